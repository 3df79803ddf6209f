"""libvirt domains on iotlbd's network ports (issue 25, with issue 20's
ports). Run with the other libvirt tests by integration/test_libvirt.py;
`python3 integration/libvirtports.py` runs these alone.

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
  connection, and QEMU's log holds no complaint."""
import os
import shutil
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guestnet import parse_console  # noqa: E402
from netns import Netns, qgdata  # noqa: E402
from nsdaemon import NsDaemon  # noqa: E402
from iotlbtest import ROOT, wait_until  # noqa: E402
from libvirtrig import (  # noqa: E402
    FiguresThenDown, DEVICE, DOMAIN, LibvirtDaemons, NET_TIMEOUT, PAIR, SCRIPT, STREAM_MB, TAP_HOST, VIRSH, domstate,
    log_size, qemu_complaints, read_text)


class LibvirtNetwork(FiguresThenDown, unittest.TestCase):
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
        def failed():
            states = {d: domstate(d) for d in self.domains}
            tails = "".join(f"\n{d} console:\n{read_text(self.console(d))[-1500:]}" for d in self.domains)
            self.fail(f"{what}: not within {timeout} s (domains {states}){tails}")
        return wait_until(predicate, timeout, poll, failed)

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
