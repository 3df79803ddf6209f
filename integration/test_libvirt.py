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
- Ports (LibvirtNetwork): iotlbd runs inside a network namespace the test
  makes (integration/netns.py: no route out; integration/nsdaemon.py: its API on a Unix
  socket, which the script reaches with IOTLBD_SOCKET), where the TAP tap0
  (10.77.0.1/24) lives; libvirt's QEMU stays in the root namespace (the
  vhost-user sockets are files). The guests run in qg_mode=net and power off
  when done; their serial consoles carry the results.
  - TAP port (iotlbd-guest-tap.xml, device vm1 on tap0): the guest pings
    10.77.0.1 and sends a 1 MiB TCP stream that a receiver in the namespace
    checks by its sha256;
  - peer ports (iotlbd-vm2.xml, iotlbd-vm3.xml, devices vm2 and vm3 wired to
    each other): the guests ping each other and each sends the other a 1 MiB
    stream it checks by its sha256;
  each time: the port counters show frames and bytes both ways and no drop
  (peer: peer_full only, under 5 % of the frames sent), the IOTLB counts
  misses, updates and invalidations, the guest powering off leaves no
  connection, `virsh start` again connects and `virsh destroy` leaves no
  connection, and QEMU's log holds no complaint.
- The README's "Use with libvirt" fragments are the ones in the example files
  (checked as written), the two loopback domain files differ only in
  <source>, and the port domains differ from iotlbd-guest-client.xml only in
  what each must (name, MAC, socket, console, the guest's command line).

Needs root, libvirt (`make libvirt-tools`), QEMU and ip (`make net-tools`);
fails, never skips, when something cannot run. libvirtd and virtlogd are
started once for all the tests. KEEP_LIBVIRT_LOGS=1 keeps the test's folder.
Takes about a minute here (two on a busy machine; the port tests about half).
Run by `make test-libvirt` (part of `make test`)."""
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
from guestnet import parse_console  # noqa: E402
from netns import Netns, pid_alive, qgdata  # noqa: E402
from nsdaemon import NsDaemon  # noqa: E402
from iotlbtest import ROOT, Daemon, free_port  # noqa: E402
from test_qemu_restart import ERROR_COUNTERS, QEMU_BENIGN, QEMU_DISCONNECT_MESSAGES  # noqa: E402

EXAMPLES = os.path.join(ROOT, "examples", "libvirt")
SCRIPT = os.path.join(EXAMPLES, "libvirt-guest.sh")
GUEST = os.path.join(ROOT, "scripts", "qemu-guest")
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


class Fragments(unittest.TestCase):
    """The README's libvirt guide as written: what it shows is what the test boots."""

    def example(self, mode):
        return read_text(os.path.join(EXAMPLES, f"iotlbd-guest-{mode}.xml"))

    def test_xml_fragments_are_the_example_files(self):
        """Each block is in the files its comment names (`<!-- FILE.xml -->`), or
        else in the loopback file of its socket mode (both without one)."""
        section = libvirt_section()
        blocks = re.findall(r"```xml\n(.*?)```", section, re.S)
        self.assertGreaterEqual(len(blocks), 6, "interface (both modes), iommu, memoryBacking, features, override, "
                                                "a peer domain's interface")
        for block in blocks:
            want = stripped_lines(block)
            named = re.findall(r"<!--\s*([\w.-]+\.xml)\s*-->", block)
            modes = [m for m in ("client", "server") if f"mode='{m}'" in block] or ["client", "server"]
            for name in named or [f"iotlbd-guest-{m}.xml" for m in modes]:
                text = read_text(os.path.join(EXAMPLES, name))
                self.assertTrue(text, f"README fragment names {name}, not in examples/libvirt/")
                lines = stripped_lines(text)
                found = any(lines[i:i + len(want)] == want for i in range(len(lines) - len(want) + 1))
                self.assertTrue(found, f"README fragment not in {name} as written:\n{block}")
        for needle in ("<interface type='vhostuser'>", "<iommu model='intel'>", "<memoryBacking>", "<features>",
                       "<qemu:override>", "name='vectors'", "mode='client'", "mode='server'", "iotlbd-vm3.xml"):
            self.assertIn(needle, "".join(blocks), f"the README shows no {needle}")

    def test_domain_files_differ_in_source_only(self):
        a, b = stripped_lines(self.example("client")), stripped_lines(self.example("server"))
        changed = [line[2:] for line in difflib.ndiff(a, b) if line[:2] in ("- ", "+ ")]
        self.assertTrue(changed)
        for line in changed:
            self.assertRegex(line, r"^(<source type='unix' |<reconnect |</source>)", "the two domains differ elsewhere")

    def test_port_domains_differ_from_client_where_they_must(self):
        """The port is the device's: the TAP domain is iotlbd-guest-client.xml
        but for the guest's command line; each peer domain also has its own
        name, MAC, socket and console file."""
        client = stripped_lines(self.example("client"))
        allowed = {"iotlbd-guest-tap.xml": r"^<cmdline>",
                   "iotlbd-vm2.xml": r"^(<cmdline>|<name>|<mac |<source type='unix' path=|<source path=)",
                   "iotlbd-vm3.xml": r"^(<cmdline>|<name>|<mac |<source type='unix' path=|<source path=)"}
        seen = {}
        for name in PORT_FILES:
            lines = stripped_lines(read_text(os.path.join(EXAMPLES, name)))
            self.assertTrue(lines, name)
            changed = [line[2:] for line in difflib.ndiff(client, lines) if line[:2] in ("- ", "+ ")]
            for line in changed:
                self.assertRegex(line, allowed[name], f"{name} differs from iotlbd-guest-client.xml elsewhere")
            cmdline = next(line for line in lines if line.startswith("<cmdline>"))
            self.assertIn("qg_mode=net", cmdline)
            self.assertIn(f"qg_mb={STREAM_MB}", cmdline)
            seen[name] = {k: next(line for line in lines if line.startswith(k)) for k in ("<name>", "<mac ", "<source type='unix'", "<source path=")}
        self.assertIn(f"qg_peer={TAP_HOST} ", next(l for l in stripped_lines(read_text(
            os.path.join(EXAMPLES, "iotlbd-guest-tap.xml"))) if l.startswith("<cmdline>")))
        for k in ("<name>", "<mac ", "<source type='unix'", "<source path="):
            self.assertNotEqual(seen["iotlbd-vm2.xml"][k], seen["iotlbd-vm3.xml"][k], f"the peer domains share {k}")
        for (domain, device), name in zip(PAIR, PORT_FILES[1:]):
            self.assertEqual(seen[name]["<name>"], f"<name>{domain}</name>")
            self.assertIn(f"/{device}.sock'", seen[name]["<source type='unix'"])
            self.assertIn(f"/{domain}-console.log'", seen[name]["<source path="])

    def test_readme_commands_are_the_scripts(self):
        """The device JSON the README creates is the script's, and so is the one
        each domain file's comment names; the group setting is the test's."""
        section = libvirt_section()
        script = read_text(SCRIPT)
        bodies = re.findall(r"-d '(\{.*?\})'", section)
        self.assertEqual(len(bodies), 5, "the README creates the device for both modes, the TAP port and the pair")
        for body in bodies:
            json.loads(body)
            self.assertTrue(f"'{body}'" in script, f"README device JSON not in libvirt-guest.sh: {body}")
        ports = {json.loads(b).get("port", {}).get("type", "loopback") for b in bodies}
        self.assertEqual(ports, {"loopback", "tap", "peer"})
        for name in ("iotlbd-guest-client.xml", "iotlbd-guest-server.xml") + PORT_FILES:
            named = re.findall(r"(\{\"id\".*\}\})[.;]?$", read_text(os.path.join(EXAMPLES, name)), re.M)
            self.assertEqual(len(named), 1, f"{name} names its device's JSON")
            self.assertTrue(f"'{named[0]}'" in script, f"{name}'s device JSON not in libvirt-guest.sh: {named[0]}")
        self.assertIn("--vhost-user-group libvirt-qemu", section)
        self.assertIn("install -d -m 0770 -g libvirt-qemu", section)
        self.assertIn("install -d -m 0770 -g libvirt-qemu", script)


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
    """virtlogd and libvirtd for all the tests of this file, each in its own
    session and by PID: started by the first class that needs them, stopped at
    the end (a module cleanup, after the classes' own: they still need virsh),
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
        out = subprocess.run([os.path.join(GUEST, "build.sh")], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise AssertionError(f"scripts/qemu-guest/build.sh failed:\n{out.stdout}{out.stderr}")
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
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

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
        self.stop("libvirtd")
        self.stop("virtlogd")
        if os.environ.get("KEEP_LIBVIRT_LOGS"):
            sys.stderr.write(f"logs kept in {self.tmp}\n")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


class LibvirtGuest(unittest.TestCase):
    """The loopback port, both socket directions; iotlbd in the root namespace."""

    @classmethod
    def setUpClass(cls):
        t0 = time.monotonic()
        cls.lv = LibvirtDaemons.shared()
        cls.tmp = cls.lv.folder("loopback")
        cls.vu = cls.lv.folder("loopback/vu")
        cls.state = os.path.join(cls.tmp, "state")
        cls.env = dict(os.environ, VHOST_USER_DIR=cls.vu, BOOT_DIR=os.path.join(cls.tmp, "boot"),
                       QEMU_GUEST_CACHE=os.environ.get("QEMU_GUEST_CACHE", os.path.join(ROOT, ".cache", "qemu-guest")))
        cls.env.pop("IOTLBD_SOCKET", None)
        cls.lv.clean_domains([DOMAIN])  # one left by a run that was killed
        cls.addClassCleanup(cls.lv.clean_domains, [DOMAIN])
        cls.port = free_port()
        cls.daemons = 0
        cls.daemon = None
        cls.addClassCleanup(cls.stop_daemon)
        cls.start_daemon()
        cls.env["IOTLBD"] = cls.daemon.url
        sys.stderr.write(f"\n[libvirtd and iotlbd ready in {time.monotonic() - t0:.1f} s] ")

    # --- the daemon the test starts and stops ---

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
        return domstate(DOMAIN)

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
        that resets before /init (seen rarely under TCG, integration/test_qemu.py) is
        started once more: on_reboot is destroy."""
        self.env["CONSOLE_DIR"] = self.lv.folder(f"loopback/console-{mode}")
        self.console = os.path.join(self.env["CONSOLE_DIR"], f"{DOMAIN}-console.log")
        self.log_offset = log_size(QEMU_LOG)
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
        """QEMU's complaints since this boot: only its back-end going away, inside
        a restart's window."""
        self.assertEqual(qemu_complaints(QEMU_LOG, self.log_offset, windows), [], f"{mode}: QEMU complained")

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
        self.lv.stop("libvirtd")
        self.lv.spawn("libvirtd")
        self.wait_for("libvirtd back, the domain running",
                      lambda: self.lv.running() and self.domstate() == "running", 30, poll=0.2)
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



class LibvirtNetwork(unittest.TestCase):
    """Domains on a TAP port and on two peer ports: iotlbd inside a network
    namespace of the test's (the TAP's), libvirt's QEMU outside it."""

    @classmethod
    def setUpClass(cls):
        t0 = time.monotonic()
        cls.lv = LibvirtDaemons.shared()
        cls.domains = [DOMAIN] + [d for d, _ in PAIR]
        cls.lv.clean_domains(cls.domains)  # left by a run that was killed
        cls.tmp = cls.lv.folder("network")
        cls.vu = cls.lv.folder("network/vu")
        # Closed last (cleanups run last-in first-out): it kills the daemon too.
        cls.ns = Netns("libvirt")
        cls.addClassCleanup(cls.ns.close)
        cls.ns.add_tap("tap0")  # vnet_hdr, one queue, IPv6 off: only the test's frames cross it
        cls.ns.add_address("tap0", TAP_HOST + "/24")
        cls.ns.check_isolated()
        with open(os.path.join(cls.tmp, "iotlbd.log"), "w") as log:
            cls.daemon = NsDaemon(cls.ns, "--vhost-user-dir", cls.vu, "--vhost-user-group", "libvirt-qemu",
                                  log=log, log_level="info")
        cls.addClassCleanup(cls.daemon.stop)
        cls.addClassCleanup(cls.lv.clean_domains, cls.domains)
        cls.env = dict(os.environ, IOTLBD_SOCKET=cls.daemon.api, VHOST_USER_DIR=cls.vu,
                       BOOT_DIR=os.path.join(cls.tmp, "boot"), CONSOLE_DIR=cls.lv.folder("network/console"),
                       QEMU_GUEST_CACHE=os.environ.get("QEMU_GUEST_CACHE", os.path.join(ROOT, ".cache", "qemu-guest")))
        cls.env.pop("IOTLBD", None)
        sys.stderr.write(f"\n[namespace {cls.ns.name} with tap0 and iotlbd ready in {time.monotonic() - t0:.1f} s] ")

    def setUp(self):
        self.figures = []

    def tearDown(self):
        if self.figures:
            sys.stderr.write("[" + "; ".join(self.figures) + "] ")
        subprocess.run([SCRIPT, "down"], capture_output=True, env=self.env, timeout=90)

    # --- helpers ---

    def script(self, *args, timeout=90):
        out = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        self.assertEqual(out.returncode, 0, f"libvirt-guest.sh {' '.join(args)}:\n{out.stdout}{out.stderr}")
        return out.stdout

    def console(self, domain):
        return os.path.join(self.env["CONSOLE_DIR"], f"{domain}-console.log")

    def device(self, name):
        status, dev = self.daemon.call("GET", f"/v1/devices/{name}", timeout=5)
        self.assertEqual(status, 200, dev)
        return dev

    def stats(self, name):
        return self.daemon.call("GET", f"/v1/devices/{name}/iotlb/stats", timeout=5)[1]

    def wait_for(self, what, predicate, timeout, poll=0.05):
        deadline = time.monotonic() + timeout
        while True:
            got = predicate()
            if got:
                return got
            if time.monotonic() > deadline:
                states = {d: domstate(d) for d in self.domains}
                tails = "".join(f"\n{d} console:\n{read_text(self.console(d))[-1500:]}" for d in self.domains)
                self.fail(f"{what}: not within {timeout} s (domains {states}){tails}")
            time.sleep(poll)

    def run_guests(self, setup, domains):
        """libvirt-guest.sh up SETUP, then waits until every domain's guest has
        printed its result and powered off (on_poweroff: destroy, so the domain
        is shut off). A guest that resets before /init (seen rarely under TCG)
        is started once more. Returns {domain: parsed console}."""
        offsets = {d: log_size(f"/var/log/libvirt/qemu/{d}.log") for d in domains}
        t0 = time.monotonic()
        self.script("up", setup)
        t_up = time.monotonic()
        restarted = set()

        def done():
            for d in domains:
                state, text = domstate(d), read_text(self.console(d))
                if state != "shut off":
                    return None
                if "QG init" not in text and d not in restarted:
                    restarted.add(d)
                    sys.stderr.write(f"[{d}: the guest reset before /init, starting it again] ")
                    subprocess.run(VIRSH + ["start", d], capture_output=True, timeout=60)
                    return None
            return True

        self.wait_for(f"{setup}: the guests done and powered off", done, NET_TIMEOUT, poll=0.2)
        results = {}
        for d in domains:
            # Kept aside: `virsh start` again starts the console file anew.
            shutil.copy(self.console(d), self.console(d).replace("-console.log", "-console-run.log"))
            r = parse_console(read_text(self.console(d)))
            self.assertTrue(r["done"], f"{d}: no \"QG done\":\n{read_text(self.console(d))[-3000:]}")
            self.assertEqual(r["errors"], [], d)
            self.assertEqual(qemu_complaints(f"/var/log/libvirt/qemu/{d}.log", offsets[d]), [], f"{d}: QEMU complained")
            results[d] = r
        self.figures.append(f"{setup}: `up` {t_up - t0:.1f} s, guests done {time.monotonic() - t0:.1f} s after it")
        return results

    def check_guest(self, domain, r, send, recv):
        """The guest's own figures: behind the strict vIOMMU, every ping back, and
        the result line."""
        self.assertEqual(r["net"]["iommu"], "DMA", f"{domain}: {r['net']}")
        self.assertEqual(r["features"]["access_platform"], 1, f"{domain}: {r['features']}")
        p = r["ping"]
        self.assertEqual((p["transmitted"], p["received"]), (5, 5), f"{domain}: {p}")
        want = {"ok": 1, "ping": "ok", "send": "ok" if send else "skip", "recv": "ok" if recv else "skip"}
        self.assertEqual(r["net-result"], want, f"{domain}: {r['net-result']}")
        if send:
            self.assertEqual(r["tcp-send"]["sha256"], qgdata.stream_sha256(STREAM_MB), r["tcp-send"])
            self.assertEqual(r["tcp-send"]["bytes"], STREAM_MB << 20, r["tcp-send"])

    def check_port(self, name, peer=False):
        """Frames and bytes both ways through the device's port, none dropped
        (a peer's wire: peer_full only, under 5 % of the frames sent), and the
        IOTLB filled and emptied by the guest's vIOMMU; the guest gone, no
        connection is left."""
        dev = self.device(name)
        port, c = dev["port"], dev["port"]["counters"]
        self.assertEqual(port["state"], "up", port)
        if peer:
            self.assertTrue(port["linked"], port)
        self.assertGreater(c["tx_frames"], 5, port)
        self.assertGreater(c["rx_frames"], 5, port)
        drops = {k: v for k, v in c["drops"].items() if v}
        if peer:
            self.assertLessEqual(set(drops), {"peer_full"}, port)
            self.assertLess(drops.get("peer_full", 0), c["tx_frames"] / 20, port)
        else:
            self.assertEqual(drops, {}, port)
        self.assertFalse(dev["vhost_user"]["connected"], "the guest powered off: no connection")
        stats = self.stats(name)
        for k in ("misses", "updates", "invalidations"):
            self.assertGreater(stats[k], 0, f"{name}: no IOTLB {k}: {stats}")
        self.assertEqual(stats["access_failures"], 0, stats)
        self.assertEqual(stats["entries"], 0, "the departed front-end's translations are flushed")
        self.figures.append(f"{name} port: tx {c['tx_frames']} frames {c['tx_bytes']} B, rx {c['rx_frames']} frames "
                            f"{c['rx_bytes']} B, drops {drops or 0}; IOTLB misses {stats['misses']} updates "
                            f"{stats['updates']} invalidations {stats['invalidations']}")
        return c

    def start_and_destroy(self, pairs):
        """`virsh start` again: each new QEMU connects to its device; then `virsh
        destroy`: no connection is left, the IOTLB is empty. `pairs`: (domain,
        device). The connection, not the guests' traffic (another boot)."""
        before = {dev: self.device(dev)["vhost_user"]["connections"] for _, dev in pairs}
        t0 = time.monotonic()
        for domain, _ in pairs:
            out = subprocess.run(VIRSH + ["start", domain], capture_output=True, text=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr)
        for _, dev in pairs:
            self.wait_for(f"{dev}: the new QEMU connected",
                          lambda: (v := self.device(dev)["vhost_user"])["connected"]
                          and v["connections"] == before[dev] + 1, 20, poll=0.01)
        t_conn = time.monotonic()
        offsets = {d: log_size(f"/var/log/libvirt/qemu/{d}.log") for d, _ in pairs}
        for domain, _ in pairs:
            out = subprocess.run(VIRSH + ["destroy", domain], capture_output=True, text=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr)
        t_destroy = time.monotonic()
        for domain, dev in pairs:
            self.wait_for(f"{dev}: no connection after virsh destroy",
                          lambda: not self.device(dev)["vhost_user"]["connected"], 10, poll=0.01)
            stats = self.stats(dev)
            self.assertEqual(stats["entries"], 0, stats)
            self.assertEqual(stats["pending_misses"], 0, stats)
            self.assertEqual(domstate(domain), "shut off")
            self.assertEqual(qemu_complaints(f"/var/log/libvirt/qemu/{domain}.log", offsets[domain]), [],
                             f"{domain}: QEMU complained")
        self.figures.append(f"virsh start to connected {t_conn - t0:.1f} s, destroy to no connection "
                            f"{(time.monotonic() - t_destroy) * 1000:.0f} ms")

    def check_down(self, pairs):
        self.script("down")
        for domain, dev in pairs:
            self.assertEqual(self.daemon.call("GET", f"/v1/devices/{dev}")[0], 404, "down deletes the device")
            self.assertEqual(domstate(domain), "", "down undefines the domain")

    # --- the tests ---

    def test_tap_port(self):
        """iotlbd-guest-tap.xml on device vm1 whose port is tap0: the guest pings
        10.77.0.1 and sends a stream to a receiver there."""
        self.ns.check_isolated()
        before = self.ns.counters("tap0")
        rx = self.ns.tcp_receiver(TAP_HOST, 5001, mb=STREAM_MB, timeout=NET_TIMEOUT)
        try:
            r = self.run_guests("tap", [DOMAIN])[DOMAIN]
            got = rx.result(timeout=30)
        finally:
            rx.stop()
        self.check_guest(DOMAIN, r, send=True, recv=False)
        # Every byte reached the namespace, the stream qgdata.py makes, as the guest sent it.
        self.assertTrue(got["match"], got)
        self.assertEqual(got["sha256"], r["tcp-send"]["sha256"])
        self.assertEqual(got["peer"], "10.77.0.2")
        c = self.check_port(DEVICE)
        self.assertGreaterEqual(c["tx_bytes"], STREAM_MB << 20, c)
        # What the port wrote and read is what tap0 saw (the kernel's side: its rx is the guest's tx).
        after = self.ns.counters("tap0")
        tap = {k: after[k] - before[k] for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_drop",
                                                  "tx_drop", "rx_errs", "tx_errs")}
        self.assertEqual(tap["rx_packets"], c["tx_frames"], (tap, c))
        self.assertEqual(tap["tx_packets"], c["rx_frames"], (tap, c))
        self.assertEqual({k: v for k, v in tap.items() if k.endswith(("_drop", "_errs")) and v}, {}, tap)
        self.figures.append(f"guest ping avg {r['ping']['rtt_avg_ms']} ms, {STREAM_MB} MiB to {TAP_HOST} "
                            f"sha256 ok at {got['mbytes_per_s']} MB/s; tap0 rx {tap['rx_packets']} tx "
                            f"{tap['tx_packets']} packets")
        self.start_and_destroy([(DOMAIN, DEVICE)])
        self.check_down([(DOMAIN, DEVICE)])

    def test_peer_ports(self):
        """iotlbd-vm2.xml and iotlbd-vm3.xml on devices vm2 and vm3, wired to each
        other: the guests ping each other and exchange streams."""
        domains = [d for d, _ in PAIR]
        rs = self.run_guests("peer", domains)
        for d, other in zip(domains, reversed(domains)):
            self.check_guest(d, rs[d], send=True, recv=True)
            self.assertEqual(rs[d]["tcp-recv"]["match"], 1, rs[d]["tcp-recv"])
            self.assertEqual(rs[d]["tcp-recv"]["sha256"], rs[other]["tcp-send"]["sha256"])
        cs = {dev: self.check_port(dev, peer=True) for _, dev in PAIR}
        for dev, other in (("vm2", "vm3"), ("vm3", "vm2")):
            # A wire: what one end put on it (tx_frames; its peer_full drops are
            # not among them) the other end's guest took, but for at most a few
            # frames still on it when that guest powered off (none so far).
            left = cs[dev]["tx_frames"] - cs[other]["rx_frames"]
            self.assertTrue(0 <= left <= 4, f"{dev} → {other}: {left} frames sent but not received: {cs}")
            self.assertGreaterEqual(cs[dev]["tx_bytes"], STREAM_MB << 20, cs)
        self.figures.append(f"pings avg {rs[domains[0]]['ping']['rtt_avg_ms']} and "
                            f"{rs[domains[1]]['ping']['rtt_avg_ms']} ms, streams {rs[domains[0]]['tcp-send']['mbytes_per_s']} "
                            f"and {rs[domains[1]]['tcp-send']['mbytes_per_s']} MB/s (guests' figures, both at once)")
        self.start_and_destroy(list(PAIR))
        self.check_down(list(PAIR))

if __name__ == "__main__":
    unittest.main(verbosity=2)
