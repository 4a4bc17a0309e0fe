#!/usr/bin/env bash
# Build the mat6 guest image: Debian's cloud kernel + a busybox initramfs with
# the kernel modules the guest needs, guest-agent, nft, iputils ping, iproute2
# and the mat6-probe traffic tool.
#
#   images/build.sh            # idempotent; results cached under images/out/
#   MAT6_REBUILD=1 images/build.sh   # force the initramfs to be rebuilt
#   MAT6_IMAGE_OUT=/tmp/img images/build.sh   # build elsewhere (tests: MAT6_IMAGE_DIR)
#   MAT6_REQUIRE_AGENT=1 images/build.sh  # fail if guest-agent does not build
#
# guest-agent goes in from its Debian package (images/build-debs.sh), which
# proves the package installs and runs.
#
# Outputs (paths printed at the end):
#   images/out/vmlinuz          the guest kernel
#   images/out/initramfs.gz     the base initramfs (newc cpio, gzip)
#   images/out/image.env        KERNEL=, INITRD=, KVER=, AGENT= (sourced by scripts)
#
# A test appends a small per-VM cpio (the kernel accepts concatenated
# archives) carrying /etc/mat6/vm.conf and, for the agent, its config and key.
# See images/README.md for the guest contract.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
OUT="${MAT6_IMAGE_OUT:-$HERE/out}"
mkdir -p "$OUT/dl"

log() { printf '[images] %s\n' "$*" >&2; }

for tool in apt-get apt-cache dpkg-deb depmod cpio gzip ldd; do
    command -v "$tool" >/dev/null || { log "missing tool: $tool"; exit 1; }
done
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 \
    || { log "need a static busybox: apt-get install busybox-static"; exit 1; }

