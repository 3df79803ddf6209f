#!/bin/sh
# Boots the test guest (scripts/qemu-guest/build.sh) under QEMU against a
# vhost-user socket iotlbd serves:
#   run.sh [--print] [--server] SOCKET [strict|lazy|off] [extra QEMU arguments...]
# or, instead of SOCKET, tap:IFNAME: QEMU's own virtio-net back-end on the TAP
#   interface IFNAME (-netdev tap, vnet_hdr=on, no vhost; the same guest and NIC
#   otherwise). The TAP must exist where QEMU runs (its network namespace: start
#   run.sh with `ip netns exec NS`); a multi_queue TAP needs QG_QUEUES=2 or more.
# --print: only print the command line, one option a line (as in the README).
# --server: QEMU listens on SOCKET (server=on,wait=off) and the device is in
#   client mode ("vhost_user": {"socket": .., "mode": "client"}): QEMU waits
#   for the daemon at start-up, and takes it again after it went away (a
#   restarted iotlbd connects again; the guest sees the link down meanwhile).
# strict (default): an Intel vIOMMU with device IOTLB (ATS), the NIC behind it
#   (iommu_platform=on, ats=on), the guest kernel in strict mode
#   (intel_iommu=on iommu.strict=1: one invalidation per unmap);
# lazy: the same with iommu.strict=0 (flush queue, batched invalidations);
# off: no vIOMMU; create the device with "iotlb": false.
# The guest's serial console is this script's stdout; the command line goes to
# stderr first. QG_FRAMES sets the frames the guest sends per size and phase;
# QG_MODE=continuous with QG_SECONDS=S makes it send bursts of QG_FRAMES
# frames for S seconds, printing counters every ~0.5 s (scripts/qemu-guest/init).
# QG_MODE=net with QG_APPEND="qg_ip=.. qg_peer=.. qg_mb=.." (more kernel
# command-line words; init lists them) puts the guest on an IPv4 network.
# QG_MEM sets the guest's memory (default 1G; the migration test uses less);
# QG_MAC sets the NIC's MAC (two guests on one bridge need different ones);
# QG_QUEUES=N (tap only) opens N queue pairs (a multi_queue TAP).
# This is the one place the QEMU command line lives (README "Use with QEMU",
# integration/test_qemu.py). Why each part:
#   TCG (not KVM): /dev/kvm here is nested and a Debian kernel does not boot on it;
#   memfd share=on: the backend maps guest memory;
#   pcie-root-port: ATS is only offered off the root bus;
#   vectors=0 (INTx): QEMU 7.2 + TCG + vhost-user segfaults unmasking MSI-X vectors.
set -eu
PRINT=; [ "${1:-}" = --print ] && { PRINT=1; shift; }
SERVER=; [ "${1:-}" = --server ] && { SERVER=",server=on,wait=off"; shift; }
[ $# -ge 1 ] || { echo "usage: $0 [--print] [--server] SOCKET [strict|lazy|off] [QEMU args...]" >&2; exit 2; }
SOCK=$1; shift
MODE=${1:-strict}; [ $# -ge 1 ] && shift
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${QEMU_GUEST_CACHE:-$(cd "$HERE/../.." && pwd)/.cache/qemu-guest}
QEMU=${QEMU:-qemu-system-x86_64}
APPEND="console=ttyS0 panic=-1 ipv6.disable=1 qg_frames=${QG_FRAMES:-2000}"
[ -n "${QG_MODE:-}" ] && APPEND="$APPEND qg_mode=$QG_MODE"
[ -n "${QG_SECONDS:-}" ] && APPEND="$APPEND qg_seconds=$QG_SECONDS"
[ -n "${QG_APPEND:-}" ] && APPEND="$APPEND $QG_APPEND"
case "$MODE" in
    strict) IOMMU="-device intel-iommu,intremap=on,device-iotlb=on"; NIC=",iommu_platform=on,ats=on"
            APPEND="$APPEND intel_iommu=on iommu.strict=1" ;;
    lazy)   IOMMU="-device intel-iommu,intremap=on,device-iotlb=on"; NIC=",iommu_platform=on,ats=on"
            APPEND="$APPEND intel_iommu=on iommu.strict=0" ;;
    off)    IOMMU=""; NIC="" ;;
    *) echo "$0: mode is strict, lazy or off, not $MODE" >&2; exit 2 ;;
esac
# QG_PACKED=1: packed virtqueues (VIRTIO_F_RING_PACKED) instead of split ones.
[ -n "${QG_PACKED:-}" ] && NIC="$NIC,packed=on"
[ -n "${QG_MAC:-}" ] && NIC="$NIC,mac=$QG_MAC"
NETDEV=
case "$SOCK" in
    tap:*)  [ -z "$SERVER" ] || { echo "$0: --server is for vhost-user sockets" >&2; exit 2; }
            NETDEV="tap,id=n0,ifname=${SOCK#tap:},script=no,downscript=no,vnet_hdr=on"
            if [ "${QG_QUEUES:-1}" -gt 1 ]; then NETDEV="$NETDEV,queues=$QG_QUEUES"; NIC="$NIC,mq=on"; fi ;;
esac
MEM=${QG_MEM:-1G}
set -- "$QEMU" -accel tcg,thread=multi -cpu max -machine q35 -smp 1 -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on -numa node,memdev=mem \
    $IOMMU @NETDEV@ \
    -device pcie-root-port,id=rp0,bus=pcie.0,chassis=1 \
    -device "virtio-net-pci,bus=rp0,netdev=n0,disable-legacy=on,vectors=0$NIC" \
    -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initramfs.gz" -append "$APPEND" \
    -nodefaults -display none -serial stdio -no-reboot "$@"
# @NETDEV@: the vhost-user socket's chardev and netdev, or the TAP's netdev.
for a do
    shift
    if [ "$a" != @NETDEV@ ]; then set -- "$@" "$a"
    elif [ -n "$NETDEV" ]; then set -- "$@" -netdev "$NETDEV"
    else set -- "$@" -chardev "socket,id=c0,path=$SOCK$SERVER" -netdev vhost-user,id=n0,chardev=c0
    fi
done
# The command, shell-quoted, a line per option.
show() {
    first=1
    for a in "$@"; do
        case "$a" in *[!A-Za-z0-9_.,:=/@%+-]*) a="'$a'" ;; esac
        if [ -n "$first" ]; then printf '%s' "$a"; first=
        else case "$a" in -*) printf ' \\\n    %s' "$a" ;; *) printf ' %s' "$a" ;; esac
        fi
    done
    printf '\n'
}
if [ -n "$PRINT" ]; then show "$@"; exit 0; fi
show "$@" >&2
exec "$@"
