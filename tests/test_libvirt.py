#!/usr/bin/env python3
"""libvirt as the front door (issue 25): the test guest of scripts/qemu-guest/
booted by `virsh start` on an iotlbd vhost-user device, behind an emulated
Intel IOMMU, from the domain XML of examples/libvirt/ and with its script
(examples/libvirt/libvirt-guest.sh: curl creates the device, virsh defines and
starts the domain, and `down` tears both down).

The test starts virtlogd and libvirtd itself (no systemd; Debian's
libvirt-daemon without libvirt-daemon-system) and stops them by PID at the end,
also when something failed. iotlbd runs with --vhost-user-group libvirt-qemu
(QEMU runs as that user) and --state-dir. The guest (qg_mode=continuous) sends
pktgen bursts of UDP frames to itself; the device's loopback port returns them;
its serial console (a file) prints the counters every ~0.5 s.

- interface mode='client' (QEMU connects; a server-mode device; <reconnect>):
  traffic comes back; the IOTLB counters show misses, updates and
  invalidations; iotlbd killed with -9 and started again on its state
  directory: QEMU connects again, traffic resumes; `virsh destroy` leaves the
  device without a connection; `virsh start` again: the new QEMU connects.
- interface mode='server' (QEMU listens; a client-mode device): the same
  traffic and counters; libvirtd stopped and started again under the running
  domain: the domain runs on, traffic too; iotlbd killed with -9 and started
  again: it connects to QEMU by itself, traffic resumes; `virsh destroy` leaves
  no connection; `virsh start` again: the device connects to the new QEMU.
- The README's "Use with libvirt" fragments are the ones in the example files
  (checked as written), and the two domain files differ only in <source>.

Needs root, libvirt (`make libvirt-tools`) and QEMU; fails, never skips, when
something cannot run. KEEP_LIBVIRT_LOGS=1 keeps the test's folder. Takes about
a minute here. Run by `make test-libvirt` (part of `make test`)."""
import datetime
import difflib
import grp
import json
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
from test_examples import ROOT, Daemon, free_port  # noqa: E402
from test_qemu_restart import ERROR_COUNTERS, QEMU_BENIGN, QEMU_DISCONNECT_MESSAGES  # noqa: E402

EXAMPLES = os.path.join(ROOT, "examples", "libvirt")
SCRIPT = os.path.join(EXAMPLES, "libvirt-guest.sh")
GUEST = os.path.join(ROOT, "scripts", "qemu-guest")
VIRSH = ["virsh", "-c", "qemu:///system"]
DOMAIN = "iotlbd-guest"   # as in the example files and the script
DEVICE = "vm1"
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


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


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


class Fragments(unittest.TestCase):
    """The README's libvirt guide as written: what it shows is what the test boots."""

    def example(self, mode):
        return read_text(os.path.join(EXAMPLES, f"iotlbd-guest-{mode}.xml"))

    def test_xml_fragments_are_the_example_files(self):
        section = libvirt_section()
        blocks = re.findall(r"```xml\n(.*?)```", section, re.S)
        self.assertGreaterEqual(len(blocks), 5, "interface (both modes), iommu, memoryBacking, features, override")
        files = {mode: stripped_lines(self.example(mode)) for mode in ("client", "server")}
        for block in blocks:
            want = stripped_lines(block)
            modes = [m for m in ("client", "server") if f"mode='{m}'" in block] or ["client", "server"]
            for mode in modes:
                lines = files[mode]
                found = any(lines[i:i + len(want)] == want for i in range(len(lines) - len(want) + 1))
                self.assertTrue(found, f"README fragment not in iotlbd-guest-{mode}.xml as written:\n{block}")
        for needle in ("<interface type='vhostuser'>", "<iommu model='intel'>", "<memoryBacking>", "<features>",
                       "<qemu:override>", "name='vectors'", "mode='client'", "mode='server'"):
            self.assertIn(needle, "".join(blocks), f"the README shows no {needle}")

    def test_domain_files_differ_in_source_only(self):
        a, b = stripped_lines(self.example("client")), stripped_lines(self.example("server"))
        changed = [line[2:] for line in difflib.ndiff(a, b) if line[:2] in ("- ", "+ ")]
        self.assertTrue(changed)
        for line in changed:
            self.assertRegex(line, r"^(<source type='unix' |<reconnect |</source>)", "the two domains differ elsewhere")

    def test_readme_commands_are_the_scripts(self):
        """The device JSON the README creates is the script's; the group setting
        is the test's."""
        section = libvirt_section()
        script = read_text(SCRIPT)
        bodies = re.findall(r"-d '(\{.*?\})'", section)
        self.assertEqual(len(bodies), 2, "the README creates the device for both modes")
        for body in bodies:
            json.loads(body)
            self.assertTrue(f"'{body}'" in script, f"README device JSON not in libvirt-guest.sh: {body}")
        self.assertIn("--vhost-user-group libvirt-qemu", section)
        self.assertIn("install -d -m 0770 -g libvirt-qemu", section)
        self.assertIn("install -d -m 0770 -g libvirt-qemu", script)


