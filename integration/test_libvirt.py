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
- Ports (LibvirtNetwork, in integration/libvirtports.py): the TAP domain and
  the two peer domains, with iotlbd in a network namespace; see that file.
- The README's "Use with libvirt" fragments are the ones in the example files
  (checked as written), the two loopback domain files differ only in
  <source>, and the port domains differ from iotlbd-guest-client.xml only in
  what each must (name, MAC, socket, console, the guest's command line).

Needs root, libvirt (`make libvirt-tools`), QEMU and ip (`make net-tools`);
fails, never skips, when something cannot run. libvirtd and virtlogd are
started once for all the tests. KEEP_LIBVIRT_LOGS=1 keeps the test's folder.
Takes about a minute here (two on a busy machine; the port tests about half).
Run by `make test-libvirt` (part of `make test`)."""
import difflib
import grp
import json
import os
import re
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import ROOT, Daemon, free_port, wait_until  # noqa: E402
from test_qemu_restart import ERROR_COUNTERS  # noqa: E402

from libvirtports import LibvirtNetwork  # noqa: E402,F401 (run with these tests)
from libvirtrig import (  # noqa: E402
    FiguresThenDown, ACCESS_PLATFORM, BACKEND_REQ, BOOT_TIMEOUT, DEVICE, DOMAIN, EXAMPLES, LibvirtDaemons, PAIR,
    PORT_FILES, QEMU_LOG, SCRIPT, STREAM_MB, TAP_HOST, TRAFFIC, VIRSH, counters, domstate,
    libvirt_section, log_size, qemu_complaints, read_text, stripped_lines)


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




class LibvirtGuest(FiguresThenDown, unittest.TestCase):
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
        return wait_until(predicate, timeout, poll, lambda: self.fail(
            f"{what}: not within {timeout} s (domain {self.domstate()!r})\nconsole:\n{read_text(self.console)[-3000:]}"))

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


if __name__ == "__main__":
    unittest.main(verbosity=2)
