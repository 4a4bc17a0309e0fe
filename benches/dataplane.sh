#!/usr/bin/env bash
# guest-agent data plane: iperf3 through the nftables HoA/MoA translation vs untranslated, same namespaces, same run.
# Writes bench-results/dataplane.json and prints a table. Needs root and
# iperf3. Extra args go to the bench (e.g. --secs 2 --rounds 1).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "dataplane bench: needs root (network namespaces)" >&2; exit 1; }
cargo build --release -p guest-agent -p ims-server --bins
cargo build --release -p mat6-tests --example agent_bench
mkdir -p bench-results
exec ./target/release/examples/agent_bench dataplane --out bench-results/dataplane.json "$@"
