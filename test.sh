#!/usr/bin/env bash
# The whole mat6 test suite, as CI runs it: set-up, format and lint gate,
# unit tests, privileged namespace tests, the QEMU end-to-end test (quick
# mode), and a build of the fuzz targets. Needs root.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" = 0 ] || { echo "test.sh: needs root (network namespaces, nftables, QEMU)" >&2; exit 1; }

step() { printf '\n==> %s\n' "$*"; }

step "set-up"
scripts/setup.sh

step "format"
cargo fmt --all --check

step "lint"
cargo clippy --workspace --all-targets -- -D warnings

step "build (release binaries for the guest image)"
cargo build --release -p guest-agent -p ims-server -p host-prep

step "guest image"
images/build.sh

step "tests (unit, loopback, network namespaces)"
cargo test --workspace --exclude mat6-tests -- --include-ignored
cargo test -p mat6-tests -- --include-ignored --skip e2e_

step "end-to-end QEMU migration (quick)"
cargo test -p mat6-tests e2e_ -- --include-ignored --test-threads=1 --nocapture

step "fuzz targets build"
cargo build --manifest-path fuzz/Cargo.toml

echo
echo "test.sh: all steps passed"
