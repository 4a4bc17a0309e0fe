#!/usr/bin/env bash
# ./bench.sh NAME [ARGS...] runs benchmark NAME (benches/NAME.sh), prints its
# table and writes bench-results/NAME.json. ./bench.sh with no name lists them.
# Runs scripts/setup.sh first (Debian packages), like ./demo.sh and ./test.sh.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH"
if [ $# -lt 1 ]; then
  echo "usage: ./bench.sh NAME [ARGS...]"
  echo "benchmarks:"; for f in benches/*.sh; do n=$(basename "$f" .sh); echo "  $n  $(sed -n 2p "$f" | sed 's/^# *//')"; done
  exit 2
fi
name=$1; shift
script="benches/$name.sh"
[ -f "$script" ] || { echo "bench.sh: no benchmark named '$name' (no $script)" >&2; exit 2; }
# Same set-up as ./demo.sh and ./test.sh: a fresh machine lacks nft, iperf3, qemu ...
scripts/setup.sh
mkdir -p bench-results
exec bash "$script" "$@"
