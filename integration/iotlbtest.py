"""What the integration tests share: where the tree and the daemon are, a
free port, waiting for a daemon to listen, `Daemon` (iotlbd on a loopback
port, driven over HTTP) and `GuestConsole` (a QEMU guest's output). The network tests add netns.py and nsdaemon.py, the
TLS ones tlspki.py. Stdlib only."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IOTLBD = os.environ.get("IOTLBD", os.path.join(ROOT, ".build", "debug", "iotlbd"))


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc=None, timeout=15, log=lambda: ""):
    """Waits until something accepts connections on 127.0.0.1:PORT. Raises
    RuntimeError, with `log()` appended, when PROC exits first or TIMEOUT
    seconds pass."""
    deadline = time.time() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"iotlbd exited ({proc.returncode}): {log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError("iotlbd did not listen: " + log())
            time.sleep(0.05)


class Daemon:
    def __init__(self, *extra, port=None, cwd=None, log=None, log_level="warning"):
        """`log`: a file for the daemon's output (default: inherited)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([IOTLBD, "--listen", f"127.0.0.1:{self.port}", "--log-level", log_level, *extra],
                                     cwd=cwd, stdout=log, stderr=log)
        wait_listening(self.port, self.proc, timeout=10)

    def call(self, method, path, body=None, timeout=30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)

    def vhost_user_device(self, name, iotlb, directory):
        """Creates device `name` serving the vhost-user socket DIRECTORY/NAME.sock
        (DIRECTORY: the daemon's --vhost-user-dir); returns the socket's path."""
        sock = os.path.join(directory, name + ".sock")
        status, dev = self.call("POST", "/v1/devices", {"id": name, "iotlb": iotlb, "vhost_user": {"socket": sock}})
        if status != 201:
            raise AssertionError(f"creating {name}: {status} {dev}")
        return sock

    def wait_done(self, device, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, w = self.call("GET", f"/v1/devices/{device}/workload")
            if status == 200 and w["state"] == "done":
                return w
            time.sleep(0.05)
        raise AssertionError(f"workload on {device} not done: {w}")



def stop_process(proc, sig=signal.SIGTERM, timeout=10):
    """Sends `sig` to `proc` if it still runs, waits up to `timeout` s for it
    to exit, then kills it."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_until(predicate, timeout, poll, failed, stop=lambda: False):
    """predicate()'s first true value, polled every `poll` s; after `timeout`
    s (or once stop() is true) calls failed(), which raises (a test's fail)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline or stop():
            failed()
        time.sleep(poll)


def build_test_guest(make_target=None):
    """The QEMU test guest of scripts/qemu-guest (build.sh: cached after the
    first run); with `make_target`, QEMU must be there too (that target
    installs it). Raises AssertionError: a missing piece fails, never skips."""
    if make_target and shutil.which("qemu-system-x86_64") is None:
        raise AssertionError(f"qemu-system-x86_64 is missing: `make {make_target}` installs qemu-system-x86")
    out = subprocess.run([os.path.join(ROOT, "scripts", "qemu-guest", "build.sh")], capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise AssertionError(f"scripts/qemu-guest/build.sh failed:\n{out.stdout}{out.stderr}")

# The QG counters line scripts/qemu-guest/init prints while it sends.
GUEST_COUNTERS = re.compile(r"^QG counters phase=run up=([\d.]+) (.*)$")


class GuestConsole:
    """QEMU's output (serial console and stderr), read by a thread; each line
    kept with the host's monotonic time of its arrival."""

    def __init__(self, proc, path):
        self.lines = []  # (arrival, text)
        self.lock = threading.Lock()
        self.log = open(path, "w")
        self.thread = threading.Thread(target=self.read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def read(self, stream):
        # QEMU's end closes both: nothing reads the pipe or writes the log after it.
        with stream, self.log:
            for raw in iter(stream.readline, b""):
                text = raw.decode(errors="replace").rstrip("\r\n")
                with self.lock:
                    self.lines.append((time.monotonic(), text))
                self.log.write(text + "\n")
                self.log.flush()

    def counters(self):
        """[(arrival, {counter: value, "up": float})] of the QG counters lines."""
        out = []
        with self.lock:
            lines = list(self.lines)
        for t, text in lines:
            m = GUEST_COUNTERS.match(text.strip())
            pairs = m.group(2).split() if m else []
            # A line whose counters did not all print (the guest's read of
            # /proc raced pktgen: "pktgen_sent=") is skipped, not a failure.
            if m and all(re.fullmatch(r"\w+=\d+", kv) for kv in pairs):
                c = {k: int(v) for k, v in (kv.split("=") for kv in pairs)}
                c["up"] = float(m.group(1))
                out.append((t, c))
        return out

    def text(self):
        with self.lock:
            return "\n".join(t for _, t in self.lines)
