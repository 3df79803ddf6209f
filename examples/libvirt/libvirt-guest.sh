#!/bin/sh
# The test guest under libvirt on iotlbd vhost-user devices (README "Use with
# libvirt"; integration/test_libvirt.py runs this script):
#   libvirt-guest.sh up client|server   device vm1 (curl), domain iotlbd-guest on its loopback port
#   libvirt-guest.sh up tap             device vm1 on the TAP tap0, domain iotlbd-guest in qg_mode=net
#   libvirt-guest.sh up peer            devices vm2 and vm3 wired guest to guest, domains iotlbd-vm2 and iotlbd-vm3
#   libvirt-guest.sh down               destroys and undefines the domains, deletes the devices (whichever exist)
# client: iotlbd-guest-client.xml, <source mode='client'>: QEMU connects to the
#   socket iotlbd serves (a server-mode device).
# server: iotlbd-guest-server.xml, <source mode='server'>: QEMU listens in
#   $VHOST_USER_DIR/libvirt/ (made here, writable by the libvirt-qemu group)
#   and the device connects to it (a client-mode device).
# tap: iotlbd-guest-tap.xml, iotlbd-guest-client.xml with the guest in
#   qg_mode=net: the device's port is tap0, which must exist (the operator's,
#   up, 10.77.0.1/24) in the network namespace iotlbd runs in (or iotlbd runs
#   with --tap-create and the operator sets up the TAP it made). The guest
#   pings 10.77.0.1, sends a 1 MiB TCP stream to 10.77.0.1:5001 (something
#   must listen there) and powers off.
# peer: iotlbd-vm2.xml and iotlbd-vm3.xml on devices vm2 and vm3, each the
#   other's peer: the guests ping each other, exchange 1 MiB TCP streams and
#   power off.
# The port is the device's (the JSON posted below), never the domain XML's.
# iotlbd must run as root with --vhost-user-group libvirt-qemu (QEMU runs as
# libvirt-qemu and must be able to open the sockets iotlbd creates).
# The guest is scripts/qemu-guest/build.sh's: its kernel and initramfs are
# copied to $BOOT_DIR. The serial console of domain D (the "QG" lines) goes to
# $CONSOLE_DIR/D-console.log, QEMU's own messages to /var/log/libvirt/qemu/D.log.
#
# Environment; the defaults are the paths written in the XML files, which are
# rewritten on the way to `virsh define` when these are changed:
#   IOTLBD=http://localhost:8080             iotlbd's API
#   IOTLBD_SOCKET=                           or its Unix socket (iotlbd --listen unix:PATH;
#                                            then IOTLBD defaults to http://localhost)
#   VHOST_USER_DIR=/run/iotlbd               iotlbd's --vhost-user-dir
#   BOOT_DIR=/var/lib/libvirt/boot/iotlbd-guest
#   CONSOLE_DIR=/var/log/libvirt/qemu
#   QEMU_GUEST_CACHE=<repository>/.cache/qemu-guest   build.sh's output
#   VIRSH="virsh -c qemu:///system"
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
IOTLBD_SOCKET=${IOTLBD_SOCKET:-}
if [ -n "$IOTLBD_SOCKET" ]; then IOTLBD=${IOTLBD:-http://localhost}; else IOTLBD=${IOTLBD:-http://localhost:8080}; fi
VHOST_USER_DIR=${VHOST_USER_DIR:-/run/iotlbd}
BOOT_DIR=${BOOT_DIR:-/var/lib/libvirt/boot/iotlbd-guest}
CONSOLE_DIR=${CONSOLE_DIR:-/var/log/libvirt/qemu}
QEMU_GUEST_CACHE=${QEMU_GUEST_CACHE:-$(cd "$HERE/../.." && pwd)/.cache/qemu-guest}
VIRSH=${VIRSH:-virsh -c qemu:///system}
DOMAINS="iotlbd-guest iotlbd-vm2 iotlbd-vm3"
DEVICES="vm1 vm2 vm3"

usage() { echo "usage: $0 up client|server|tap|peer | down" >&2; exit 2; }

# api [curl arguments...] PATH: iotlbd's API over TCP or its Unix socket.
api() {
    path=$1; shift
    if [ -n "$IOTLBD_SOCKET" ]; then curl -sS --unix-socket "$IOTLBD_SOCKET" "$@" "$IOTLBD$path"
    else curl -sS "$@" "$IOTLBD$path"; fi
}

create() {  # DEVICE-JSON
    api /v1/devices --fail-with-body -o /dev/null -XPOST -d "$1"
}

# define FILE: the domain file with this script's paths, defined.
define() {
    xml=$(mktemp)
    sed -e "s|/run/iotlbd/|$VHOST_USER_DIR/|" \
        -e "s|/var/lib/libvirt/boot/iotlbd-guest/|$BOOT_DIR/|" \
        -e "s|/var/log/libvirt/qemu/\([a-z0-9-]*-console\.log\)|$CONSOLE_DIR/\1|" \
        "$HERE/$1" > "$xml"
    $VIRSH define "$xml" || { rm -f "$xml"; return 1; }
    rm -f "$xml"
}

up() {
    case "$1" in client|server|tap|peer) ;; *) usage ;; esac
    for f in vmlinuz initramfs.gz; do
        [ -f "$QEMU_GUEST_CACHE/$f" ] || { echo "$0: no $QEMU_GUEST_CACHE/$f: run scripts/qemu-guest/build.sh" >&2; exit 1; }
    done
    install -d -m 0755 "$BOOT_DIR"
    install -m 0644 "$QEMU_GUEST_CACHE/vmlinuz" "$QEMU_GUEST_CACHE/initramfs.gz" "$BOOT_DIR/"
    case "$1" in
        client) create '{"id":"vm1","iotlb":true,"vhost_user":{"socket":"vm1.sock"}}'
                define iotlbd-guest-client.xml; domains=iotlbd-guest ;;
        server) install -d -m 0770 -g libvirt-qemu "$VHOST_USER_DIR/libvirt"
                create '{"id":"vm1","iotlb":true,"vhost_user":{"socket":"libvirt/vm1.sock","mode":"client"}}'
                define iotlbd-guest-server.xml; domains=iotlbd-guest ;;
        tap)    create '{"id":"vm1","iotlb":true,"port":{"type":"tap","name":"tap0"},"vhost_user":{"socket":"vm1.sock"}}'
                define iotlbd-guest-tap.xml; domains=iotlbd-guest ;;
        peer)   # The wire is up once both devices exist.
                create '{"id":"vm2","iotlb":true,"port":{"type":"peer","device":"vm3"},"vhost_user":{"socket":"vm2.sock"}}'
                create '{"id":"vm3","iotlb":true,"port":{"type":"peer","device":"vm2"},"vhost_user":{"socket":"vm3.sock"}}'
                define iotlbd-vm2.xml; define iotlbd-vm3.xml; domains="iotlbd-vm2 iotlbd-vm3" ;;
    esac
    # mode='server': returns once iotlbd has connected to QEMU's socket.
    for d in $domains; do $VIRSH start "$d"; done
}

down() {
    # Each step only when there is something to undo: `down` also cleans up
    # after a failed `up`.
    for d in $DOMAINS; do
        if $VIRSH domstate "$d" >/dev/null 2>&1; then
            [ "$($VIRSH domstate "$d")" = "shut off" ] || $VIRSH destroy "$d"
            $VIRSH undefine "$d"
        fi
    done
    for dev in $DEVICES; do
        if [ "$(api "/v1/devices/$dev" -o /dev/null -w '%{http_code}')" = 200 ]; then
            api "/v1/devices/$dev" --fail-with-body -XDELETE
        fi
    done
}

case "${1:-}" in
    up) [ $# -eq 2 ] || usage; up "$2" ;;
    down) [ $# -eq 1 ] || usage; down ;;
    *) usage ;;
esac
