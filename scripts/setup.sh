#!/usr/bin/env bash
# Installs everything mat6's demo, tests and benchmarks need on a fresh
# Debian 12 machine (run as root). Idempotent: packages already present are
# not fetched again. The guest kernel is fetched by images/build.sh.
set -euo pipefail

PACKAGES=(
  # build
  build-essential pkg-config ca-certificates
  # testbed: namespaces, bridges, routers, traffic, captures
  iproute2 nftables radvd ndisc6 iperf3 tcpdump socat iputils-ping procps psmisc
  # QEMU live migration and the guest image
  qemu-system-x86 busybox-static cpio kmod dpkg-dev binutils
  # operator docs: making TLS certificates
  openssl
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "setup: cargo not found (install Rust with rustup)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
echo "setup: ok ($(cargo --version))"
