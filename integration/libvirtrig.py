"""What the libvirt tests share (integration/test_libvirt.py and
integration/libvirtports.py): where the example domains and the script are,
reading the guests' consoles and QEMU's log, and `LibvirtDaemons` (virtlogd
and libvirtd started once for all the tests, stopped by PID)."""
import datetime
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netns import pid_alive  # noqa: E402
from iotlbtest import ROOT, build_test_guest, stop_process  # noqa: E402
from test_qemu_restart import QEMU_BENIGN, QEMU_DISCONNECT_MESSAGES  # noqa: E402


EXAMPLES = os.path.join(ROOT, "examples", "libvirt")
SCRIPT = os.path.join(EXAMPLES, "libvirt-guest.sh")
VIRSH = ["virsh", "-c", "qemu:///system"]
DOMAIN = "iotlbd-guest"   # as in the example files and the script
DEVICE = "vm1"
PAIR = (("iotlbd-vm2", "vm2"), ("iotlbd-vm3", "vm3"))  # the peer domains and their devices
QEMU_LOG = f"/var/log/libvirt/qemu/{DOMAIN}.log"  # QEMU's stderr, through virtlogd
ACCESS_PLATFORM = 1 << 33
BACKEND_REQ = 1 << 5
COUNTERS = re.compile(r"^QG counters phase=run up=([\d.]+) (.*)$")
QEMU_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z qemu-system-x86_64: (.*)$")
# What QEMU says about its vhost-user back-end going away and, in client mode
# with <reconnect>, about connecting again while it is not back yet.
QEMU_RECONNECT_MESSAGES = re.compile(r"Unable to connect character device|Failed to connect to")
TRAFFIC = 400       # frames back (two bursts, 60 and 1514 bytes) that count as traffic
BOOT_TIMEOUT = 60   # from `virsh start` to traffic, on a busy 2-core machine
NET_TIMEOUT = 150   # from `up tap|peer` to the guests powered off (qg_wait is 60 s a step)
STREAM_MB = 1       # the TCP streams of the port domains' <cmdline> (qg_mb=1)
TAP_HOST = "10.77.0.1"  # tap0's address in the namespace (iotlbd-guest-tap.xml's qg_peer)


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def counters(text):
    """The console's "QG counters phase=run" lines, as dicts of ints (plus "up");
    a last line still being written is left for the next read, and so is a line
    with an empty value (the guest read /qg-sent while its pktgen loop rewrote
    it: `pktgen_sent=`, seen once here)."""
    out = []
    for line in text[:text.rfind("\n") + 1].splitlines():
        m = COUNTERS.match(line.strip())
        if m:
            words = [kv.split("=", 1) for kv in m.group(2).split()]
            if not all(len(w) == 2 and re.fullmatch(r"-?\d+", w[1]) for w in words):
                continue
            c = {k: int(v) for k, v in words}
            c["up"] = float(m.group(1))
            out.append(c)
    return out


def libvirt_section():
    text = read_text(os.path.join(ROOT, "README.md"))
    m = re.search(r"^## Use with libvirt\n(.*?)(?=^## )", text, re.S | re.M)
    if not m:
        raise AssertionError('README.md has no "## Use with libvirt" section')
    return m.group(1)


