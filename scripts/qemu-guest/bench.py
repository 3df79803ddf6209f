#!/usr/bin/env python3
"""Real-guest figures (issue 13): a Debian kernel under QEMU (TCG) sends pktgen
bursts to itself through an iotlbd vhost-user device (loopback), with strict
vIOMMU flushing (iommu.strict=1), lazy flushing (iommu.strict=0) and no vIOMMU
(device IOTLB off), alternated round by round. Per run: the guest's rx
frames/s between its first and last counter line with traffic, the device's
misses per frame, and the miss round trip p50/p99 from /metrics.

Under TCG the guest's CPU is emulated: every figure is a small fraction of
what KVM gives, so only the ratios between the three modes, measured in the
same round, mean something.

    scripts/qemu-guest/build.sh && .build/debug/iotlbd ...   (started here)
    scripts/qemu-guest/bench.py [--rounds 3] [--seconds 12] [--json bench/results/qemu-guest.json]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "integration"))
from test_examples import Daemon  # noqa: E402

GUEST = os.path.join(ROOT, "scripts", "qemu-guest")
MODES = ["off", "strict", "lazy"]


def quantile(buckets, q):
    """From cumulative (le, count) pairs, the upper bound holding quantile q (seconds)."""
    total = buckets[-1][1]
    if total == 0:
        return None
    for le, n in buckets:
        if n >= q * total:
            return le
    return None


def histogram(text, device):
    pairs = []
    for m in re.finditer(r'iotlbd_miss_resolution_seconds_bucket\{device="%s",le="([^"]+)"\} (\d+)' % re.escape(device), text):
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        pairs.append((le, int(m.group(2))))
    return sorted(pairs)


def run(daemon, tmp, mode, rnd, seconds, frames):
    name = f"g-{mode}-{rnd}"
    sock = os.path.join(tmp, name + ".sock")
    status, dev = daemon.call("POST", "/v1/devices", {"id": name, "iotlb": mode != "off", "vhost_user": {"socket": sock}})
    if status != 201:
        raise SystemExit(f"create {name}: {status} {dev}")
    env = dict(os.environ, QG_FRAMES=str(frames), QG_MODE="continuous", QG_SECONDS=str(seconds),
               QEMU_GUEST_CACHE=os.environ.get("QEMU_GUEST_CACHE", os.path.join(ROOT, ".cache", "qemu-guest")))
    p = subprocess.run([os.path.join(GUEST, "run.sh"), sock, mode], capture_output=True, text=True, env=env,
                       timeout=seconds + 90)
    lines = [l for l in p.stdout.splitlines() if l.startswith("QG counters phase=run")]
    samples = []
    for l in lines:
        f = dict(kv.split("=", 1) for kv in l.split()[2:] if "=" in kv)
        samples.append((float(f["up"]), int(f["rx_packets"])))
    moving = [s for i, s in enumerate(samples) if i > 0 and s[1] > samples[i - 1][1]]
    if len(moving) < 2:
        raise SystemExit(f"{name}: too few counter lines with traffic ({len(samples)}):\n{p.stdout[-2000:]}{p.stderr[-1000:]}")
    (t0, r0), (t1, r1) = moving[0], moving[-1]
    stats = daemon.call("GET", f"/v1/devices/{name}/iotlb/stats")[1] if mode != "off" else {}
    hist = histogram(daemon.call("GET", "/metrics")[1].decode(), name) if mode != "off" else []
    chains = sum(q["chains"] for q in daemon.call("GET", f"/v1/devices/{name}/iotlb/stats")[1].get("vqs", [])) \
        if mode != "off" else None
    daemon.call("DELETE", f"/v1/devices/{name}")
    fps = (r1 - r0) / (t1 - t0)
    received = samples[-1][1]
    out = {"mode": mode, "round": rnd, "rx_frames_per_s": fps, "rx_frames": received}
    if mode != "off":
        out["misses"] = stats["misses"]
        out["misses_per_frame"] = stats["misses"] / max(received, 1)
        out["p50_us"] = (quantile(hist, 0.5) or 0) * 1e6
        out["p99_us"] = (quantile(hist, 0.99) or 0) * 1e6
        out["invalidations"] = stats["invalidations"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=12, help="guest traffic seconds per run")
    ap.add_argument("--frames", type=int, default=200, help="frames per pktgen burst and size")
    ap.add_argument("--json", help="write the runs as JSON (schema iotlb-bench/1)")
    args = ap.parse_args()
    subprocess.run([os.path.join(GUEST, "build.sh")], check=True, stdout=subprocess.DEVNULL)
    tmp = tempfile.mkdtemp(prefix="iotlbd-qemu-bench-")
    daemon = Daemon("--vhost-user-dir", tmp)
    rows = []
    try:
        for rnd in range(args.rounds):
            for mode in MODES:
                r = run(daemon, tmp, mode, rnd, args.seconds, args.frames)
                rows.append(r)
                print(f"round {rnd + 1} {mode:6}: {r['rx_frames_per_s']:9.0f} frames/s"
                      + (f", {r['misses_per_frame']:.2f} misses/frame, p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us"
                         if mode != "off" else ""), file=sys.stderr)
    finally:
        daemon.stop()
    by = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    ratio = {m: [a["rx_frames_per_s"] / b["rx_frames_per_s"] for a, b in zip(by[m], by["off"])] for m in ("strict", "lazy")}
    print("| mode | rx frames/s (median) | / no vIOMMU (per round) | misses/frame | miss p50 / p99 |")
    print("|---|---:|---|---:|---|")
    for m in MODES:
        med = statistics.median(r["rx_frames_per_s"] for r in by[m])
        rat = "1" if m == "off" else ", ".join(f"{x:.2f}" for x in ratio[m]) + f" (median {statistics.median(ratio[m]):.2f})"
        mpf = "-" if m == "off" else f"{statistics.median(r['misses_per_frame'] for r in by[m]):.2f}"
        lat = "-" if m == "off" else (f"≤{statistics.median(r['p50_us'] for r in by[m]):.0f} µs / "
                                      f"≤{statistics.median(r['p99_us'] for r in by[m]):.0f} µs")
        print(f"| {m} | {med:.0f} | {rat} | {mpf} | {lat} |")
    if args.json:
        doc = {"schema": "iotlb-bench/1", "benchmark": "qemu-guest",
               "meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
                        "parameters": vars(args)},
               "rows": rows,
               "summary": [{"mode": m, "over_off": ratio[m], "over_off_median": statistics.median(ratio[m])}
                           for m in ("strict", "lazy")]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
