#!/usr/bin/env python3
"""A TAP port's anchors (issue 20), side by side, alternated round by round.

TX (a DPDK virtio-user front-end into a TAP): dpdk-testpmd txonly on
net_virtio_user (64 and 1518 B) → a vhost-user back-end → a TAP inside a
network namespace made for the run; frames are counted on the namespace side
(/proc/net/dev rx_packets of the TAP, over SECONDS after a 2 s warm-up).

RX (a TAP into the front-end): trafgen (Debian's netsniff-ng) writes frames
into the TAP inside the namespace (64 and 1514 B: a packet socket cannot send
past the TAP's MTU); dpdk-testpmd rxonly on net_virtio_user counts what
arrives (median of its per-second Rx-pps after the warm-up); the TAP's
tx_packets and tx_dropped say what the generator got into it.

Sides (--sides, alternated in this order every round):
  dpdk        DPDK's own: testpmd with net_vhost (iommu-support=1) and net_tap
              (iface=dtap0, created by net_tap in the namespace), io forwarding
  iotlbd-off  iotlbd (started in the namespace, API on a Unix socket) with a
  iotlbd-on   device whose port is a TAP made there (multi_queue, vnet_hdr),
              device IOTLB off / on. The device's JSON is integration/nsdaemon.py's
              tap_device_body(): fill in the port's field once issue 20's API exists.

Cores (2 here): the back-end's forwarding on core 1, the front-end's on core 0
(iotlbd pinned to core 1); trafgen runs with one process (it, the back-end and
the front-end share the 2 cores: RX figures are the noisier). Runs vary 2-4x
with how the host schedules: compare sides within a round only. Each run
records the host's phase around it (`iotlb-bench phase`: fast, slow, or mixed
when it changed; the row's host_phase, and (f)/(s)/(m) in the table).

    scripts/tap-side-by-side.py [--rounds 3] [--seconds 5] [--frames "64 1518"]
        [--rx-frames "64 1514"] [--directions "tx rx"] [--sides "dpdk iotlbd-off iotlbd-on"]
        [--json bench/results/tap-side-by-side.json]

Root (namespaces, 2 MiB huge pages: reserved as needed, the count restored).
Needs dpdk-testpmd (Debian's dpdk-dev), trafgen (netsniff-ng) for RX, and
.build/release/iotlbd for the iotlbd sides and .build/release/iotlb-bench
(`make net-tools tools release`).
"""
import argparse
import datetime
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "integration"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from iotlbtest import stop_process, wait_until  # noqa: E402
from netns import Netns  # noqa: E402
from nsdaemon import NsDaemon, iotlbd_path, tap_device_body  # noqa: E402
import bench_json  # noqa: E402

WARMUP = 2.0
PAGES = 700  # two testpmds at -m 512 (in 2 MiB pages) with room


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class HugePages:
    def __enter__(self):
        with open("/proc/sys/vm/nr_hugepages") as f:
            self.before = int(f.read())
        if self.before < PAGES:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write(str(PAGES))
        return self

    def __exit__(self, *exc):
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(self.before))


def wait_for(cond, timeout, what):
    def failed():
        raise RuntimeError(f"timed out waiting for {what}")
    return wait_until(cond, timeout, 0.05, failed)


# --- back-ends (sides) -----------------------------------------------------
class DpdkSide:
    """testpmd: net_vhost (iommu-support=1) <-> net_tap, io forwarding, in the namespace."""
    name = "dpdk"

    def start(self, ns):
        self.sock = os.path.join(ns.tmp, "vhost.sock")
        self.tap = "dtap0"
        self.log_path = os.path.join(ns.tmp, "vhost-testpmd.log")
        self.log = open(self.log_path, "w")
        self.proc = ns.popen(["dpdk-testpmd", "-l", "0,1", "--main-lcore", "0", "--no-pci", "--in-memory", "-m", "512",
                              "--vdev", f"net_vhost0,iface={self.sock},queues=1,iommu-support=1",
                              "--vdev", f"net_tap0,iface={self.tap}",
                              "--", "--forward-mode=io", "--nb-cores=1", "--no-lsc-interrupt", "--stats-period", "1"],
                             stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.sock) and self.tap in ns.link_names(), 30,
                 f"net_vhost's socket and {self.tap} ({self.log_path})")
        ns.links.append(self.tap)
        ns.no_ipv6(self.tap)  # only testpmd's frames on it
        time.sleep(0.5)
        return self.sock, self.tap

    def stop(self):
        stop_process(self.proc)
        self.log.close()


