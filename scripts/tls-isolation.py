#!/usr/bin/env python3
"""The isolation benchmark over TLS: the built-in guest's traffic while a client
loops GETs over TLS (client certificate and a read token), alternated with the
same client over plain HTTP (the same token), on one daemon.

  scripts/tls-isolation.py .build/release/iotlbd [--rounds 7] [--seconds 3]
                           [--clients 1] [--rate 200] [--new-connections] [--json FILE]

One `iotlbd --demo --datapath-threads 1` (demo0: 64 B frames, 2 MiB static
mappings) serves TLS on 127.0.0.1 (TCP) and plain HTTP on a Unix socket (TLS
applies to TCP listeners only), so both sides meet the same daemon, warmed up
once, and alternate every window. Per window `--clients` processes loop
`GET /v1/devices/demo0/iotlb/stats` (kept connections; `--new-connections`: a
new connection, hence a TLS handshake, per request) for `--seconds`, each at
`--rate` requests/s (0: as fast as it can, which on a 2-core machine measures
mostly the client's own CPU); demo0's frames/s over that window is the figure. Rounds alternate which side goes
first. The plain side's transport is a Unix socket, cheaper than TCP: the
comparison is, if anything, unfair to TLS. Prints per-round TLS/plain ratios and their median (the target is 0.95
or more) and the medians of each side; the machine is shared, so only the
alternated medians mean anything."""
import argparse
import http.client
import json
import multiprocessing
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration"))
from tlspki import PKI  # noqa: E402

TOKEN = "b3nch-read-t0ken-0001"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path)


def connect(port, tls):
    if tls is None:
        return UnixConnection(port)
    ctx = ssl.create_default_context(cafile=tls["ca"])
    ctx.load_cert_chain(tls["cert"], tls["key"])
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=ctx)


def get(conn, path):
    conn.request("GET", path, headers={"Authorization": "Bearer " + TOKEN})
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"{path}: {r.status} {body[:200]}")
    return json.loads(body)


def client(port, tls, new_connections, rate, stop, served):
    conn = connect(port, tls)
    n = 0
    start = time.monotonic()
    while not stop.is_set():
        if rate > 0:
            ahead = start + n / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        if new_connections:
            conn.close()
            conn = connect(port, tls)
        get(conn, "/v1/devices/demo0/iotlb/stats")
        n += 1
        if n % 50 == 0:
            with served.get_lock():
                served.value += 50
    with served.get_lock():
        served.value += n % 50


def start(args, pki, workdir):
    """The daemon, its Unix socket and its TLS port."""
    sock, port = os.path.join(workdir, "api.sock"), free_port()
    argv = [args.iotlbd, "--listen", f"unix:{sock}", "--also-listen", f"127.0.0.1:{port}", "--demo",
            "--datapath-threads", "1", "--token-file", pki["tokens"], "--audit-log", "none", "--log-level", "warning",
            "--tls-cert", pki["server"][0], "--tls-key", pki["server"][1], "--tls-client-ca", pki["ca"]]
    daemon = subprocess.Popen(argv, cwd=workdir)
    deadline = time.time() + 15
    while True:
        try:
            probe = connect(sock, None)
            get(probe, "/v1/devices/demo0/workload")
            get(connect(port, pki["tls"]), "/healthz")
            return daemon, sock, port, probe
        except (OSError, RuntimeError, http.client.HTTPException):
            if time.time() > deadline:
                raise RuntimeError("iotlbd did not start its demo")
            time.sleep(0.1)


def window(args, probe, address, tls):
    """demo0's Mpps and the clients' requests/s while they loop over `address`."""
    stop = multiprocessing.Event()
    served = multiprocessing.Value("l", 0)
    procs = [multiprocessing.Process(target=client, args=(address, tls, args.new_connections, args.rate, stop, served))
             for _ in range(args.clients)]
    for p in procs:
        p.start()
    time.sleep(0.3)
    w0, n0, t0 = get(probe, "/v1/devices/demo0/workload"), served.value, time.time()
    time.sleep(args.seconds)
    w1, n1, t1 = get(probe, "/v1/devices/demo0/workload"), served.value, time.time()
    stop.set()
    for p in procs:
        p.join(timeout=10)
    frames = w1["received"] - w0["received"]
    return frames / (w1["elapsed_s"] - w0["elapsed_s"]) / 1e6, (n1 - n0) / (t1 - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("iotlbd")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--rate", type=float, default=200, help="requests/s per client (0: unpaced)")
    ap.add_argument("--new-connections", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.iotlbd = os.path.abspath(args.iotlbd)
    work = tempfile.mkdtemp(prefix="iotlbd-tls-bench-")
    p = PKI(os.path.join(work, "pki"))
    ca = p.ca("ca", "bench CA")
    pki = {"ca": ca[0], "server": p.server("server", ca), "client": p.client("client", ca, "bench"),
           "tokens": os.path.join(work, "tokens")}
    pki["tls"] = {"ca": pki["ca"], "cert": pki["client"][0], "key": pki["client"][1]}
    with open(pki["tokens"], "w") as f:
        f.write(f"{TOKEN} read bench\n")
    rows = []
    started = time.time()
    daemon, sock, port, probe = start(args, pki, work)
    time.sleep(1.0)  # warm-up
    try:
        for r in range(args.rounds):
            pair = {}
            for name in (("plain", "tls") if r % 2 == 0 else ("tls", "plain")):
                mpps, rps = window(args, probe, *((sock, None) if name == "plain" else (port, pki["tls"])))
                pair[name] = (mpps, rps)
                print(f"round {r + 1}/{args.rounds} {name:5}: {mpps:.3f} Mpps, client {rps:.0f} req/s", file=sys.stderr)
            rows.append({"round": r, "plain_mpps": pair["plain"][0], "tls_mpps": pair["tls"][0],
                         "plain_requests_per_s": pair["plain"][1], "tls_requests_per_s": pair["tls"][1],
                         "ratio": pair["tls"][0] / pair["plain"][0]})
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=15)
    med = {k: statistics.median(row[k] for row in rows)
           for k in ("plain_mpps", "tls_mpps", "plain_requests_per_s", "tls_requests_per_s", "ratio")}
    print("| client loops | datapath Mpps (median) | requests/s (median) |\n|---:|---:|---:|")
    print(f"| GET …/iotlb/stats, plain HTTP (Unix socket) | {med['plain_mpps']:.3f} | {med['plain_requests_per_s']:.0f} |")
    print(f"| GET …/iotlb/stats, TLS + client certificate | {med['tls_mpps']:.3f} | {med['tls_requests_per_s']:.0f} |")
    print(f"\nTLS / plain, per round: {', '.join('%.3f' % row['ratio'] for row in rows)}; median {med['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"benchmark": "tls-isolation", "command": " ".join(sys.argv), "date": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "duration_s": round(time.time() - started, 1),
                "options": vars(args)}, "rows": rows, "summary": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
