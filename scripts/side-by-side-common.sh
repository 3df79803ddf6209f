# What scripts/vhost-user-side-by-side.sh and scripts/peer-side-by-side.sh
# share; sourced, after `cd` to the tree's root and the arguments parsed:
#   sbs_prepare        dpdk-testpmd (Debian's dpdk-dev, when missing), 1024
#                      huge pages (given back at exit), a hugetlbfs mount, and
#                      the release iotlbd
#   sbs_start_iotlbd   iotlbd on core 1, its sockets in $WORK, API on $PORT;
#                      stopped and $WORK removed at exit
#   median_mpps        per-second pps figures on stdin → the median after a
#                      2 s warm-up, in Mpps ("0.00" when none)
#   dpdk_retried CMD   runs CMD (prints Mpps) up to 3 times while it gives
#                      0.00 (DPDK's pair lost its tx-first burst); counts the
#                      repeats in $WORK/dpdk-retries
#   phased CMD         runs CMD (prints Mpps) and prints "Mpps PHASE": the
#                      host's phase (iotlb-bench phase) before and after it,
#                      fast, slow, or mixed when they differ
#   sbs_rounds HEADER SECOND
#                      for every frame in $FRAMES, $ROUNDS rounds of the
#                      script's run_dpdk, run_off, run_on FRAME (each prints
#                      Mpps; as `has` allows), each with its phase: Markdown
#                      rows (HEADER: the first line), $WORK/rows.tsv, then
#                      medians per phase. Ratios: off / DPDK, and SECOND
#                      (on_over_off or on_over_dpdk)
#   sbs_report NAME SECOND [--meta k=v …]
#                      how many DPDK runs were repeated, and with --json FILE
#                      the rows as JSON (scripts/bench_json.py), medians by
#                      frame size
#   ratio A B, has BACKEND

sbs_prepare() {
  command -v dpdk-testpmd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev; }
  HUGE_BEFORE=$(cat /proc/sys/vm/nr_hugepages)
  if [ "$HUGE_BEFORE" -lt 1024 ]; then echo 1024 > /proc/sys/vm/nr_hugepages; fi
  mountpoint -q /dev/hugepages || { mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages; }
  [ -x .build/release/iotlbd ] || swift build -c release --product iotlbd >/dev/null
  [ -x .build/release/iotlb-bench ] || swift build -c release --product iotlb-bench >/dev/null
}

sbs_start_iotlbd() {
  WORK=$(mktemp -d)
  : >"$WORK/dpdk-retries"  # counted at the end even when nothing was repeated
  PORT=$((20000 + $$ % 10000))
  taskset -c 1 .build/release/iotlbd --listen 127.0.0.1:$PORT --vhost-user-dir "$WORK" --log-level warning >"$WORK/iotlbd.log" 2>&1 &
  DAEMON=$!
  trap sbs_cleanup EXIT
  for i in $(seq 50); do curl -fs "127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
}

sbs_cleanup() {
  kill "$DAEMON" 2>/dev/null || true; wait "$DAEMON" 2>/dev/null || true
  echo "$HUGE_BEFORE" > /proc/sys/vm/nr_hugepages
  rm -rf "$WORK"
}

median_mpps() {
  tail -n +3 | sort -n | awk '{a[NR]=$1} END {if (NR==0) print "0.00"; else printf "%.2f\n", a[int((NR+1)/2)]/1e6}'
}

dpdk_retried() {
  local r
  for attempt in 1 2 3; do
    r=$("$@")
    [ "$r" != "0.00" ] && break
    echo x >>"$WORK/dpdk-retries"
  done
  echo "$r"
}

phase_now() { .build/release/iotlb-bench phase | awk '{print $2}'; }

phased() {
  local before after r
  before=$(phase_now)
  r=$("$@")
  after=$(phase_now)
  echo "$r $([ "$before" = "$after" ] && echo "$before" || echo mixed)"
}

sbs_rounds() {
  local header=$1 second=$2 frame r d off on dp offp onp r1 r2
  echo "$header"
  echo "|---:|---:|---:|---:|---:|---:|---:|"
  printf 'frame_size\tround\tdpdk_mpps\tiotlbd_off_mpps\tiotlbd_on_mpps\toff_over_dpdk\t%s\tdpdk_phase\toff_phase\ton_phase\n' \
    "$second" >"$WORK/rows.tsv"
  for frame in $FRAMES; do
    for r in $(seq 1 "$ROUNDS"); do
      d=-; off=-; on=-; dp=-; offp=-; onp=-
      if has dpdk; then read -r d dp < <(phased run_dpdk "$frame"); fi
      if has off; then read -r off offp < <(phased run_off "$frame"); fi
      if has on; then read -r on onp < <(phased run_on "$frame"); fi
      if [ "$d" = 0.00 ]; then d=-; fi  # DPDK's pair lost its burst 3 times: no figure (null in the JSON)
      r1=-; r2=-
      [ "$d" != - ] && [ "$off" != - ] && r1=$(ratio "$off" "$d")
      case $second in
        on_over_off) [ "$off" != - ] && [ "$on" != - ] && r2=$(ratio "$on" "$off") ;;
        *) [ "$d" != - ] && [ "$on" != - ] && r2=$(ratio "$on" "$d") ;;
      esac
      echo "| $frame | $r | $d (${dp:0:1}) | $off (${offp:0:1}) | $on (${onp:0:1}) | $r1 | $r2 |"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$frame" "$r" "$d" "$off" "$on" "$r1" "$r2" "$dp" "$offp" "$onp" \
        >>"$WORK/rows.tsv"
    done
  done
  echo
  python3 scripts/phase_medians.py "$WORK/rows.tsv" dpdk iotlbd_off iotlbd_on
}

sbs_report() {
  local name=$1 second=$2 retries
  shift 2
  retries=$(wc -l <"$WORK/dpdk-retries")
  if has dpdk; then
    echo
    echo "DPDK runs repeated because the tx-first burst was lost: $retries"
  fi
  [ -n "$JSON_OUT" ] || return 0
  python3 scripts/bench_json.py --benchmark "$name" --out "$JSON_OUT" --started "$STARTED" \
    --param "rounds=$ROUNDS" --param "seconds=$SECONDS_PER_RUN" --param-list "frames=$FRAMES" \
    --param-list "backends=$BACKENDS" --meta "dpdk_retries=$retries" "$@" --group-by frame_size --median dpdk_mpps \
    --median iotlbd_off_mpps --median iotlbd_on_mpps --median off_over_dpdk --median "$second" -- "${ARGV[@]}" \
    <"$WORK/rows.tsv"
}

ratio() { python3 -c "print('%.2f' % ($1 / $2 if $2 else 0))"; }
has() { case " $BACKENDS " in *" $1 "*) return 0;; esac; return 1; }