class IotlbdSide:
    """iotlbd in the namespace, a device whose port is a TAP made there."""

    def __init__(self, iotlb):
        self.iotlb = iotlb
        self.name = "iotlbd-" + ("on" if iotlb else "off")

    def start(self, ns):
        self.tap = ns.add_tap("itap0", multi_queue=True, vnet_hdr=True)
        self.log = open(os.path.join(ns.tmp, "iotlbd.log"), "w")
        self.daemon = NsDaemon(ns, "--vhost-user-dir", ns.tmp, binary=iotlbd_path("release"), log=self.log, cpu=1)
        sock = os.path.join(ns.tmp, "dev.sock")
        status, dev = self.daemon.call("POST", "/v1/devices", tap_device_body("tapdev", sock, self.tap, self.iotlb))
        if status != 201:
            raise RuntimeError(f"creating the TAP device: {status} {dev}")
        return sock, self.tap

    def stop(self):
        self.daemon.stop()
        self.log.close()


# --- the front-end -----------------------------------------------------------
def front_end(sock, mode, frame, seconds, path):
    """testpmd on net_virtio_user (forwarding on core 0), `mode` txonly|rxonly."""
    argv = ["timeout", "-s", "INT", str(int(seconds)), "dpdk-testpmd", "-l", "1,0", "--main-lcore", "1", "--no-pci",
            "--single-file-segments", "--in-memory", "-m", "512",
            "--vdev", f"net_virtio_user0,path={sock},queues=1",
            "--", f"--forward-mode={mode}", "--nb-cores=1", "--stats-period", "1", "--no-lsc-interrupt"]
    if mode == "txonly":
        argv.append(f"--txpkts={frame}")
    return subprocess.Popen(argv, stdout=open(path, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def pps_median(path, key, skip):
    """Median of testpmd's per-second `key` (Rx-pps/Tx-pps) lines after `skip` of them, in Mpps."""
    with open(path, errors="replace") as f:
        vals = [int(v) for v in re.findall(key + r": *(\d+)", f.read())][skip:]
    return round(statistics.median(vals) / 1e6, 3) if vals else None


BENCH = os.path.join(ROOT, ".build", "release", "iotlb-bench")


def host_phase():
    """The host's phase now (`iotlb-bench phase`: a cache line's round trip between two threads): fast or slow."""
    return subprocess.run([BENCH, "phase"], capture_output=True, text=True, check=True).stdout.split()[1]


def tx_run(side, frame, seconds):
    with Netns("tapbench") as ns:
        sock, tap = side.start(ns)
        ns.check_isolated()
        fe_log = os.path.join(ns.tmp, "virtio-user.log")
        try:
            fe = front_end(sock, "txonly", frame, seconds + WARMUP + 4, fe_log)
            first = ns.counters(tap)["rx_packets"]
            wait_for(lambda: ns.counters(tap)["rx_packets"] > first + 1000, 20, f"frames on {tap} ({fe_log})")
            time.sleep(WARMUP)
            c0, t0 = ns.counters(tap), time.monotonic()
            time.sleep(seconds)
            c1, t1 = ns.counters(tap), time.monotonic()
            fe.wait(timeout=30)
        finally:
            side.stop()
        n = c1["rx_packets"] - c0["rx_packets"]
        return {"ns_rx_mpps": round(n / (t1 - t0) / 1e6, 3),
                "bytes_per_frame": round((c1["rx_bytes"] - c0["rx_bytes"]) / n, 1) if n else None,
                "frontend_tx_mpps": pps_median(fe_log, "Tx-pps", 3)}


def trafgen_packet(frame):
    # Broadcast, a locally administered source, an experimental EtherType, filler.
    return ("{ fill(0xff, 6), 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, c16(0x88b5), fill(0x41, %d) }" % (frame - 14))


def rx_run(side, frame, seconds):
    with Netns("tapbench") as ns:
        sock, tap = side.start(ns)
        ns.check_isolated()
        fe_log = os.path.join(ns.tmp, "virtio-user.log")
        try:
            fe = front_end(sock, "rxonly", frame, seconds + WARMUP + 6, fe_log)
            time.sleep(2)  # the front-end connects and starts
            gen = ns.popen(["timeout", "-s", "INT", str(int(seconds + WARMUP + 1)), "trafgen", "--dev", tap,
                            "--cpus", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats",
                            trafgen_packet(frame)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(WARMUP)
            c0, t0 = ns.counters(tap), time.monotonic()
            time.sleep(seconds)
            c1, t1 = ns.counters(tap), time.monotonic()
            gen.wait(timeout=30)
            fe.wait(timeout=30)
        finally:
            side.stop()
        dt = t1 - t0
        return {"frontend_rx_mpps": pps_median(fe_log, "Rx-pps", 4),
                "tap_tx_mpps": round((c1["tx_packets"] - c0["tx_packets"]) / dt / 1e6, 3),
                "tap_tx_dropped_mpps": round((c1["tx_drop"] - c0["tx_drop"]) / dt / 1e6, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--frames", default="64 1518", help="TX frame sizes (testpmd --txpkts)")
    ap.add_argument("--rx-frames", default="64 1514", help="RX frame sizes (trafgen; at most MTU + 14)")
    ap.add_argument("--directions", default="tx rx")
    ap.add_argument("--sides", default="dpdk", help='any of "dpdk iotlbd-off iotlbd-on"')
    ap.add_argument("--json", help="write an iotlb-bench/1 report (scripts/bench_json.py layout)")
    a = ap.parse_args()
    started = time.time()
    known = {"dpdk": DpdkSide, "iotlbd-off": lambda: IotlbdSide(False), "iotlbd-on": lambda: IotlbdSide(True)}
    sides = a.sides.split()
    for s in sides:
        if s not in known:
            ap.error(f"unknown side {s}")
    if any(s.startswith("iotlbd") for s in sides) and not os.access(iotlbd_path("release"), os.X_OK):
        ap.error(f"{iotlbd_path('release')} is missing: make release")
    if not os.access(BENCH, os.X_OK):
        ap.error(f"{BENCH} is missing (it tells the host's phase): make release")
    rows = []
    with HugePages():
        for direction in a.directions.split():
            frames = a.frames if direction == "tx" else a.rx_frames
            for frame in [int(f) for f in frames.split()]:
                for rnd in range(1, a.rounds + 1):
                    for s in sides:
                        side = known[s]()
                        before = host_phase()
                        r = (tx_run if direction == "tx" else rx_run)(side, frame, a.seconds)
                        after = host_phase()
                        row = {"direction": direction, "frame_size": frame, "round": rnd, "side": s, **r,
                               "host_phase": before if before == after else "mixed"}
                        rows.append(row)
                        log("  " + " ".join(f"{k}={v}" for k, v in row.items()))
    key = {"tx": "ns_rx_mpps", "rx": "frontend_rx_mpps"}
    summary = []
    print("| direction | frame B | side | Mpps (median) | per round (host phase) | / dpdk (per round) |")
    print("|---|---:|---|---:|---|---|")
    for direction in a.directions.split():
        for frame in dict.fromkeys(r["frame_size"] for r in rows if r["direction"] == direction):
            base = {r["round"]: r[key[direction]] for r in rows
                    if (r["direction"], r["frame_size"], r["side"]) == (direction, frame, "dpdk")}
            for s in sides:
                g = [r for r in rows if (r["direction"], r["frame_size"], r["side"]) == (direction, frame, s)]
                vals = [r[key[direction]] for r in g if r[key[direction]] is not None]
                med = statistics.median(vals) if vals else None
                ratios = [r[key[direction]] / base[r["round"]] for r in g
                          if s != "dpdk" and base.get(r["round"]) and r[key[direction]] is not None]
                line = {"benchmark": "tap-side-by-side", "direction": direction, "frame_size": frame, "side": s,
                        key[direction] + "_median": med, "n": len(vals)}
                if ratios:
                    line["over_dpdk_median"] = round(statistics.median(ratios), 3)
                summary.append(line)
                runs = ", ".join(f"{r[key[direction]]} ({r['host_phase'][0]})" for r in g if r[key[direction]] is not None)
                print(f"| {direction} | {frame} | {s} | {med} | {runs} | "
                      f"{', '.join('%.2f' % x for x in ratios) or '-'} |")
    if a.json:
        dpdk = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"], capture_output=True, text=True).stdout
        doc = {"schema": bench_json.SCHEMA, "benchmark": "tap-side-by-side",
               "meta": {"date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "duration_s": round(time.time() - started, 1), "command": shlex.join(sys.argv), "argv": sys.argv,
                        "host": bench_json.host(), "parameters": vars(a), "dpdk_version": dpdk or "unknown",
                        "counted": {"tx": "TAP rx_packets in the namespace (/proc/net/dev)",
                                    "rx": "virtio-user testpmd rxonly Rx-pps, median of per-second figures"}},
               "rows": [dict({"benchmark": "tap-side-by-side"}, **r) for r in rows], "summary": summary}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            f.write(bench_json.layout(doc))
        log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
