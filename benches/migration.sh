#!/usr/bin/env bash
# Live-migration downtime (T_DW, T_ALL) vs guest memory: lan / prep / noprep.
# Usage: ./bench.sh migration [--quick] [--mem 128,256] [--runs N] [--modes lan,prep,noprep]
# Writes bench-results/migration.json and bench-results/migration.svg; prints
# a table laid out like seed paper 004's Table 2. Needs root (netns, QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "migration bench: needs root" >&2; exit 1; }
# Two builds: a --bin filter would apply to every -p and skip the daemons.
cargo build --release -p ims-server -p guest-agent -p host-prep >&2
cargo build --release -p mat6-tests --bin migration-bench --bin mat6-probe >&2
images/build.sh >/dev/null
# Run private copies: a rebuild of target/ during the (long) run must not
# swap binaries under it.
BIN="$(mktemp -d /tmp/m6e-bench-bin.XXXXXX)"
trap 'rm -rf "$BIN"' EXIT
cp target/release/{ims-server,guest-agent,host-prep,migration-bench,mat6-probe} "$BIN/"
mkdir -p bench-results
"$BIN/migration-bench" --out bench-results/migration.json --chart bench-results/migration.svg "$@"
