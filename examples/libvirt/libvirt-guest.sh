#!/bin/sh
# The test guest under libvirt on an iotlbd vhost-user device (README "Use
# with libvirt"; tests/test_libvirt.py runs this script):
#   libvirt-guest.sh up client|server   create device vm1 (curl), define and start domain iotlbd-guest
#   libvirt-guest.sh down               destroy and undefine the domain, delete the device
# client: iotlbd-guest-client.xml, <source mode='client'>: QEMU connects to the
#   socket iotlbd serves (a server-mode device).
# server: iotlbd-guest-server.xml, <source mode='server'>: QEMU listens in
#   $VHOST_USER_DIR/libvirt/ (made here, writable by the libvirt-qemu group)
#   and the device connects to it (a client-mode device).
# iotlbd must run as root with --vhost-user-group libvirt-qemu (QEMU runs as
# libvirt-qemu and must be able to open the sockets iotlbd creates).
# The guest is scripts/qemu-guest/build.sh's: its kernel and initramfs are
# copied to $BOOT_DIR. Its serial console (the "QG counters" lines) goes to
# $CONSOLE, QEMU's own messages to /var/log/libvirt/qemu/iotlbd-guest.log.
#
# Environment; the defaults are the paths written in the XML files, which are
# rewritten on the way to `virsh define` when these are changed:
#   IOTLBD=http://localhost:8080             iotlbd's API
#   VHOST_USER_DIR=/run/iotlbd               iotlbd's --vhost-user-dir
#   BOOT_DIR=/var/lib/libvirt/boot/iotlbd-guest
#   CONSOLE=/var/log/libvirt/qemu/iotlbd-guest-console.log
#   QEMU_GUEST_CACHE=<repository>/.cache/qemu-guest   build.sh's output
#   VIRSH="virsh -c qemu:///system"
#
# Ports: device vm1 uses the default `loopback` port (the guest's frames come
# back to it). TAP and guest-to-guest ports: examples not written yet (room in
# examples/libvirt/README.md); the port is chosen in the device JSON below.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
IOTLBD=${IOTLBD:-http://localhost:8080}
VHOST_USER_DIR=${VHOST_USER_DIR:-/run/iotlbd}
BOOT_DIR=${BOOT_DIR:-/var/lib/libvirt/boot/iotlbd-guest}
CONSOLE=${CONSOLE:-/var/log/libvirt/qemu/iotlbd-guest-console.log}
QEMU_GUEST_CACHE=${QEMU_GUEST_CACHE:-$(cd "$HERE/../.." && pwd)/.cache/qemu-guest}
VIRSH=${VIRSH:-virsh -c qemu:///system}
DOMAIN=iotlbd-guest

usage() { echo "usage: $0 up client|server | down" >&2; exit 2; }

up() {
    case "$1" in
        client) DEVICE='{"id":"vm1","iotlb":true,"vhost_user":{"socket":"vm1.sock"}}' ;;
        server) DEVICE='{"id":"vm1","iotlb":true,"vhost_user":{"socket":"libvirt/vm1.sock","mode":"client"}}'
                install -d -m 0770 -g libvirt-qemu "$VHOST_USER_DIR/libvirt" ;;
        *) usage ;;
    esac
    for f in vmlinuz initramfs.gz; do
        [ -f "$QEMU_GUEST_CACHE/$f" ] || { echo "$0: no $QEMU_GUEST_CACHE/$f: run scripts/qemu-guest/build.sh" >&2; exit 1; }
    done
    install -d -m 0755 "$BOOT_DIR"
    install -m 0644 "$QEMU_GUEST_CACHE/vmlinuz" "$QEMU_GUEST_CACHE/initramfs.gz" "$BOOT_DIR/"
    curl -sS --fail-with-body -o /dev/null -XPOST "$IOTLBD/v1/devices" -d "$DEVICE"
    xml=$(mktemp)
    trap 'rm -f "$xml"' EXIT
    sed -e "s|/run/iotlbd/|$VHOST_USER_DIR/|" \
        -e "s|/var/lib/libvirt/boot/iotlbd-guest/|$BOOT_DIR/|" \
        -e "s|/var/log/libvirt/qemu/iotlbd-guest-console.log|$CONSOLE|" \
        "$HERE/iotlbd-guest-$1.xml" > "$xml"
    $VIRSH define "$xml"
    # mode='server': returns once iotlbd has connected to QEMU's socket.
    $VIRSH start "$DOMAIN"
}

down() {
    # Each step only when there is something to undo: `down` also cleans up
    # after a failed `up`.
    if $VIRSH domstate "$DOMAIN" >/dev/null 2>&1; then
        [ "$($VIRSH domstate "$DOMAIN")" = "shut off" ] || $VIRSH destroy "$DOMAIN"
        $VIRSH undefine "$DOMAIN"
    fi
    if [ "$(curl -sS -o /dev/null -w '%{http_code}' "$IOTLBD/v1/devices/vm1")" = 200 ]; then
        curl -sS --fail-with-body -XDELETE "$IOTLBD/v1/devices/vm1"
    fi
}

case "${1:-}" in
    up) [ $# -eq 2 ] || usage; up "$2" ;;
    down) [ $# -eq 1 ] || usage; down ;;
    *) usage ;;
esac
