#!/usr/bin/env python3
"""Network namespaces for integration tests: every frame a test makes stays in
a namespace the test owns (or on loopback), never anywhere else.

    from netns import Netns
    with Netns("guest") as ns:                   # ip netns add iotlbt-PID-guest-N; lo up
        ns.add_tap("tap0", multi_queue=False)    # ip tuntap add ... mode tap vnet_hdr (inside)
        ns.add_address("tap0", "10.77.0.1/24")   # 10.0.0.0/8 only, inside only
        qemu = ns.popen([...])                   # ip netns exec NS ...: QEMU opens the TAP there
        rx = ns.tcp_receiver("10.77.0.1", 5001)  # a receiver in the namespace (sha256, MB/s)
        with ns.capture("tap0", direction="in") as cap:   # tcpdump in the namespace
            ...
        cap.lengths, cap.lengths_from("10.77.0.2")   # original lengths of the frames seen
        ns.counters("tap0")                      # /proc/net/dev inside: rx_packets, ...
    # processes started here are killed and the namespace deleted, also on failure

Root only (ip netns add). The namespace has no default route and no link to
anywhere outside it: `check_isolated()` asserts so (every test calls it after
its set-up). A namespace left by a test that was killed (name iotlbt-PID-...,
PID gone) is deleted by the next Netns() (`sweep()`). Teardown also runs from
atexit and on SIGTERM.

Run as a script, it is the namespace side of a TCP stream (run inside with
`ip netns exec`; tcp_receiver/tcp_sender do that):

    netns.py recv --bind 10.77.0.1 --port 5001 [--mb N]   accept one connection, read to EOF
    netns.py send --to 10.77.0.2 --port 5002 --mb N        send qgdata.py's stream of N MiB
each printing one JSON line: bytes, sha256, seconds from first to last byte,
MB/s (10^6 bytes/s), and, with --mb, the expected sha256 and whether it matches.
"""
import atexit
import ipaddress
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts", "qemu-guest"))
import qgdata  # noqa: E402,F401 (tests take it from here)
from nscapture import Capture  # noqa: E402

PREFIX = "iotlbt-"
TEN = ipaddress.ip_network("10.0.0.0/8")
IP = "ip"
_counter = itertools.count()
_live = []          # namespaces not yet closed (atexit / SIGTERM close them)
_lock = threading.Lock()


