#!/usr/bin/env bash
# Guest to guest (issue 20), side by side, alternated round after round: two
# DPDK virtio-user front-ends (two ports of one dpdk-testpmd, io forwarding
# between them, tx-first) wired to each other by a vhost-user back-end:
#   dpdk        DPDK's own: testpmd with two net_vhost ports, io forwarding
#               between them (its "wire" is the forwarding core);
#   off, on     iotlbd: two devices whose ports name each other (peer ports),
#               device IOTLB off / on (the identity translator answers).
# Frames go port 0 → back-end → port 1 → front-end → port 0 … in a loop: the
# figure is the front-end's Rx-pps over both ports (median of the per-second
# figures after a 2 s warm-up), with the host's phase around each run and
# medians per phase at the end (see vhost-user-side-by-side.sh). The back-end gets core 1, the front-end core 0.
# Needs root (huge pages) and Debian's dpdk-dev (installed when missing).
#   scripts/peer-side-by-side.sh [--json FILE] [ROUNDS] [SECONDS] [FRAMES] [BACKENDS]
# BACKENDS: any of "dpdk off on" (default all three).
set -euo pipefail
STARTED=$(date +%s.%N)
ARGV=("$0" "$@")
JSON_OUT=
if [ "${1:-}" = --json ]; then JSON_OUT=$(realpath -m "$2"); shift 2; fi
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-6}
FRAMES=${3:-"64 1518"}
BACKENDS=${4:-"dpdk off on"}
cd "$(dirname "$0")/.."
. scripts/side-by-side-common.sh
sbs_prepare
sbs_start_iotlbd
for side in on off; do
  iotlb=$([ $side = on ] && echo true || echo false)
  for pair in "a b" "b a"; do
    set -- $pair
    curl -fs -XPOST "127.0.0.1:$PORT/v1/devices" -d "{\"id\":\"$side-$1\",\"iotlb\":$iotlb,\
\"vhost_user\":{\"socket\":\"$WORK/$side-$1.sock\"},\"port\":{\"type\":\"peer\",\"device\":\"$side-$2\"}}" >/dev/null
  done
done

front_end() { # SOCKET_A SOCKET_B FRAME -> median total Rx-pps in Mpps
  timeout -s INT $((SECONDS_PER_RUN + 2)) dpdk-testpmd -l 1,0 --main-lcore 1 --no-pci --single-file-segments --in-memory \
    -m 512 --file-prefix peer-fe --vdev "net_virtio_user0,path=$1,queues=1" --vdev "net_virtio_user1,path=$2,queues=1" \
    -- --forward-mode=io --tx-first --txpkts="$3" --nb-cores=1 --stats-period 1 --no-lsc-interrupt \
    >"$WORK/virtio.log" 2>&1 || true
  # Per second: the two ports' Rx-pps lines, summed.
  grep -o 'Rx-pps: *[0-9]*' "$WORK/virtio.log" | awk '{print $2}' | paste - - | awk '{print $1 + $2}' | median_mpps
}

dpdk_once() { # FRAME
  local a=$WORK/dpdk-a.sock b=$WORK/dpdk-b.sock r
  rm -f "$a" "$b"
  timeout $((SECONDS_PER_RUN + 6)) dpdk-testpmd -l 0,1 --main-lcore 0 --no-pci --in-memory -m 512 --file-prefix peer-be \
    --vdev "net_vhost0,iface=$a,queues=1" --vdev "net_vhost1,iface=$b,queues=1" -- --forward-mode=io \
    --nb-cores=1 --no-lsc-interrupt --stats-period 1 >"$WORK/vhost.log" 2>&1 &
  local vh=$!
  for i in $(seq 50); do [ -S "$a" ] && [ -S "$b" ] && break; sleep 0.1; done
  sleep 1
  r=$(front_end "$a" "$b" "$1")
  kill "$vh" 2>/dev/null || true; wait "$vh" 2>/dev/null || true
  echo "$r"
}
run_dpdk() { dpdk_retried dpdk_once "$1"; }  # FRAME
run_off() { front_end "$WORK/off-a.sock" "$WORK/off-b.sock" "$1"; }
run_on() { front_end "$WORK/on-a.sock" "$WORK/on-b.sock" "$1"; }
sbs_rounds "| frame B | round | DPDK 2 × net_vhost Mpps | iotlbd peers, IOTLB off Mpps | IOTLB on Mpps | off / DPDK | on / DPDK |" \
  on_over_dpdk
sbs_report peer-side-by-side on_over_dpdk
