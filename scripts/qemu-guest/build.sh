#!/bin/sh
# Builds the QEMU test guest: Debian's own kernel (linux-image-<version>-amd64,
# the version the linux-image-amd64 metapackage points at) and a busybox
# initramfs holding scripts/qemu-guest/init, the modules it loads
# (virtio_pci, virtio_net, pktgen and what they depend on) and /qg-data, the
# block its TCP test stream is made of (qgdata.py; qg_mode=net needs no other
# module: TSO, checksum offload and mergeable buffers are virtio_net's own).
#
# Idempotent: everything is cached in $QEMU_GUEST_CACHE (default
# .cache/qemu-guest/ in the repository, gitignored); a second run only checks.
# Leaves the guest in $CACHE/vmlinuz and $CACHE/initramfs.gz (run.sh boots them).
# Needs apt-get, dpkg-deb, busybox-static, cpio, gzip, kmod's modinfo and python3.
set -eu
PATH=$PATH:/usr/sbin:/sbin  # modinfo

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${QEMU_GUEST_CACHE:-$ROOT/.cache/qemu-guest}
MODULES="virtio_pci virtio_net pktgen"
mkdir -p "$CACHE"

need() { command -v "$1" >/dev/null 2>&1 || { echo "build.sh: $1 is missing ($2)" >&2; exit 1; }; }
need apt-get "Debian's apt"
need dpkg-deb "Debian's dpkg"
need cpio "apt-get install cpio"
need gzip "apt-get install gzip"
need modinfo "apt-get install kmod"
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && "$BUSYBOX" --help 2>&1 | head -1 | grep -q BusyBox || { echo "build.sh: $BUSYBOX is missing (apt-get install busybox-static)" >&2; exit 1; }
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "build.sh: $BUSYBOX is dynamically linked; the initramfs needs busybox-static" >&2; exit 1
fi
# The applets init uses (qg_mode=net: ip, ping, nc, sha256sum, mkfifo, awk).
for a in ip ping nc sha256sum mkfifo awk od insmod rmmod; do
    "$BUSYBOX" --list | grep -qx "$a" || { echo "build.sh: $BUSYBOX has no $a applet" >&2; exit 1; }
done
need python3 "apt-get install python3 (qgdata.py makes the TCP test data)"

# 1. Which kernel: the package linux-image-amd64 depends on (cached once found).
if [ -s "$CACHE/kernel-package" ]; then
    PKG=$(cat "$CACHE/kernel-package")
else
    resolve() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1; }
    PKG=$(resolve)
    if [ -z "$PKG" ]; then
        apt-get update -qq
        PKG=$(resolve)
    fi
    [ -n "$PKG" ] || { echo "build.sh: cannot resolve linux-image-amd64 to a kernel package" >&2; exit 1; }
    echo "$PKG" > "$CACHE/kernel-package"
fi
KVER=${PKG#linux-image-}

# 2. Fetch and unpack it.
if [ ! -f "$CACHE/kernel/boot/vmlinuz-$KVER" ]; then
    mkdir -p "$CACHE/deb"
    if ! ls "$CACHE/deb/${PKG}_"*.deb >/dev/null 2>&1; then
        echo "build.sh: downloading $PKG"
        # apt-get download writes into the current directory.
        (cd "$CACHE/deb" && apt-get download -q "$PKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
        ls "$CACHE/deb/${PKG}_"*.deb >/dev/null 2>&1 || { echo "build.sh: apt-get download $PKG failed" >&2; exit 1; }
    fi
    echo "build.sh: unpacking $PKG"
    rm -rf "$CACHE/kernel.tmp"
    dpkg-deb -x "$CACHE/deb/${PKG}_"*.deb "$CACHE/kernel.tmp"
    rm -rf "$CACHE/kernel"
    mv "$CACHE/kernel.tmp" "$CACHE/kernel"
fi
MODDIR="$CACHE/kernel/lib/modules/$KVER"
cp -f "$CACHE/kernel/boot/vmlinuz-$KVER" "$CACHE/vmlinuz.tmp" && mv -f "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"

# 3. The modules, dependencies first (modinfo -F depends, followed recursively).
modpath() {
    p=$(find "$MODDIR/kernel" -name "$1.ko*" -o -name "$(echo "$1" | tr _ -).ko*" | head -1)
    [ -n "$p" ] || { echo "build.sh: module $1 is not in $PKG (built in?)" >&2; return 1; }
    echo "$p"
}
ORDER=""
add() {  # add NAME: its dependencies, then itself, once each
    case " $ORDER " in *" $1 "*) return 0 ;; esac
    p=$(modpath "$1") || exit 1
    for d in $(modinfo -F depends "$p" | tr , ' '); do add "$d"; done
    ORDER="$ORDER $1"
}
for m in $MODULES; do add "$m"; done

# 4. The initramfs, rebuilt only when its inputs changed.
STAMP=$( { echo "$PKG$ORDER"; cat "$HERE/init" "$0" "$HERE/qgdata.py"; } | sha256sum | cut -c1-16)
if [ -f "$CACHE/initramfs.gz" ] && [ "$(cat "$CACHE/initramfs.stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "build.sh: cached: $PKG, modules:$ORDER"
else
    STAGE="$CACHE/initramfs.d"
    rm -rf "$STAGE"
    mkdir -p "$STAGE/bin" "$STAGE/dev" "$STAGE/proc" "$STAGE/sys" "$STAGE/lib/modules"
    cp "$BUSYBOX" "$STAGE/bin/busybox"
    ln -s busybox "$STAGE/bin/sh"
    cp "$HERE/init" "$STAGE/init"
    chmod 755 "$STAGE/init"
    # qg_mode=net's TCP stream is built from this block (qgdata.py says how).
    python3 "$HERE/qgdata.py" --block "$STAGE/qg-data"
    : > "$STAGE/lib/modules/order"
    for m in $ORDER; do
        p=$(modpath "$m")
        case "$p" in
            *.ko) cp "$p" "$STAGE/lib/modules/$m.ko" ;;
            *.ko.xz) xz -dc "$p" > "$STAGE/lib/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$p" > "$STAGE/lib/modules/$m.ko" ;;
            *.ko.gz) gzip -dc "$p" > "$STAGE/lib/modules/$m.ko" ;;
        esac
        echo "$m" >> "$STAGE/lib/modules/order"
    done
    (cd "$STAGE" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -6 > "$CACHE/initramfs.gz.tmp"
    mv -f "$CACHE/initramfs.gz.tmp" "$CACHE/initramfs.gz"
    echo "$STAMP" > "$CACHE/initramfs.stamp"
    echo "build.sh: built $CACHE/initramfs.gz: $PKG, modules:$ORDER"
fi
