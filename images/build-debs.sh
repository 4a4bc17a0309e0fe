#!/usr/bin/env bash
# Build Debian packages for guest-agent, ims-server and host-prep with
# dpkg-deb: release binaries, systemd units, sample configs under
# /etc/mat6/*.toml.sample (conffiles are not overwritten), docs.
#
#   images/build-debs.sh            # -> images/out/debs/*.deb
#   images/build-debs.sh guest-agent   # only the named package(s)
#   MAT6_SKIP_CARGO=1 images/build-debs.sh   # use the binaries already built
#
# Install on a host/VM: apt-get install ./images/out/debs/guest-agent_*.deb
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="$HERE/out/debs"
mkdir -p "$OUT"
log() { printf '[debs] %s\n' "$*" >&2; }

VERSION="$(awk -F'"' '/^\[workspace.package\]/{p=1} p && /^version/{print $2; exit}' "$ROOT/Cargo.toml")"
ARCH="$(dpkg --print-architecture)"
[ -n "$VERSION" ] || { log "cannot read the workspace version"; exit 1; }

PKGS=("$@")
[ ${#PKGS[@]} -gt 0 ] || PKGS=(guest-agent ims-server host-prep)
if [ "${MAT6_SKIP_CARGO:-0}" != 1 ]; then
    args=()
    for p in "${PKGS[@]}"; do args+=(-p "$p"); done
    log "cargo build --release ${args[*]}"
    (cd "$ROOT" && cargo build --release "${args[@]}") >&2
fi

# pkg NAME DESCRIPTION DEPENDS
pkg() {
    local name="$1" desc="$2" depends="$3"
    local bin="$ROOT/target/release/$name"
    [ -x "$bin" ] || { log "missing $bin"; exit 1; }
    local st="$HERE/out/debs/stage-$name"
    rm -rf "$st"
    mkdir -p "$st/DEBIAN" "$st/usr/bin" "$st/etc/mat6" "$st/usr/share/doc/$name"
    install -m 0755 "$bin" "$st/usr/bin/$name"
    strip "$st/usr/bin/$name" 2>/dev/null || true
    if [ -f "$HERE/debian/$name/$name.service" ]; then
        mkdir -p "$st/lib/systemd/system"
        install -m 0644 "$HERE/debian/$name/$name.service" "$st/lib/systemd/system/"
    fi
    install -m 0644 "$HERE/debian/$name/$name.toml" "$st/etc/mat6/$name.toml.sample"
    for doc in "$ROOT/$name/README.md"; do
        [ -f "$doc" ] && install -m 0644 "$doc" "$st/usr/share/doc/$name/"
    done
    if [ "$name" = host-prep ] && [ -f "$ROOT/host-prep/hooks/qemu" ]; then
        install -m 0755 "$ROOT/host-prep/hooks/qemu" "$st/usr/share/doc/$name/libvirt-hook-qemu"
    fi
    local size
    size="$(du -sk "$st" | cut -f1)"
    cat >"$st/DEBIAN/control" <<EOF
Package: $name
Version: $VERSION
Architecture: $ARCH
Maintainer: mat6 developers <mat6@example.invalid>
Installed-Size: $size
Depends: $depends
Section: net
Priority: optional
Homepage: https://example.invalid/mat6
Description: $desc
 mat6 lets a running VM be live-migrated to a host on a different IPv6
 network while its connections keep working (MAT: HoA/MoA translation,
 an IP address Mapping Server, pre-migration preparation).
EOF
    if [ -f "$st/lib/systemd/system/$name.service" ]; then
        cat >"$st/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    echo "$name: copy /etc/mat6/$name.toml.sample to /etc/mat6/$name.toml, edit it, then: systemctl enable --now $name"
fi
exit 0
EOF
        cat >"$st/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl stop $name.service 2>/dev/null || true
fi
exit 0
EOF
        chmod 0755 "$st/DEBIAN/postinst" "$st/DEBIAN/prerm"
    fi
    local deb="$OUT/${name}_${VERSION}_${ARCH}.deb"
    dpkg-deb --root-owner-group --build "$st" "$deb" >/dev/null
    rm -rf "$st"
    log "built $deb"
    echo "$deb"
}

for p in "${PKGS[@]}"; do
    case "$p" in
        guest-agent) pkg guest-agent "mat6 guest agent: mobility (HoA/MoA) and in-kernel translation" "nftables, libc6" ;;
        ims-server) pkg ims-server "mat6 IP address Mapping Server" "libc6" ;;
        host-prep) pkg host-prep "mat6 host preparation and QEMU live-migration orchestration" "libc6, iproute2, nftables" ;;
        *) log "unknown package $p"; exit 2 ;;
    esac
done
