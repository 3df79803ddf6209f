#!/usr/bin/env python3
"""TCP throughput of the QEMU test guest on a TAP (issue 20's "TCP from the
QEMU guest" benchmark), alternated round by round: per run, a fresh network
namespace with tap0 (10.77.0.1/24), the guest (10.77.0.2) sends TX_MB MiB to
a receiver in the namespace, then receives RX_MB MiB from a sender there
(integration/netns.py; both streams sha256-checked). Figures are the namespace
side's (first to last byte, 10^6 bytes/s); the guest's own send figure is
kept too.

Back-ends (--backends, alternated in this order within each round and mode):
  qemu-tap   QEMU's own -netdev tap (vnet_hdr, no vhost): what users run
             without vhost-net; the anchor
  iotlbd     iotlbd started in the namespace, a device whose port is tap0,
             the guest on its vhost-user socket (device IOTLB on with a
             vIOMMU, off without); the device's JSON is integration/nsdaemon.py's
             tap_device_body(): it needs issue 20's TAP port
--iommu: any of "off strict lazy" (Intel vIOMMU; strict = iommu.strict=1).

Under TCG the guest's emulated CPU sets the pace (a few MB/s out, tens of MB/s
in, here): compare back-ends within a round, as ratios; say so with figures.

    scripts/qemu-guest/net-bench.py [--rounds 2] [--iommu "off strict"]
        [--backends "qemu-tap iotlbd"] [--tx-mb 30] [--rx-mb 30] [--json FILE]
Root. Needs the guest (scripts/qemu-guest/build.sh, run here) and, for iotlbd,
.build/release/iotlbd.
"""
import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "integration"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from guestnet import BUILD_SH, Guest, NetConfig, Tap, VhostUser  # noqa: E402
from netns import Netns  # noqa: E402
from nsdaemon import NsDaemon, iotlbd_path, tap_device_body  # noqa: E402
import bench_json  # noqa: E402

HOST, GUEST_IP = "10.77.0.1", "10.77.0.2"
TIMEOUT = 300


def backend(name, ns, iommu):
    """(Backend for guestnet.Guest, cleanup) with tap0 made in `ns`."""
    if name == "qemu-tap":
        ns.add_tap("tap0")
        return Tap("tap0"), lambda: None
    if name == "iotlbd":
        ns.add_tap("tap0", multi_queue=True)
        log = open(os.path.join(ns.tmp, "iotlbd.log"), "w")
        d = NsDaemon(ns, "--vhost-user-dir", ns.tmp, binary=iotlbd_path("release"), log=log)
        sock = os.path.join(ns.tmp, "g.sock")
        status, dev = d.call("POST", "/v1/devices", tap_device_body("g", sock, "tap0", iommu != "off"))
        if status != 201:
            d.stop()
            raise SystemExit(f"iotlbd: creating the TAP device: {status} {dev}")
        return VhostUser(sock), lambda: (d.stop(), log.close())
    raise SystemExit(f"unknown back-end {name}")


