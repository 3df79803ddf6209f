#!/usr/bin/env bash
# Alternates DPDK's vhost-user <-> virtio-user loopback (two dpdk-testpmd
# processes, one forwarding core each) with iotlbd's engine driven by its
# built-in guest (iotlb-bench, one datapath thread + the guest thread), on the
# same machine, A B A B ..., and prints Mpps per run. Needs root (huge pages)
# and Debian's dpdk-dev (dpdk-testpmd; installed when missing). Nothing of
# DPDK is built or kept here. --json FILE also writes the rows as JSON
# (scripts/bench_json.py; schema iotlb-bench/1, as `iotlb-bench --json`).
#   scripts/dpdk-side-by-side.sh [--json FILE] [ROUNDS] [SECONDS] [SIZES]
set -euo pipefail
STARTED=$(date +%s.%N)
ARGV=("$0" "$@")
JSON_OUT=
if [ "${1:-}" = --json ]; then JSON_OUT=$(realpath -m "$2"); shift 2; fi
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-8}
SIZES=${3:-"64 1500"}
cd "$(dirname "$0")/.."
command -v dpdk-testpmd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev; }
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1024 ]; then echo 1024 > /proc/sys/vm/nr_hugepages; fi
mountpoint -q /dev/hugepages || { mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages; }
[ -x .build/release/iotlb-bench ] || swift build -c release --product iotlb-bench >/dev/null

dpdk_run() { # SIZE -> median Rx-pps of the periodic stats, in Mpps
  local size=$1 sock=/tmp/iotlb-dpdk-$$.sock frame=$(( $1 == 64 ? 64 : $1 + 18 ))
  rm -f "$sock"
  timeout $((SECONDS_PER_RUN + 6)) dpdk-testpmd -l 0,1 --main-lcore 0 --no-pci --file-prefix=vh$$ \
    --vdev "net_vhost0,iface=$sock,queues=1" -- --forward-mode=io --nb-cores=1 --stats-period 1 \
    >/tmp/iotlb-dpdk-vhost.log 2>&1 &
  local vh=$!
  sleep 2
  timeout $((SECONDS_PER_RUN + 2)) dpdk-testpmd -l 1,0 --main-lcore 1 --no-pci --single-file-segments --file-prefix=vu$$ \
    --vdev "net_virtio_user0,path=$sock,queues=1" -- --forward-mode=mac --tx-first --txpkts="$frame" --nb-cores=1 \
    --stats-period 1 >/tmp/iotlb-dpdk-virtio.log 2>&1 || true
  kill "$vh" 2>/dev/null || true; wait "$vh" 2>/dev/null || true
  rm -f "$sock"
  grep -o 'Rx-pps: *[0-9]*' /tmp/iotlb-dpdk-virtio.log | awk '{print $2}' | tail -n +3 | sort -n |
    awk '{a[NR]=$1} END {if (NR==0) print "0"; else printf "%.2f\n", a[int((NR+1)/2)]/1e6}'
}

ours_run() { # SIZE -> Mpps, IOTLB on, 2 MiB static mappings
  .build/release/iotlb-bench datapath --sizes "$1" --pages 2m --mappings static --sides on --repeats 1 \
    --seconds "$SECONDS_PER_RUN" --json - 2>/dev/null |
    python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["rows"][0]["mpps"])'
}

echo "| frame payload | round | DPDK vhost-user loopback Mpps | iotlbd (IOTLB on, 2 MiB static) Mpps | ratio |"
echo "|---:|---:|---:|---:|---:|"
ROWS=$(mktemp)
trap 'rm -f "$ROWS"' EXIT
printf 'payload_size\tround\tdpdk_mpps\tiotlbd_on_mpps\tratio\n' >"$ROWS"
for size in $SIZES; do
  for r in $(seq 1 "$ROUNDS"); do
    d=$(dpdk_run "$size"); o=$(ours_run "$size")
    ratio=$(python3 -c "print('%.2f' % ($o / $d if $d else 0))")
    echo "| $size | $r | $d | $o | $ratio |"
    if [ "$d" = 0 ] || [ "$d" = 0.00 ]; then d=-; ratio=-; fi  # no figure: null in the JSON
    printf '%s\t%s\t%s\t%s\t%s\n' "$size" "$r" "$d" "$o" "$ratio" >>"$ROWS"
  done
done
if [ -n "$JSON_OUT" ]; then
  python3 scripts/bench_json.py --benchmark dpdk-side-by-side --out "$JSON_OUT" --started "$STARTED" \
    --param "rounds=$ROUNDS" --param "seconds=$SECONDS_PER_RUN" --param-list "sizes=$SIZES" \
    --meta "dpdk_version=$(dpkg-query -W -f='${Version}' dpdk-dev 2>/dev/null || echo unknown)" \
    --group-by payload_size --median dpdk_mpps --median iotlbd_on_mpps --median ratio -- "${ARGV[@]}" <"$ROWS"
fi