# ---------------------------------------------------------------- kernel
META=linux-image-cloud-amd64
resolve_kernel() { apt-cache depends "$META" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
KPKG="${MAT6_KERNEL_PKG:-$(resolve_kernel)}"
if [ -z "$KPKG" ]; then
    log "$META unknown to apt: running apt-get update"
    apt-get update -qq >&2 || true
    KPKG="$(resolve_kernel)"
fi
[ -n "$KPKG" ] || { log "cannot resolve $META (apt sources?)"; exit 1; }
KVER="${KPKG#linux-image-}"
KROOT="$OUT/kernel-$KVER"
if [ ! -f "$KROOT/.done" ]; then
    log "downloading $KPKG"
    (cd "$OUT/dl" && apt-get download "$KPKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    DEB="$(ls -t "$OUT/dl/${KPKG}"_*.deb 2>/dev/null | head -1)"
    [ -n "$DEB" ] || { log "apt-get download $KPKG failed"; exit 1; }
    rm -rf "$KROOT"
    mkdir -p "$KROOT"
    dpkg-deb -x "$DEB" "$KROOT"
    depmod -b "$KROOT" "$KVER"
    touch "$KROOT/.done"
fi
MODDIR="$KROOT/lib/modules/$KVER"
cp -f "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

# ---------------------------------------------------------------- binaries
AGENT_BIN=""
if [ "${MAT6_SKIP_CARGO:-0}" != 1 ]; then
    log "cargo build --release (mat6-probe; guest-agent with ims-server and host-prep)"
    (cd "$ROOT" && cargo build --release -p mat6-tests --bin mat6-probe) >&2
    # The same package set as build-debs.sh and test.sh: building
    # guest-agent alone unifies features differently and rebuilds the
    # crates they share.
    if (cd "$ROOT" && cargo build --release -p guest-agent -p ims-server -p host-prep) >&2; then
        AGENT_BIN="$ROOT/target/release/guest-agent"
    elif [ "${MAT6_REQUIRE_AGENT:-0}" = 1 ]; then
        log "guest-agent does not build and MAT6_REQUIRE_AGENT=1"; exit 1
    else
        log "WARNING: guest-agent binary not available; image built without it"
    fi
else
    [ -x "$ROOT/target/release/guest-agent" ] && AGENT_BIN="$ROOT/target/release/guest-agent"
fi
PROBE_BIN="$ROOT/target/release/mat6-probe"
[ -x "$PROBE_BIN" ] || { log "missing $PROBE_BIN"; exit 1; }

# Modules, in load order (dependencies first), resolved with modules.dep.
WANT_MODS=(
    virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    failover net_failover virtio_net virtio_console
    nfnetlink nf_tables nf_defrag_ipv6 nf_defrag_ipv4 nf_conntrack nft_ct
    nf_reject_ipv6 nf_reject_ipv4 nft_reject nft_reject_inet nft_reject_ipv6
    nft_fib nft_fib_ipv6 nft_fib_inet nft_limit nft_quota nft_hash nft_numgen
    nf_nat nft_nat nft_chain_nat nft_log nf_log_syslog
    nf_dup_ipv6 nft_dup_ipv6
)

# Fingerprint of everything that goes into the initramfs.
fp_inputs() {
    printf '%s\n' "$KVER" "${WANT_MODS[*]}"
    sha256sum "$HERE/build.sh" "$HERE/guest/init" "$HERE/guest/gapstat" "$PROBE_BIN" \
        /usr/sbin/nft /usr/bin/ping /usr/sbin/ip /bin/busybox "$HERE/build-debs.sh" \
        "$HERE/debian/guest-agent/guest-agent.toml" "$HERE/debian/guest-agent/guest-agent.service"
    [ -n "$AGENT_BIN" ] && sha256sum "$AGENT_BIN"
    true
}
FP="$(fp_inputs | sha256sum | cut -c1-16)"
if [ "${MAT6_REBUILD:-0}" != 1 ] && [ -f "$OUT/initramfs.gz" ] && [ "$(cat "$OUT/initramfs.fp" 2>/dev/null)" = "$FP" ]; then
    log "initramfs up to date ($FP)"
else
    STAGE="$OUT/stage"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc/mat6,proc,sys,dev,run,tmp,var/log,root}
    ln -s ../lib "$STAGE/usr/lib"

    cp /bin/busybox "$STAGE/bin/busybox"
    for app in $(/bin/busybox --list); do
        [ "$app" = busybox ] && continue
        [ -e "$STAGE/bin/$app" ] || ln -s busybox "$STAGE/bin/$app"
    done
    # modprobe/insmod where the kernel looks for them (module autoload).
    ln -sf ../bin/busybox "$STAGE/sbin/modprobe"

    # Dynamically linked tools with their libraries (ldd).
    copy_with_libs() {
        local src="$1" dst="$2"
        [ "$src" -ef "$STAGE/$dst" ] || cp -L "$src" "$STAGE/$dst"
        ldd "$src" | awk '/=>/ {print $3} $1 ~ /^\/lib64\// {print $1}' | while read -r lib; do
            [ -f "$lib" ] || continue
            mkdir -p "$STAGE$(dirname "$lib")"
            cp -Ln "$lib" "$STAGE$lib" 2>/dev/null || true
        done
    }
    copy_with_libs /usr/sbin/nft usr/sbin/nft
    copy_with_libs /usr/bin/ping usr/bin/ping     # iputils: -D -i 0.01
    rm -f "$STAGE/bin/ping" "$STAGE/bin/ping6"     # iputils, not busybox's
    ln -s ../usr/bin/ping "$STAGE/bin/ping"
    copy_with_libs /usr/sbin/ip usr/sbin/ip       # iproute2: nodad, metrics
    rm -f "$STAGE/bin/ip"
    ln -s ../usr/sbin/ip "$STAGE/bin/ip"
    copy_with_libs "$PROBE_BIN" usr/bin/mat6-probe
    if [ -n "$AGENT_BIN" ]; then
        # Install the agent the normal way: from its Debian package (binary,
        # unit, sample config), plus the shared libraries it links.
        AGENT_DEB="$(MAT6_SKIP_CARGO=1 "$HERE/build-debs.sh" guest-agent | tail -1)"
        dpkg-deb -x "$AGENT_DEB" "$STAGE"
        echo "$(basename "$AGENT_DEB")" >"$STAGE/etc/mat6/agent-package"
        copy_with_libs "$STAGE/usr/bin/guest-agent" usr/bin/guest-agent
    fi
    strip "$STAGE/usr/bin/mat6-probe" 2>/dev/null || true
    # libnftables loads nothing at run time, but nft wants these for names.
    mkdir -p "$STAGE/etc/iproute2"
    [ -f /etc/protocols ] && cp /etc/protocols "$STAGE/etc/"
    [ -f /etc/services ] && cp /etc/services "$STAGE/etc/"
    # nft -i (the agent's long-lived nft session) uses libedit, which wants
    # a terminfo entry.
    mkdir -p "$STAGE/lib/terminfo/d"
    cp /lib/terminfo/d/dumb "$STAGE/lib/terminfo/d/" 2>/dev/null || true
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$STAGE/etc/passwd"
    printf 'root:x:0:\n' >"$STAGE/etc/group"

    # Kernel modules with their dependencies, and a load-order list.
    : >"$STAGE/etc/mat6/modules"
    declare -A SEEN=()
    add_mod() {
        local name="$1" rel line dep
        rel="$(awk -F: -v n="$name" '{ f=$1; sub(/.*\//, "", f); sub(/\.ko(\.[a-z]+)?$/, "", f); gsub(/-/, "_", f); if (f==n) {print $1; exit} }' "$MODDIR/modules.dep")"
        if [ -z "$rel" ]; then
            # Built into the kernel (or absent): nothing to load.
            grep -q "/$name.ko" "$MODDIR/modules.builtin" 2>/dev/null || log "note: module $name not found (built in?)"
            return 0
        fi
        [ -n "${SEEN[$rel]:-}" ] && return 0
        SEEN[$rel]=1
        line="$(grep "^$rel:" "$MODDIR/modules.dep" | cut -d: -f2)"
        # modules.dep lists dependencies nearest first; load the deepest first.
        for dep in $(echo $line | tr ' ' '\n' | tac); do
            dep="${dep##*/}"; dep="${dep%%.ko*}"; dep="${dep//-/_}"
            add_mod "$dep"
        done
        mkdir -p "$STAGE/lib/modules/$KVER/$(dirname "$rel")"
        cp "$MODDIR/$rel" "$STAGE/lib/modules/$KVER/$rel"
        echo "$rel" >>"$STAGE/etc/mat6/modules"
    }
    for m in "${WANT_MODS[@]}"; do add_mod "$m"; done
    cp "$MODDIR"/modules.{order,builtin} "$STAGE/lib/modules/$KVER/" 2>/dev/null || true
    depmod -b "$STAGE" "$KVER"

    install -m 0755 "$HERE/guest/init" "$STAGE/init"
    install -m 0755 "$HERE/guest/gapstat" "$STAGE/usr/bin/gapstat"
    echo "$KVER" >"$STAGE/etc/mat6/kernel-version"
    [ -n "$AGENT_BIN" ] && echo yes >"$STAGE/etc/mat6/has-agent"

    (cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner 0:0 --quiet --reproducible 2>/dev/null \
        || find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner 0:0 --quiet) | gzip -n -6 >"$OUT/initramfs.gz.tmp"
    mv "$OUT/initramfs.gz.tmp" "$OUT/initramfs.gz"
    echo "$FP" >"$OUT/initramfs.fp"
    log "initramfs: $(du -h "$OUT/initramfs.gz" | cut -f1), $(wc -l <"$STAGE/etc/mat6/modules") modules"
fi

cat >"$OUT/image.env" <<EOF
KERNEL=$OUT/vmlinuz
INITRD=$OUT/initramfs.gz
KVER=$KVER
AGENT=$([ -n "$AGENT_BIN" ] && echo yes || echo no)
EOF
log "kernel:    $OUT/vmlinuz ($KVER)"
log "initramfs: $OUT/initramfs.gz"
echo "$OUT/image.env"
