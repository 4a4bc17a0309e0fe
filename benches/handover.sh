#!/usr/bin/env bash
# guest-agent handover: standby switch and unplanned move latency (>= 20 moves each), agent RSS with 1,000 peer bindings.
# Writes bench-results/handover.json and prints a table. Needs root (network
# namespaces). Extra args go to the bench (e.g. --moves 5 --peers 100).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "handover bench: needs root (network namespaces)" >&2; exit 1; }
cargo build --release -p guest-agent -p ims-server --bins
cargo build --release -p mat6-tests --example agent_bench
mkdir -p bench-results
exec ./target/release/examples/agent_bench handover --out bench-results/handover.json "$@"
