"""The busybox QEMU guest on a network (scripts/qemu-guest/init, qg_mode=net):
its command line, started in a network namespace or not, and its console's
"QG" lines parsed. The QEMU command line itself lives in
scripts/qemu-guest/run.sh only; the back-end is one argument:

    from guestnet import Tap, VhostUser, NetConfig, Guest
    cfg = NetConfig(ip="10.77.0.2/24", peer="10.77.0.1", mb=50, listen=5002, rx_mb=20)
    g = Guest(Tap("tap0"), "strict", cfg, console="/tmp/c.log", ns=ns)       # QEMU's -netdev tap
    g = Guest(VhostUser(sock), "strict", cfg, console="/tmp/c.log", ns=ns)   # the same guest on iotlbd
    g.start(); g.wait_line("QG tcp-send"); r = g.wait()    # r["tcp-send"]["mbytes_per_s"], ...

`ns` (a netns.Netns) runs QEMU inside the namespace (required for a TAP: it
lives there; harmless for vhost-user, whose socket is a file). iommu is
"strict" (Intel vIOMMU, iommu.strict=1), "lazy" (iommu.strict=0) or "off".
"""
import os
import re
import subprocess
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GUEST = os.path.join(ROOT, "scripts", "qemu-guest")
RUN_SH = os.path.join(GUEST, "run.sh")
BUILD_SH = os.path.join(GUEST, "build.sh")

# virtio-net feature bits the guest prints (QG features ...=0|1).
OFFLOADS = ("csum", "guest_csum", "guest_tso4", "guest_tso6", "guest_ecn", "host_tso4", "host_tso6", "host_ecn",
            "mrg_rxbuf")


@dataclass
class Tap:
    """QEMU's own virtio-net back-end on an existing TAP (no vhost).
    queues > 1 for a multi_queue TAP (QEMU cannot open one with a single queue)."""
    ifname: str
    queues: int = 1

    def run_args(self):
        return [f"tap:{self.ifname}"]

    def env(self):
        return {"QG_QUEUES": str(self.queues)} if self.queues > 1 else {}


@dataclass
class VhostUser:
    """A vhost-user socket (iotlbd's, or DPDK's net_vhost). server=True: QEMU
    listens and the back-end connects (iotlbd's client-mode device)."""
    socket: str
    server: bool = False

    def run_args(self):
        return (["--server"] if self.server else []) + [self.socket]

    def env(self):
        return {}


@dataclass
class NetConfig:
    """qg_mode=net's kernel command-line parameters (scripts/qemu-guest/init)."""
    ip: str = "10.77.0.2/24"
    peer: str = "10.77.0.1"
    pings: int = 5
    mb: int = 0            # MiB the guest sends to peer:port
    port: int = 5001
    listen: int = None     # port the guest receives one stream on
    rx_mb: int = None      # MiB it expects there (default: mb)
    wait: int = 60
    mtu: int = None
    gen: bool = False      # time the stream's making alone first

    def append(self):
        words = [f"qg_ip={self.ip}", f"qg_peer={self.peer}", f"qg_ping={self.pings}", f"qg_mb={self.mb}",
                 f"qg_port={self.port}", f"qg_wait={self.wait}"]
        if self.listen:
            words.append(f"qg_listen={self.listen}")
        if self.rx_mb is not None:
            words.append(f"qg_rx_mb={self.rx_mb}")
        if self.mtu:
            words.append(f"qg_mtu={self.mtu}")
        if self.gen:
            words.append("qg_gen=1")
        return " ".join(words)


def guest_command(backend, iommu="strict", net=None, mac=None, packed=False, qemu_args=()):
    """(argv, env) booting the guest on `backend` (Tap or VhostUser) with
    `iommu` strict|lazy|off; with `net`, in qg_mode=net."""
    env = dict(os.environ)
    for k in ("QG_MODE", "QG_APPEND", "QG_MAC", "QG_QUEUES", "QG_PACKED", "QG_SECONDS"):
        env.pop(k, None)
    env.update(backend.env())
    if net is not None:
        env["QG_MODE"] = "net"
        env["QG_APPEND"] = net.append()
    if mac:
        env["QG_MAC"] = mac
    if packed:
        env["QG_PACKED"] = "1"
    return [RUN_SH, *backend.run_args(), iommu, *qemu_args], env


LINE = re.compile(r"^QG (features|net|ping|gen|tcp-send|tcp-recv|net-counters|net-result) (.*)$")


def _value(v, key=""):
    if key in ("bits", "sha256", "expected"):
        return v  # digits, but not numbers
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if re.fullmatch(r"-?\d+\.\d*", v):
        return float(v)
    return v


def parse_console(text):
    """{"features": {..}, "net": {..}, "ping": {..}, "tcp-send": {..}, "tcp-recv":
    {..}, "net-counters": {..}, "net-result": {..}, "errors": [..], "done": bool}"""
    out = {"errors": [], "done": False}
    for line in text.splitlines():
        line = line.strip()
        m = LINE.match(line)
        if m:
            out[m.group(1)] = {k: _value(v, k) for k, v in (w.split("=", 1) for w in m.group(2).split() if "=" in w)}
        elif line.startswith("QG error"):
            out["errors"].append(line)
        elif line == "QG done":
            out["done"] = True
    return out


class Guest:
    """One QEMU run of the guest; its console (QEMU's stderr too) goes to `console`."""

    def __init__(self, backend, iommu, net, console, ns=None, mac=None, packed=False, qemu_args=()):
        self.argv, self.env = guest_command(backend, iommu, net, mac, packed, qemu_args)
        self.console, self.ns, self.proc = console, ns, None
        self.iommu = iommu

    def start(self):
        self.t0 = time.time()
        self.log = open(self.console, "w")
        popen = self.ns.popen if self.ns else subprocess.Popen
        # run.sh execs QEMU: the process is QEMU itself.
        self.proc = popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def text(self):
        with open(self.console, errors="replace") as f:
            return f.read()

    def wait_line(self, prefix, timeout=120):
        """Waits for a console line starting with `prefix`; returns it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.text().splitlines():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited {self.proc.returncode} before {prefix!r}:\n{self.text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no {prefix!r} within {timeout} s:\n{self.text()[-3000:]}")

    def wait(self, timeout=180):
        """Waits for QEMU to exit (killed after `timeout`); returns the parsed
        console with "returncode", "timed_out", "wall_s" and "qemu_errors"."""
        try:
            self.proc.wait(timeout=max(0.1, timeout - (time.time() - self.t0)))
            timed_out = False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            timed_out = True
        self.log.close()
        text = self.text()
        r = parse_console(text)
        r.update(returncode=self.proc.returncode, timed_out=timed_out, wall_s=round(time.time() - self.t0, 1),
                 qemu_errors=[l for l in text.splitlines() if l.startswith("qemu-system-x86_64:")], text=text)
        return r

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
