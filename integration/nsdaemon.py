"""iotlbd started inside a test's network namespace (integration/netns.py), so that
a TAP port opens the TAP where it lives. Its API listens on a Unix socket
(--listen unix:PATH): a file, reachable from outside the namespace, where a
TCP port would be on the namespace's own loopback.

    from netns import Netns
    from nsdaemon import NsDaemon
    with Netns("port") as ns:
        ns.add_tap("tap0", multi_queue=True)
        d = NsDaemon(ns, "--vhost-user-dir", ns.tmp)       # more iotlbd arguments
        status, dev = d.call("POST", "/v1/devices", {...})  # as test_examples.Daemon.call
        d.stop()                                            # (ns.close() kills it too)
"""
import http.client
import json
import os
import signal
import socket
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tap_device_body(name, sock, tap, iotlb, queues=None):
    """A device whose port is the TAP `tap` (made beforehand in the namespace),
    as POST /v1/devices takes it. TODO(issue 20): the port's field is a guess
    until the API exists; the test harness and both benchmarks
    (scripts/tap-side-by-side.py, scripts/qemu-guest/net-bench.py) take it
    from here, so change it here only."""
    body = {"id": name, "iotlb": iotlb, "vhost_user": {"socket": sock}, "port": {"type": "tap", "name": tap}}
    if queues:
        body["queues"] = queues  # virtqueues: 2 per queue pair
    return body


def iotlbd_path(config="debug"):
    return os.environ.get("IOTLBD", os.path.join(ROOT, ".build", config, "iotlbd"))


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class NsDaemon:
    def __init__(self, ns, *extra, binary=None, log=None, log_level="warning", cpu=None):
        """iotlbd inside `ns`, API on ns.tmp/api.sock; `cpu` pins it (taskset)."""
        self.api = os.path.join(ns.tmp, "api.sock")
        argv = [binary or iotlbd_path(), "--listen", "unix:" + self.api, "--log-level", log_level, *extra]
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        self.proc = ns.popen(argv, stdout=log, stderr=log)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"iotlbd exited {self.proc.returncode}")
            try:
                if self.call("GET", "/healthz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("iotlbd did not start")

    def call(self, method, path, body=None, timeout=30):
        c = _UnixHTTP(self.api, timeout)
        try:
            data = None if body is None else json.dumps(body)
            c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            r = c.getresponse()
            raw = r.read()
            ctype = (r.getheader("Content-Type") or "").split(";")[0]
            return r.status, (json.loads(raw) if raw and ctype == "application/json" else raw)
        finally:
            c.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
