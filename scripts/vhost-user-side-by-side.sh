#!/usr/bin/env bash
# The same DPDK virtio-user front-end (dpdk-testpmd, mac forwarding, tx-first)
# against three vhost-user backends, alternated on this machine, round after
# round: DPDK's own net_vhost PMD (testpmd, io forwarding), iotlbd with the
# device IOTLB off, and iotlbd with it on (identity translator: IOVA = GPA,
# 2 MiB entries). Every backend gets one pinned core, the front-end the other.
# Prints a Markdown table of Mpps (median of the per-second figures after a
# 2 s warm-up), each with the host's phase around its run (f: fast, s: slow,
# m: mixed; `iotlb-bench phase`), and medians per phase at the end: this VM
# flips between two phases that change every figure by up to 3x, so sides
# compare within one phase. Needs root (huge pages) and Debian's dpdk-dev (dpdk-testpmd;
# installed when missing). Nothing of DPDK is built or kept here.
#   scripts/vhost-user-side-by-side.sh [--json FILE] [ROUNDS] [SECONDS] [FRAMES] [BACKENDS]
# BACKENDS: any of "dpdk off on" (default all three), e.g. "off on" for a
# focused IOTLB on/off series. --json FILE also writes the rows as JSON
# (scripts/bench_json.py; schema iotlb-bench/1, as `iotlb-bench --json`);
# a DPDK run with no figure (0 pps after its retries) is null there.
# RING=packed: every front-end asks for packed virtqueues (packed_vq=1)
# instead of split ones (the default, RING=split).
set -euo pipefail
STARTED=$(date +%s.%N)
ARGV=("$0" "$@")
JSON_OUT=
if [ "${1:-}" = --json ]; then JSON_OUT=$(realpath -m "$2"); shift 2; fi
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-8}
FRAMES=${3:-"64 1518"}
BACKENDS=${4:-"dpdk off on"}
RING=${RING:-split}
case "$RING" in split) VQ="" ;; packed) VQ=",packed_vq=1" ;; *) echo "RING is split or packed, not $RING" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
. scripts/side-by-side-common.sh
sbs_prepare
sbs_start_iotlbd
for side in on off; do
  iotlb=$([ $side = on ] && echo true || echo false)
  curl -fs -XPOST "127.0.0.1:$PORT/v1/devices" \
    -d "{\"id\":\"vu-$side\",\"iotlb\":$iotlb,\"vhost_user\":{\"socket\":\"$WORK/vu-$side.sock\"}}" >/dev/null
done

front_end() { # SOCKET FRAME -> median Rx-pps in Mpps
  timeout -s INT $((SECONDS_PER_RUN + 2)) dpdk-testpmd -l 1,0 --main-lcore 1 --no-pci --single-file-segments --in-memory -m 512 \
    --vdev "net_virtio_user0,path=$1,queues=1$VQ" -- --forward-mode=mac --tx-first \
    --txpkts="$2" --nb-cores=1 --stats-period 1 --no-lsc-interrupt >"$WORK/virtio.log" 2>&1 || true
  grep -o 'Rx-pps: *[0-9]*' "$WORK/virtio.log" | awk '{print $2}' | median_mpps
}

dpdk_once() { # FRAME
  local sock=$WORK/dpdk.sock
  rm -f "$sock"
  timeout $((SECONDS_PER_RUN + 6)) dpdk-testpmd -l 0,1 --main-lcore 0 --no-pci --in-memory -m 512 \
    --vdev "net_vhost0,iface=$sock,queues=1" -- --forward-mode=io --nb-cores=1 --no-lsc-interrupt \
    --stats-period 1 >"$WORK/vhost.log" 2>&1 &
  local vh=$!
  for i in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  sleep 1
  front_end "$sock" "$1"
  kill "$vh" 2>/dev/null || true; wait "$vh" 2>/dev/null || true
}

# DPDK's own pair sometimes loses the tx-first burst while its vhost side
# starts (the loop then never runs: 0 pps); such a run is repeated, up to 3
# times, and counted.
run_dpdk() { dpdk_retried dpdk_once "$1"; }  # FRAME
run_off() { front_end "$WORK/vu-off.sock" "$1"; }
run_on() { front_end "$WORK/vu-on.sock" "$1"; }
sbs_rounds "| frame B | round | DPDK net_vhost Mpps | iotlbd IOTLB off Mpps | iotlbd IOTLB on Mpps | iotlbd off / DPDK | on / off |" \
  on_over_off
sbs_report vhost-user-side-by-side on_over_off --meta "ring=$RING" \
  --meta "dpdk_version=$(dpkg-query -W -f='${Version}' dpdk-dev 2>/dev/null || echo unknown)"
