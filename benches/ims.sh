#!/usr/bin/env bash
# IMS benchmark: durable updates/s (1/8/64 clients), update latency at
# 1,000 updates/s offered, lookups/s, server RSS with 1,000,000 bindings.
# Writes bench-results/ims.json and prints a table. Extra args go to ims-bench
# (e.g. --secs 2 --rss-bindings 100000 for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ims-server --bins
mkdir -p bench-results
exec ./target/release/ims-bench --out bench-results/ims.json "$@"