def _run(argv, check=True, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def pid_alive(pid):
    """Whether process `pid` exists (ours or not)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_ns_pids(name):
    """SIGKILL whatever still runs in namespace `name`."""
    p = _run([IP, "netns", "pids", name], check=False)
    for pid in p.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def sweep():
    """Deletes namespaces iotlbt-PID-... whose PID is gone (a test killed hard)."""
    p = _run([IP, "netns", "list"], check=False)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(re.escape(PREFIX) + r"(\d+)-", name)
        if m and not pid_alive(int(m.group(1))):
            _kill_ns_pids(name)
            _run([IP, "netns", "del", name], check=False)


def _close_all():
    for ns in list(_live):
        ns.close()


atexit.register(_close_all)


def _on_sigterm(signum, frame):
    _close_all()
    raise SystemExit(128 + signum)


def _install_sigterm():
    # Only where nobody else chose a handler (and only from the main thread).
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        pass


def parse_proc_net_dev(text):
    """{ifname: {rx_bytes, rx_packets, rx_errs, rx_drop, ..., tx_bytes, tx_packets, ...}}"""
    names = ["bytes", "packets", "errs", "drop", "fifo", "frame", "compressed", "multicast"]
    tx = ["bytes", "packets", "errs", "drop", "fifo", "colls", "carrier", "compressed"]
    out = {}
    for line in text.splitlines()[2:]:
        if ":" not in line:
            continue
        name, rest = line.split(":", 1)
        v = [int(x) for x in rest.split()]
        out[name.strip()] = {**{"rx_" + n: v[i] for i, n in enumerate(names)},
                             **{"tx_" + n: v[8 + i] for i, n in enumerate(tx)}}
    return out


class StreamEnd:
    """A `netns.py recv|send` process in the namespace; result() is its JSON line."""

    def __init__(self, ns, argv):
        self.proc = ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out = self.err = None

    def ready(self, timeout=10):
        """recv: waits for its "listening" line on stderr."""
        deadline = time.time() + timeout
        line = self.proc.stderr.readline()
        if "listening" not in line or time.time() > deadline:
            raise RuntimeError(f"receiver did not start: {line}")
        return self

    def result(self, timeout=120):
        try:
            self.out, self.err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.out, self.err = self.proc.communicate()
            raise AssertionError(f"stream end still running after {timeout} s: {self.err}")
        lines = [l for l in self.out.splitlines() if l.startswith("{")]
        if self.proc.returncode != 0 or not lines:
            raise AssertionError(f"stream end exited {self.proc.returncode}: {self.out}{self.err}")
        return json.loads(lines[-1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


class Netns:
    """A network namespace owned by this test, deleted by close() (idempotent)."""

    def __init__(self, tag="t"):
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root")
        _install_sigterm()
        sweep()
        tag = re.sub(r"[^A-Za-z0-9]", "", tag)[:12] or "t"
        self.name = f"{PREFIX}{os.getpid()}-{tag}-{next(_counter)}"
        self.procs = []
        self.links = ["lo"]
        self.tmp = tempfile.mkdtemp(prefix=self.name + "-")
        self.closed = False
        _run([IP, "netns", "add", self.name])
        with _lock:
            _live.append(self)
        try:
            self.ip("link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    # --- running things inside ---------------------------------------------
    def argv(self, argv):
        """The command line that runs `argv` inside the namespace."""
        return [IP, "netns", "exec", self.name, *argv]

    def run(self, argv, check=True, **kw):
        """Runs argv inside; returns CompletedProcess (text, output captured)."""
        kw.setdefault("timeout", 60)
        return _run(self.argv(argv), check=check, **kw)

    def popen(self, argv, **kw):
        """Starts argv inside (ip netns exec execs it: the Popen's pid is the
        process itself); killed by close() if still running."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.argv(argv), **kw)
        self.procs.append(p)
        return p

    def ip(self, *args):
        return _run([IP, "-n", self.name, *args])

    # --- links ---------------------------------------------------------------
    def no_ipv6(self, ifname):
        """No IPv6 on `ifname` (no router solicitations or MLD reports: only the
        test's own frames cross it, so its counters count those)."""
        self.run(["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"], check=False)

    def add_tap(self, ifname, multi_queue=False, vnet_hdr=True, user=None, group=None, up=True, mtu=None, ipv6=False):
        """A persistent TAP inside (ip tuntap add): plain, or multi_queue, with or
        without vnet_hdr; `user`/`group` may open it without CAP_NET_ADMIN.
        IPv6 is off on it unless `ipv6`."""
        argv = ["tuntap", "add", "dev", ifname, "mode", "tap"]
        if multi_queue:
            argv.append("multi_queue")
        if vnet_hdr:
            argv.append("vnet_hdr")
        if user is not None:
            argv += ["user", str(user)]
        if group is not None:
            argv += ["group", str(group)]
        self.ip(*argv)
        self.links.append(ifname)
        if not ipv6:
            self.no_ipv6(ifname)
        if mtu:
            self.ip("link", "set", ifname, "mtu", str(mtu))
        if up:
            self.ip("link", "set", ifname, "up")
        return ifname

    def add_bridge(self, ifname, ports=(), up=True):
        """A Linux bridge inside with `ports` (links of this namespace) on it."""
        self.ip("link", "add", ifname, "type", "bridge")
        self.links.append(ifname)
        self.no_ipv6(ifname)
        for p in ports:
            self.ip("link", "set", p, "master", ifname)
        if up:
            self.ip("link", "set", ifname, "up")
        return ifname

    def add_address(self, ifname, cidr):
        """An IPv4 address in 10.0.0.0/8 on a link of this namespace."""
        net = ipaddress.ip_interface(cidr)
        if net.version != 4 or not net.network.subnet_of(TEN):
            raise ValueError(f"{cidr}: test addresses are in 10.0.0.0/8 only")
        self.ip("addr", "add", cidr, "dev", ifname)

    def link_names(self):
        return [l.split(":")[1].strip().split("@")[0] for l in self.ip("-o", "link", "show").stdout.splitlines()]

    def check_isolated(self):
        """No default route, no route through a link this helper did not make,
        no link it did not make, and every address in 10/8 or loopback."""
        routes = self.ip("-4", "route", "show", "table", "all").stdout + self.ip("-6", "route", "show", "table", "all").stdout
        for line in routes.splitlines():
            if line.startswith("default") or " default " in line:
                raise AssertionError(f"{self.name}: a default route: {line}")
            m = re.search(r" dev (\S+)", line)
            if m and m.group(1) not in self.links:
                raise AssertionError(f"{self.name}: route through {m.group(1)}: {line}")
        extra = set(self.link_names()) - set(self.links)
        if extra:
            raise AssertionError(f"{self.name}: links not made here: {sorted(extra)}")
        for line in self.ip("-o", "-4", "addr", "show").stdout.splitlines():
            a = ipaddress.ip_interface(line.split()[3])
            if not (a.network.subnet_of(TEN) or a.is_loopback):
                raise AssertionError(f"{self.name}: address outside 10/8: {line}")

    # --- observing -----------------------------------------------------------
    def counters(self, ifname=None):
        """/proc/net/dev inside: {ifname: {...}} or one interface's dict."""
        text = self.run(["cat", "/proc/net/dev"]).stdout
        all_ = parse_proc_net_dev(text)
        return all_ if ifname is None else all_[ifname]

    def capture(self, ifname, path=None, snaplen=128, direction=None, bpf=None):
        """tcpdump on `ifname` inside (started and listening when this returns);
        a context manager; `lengths` once stopped."""
        path = path or os.path.join(self.tmp, f"{ifname}-{next(_counter)}.pcap")
        return Capture(self, ifname, path, snaplen, direction, bpf)

    def tcp_receiver(self, bind, port, mb=None, timeout=120):
        """`netns.py recv` inside, listening when this returns; .result() → dict."""
        argv = [sys.executable, os.path.abspath(__file__), "recv", "--bind", bind, "--port", str(port),
                "--timeout", str(timeout)]
        if mb is not None:
            argv += ["--mb", str(mb)]
        return StreamEnd(self, argv).ready()

    def tcp_sender(self, to, port, mb, timeout=120):
        """`netns.py send` inside (retries the connection until accepted, up to
        `timeout`); .result() → dict."""
        return StreamEnd(self, [sys.executable, os.path.abspath(__file__), "send", "--to", to, "--port", str(port),
                                "--mb", str(mb), "--timeout", str(timeout)])

    # --- teardown --------------------------------------------------------------
    def close(self):
        if self.closed:
            return
        self.closed = True
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        _kill_ns_pids(self.name)
        # Persistent TAPs go with the namespace (their fds are closed by now).
        _run([IP, "netns", "del", self.name], check=False)
        with _lock:
            if self in _live:
                _live.remove(self)
        if not os.environ.get("KEEP_NETNS_FILES"):
            subprocess.run(["rm", "-rf", self.tmp])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def exists(name):
    return name in [l.split()[0] for l in _run([IP, "netns", "list"], check=False).stdout.splitlines() if l.split()]


if __name__ == "__main__":
    # The namespace side of a TCP stream (the usage above): integration/nsstream.py.
    import nsstream
    nsstream.main(__doc__)
