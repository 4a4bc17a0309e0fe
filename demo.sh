#!/usr/bin/env bash
# mat6 demo: live-migrate a running VM from IPv6 site A to IPv6 site B while
# pinging it, and compare with an ordinary same-LAN migration.
#
# Installs what it needs (scripts/setup.sh), builds mat6 (release), makes the
# guest image (images/build.sh), builds the two-site testbed in network
# namespaces (routers with radvd, the IMS, a correspondent running
# guest-agent), boots the VM under QEMU (TCG) with guest-agent inside, and
# migrates it three ways:
#   lan     same bridge, no mat6 (the floor any migration pays)
#   prep    site A -> site B with `host-prep migrate` (prepared standby NIC)
#   noprep  site A -> site B without preparation
# while pinging every 10 ms both ways between the HoAs and streaming UDP and
# TCP. Prints the T_DW / T_ALL table (seed paper 004's Table 2 layout, with
# the paper's figures beside ours) and where the chart is.
#
# Usage: ./demo.sh [--mem MIB] [--runs N]     (root; about 5 minutes)
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (network namespaces, nftables, QEMU)" >&2; exit 1; }

MEM=256
RUNS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --mem) MEM="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "demo.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

step() { printf '\n==> %s\n' "$*"; }

step "set-up (Debian packages)"
scripts/setup.sh

step "build (release)"
# Two builds: a --bin filter would apply to every -p and skip the daemons.
cargo build --release -p ims-server -p guest-agent -p host-prep
cargo build --release -p mat6-tests --bin migration-bench --bin mat6-probe

step "guest image (Debian cloud kernel + busybox initramfs + guest-agent .deb)"
images/build.sh

step "two-site testbed, VM boot, migrations (lan, prep, noprep) at ${MEM} MiB"
mkdir -p bench-results
target/release/migration-bench --mem "$MEM" --runs "$RUNS" --modes lan,prep,noprep \
    --out bench-results/demo-migration.json --chart bench-results/demo-migration.svg

step "done"
echo "table above; JSON: bench-results/demo-migration.json; chart: bench-results/demo-migration.svg"
echo "full benchmark (128-1024 MiB x 3 modes x 3 runs): ./bench.sh migration"