def stripped_lines(text):
    """Lines without their indentation, blank ones and the leading comment dropped."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return [line.strip() for line in text.splitlines() if line.strip()]


PORT_FILES = ("iotlbd-guest-tap.xml", "iotlbd-vm2.xml", "iotlbd-vm3.xml")


def domstate(domain):
    """virsh domstate DOMAIN ("" when there is no such domain)."""
    return subprocess.run(VIRSH + ["domstate", domain], capture_output=True, text=True, timeout=60).stdout.strip()


def qemu_complaints(log, offset, windows=()):
    """QEMU's complaints in `log` (its stderr, kept by virtlogd) from `offset` on:
    all but its back-end going away inside a restart's window (kill to
    connected, plus a second), the benign stopped-device one, and destroy's
    SIGTERM."""
    with open(log, errors="replace") as f:
        f.seek(offset)
        lines = f.read().splitlines()
    bad = []
    for line in lines:
        m = QEMU_LINE.match(line)
        if not m:
            continue
        msg = m.group(2)
        if ": info: " in msg or QEMU_BENIGN in msg or msg.startswith("terminating on signal 15"):
            continue
        t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc).timestamp()
        if (QEMU_DISCONNECT_MESSAGES.search(msg) or QEMU_RECONNECT_MESSAGES.search(msg)) and \
                any(a - 1 <= t <= b + 1 for a, b in windows):
            continue
        bad.append(line)
    return bad


def log_size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0



class LibvirtDaemons:
    """virtlogd and libvirtd for the tests of a module, each in its own
    session and by PID: started by the first class that needs them, stopped at
    the module's end (a module cleanup, after the classes' own: they still need virsh),
    also when something failed. Their logs, and each class's files, go to one
    folder (0755: QEMU, as libvirt-qemu, reaches the sockets and boot files in
    it)."""
    _shared = None
    _failed = None

    @classmethod
    def shared(cls):
        if cls._failed is not None:
            raise AssertionError(f"libvirt could not be started: {cls._failed}")
        if cls._shared is None:
            try:
                cls._shared = cls()
            except Exception as e:
                cls._failed = e
                raise
        return cls._shared

    def __init__(self):
        # No skip: whatever is missing is a failure of `make test`.
        if os.geteuid() != 0:
            raise AssertionError("test_libvirt.py needs root (libvirtd's system instance, QEMU as libvirt-qemu)")
        for tool in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "curl", "ip"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                raise AssertionError(f"{tool} is missing: `make libvirt-tools net-tools` installs libvirt, QEMU and ip")
        try:
            pwd.getpwnam("libvirt-qemu")
            members = grp.getgrnam("kvm").gr_mem if "kvm" in [g.gr_name for g in grp.getgrall()] else ["libvirt-qemu"]
        except KeyError:
            raise AssertionError("no libvirt-qemu user: `make libvirt-tools` creates it")
        if "libvirt-qemu" not in members:
            raise AssertionError("libvirt-qemu is not in group kvm: libvirtd would probe QEMU again on every "
                                 "define and start (`make libvirt-tools` adds it)")
        for name in ("libvirtd", "virtlogd"):
            pid = read_text(f"/run/{name}.pid").strip()
            if pid.isdigit() and pid_alive(int(pid)):
                raise AssertionError(f"a {name} runs already (PID {pid}): this test starts and stops its own")
        build_test_guest()  # QEMU checked above, with libvirt's tools
        self.tmp = tempfile.mkdtemp(prefix="iotlbd-libvirt-")
        self.procs = {}
        unittest.addModuleCleanup(self.cleanup)  # also when start() fails half-way
        os.chmod(self.tmp, 0o755)
        self.start()

    def start(self):
        """virtlogd, then libvirtd; ready once virsh answers."""
        for name in ("virtlogd", "libvirtd"):
            self.spawn(name)
        deadline = time.monotonic() + 30
        while True:
            if self.procs["libvirtd"].poll() is not None:
                raise AssertionError(f"libvirtd exited {self.procs['libvirtd'].returncode}:\n"
                                     + read_text(os.path.join(self.tmp, "libvirtd-1.log"))[-3000:])
            if subprocess.run(VIRSH + ["version"], capture_output=True, timeout=30).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError("libvirtd does not answer virsh after 30 s")
            time.sleep(0.2)

    def spawn(self, name):
        n = sum(1 for k in os.listdir(self.tmp) if k.startswith(name + "-")) + 1
        with open(os.path.join(self.tmp, f"{name}-{n}.log"), "w") as log:
            self.procs[name] = subprocess.Popen([name], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def stop(self, name):
        """SIGTERM to the PID the test started, SIGKILL after 20 s."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_process(proc, timeout=20)

    def running(self):
        libvirtd = self.procs.get("libvirtd")
        return libvirtd is not None and libvirtd.poll() is None

    def folder(self, name):
        path = os.path.join(self.tmp, name)
        os.makedirs(path, 0o755, exist_ok=True)
        os.chmod(path, 0o755)
        return path

    def clean_domains(self, domains):
        """Destroys and undefines the test's domains; if libvirtd cannot (or is not
        running), kills their QEMUs by the PID libvirt recorded."""
        for domain in domains:
            if self.running() and domstate(domain):
                subprocess.run(VIRSH + ["destroy", domain], capture_output=True, timeout=60)
                subprocess.run(VIRSH + ["undefine", domain], capture_output=True, timeout=60)
            # Only this run's QEMU: its command line names the test's folder.
            pid = read_text(f"/run/libvirt/qemu/{domain}.pid").strip()
            if pid.isdigit() and pid_alive(int(pid)):
                cmdline = read_text(f"/proc/{pid}/cmdline")
                if f"guest={domain}" in cmdline and self.tmp in cmdline:
                    os.kill(int(pid), signal.SIGKILL)

    def cleanup(self):
        # The next module's classes (libvirtports.py's, run by test_libvirt.py) start their own.
        if LibvirtDaemons._shared is self:
            LibvirtDaemons._shared = None
        self.stop("libvirtd")
        self.stop("virtlogd")
        if os.environ.get("KEEP_LIBVIRT_LOGS"):
            sys.stderr.write(f"logs kept in {self.tmp}\n")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class FiguresThenDown:
    """A libvirt TestCase mix-in: each test's figures printed after it, then
    `libvirt-guest.sh down`, so that nothing is left for the next test."""

    def setUp(self):
        self.figures = []

    def tearDown(self):
        if self.figures:
            sys.stderr.write("[" + "; ".join(self.figures) + "] ")
        subprocess.run([SCRIPT, "down"], capture_output=True, env=self.env, timeout=90)
