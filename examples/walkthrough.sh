#!/usr/bin/env bash
# The control plane by curl: a device, its memory, a mapping, a miss and its answer.
#   examples/walkthrough.sh [URL]          (default http://127.0.0.1:8080)
# With --token-file on the daemon, export TOKEN=… first.
set -euo pipefail
URL=${1:-${URL:-http://127.0.0.1:8080}}
DEV=${DEV:-walk0}
auth=()
[ -n "${TOKEN:-}" ] && auth=(-H "Authorization: Bearer $TOKEN")
api() { # METHOD PATH [BODY]
  local body=()
  [ $# -ge 3 ] && body=(-d "$3")
  curl -sS --fail-with-body -X "$1" "${auth[@]}" -H 'Content-Type: application/json' "${body[@]}" "$URL$2"
  echo
}

echo "# create $DEV"
api POST /v1/devices "{\"id\":\"$DEV\",\"translator\":\"external\"}"
echo "# 64 MiB of guest memory at GPA 0 (user address 0x7f0000000000)"
api PUT /v1/devices/$DEV/mem-table '{"regions":[{"guest_phys_addr":0,"memory_size":"0x4000000","userspace_addr":"0x7f0000000000"}]}'
echo "# map IOVA 0x100000 (2 MiB) read-write"
api POST /v1/devices/$DEV/iotlb/updates '{"iova":"0x100000","size":"0x200000","uaddr":"0x7f0000100000","perm":"rw"}'
echo "# look one up"
api GET "/v1/devices/$DEV/iotlb/translate?iova=0x180000&perm=rw"
echo "# a TX queue whose rings are not mapped: the miss shows at once"
api PUT /v1/devices/$DEV/vrings/1 '{"num":256,"desc_addr":"0x800000","avail_addr":"0x801000","used_addr":"0x802000"}'
echo "# long-poll the misses (cursor 0, wait up to 1 s)"
api GET "/v1/devices/$DEV/iotlb/misses?after=0&timeout_ms=1000"
echo "# answer: map the rings; the queue resumes"
api POST /v1/devices/$DEV/iotlb/updates '{"iova":"0x800000","size":"0x3000","uaddr":"0x7f0000800000","perm":"rw"}'
api GET /v1/devices/$DEV/vrings/1
echo "# invalidate the first mapping, then the counters"
api POST /v1/devices/$DEV/iotlb/invalidations '{"iova":"0x100000","size":4096}'
api GET /v1/devices/$DEV/iotlb/stats
echo "# clean up"
curl -sS -o /dev/null -w '%{http_code}\n' -X DELETE "${auth[@]}" "$URL/v1/devices/$DEV"