def run(name, iommu, tx_mb, rx_mb):
    with Netns("netbench") as ns:
        be, cleanup = backend(name, ns, iommu)
        ns.add_address("tap0", HOST + "/24")
        ns.check_isolated()
        try:
            rx = ns.tcp_receiver(HOST, 5001, mb=tx_mb, timeout=TIMEOUT)
            cfg = NetConfig(ip=GUEST_IP + "/24", peer=HOST, pings=1, mb=tx_mb, listen=5002 if rx_mb else None,
                            rx_mb=rx_mb, wait=TIMEOUT)
            g = Guest(be, iommu, cfg, console=os.path.join(ns.tmp, "console.log"), ns=ns).start()
            try:
                got = rx.result(timeout=TIMEOUT)
                sent = None
                if rx_mb:
                    g.wait_line("QG tcp-send", timeout=120)
                    sent = ns.tcp_sender(GUEST_IP, 5002, rx_mb, timeout=60).result(timeout=TIMEOUT)
                r = g.wait(TIMEOUT)
            finally:
                g.stop()
        finally:
            cleanup()
    ok = bool(got["match"] and r.get("net-result", {}).get("ok") == 1 and (not rx_mb or r["tcp-recv"]["match"] == 1))
    if not ok:
        sys.stderr.write(r["text"][-3000:] + "\n")
    return {"tx_mbytes_per_s": got["mbytes_per_s"], "tx_guest_mbytes_per_s": r["tcp-send"]["mbytes_per_s"],
            "rx_mbytes_per_s": sent["mbytes_per_s"] if sent else None, "ok": ok,
            "host_tso4": r["features"]["host_tso4"], "guest_tso4": r["features"]["guest_tso4"],
            "guest_tx_avg_bytes": r["net-counters"]["tx_avg"], "qemu_wall_s": r["wall_s"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iommu", default="off strict")
    ap.add_argument("--backends", default="qemu-tap")
    ap.add_argument("--tx-mb", type=int, default=30)
    ap.add_argument("--rx-mb", type=int, default=30)
    ap.add_argument("--json")
    a = ap.parse_args()
    started = time.time()
    subprocess.run([BUILD_SH], check=True, stdout=subprocess.DEVNULL)
    rows = []
    for rnd in range(1, a.rounds + 1):
        for iommu in a.iommu.split():
            for b in a.backends.split():
                row = {"backend": b, "iommu": iommu, "round": rnd, **run(b, iommu, a.tx_mb, a.rx_mb)}
                rows.append(row)
                print("  " + " ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
    summary = []
    print("| back-end | vIOMMU | guest→ns MB/s (median) | ns→guest MB/s (median) | / qemu-tap out, in (per round) |")
    print("|---|---|---:|---:|---|")
    for iommu in a.iommu.split():
        base = {r["round"]: r for r in rows if (r["backend"], r["iommu"]) == ("qemu-tap", iommu)}
        for b in a.backends.split():
            g = [r for r in rows if (r["backend"], r["iommu"]) == (b, iommu)]
            tx = statistics.median(r["tx_mbytes_per_s"] for r in g)
            rxv = [r["rx_mbytes_per_s"] for r in g if r["rx_mbytes_per_s"]]
            rxm = statistics.median(rxv) if rxv else None
            ratios = [(r["tx_mbytes_per_s"] / base[r["round"]]["tx_mbytes_per_s"],
                       (r["rx_mbytes_per_s"] or 0) / (base[r["round"]]["rx_mbytes_per_s"] or 1))
                      for r in g if b != "qemu-tap" and r["round"] in base]
            line = {"benchmark": "qemu-guest-tcp", "backend": b, "iommu": iommu, "tx_mbytes_per_s_median": tx,
                    "rx_mbytes_per_s_median": rxm, "n": len(g), "all_ok": all(r["ok"] for r in g)}
            if ratios:
                line["tx_over_qemu_tap_median"] = round(statistics.median(x for x, _ in ratios), 3)
                line["rx_over_qemu_tap_median"] = round(statistics.median(y for _, y in ratios), 3)
            summary.append(line)
            print(f"| {b} | {iommu} | {tx} | {rxm} | {', '.join('%.2f, %.2f' % x for x in ratios) or '-'} |")
    if a.json:
        doc = {"schema": bench_json.SCHEMA, "benchmark": "qemu-guest-tcp",
               "meta": {"date": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "duration_s": round(time.time() - started, 1), "command": shlex.join(sys.argv), "argv": sys.argv,
                        "host": bench_json.host(), "parameters": vars(a),
                        "note": "TCG: the guest's emulated CPU sets the pace; compare back-ends within a round"},
               "rows": [dict({"benchmark": "qemu-guest-tcp"}, **r) for r in rows], "summary": summary}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            f.write(bench_json.layout(doc))
        print(f"wrote {a.json}", file=sys.stderr)
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
