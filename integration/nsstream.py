"""The namespace side of a TCP stream, run inside a test's namespace with
`ip netns exec` (netns.Netns.tcp_receiver/tcp_sender; `python3
integration/netns.py recv|send`, the usage in netns.py's docstring, runs this):
recv accepts one connection and reads to EOF, send sends qgdata.py's stream;
each prints one JSON line (bytes, sha256, seconds, MB/s and, with --mb, whether
the stream matches)."""
import json
import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts", "qemu-guest"))
import qgdata  # noqa: E402


def _finish(total, h, t_first, t_last, mb):
    secs = (t_last - t_first) if t_first else 0.0
    out = {"bytes": total, "sha256": h.hexdigest(), "secs": round(secs, 4),
           "mbytes_per_s": round(total / secs / 1e6, 3) if secs > 0 else None}
    if mb is not None:
        out["expected_bytes"] = mb << 20
        out["expected_sha256"] = qgdata.stream_sha256(mb)
        out["match"] = out["sha256"] == out["expected_sha256"] and total == mb << 20
    return out


def _recv(a):
    import hashlib
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.bind, a.port))
    s.listen(1)
    s.settimeout(a.timeout)
    print(f"listening on {a.bind}:{a.port}", file=sys.stderr, flush=True)
    c, peer = s.accept()
    c.settimeout(a.timeout)
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total, t_first, t_last = 0, None, None
    while True:
        n = c.recv_into(buf)
        if n == 0:
            break
        now = time.monotonic()
        t_first = t_first or now
        t_last = now
        h.update(view[:n])
        total += n
    c.close()
    out = _finish(total, h, t_first, t_last, a.mb)
    out["peer"] = peer[0]
    print(json.dumps(out), flush=True)
    return 0 if out.get("match", True) else 1


def _send(a):
    import hashlib
    deadline = time.time() + a.timeout
    while True:
        try:
            c = socket.create_connection((a.to, a.port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    c.settimeout(a.timeout)
    h = hashlib.sha256()
    t_first = time.monotonic()
    total = 0
    for block in qgdata.blocks(a.mb):
        c.sendall(block)
        h.update(block)
        total += len(block)
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):  # the guest closes once it has everything
        pass
    t_last = time.monotonic()
    c.close()
    print(json.dumps(_finish(total, h, t_first, t_last, a.mb)), flush=True)
    return 0


def main(doc=None):
    import argparse
    ap = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--mb", type=int)
    r.add_argument("--timeout", type=float, default=120)
    s = sub.add_parser("send")
    s.add_argument("--to", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--mb", type=int, required=True)
    s.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    sys.exit(_recv(a) if a.cmd == "recv" else _send(a))


if __name__ == "__main__":
    main(__doc__)