class LibvirtGuest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        t0 = time.monotonic()
        # No skip: whatever is missing is a failure of `make test`.
        if os.geteuid() != 0:
            raise AssertionError("test_libvirt.py needs root (libvirtd's system instance, QEMU as libvirt-qemu)")
        for tool in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "curl"):
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
                raise AssertionError(f"{tool} is missing: `make libvirt-tools` installs libvirt and QEMU")
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
        out = subprocess.run([os.path.join(GUEST, "build.sh")], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise AssertionError(f"scripts/qemu-guest/build.sh failed:\n{out.stdout}{out.stderr}")
        cls.tmp = tempfile.mkdtemp(prefix="iotlbd-libvirt-")
        cls.addClassCleanup(cls.remove_tmp)
        os.chmod(cls.tmp, 0o755)  # QEMU (libvirt-qemu) reaches the sockets and the boot files below
        cls.vu = os.path.join(cls.tmp, "vu")
        os.mkdir(cls.vu, 0o755)
        cls.state = os.path.join(cls.tmp, "state")
        cls.env = dict(os.environ, VHOST_USER_DIR=cls.vu, BOOT_DIR=os.path.join(cls.tmp, "boot"),
                       QEMU_GUEST_CACHE=os.environ.get("QEMU_GUEST_CACHE", os.path.join(ROOT, ".cache", "qemu-guest")))
        cls.procs = {}
        cls.addClassCleanup(cls.stop_libvirt)  # also when start_libvirt fails half-way
        cls.start_libvirt()
        cls.clean_domain()  # one left by a run that was killed
        cls.addClassCleanup(cls.clean_domain)
        cls.port = free_port()
        cls.daemons = 0
        cls.daemon = None
        cls.addClassCleanup(cls.stop_daemon)
        cls.start_daemon()
        cls.env["IOTLBD"] = cls.daemon.url
        sys.stderr.write(f"\n[libvirtd and iotlbd ready in {time.monotonic() - t0:.1f} s] ")

    # --- the daemons the test starts and stops ---

    @classmethod
    def start_libvirt(cls):
        """virtlogd, then libvirtd, each in its own session, by PID; ready once
        virsh answers."""
        for name in ("virtlogd", "libvirtd"):
            cls.spawn(name)
        deadline = time.monotonic() + 30
        while True:
            if cls.procs["libvirtd"].poll() is not None:
                raise AssertionError(f"libvirtd exited {cls.procs['libvirtd'].returncode}:\n"
                                     + read_text(os.path.join(cls.tmp, "libvirtd-1.log"))[-3000:])
            if subprocess.run(VIRSH + ["version"], capture_output=True, timeout=30).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError("libvirtd does not answer virsh after 30 s")
            time.sleep(0.2)

    @classmethod
    def spawn(cls, name):
        n = sum(1 for k in os.listdir(cls.tmp) if k.startswith(name + "-")) + 1
        with open(os.path.join(cls.tmp, f"{name}-{n}.log"), "w") as log:
            cls.procs[name] = subprocess.Popen([name], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)

    @classmethod
    def stop(cls, name):
        """SIGTERM to the PID the test started, SIGKILL after 20 s."""
        proc = cls.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @classmethod
    def stop_libvirt(cls):
        cls.stop("libvirtd")
        cls.stop("virtlogd")

    @classmethod
    def clean_domain(cls):
        """Destroys and undefines the test's domain; if libvirtd cannot (or is not
        running), kills its QEMU by the PID libvirt recorded."""
        libvirtd = cls.procs.get("libvirtd")
        if libvirtd is not None and libvirtd.poll() is None and \
                subprocess.run(VIRSH + ["domstate", DOMAIN], capture_output=True, timeout=60).returncode == 0:
            subprocess.run(VIRSH + ["destroy", DOMAIN], capture_output=True, timeout=60)
            subprocess.run(VIRSH + ["undefine", DOMAIN], capture_output=True, timeout=60)
        # Only this run's QEMU: its command line names the test's folder.
        pid = read_text(f"/run/libvirt/qemu/{DOMAIN}.pid").strip()
        if pid.isdigit() and pid_alive(int(pid)) and getattr(cls, "tmp", None) and \
                f"guest={DOMAIN}" in read_text(f"/proc/{pid}/cmdline") and cls.tmp in read_text(f"/proc/{pid}/cmdline"):
            os.kill(int(pid), signal.SIGKILL)

    @classmethod
    def start_daemon(cls):
        cls.daemons += 1
        log = open(os.path.join(cls.tmp, f"iotlbd-{cls.daemons}.log"), "w")
        cls.daemon = Daemon("--state-dir", cls.state, "--vhost-user-dir", cls.vu, "--vhost-user-group", "libvirt-qemu",
                            port=cls.port, log=log, log_level="info")
        log.close()  # the daemon has its own descriptor

    @classmethod
    def stop_daemon(cls):
        if cls.daemon is not None:
            if cls.daemon.proc.poll() is None:
                cls.daemon.proc.kill()
            cls.daemon.proc.wait()

    @classmethod
    def remove_tmp(cls):
        if os.environ.get("KEEP_LIBVIRT_LOGS"):
            sys.stderr.write(f"logs kept in {cls.tmp}\n")
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    # --- helpers ---

    def script(self, *args, timeout=90):
        out = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        self.assertEqual(out.returncode, 0, f"libvirt-guest.sh {' '.join(args)}:\n{out.stdout}{out.stderr}"
                         f"\nQEMU's log:\n{read_text(QEMU_LOG)[-2000:]}")
        return out.stdout

    def device(self):
        status, dev = self.daemon.call("GET", f"/v1/devices/{DEVICE}", timeout=5)
        self.assertEqual(status, 200, dev)
        return dev

    def stats(self):
        return self.daemon.call("GET", f"/v1/devices/{DEVICE}/iotlb/stats", timeout=5)[1]

    def domstate(self):
        return subprocess.run(VIRSH + ["domstate", DOMAIN], capture_output=True, text=True).stdout.strip()

    def wait_for(self, what, predicate, timeout, poll=0.05):
        deadline = time.monotonic() + timeout
        while True:
            got = predicate()
            if got:
                return got
            if time.monotonic() > deadline:
                self.fail(f"{what}: not within {timeout} s (domain {self.domstate()!r})\n"
                          f"console:\n{read_text(self.console)[-3000:]}")
            time.sleep(poll)

    def traffic_after(self, mark):
        """The first counters line with the carrier on and rx_packets above `mark`."""
        for c in counters(read_text(self.console)):
            if c["carrier"] == 1 and c["rx_packets"] > mark:
                return c
        return None

    def boot(self, mode):
        """libvirt-guest.sh up MODE, then waits for TRAFFIC frames back. A guest
        that resets before /init (seen rarely under TCG, tests/test_qemu.py) is
        started once more: on_reboot is destroy."""
        self.console = os.path.join(self.tmp, f"console-{mode}.log")
        self.env["CONSOLE"] = self.console
        self.log_offset = os.path.getsize(QEMU_LOG) if os.path.exists(QEMU_LOG) else 0
        t0 = time.monotonic()
        self.script("up", mode)
        t_started = time.monotonic()
        restarted = False

        def traffic():
            c = counters(read_text(self.console))
            if c and c[-1]["carrier"] == 1 and c[-1]["udp_NoPorts"] >= TRAFFIC:
                return c[-1]
            nonlocal restarted
            if not restarted and "QG init" not in read_text(self.console) and self.domstate() == "shut off":
                restarted = True
                sys.stderr.write(f"[{mode}: the guest reset before /init, starting it again] ")
                subprocess.run(VIRSH + ["start", DOMAIN], capture_output=True, timeout=60)
            return None

        c = self.wait_for(f"{mode}: {TRAFFIC} frames back", traffic, BOOT_TIMEOUT, poll=0.2)
        sys.stderr.write(f"[{mode}: virsh start done in {t_started - t0:.1f} s, {TRAFFIC} frames back "
                         f"{time.monotonic() - t0:.1f} s after `up`] ")
        return c

    def check_iotlb(self, mode, what):
        """The device negotiated the IOTLB with QEMU and its counters moved."""
        dev, stats = self.device(), self.stats()
        vu = dev["vhost_user"]
        self.assertTrue(vu["connected"], vu)
        self.assertTrue(int(vu["features"], 16) & ACCESS_PLATFORM, f"ACCESS_PLATFORM not negotiated: {vu}")
        self.assertTrue(int(vu["protocol_features"], 16) & BACKEND_REQ, f"no backend channel: {vu}")
        for k in ("misses", "updates", "invalidations"):
            self.assertGreater(stats[k], 0, f"{mode} ({what}): no IOTLB {k}: {stats}")
        self.assertGreater(vu["misses_forwarded"], 0, vu)
        self.assertEqual(stats["access_failures"], 0, stats)
        self.assertEqual(vu["memory_faults"], 0, vu)
        self.figures.append(f"{mode} {what}: misses {stats['misses']} updates {stats['updates']} "
                            f"invalidations {stats['invalidations']} forwarded {vu['misses_forwarded']}")
        return stats

    def restart_iotlbd(self, mode):
        """kill -9 under traffic, the same command again; the device comes back from
        the state file and the front-end with it, traffic resumes through the new
        daemon. Returns (kill, connected) wall-clock times for the QEMU log check."""
        t_kill, w_kill = time.monotonic(), time.time()
        self.daemon.proc.kill()
        self.daemon.proc.wait()
        self.start_daemon()  # no API call but GETs
        t_conn = self.wait_for(f"{mode}: connected again after the restart",
                               lambda: self.device()["vhost_user"]["connected"] and time.monotonic(), 20, poll=0.01)
        w_conn = time.time()
        # Frames through the new daemon: its RX queue (the guest's) used chains.
        self.wait_for(f"{mode}: frames through the restarted daemon",
                      lambda: self.stats()["vqs"][0]["chains"] > 0, 20)
        mark = max((c["rx_packets"] for c in counters(read_text(self.console))), default=0)
        self.wait_for(f"{mode}: the guest's rx grows again after the restart", lambda: self.traffic_after(mark), 20)
        sys.stderr.write(f"[{mode}: iotlbd kill -9 to connected {(t_conn - t_kill) * 1000:.0f} ms, "
                         f"to rx again {time.monotonic() - t_kill:.1f} s] ")
        return (w_kill, w_conn)

    def destroy(self, mode):
        """virsh destroy: the device is left without a front-end."""
        out = subprocess.run(VIRSH + ["destroy", DOMAIN], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        t0 = time.monotonic()
        dev = self.wait_for(f"{mode}: no connection after virsh destroy",
                            lambda: (d := self.device()) and not d["vhost_user"]["connected"] and d, 10, poll=0.01)
        sys.stderr.write(f"[{mode}: disconnected {(time.monotonic() - t0) * 1000:.0f} ms after virsh destroy] ")
        stats = self.stats()
        self.assertEqual(stats["entries"], 0, "the departed front-end's translations are flushed")
        self.assertEqual(stats["pending_misses"], 0, stats)
        return dev

    def restart_qemu(self, mode):
        """`virsh start` again after `virsh destroy`: a new QEMU, and the device
        takes it (mode='client': QEMU connects at start; mode='server': `virsh
        start` returns once the device has connected). The connection, not the
        guest's traffic: that would cost another boot."""
        before = self.device()["vhost_user"]["connections"]
        t0 = time.monotonic()
        out = subprocess.run(VIRSH + ["start", DOMAIN], capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.wait_for(f"{mode}: the new QEMU connected",
                      lambda: (v := self.device()["vhost_user"])["connected"] and v["connections"] == before + 1,
                      20, poll=0.01)
        sys.stderr.write(f"[{mode}: QEMU started again, connected in {time.monotonic() - t0:.1f} s] ")

    def check_console(self, mode):
        """The guest's last counters: nothing damaged, what came back was sent."""
        text = read_text(self.console)
        self.assertEqual([line for line in text.splitlines() if line.startswith("QG error")], [], text[-3000:])
        last = counters(text)[-1]
        for k in ERROR_COUNTERS:
            self.assertEqual(last[k], 0, f"{mode}: {k}: {last}")
        sent, back = last["pktgen_sent"], last["udp_NoPorts"]
        self.assertLessEqual(back, sent + 200, f"{mode}: frames back that were not sent: {last}")
        self.assertGreater(back, TRAFFIC, f"{mode}: {last}")
        self.figures.append(f"{mode} guest: pktgen sent {sent}, back {back}, rx {last['rx_packets']}, "
                            f"tx {last['tx_packets']}")

    def check_qemu_log(self, mode, windows):
        """QEMU's complaints (its stderr, kept by virtlogd) since this boot: only
        its back-end going away, inside a restart's window (kill to connected,
        plus a second), the benign stopped-device one, and destroy's SIGTERM."""
        with open(QEMU_LOG, errors="replace") as f:
            f.seek(self.log_offset)
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
        self.assertEqual(bad, [], f"{mode}: QEMU complained")

    def setUp(self):
        self.figures = []

    def tearDown(self):
        if self.figures:
            sys.stderr.write("[" + "; ".join(self.figures) + "] ")
        # Leaves nothing for the next test: the domain and the device go.
        subprocess.run([SCRIPT, "down"], capture_output=True, env=self.env, timeout=90)

    # --- the tests ---

    def test_mode_client(self):
        """<source mode='client'> with <reconnect>: QEMU connects to the socket
        a server-mode device serves, and again after iotlbd came back."""
        self.boot("client")
        dev = self.device()
        self.assertEqual(dev["vhost_user"]["mode"], "server")
        self.assertEqual(os.stat(dev["vhost_user"]["socket"]).st_gid, grp.getgrnam("libvirt-qemu").gr_gid,
                         "--vhost-user-group: the socket belongs to QEMU's group")
        self.check_iotlb("client", "first daemon")
        window = self.restart_iotlbd("client")
        self.check_iotlb("client", "restarted daemon")
        self.destroy("client")
        self.check_console("client")
        self.restart_qemu("client")
        self.destroy("client")
        self.check_qemu_log("client", [window])
        self.script("down")
        self.assertEqual(self.daemon.call("GET", f"/v1/devices/{DEVICE}")[0], 404, "down deletes the device")
        self.assertEqual(self.domstate(), "", "down undefines the domain")

    def test_mode_server(self):
        """<source mode='server'>: QEMU listens and the client-mode device
        connects; libvirtd and iotlbd are restarted under the running domain."""
        self.boot("server")
        self.assertEqual(self.device()["vhost_user"]["mode"], "client")
        self.check_iotlb("server", "first daemon")
        # libvirtd stopped and started again: QEMU and the connection are untouched.
        connections = self.device()["vhost_user"]["connections"]
        t0 = time.monotonic()
        self.stop("libvirtd")
        self.spawn("libvirtd")
        self.wait_for("libvirtd back, the domain running",
                      lambda: self.procs["libvirtd"].poll() is None and self.domstate() == "running", 30, poll=0.2)
        mark = max(c["rx_packets"] for c in counters(read_text(self.console)))
        self.wait_for("traffic after the libvirtd restart", lambda: self.traffic_after(mark), 20)
        self.assertEqual(self.device()["vhost_user"]["connections"], connections, "the connection outlived libvirtd")
        sys.stderr.write(f"[server: libvirtd restarted, traffic on, {time.monotonic() - t0:.1f} s] ")
        window = self.restart_iotlbd("server")
        self.assertEqual(self.device()["vhost_user"]["mode"], "client")
        self.check_iotlb("server", "restarted daemon")
        self.destroy("server")
        self.check_console("server")
        self.restart_qemu("server")
        self.destroy("server")
        self.check_qemu_log("server", [window])
        self.script("down")
        self.assertEqual(self.daemon.call("GET", f"/v1/devices/{DEVICE}")[0], 404, "down deletes the device")


if __name__ == "__main__":
    unittest.main(verbosity=2)
