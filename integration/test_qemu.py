#!/usr/bin/env python3
"""A real Linux guest drives iotlbd: QEMU boots Debian's kernel with a busybox
initramfs (scripts/qemu-guest/build.sh) whose virtio-net is a vhost-user
device of the daemon. The guest sends frames to itself with pktgen (the
loopback backend returns each one on RX), prints its interface counters,
reloads virtio_net, sends and prints again, and powers off.

With an Intel vIOMMU, the guest in strict mode and in lazy mode (device
"iotlb": true, QEMU iommu_platform=on,ats=on): every ring and buffer address
is an IOVA; iotlbd's misses go to QEMU over the backend channel and come back
as IOTLB updates, and the guest's unmaps come as invalidations (one per page
when strict, whole-domain flushes when lazy). Without a vIOMMU ("iotlb":
false) the same traffic runs on guest-physical addresses.

The QEMU command line lives in scripts/qemu-guest/run.sh only. Needs
qemu-system-x86, busybox-static, cpio and kmod (the Makefile's test-qemu
installs them) and fails, not skips, when QEMU or the kernel cannot be had.
Each QEMU run is killed after QEMU_TIMEOUT seconds. Run by `make test`."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import ROOT, Daemon, build_test_guest  # noqa: E402

GUEST = os.path.join(ROOT, "scripts", "qemu-guest")
QEMU_TIMEOUT = 60    # seconds per boot; one takes 8–30 s here
FRAMES = 500         # per frame size (60 and 1514 bytes) and phase
ACCESS_PLATFORM = 1 << 33
RING_PACKED = 1 << 34
BACKEND_REQ = 1 << 5  # protocol feature: the channel misses go to QEMU on
COUNTERS = re.compile(r"^QG counters phase=(\d) iommu=(\S+) ats=(\d) up=([\d.]+) (.*)$")


def read_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def parse_console(text):
    """The guest's QG lines: {phase: {"iommu": .., counter: int}}, errors, done."""
    phases, errors, done = {}, [], False
    for line in text.splitlines():
        line = line.strip()
        m = COUNTERS.match(line)
        if m:
            c = {k: int(v) for k, v in (kv.split("=") for kv in m.group(5).split())}
            c["iommu"], c["ats"], c["up"] = m.group(2), int(m.group(3)), float(m.group(4))
            phases[int(m.group(1))] = c
        elif line.startswith("QG error"):
            errors.append(line)
        elif line == "QG done":
            done = True
    return phases, errors, done


class QemuGuest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # No skip: a missing QEMU or kernel is a failure of `make test`.
        t0 = time.time()
        build_test_guest("test-qemu")
        sys.stderr.write(f"\n[guest ready in {time.time() - t0:.1f} s] ")
        cls.tmp = tempfile.mkdtemp(prefix="iotlbd-qemu-")
        cls.daemon_log_path = os.path.join(cls.tmp, "iotlbd.log")
        cls.daemon_log = open(cls.daemon_log_path, "w")
        # Info level: refused vhost-user requests are logged ("… refused: …").
        # The sockets live in the test's folder: it is the --vhost-user-dir.
        cls.daemon = Daemon("--vhost-user-dir", cls.tmp, log=cls.daemon_log, log_level="info")
        cls.boots = {}  # QEMU boots per test name (a guest that resets before /init boots again)

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()
        cls.daemon_log.close()
        if os.environ.get("KEEP_QEMU_LOGS"):
            sys.stderr.write(f"logs kept in {cls.tmp}\n")
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def boot(self, name, sock, mode, after_phase1=None, packed=False):
        """Boots the guest (run.sh SOCK MODE) until it powers off, QEMU_TIMEOUT at
        most; calls `after_phase1()` once the first counters line shows.
        Returns the console's phases and the console text.

        A guest that resets before it reaches /init (QEMU then exits 0 at once:
        -no-reboot) is booted once more: seen once in many runs, early in the
        kernel's boot, before any virtio driver and so before iotlbd has a part
        (TCG; QEMU's -d cpu_reset log, kept with KEEP_QEMU_LOGS, shows the reset)."""
        for attempt in (1, 2):
            proc, timed_out, text = self.boot_once(f"{name}-{attempt}", sock, mode, after_phase1, packed)
            if timed_out or proc.returncode != 0 or "QG init" in text or attempt == 2:
                break
            sys.stderr.write(f"[{mode}: the guest reset before /init, booting again] ")
        self.boots[name] = attempt
        self.assertFalse(timed_out, f"QEMU ({mode}) still running after {QEMU_TIMEOUT} s, killed:\n{text[-4000:]}")
        self.assertEqual(proc.returncode, 0, f"QEMU ({mode}) exited {proc.returncode}:\n{text[-4000:]}")
        phases, errors, done = parse_console(text)
        self.assertEqual(errors, [], text[-4000:])
        # QEMU's own complaints (its stderr shares the console file). One is
        # benign: a miss sent just before the guest reset the device reaches
        # QEMU's main loop after it stopped the rings (QEMU drops it; the ring
        # that asked is stopped and its miss withdrawn).
        qemu_errors = [line for line in text.splitlines() if line.startswith("qemu-system-x86_64:")
                       and "Unexpected IOTLB message when virtio device is stopped" not in line]
        self.assertEqual(qemu_errors, [], f"QEMU ({mode}) complained")
        self.assertTrue(done, f"the guest did not finish:\n{text[-4000:]}")
        return phases, text

    def boot_once(self, tag, sock, mode, after_phase1, packed=False):
        console = os.path.join(self.tmp, f"{tag}-console.log")
        env = dict(os.environ, QG_FRAMES=str(FRAMES))
        if packed:
            env["QG_PACKED"] = "1"
        t0 = time.time()
        with open(console, "w") as log:
            # run.sh execs QEMU: the process is QEMU itself.
            proc = subprocess.Popen([os.path.join(GUEST, "run.sh"), sock, mode,
                                     "-d", "cpu_reset", "-D", os.path.join(self.tmp, f"{tag}-qemu-d.log")],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                seen1 = False
                while proc.poll() is None and time.time() - t0 < QEMU_TIMEOUT:
                    if not seen1 and after_phase1 and "QG counters phase=1" in read_text(console):
                        seen1 = True
                        after_phase1()
                    time.sleep(0.2)
                timed_out = proc.poll() is None
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        text = read_text(console)
        init = re.search(r"^QG init up=([\d.]+)", text, re.M)
        guest = "".join(f", phase {n} done at {c['up']:.1f}" for n, c in sorted(parse_console(text)[0].items()))
        sys.stderr.write(f"[{mode}: QEMU ran {time.time() - t0:.1f} s; guest clock: /init at "
                         f"{init.group(1) if init else '?'}{guest}] ")
        return proc, timed_out, text

    def check_traffic(self, phases, iommu_type, text):
        """Both phases (before and after the driver reload): every frame pktgen
        sent came back, bytes too, nothing dropped."""
        self.assertEqual(sorted(phases), [1, 2], text[-4000:])
        for n, c in phases.items():
            self.assertEqual(c["tx_packets"], 2 * FRAMES, f"phase {n}: {c}")
            self.assertEqual(c["rx_packets"], c["tx_packets"], f"phase {n}: frames lost: {c}")
            self.assertEqual(c["rx_bytes"], c["tx_bytes"], f"phase {n}: {c}")
            self.assertEqual(c["tx_bytes"], FRAMES * (60 + 1514), f"phase {n}: {c}")
            self.assertEqual(c["rx_dropped"] + c["tx_dropped"], 0, f"phase {n}: {c}")
            self.assertEqual(c["iommu"], iommu_type, f"phase {n}: the guest's DMA domain type")
            # With a vIOMMU the guest enables the NIC's ATS (it sits behind a root port).
            self.assertEqual(c["ats"], 0 if iommu_type == "none" else 1, f"phase {n}: ATS enabled")

    def finished_device(self, name):
        """The device once QEMU has gone (its front-end disconnected)."""
        deadline = time.time() + 10
        while time.time() < deadline:
            dev = self.daemon.call("GET", f"/v1/devices/{name}")[1]
            if not dev["vhost_user"]["connected"]:
                return dev
            time.sleep(0.05)
        self.fail(f"{name}: QEMU gone but the front-end still shows connected: {dev}")

    def check_no_refusals(self, name, dev):
        """No request refused or unknown, no protocol error (the vhost_user status
        has no refusal counter: the daemon's log says, one line per refusal)."""
        self.assertNotIn("last_error", dev["vhost_user"], dev["vhost_user"])
        self.daemon_log.flush()
        lines = [line for line in read_text(self.daemon_log_path).splitlines() if f"device={name} " in line]
        bad = [line for line in lines if "refused" in line or "not supported" in line]
        self.assertEqual(bad, [], "iotlbd refused requests of QEMU")
        self.assertEqual(dev["vhost_user"]["connections"], self.boots[name.removeprefix("qemu-")])

    def test_readme_command(self):
        """The README's QEMU command line is the one run.sh runs."""
        env = dict(os.environ, QEMU_GUEST_CACHE=".cache/qemu-guest")
        env.pop("QG_FRAMES", None)
        out = subprocess.run([os.path.join(GUEST, "run.sh"), "--print", "/run/iotlbd/q0.sock", "strict"],
                             capture_output=True, text=True, env=env, check=True).stdout
        self.assertIn("```sh\n" + out + "```", read_text(os.path.join(ROOT, "README.md")),
                      "README \"Use with QEMU\" and scripts/qemu-guest/run.sh disagree")

    def run_viommu(self, mode, iommu_type, packed=False):
        """Boots with an Intel vIOMMU (`mode` strict or lazy) against a device with
        the IOTLB on: misses forwarded to QEMU, updates and invalidations from it,
        traffic both ways before and after a driver reload. Returns the IOTLB stats."""
        name = f"qemu-{mode}" + ("-packed" if packed else "")
        sock = self.daemon.vhost_user_device(name, True, self.tmp)
        mid = {}

        def snapshot():
            mid.update(self.daemon.call("GET", f"/v1/devices/{name}/iotlb/stats")[1])

        phases, text = self.boot(name.removeprefix("qemu-"), sock, mode, after_phase1=snapshot, packed=packed)
        self.check_traffic(phases, iommu_type, text)
        dev = self.finished_device(name)
        vu = dev["vhost_user"]
        stats = self.daemon.call("GET", f"/v1/devices/{name}/iotlb/stats")[1]
        sys.stderr.write(f"[{mode}: updates {stats['updates']} invalidations {stats['invalidations']} "
                         f"misses {stats['misses']} forwarded {vu['misses_forwarded']} hits {stats['hits']} "
                         f"miss resolution p50 {stats['miss_resolution_us']['p50']} us] ")
        self.assertTrue(int(vu["features"], 16) & ACCESS_PLATFORM, f"ACCESS_PLATFORM not negotiated: {vu}")
        self.assertEqual(bool(int(vu["features"], 16) & RING_PACKED), packed, f"packed rings negotiated? {vu}")
        self.assertTrue(int(vu["protocol_features"], 16) & BACKEND_REQ, f"no backend channel: {vu}")
        self.assertGreater(stats["updates"], 0)
        self.assertGreater(stats["invalidations"], 0)
        self.assertGreater(stats["misses"], 0)
        self.assertGreater(vu["misses_forwarded"], 0)
        # Misses go to QEMU (those announced again too: an update evicted or replaced
        # entries while the queue waited). A miss another update resolved before the
        # backend thread read the log is not sent (QEMU would answer it for nothing),
        # so at most all of them; none is left waiting (pending_misses below).
        self.assertLessEqual(vu["misses_forwarded"], stats["misses"] + stats["reannounced_misses"])
        self.assertGreater(vu["misses_forwarded"], (stats["misses"] + stats["reannounced_misses"]) * 9 // 10,
                           "nearly every miss went to QEMU")
        self.assertEqual(vu["identity_updates"], 0, "with a vIOMMU nothing is answered by identity")
        self.assertEqual(stats["access_failures"], 0)
        self.assertEqual(stats["pending_misses"], 0)
        self.assertEqual(stats["entries"], 0, "the departed front-end's translations are flushed")
        # After the reload the new rings and buffers went through the IOTLB again.
        self.assertTrue(mid, "no counters line seen while QEMU ran")
        for k in ("updates", "invalidations", "misses"):
            self.assertGreater(stats[k], mid[k], f"{k} did not grow after the driver reload")
        self.check_no_refusals(name, dev)
        return stats

    def test_viommu_strict(self):
        """iommu.strict=1 (domain type DMA): every unmap is invalidated at once,
        page by page: about one invalidation per miss."""
        stats = self.run_viommu("strict", "DMA")
        self.assertGreater(stats["invalidations"], stats["misses"] // 2)

    def test_viommu_lazy(self):
        """iommu.strict=0 (DMA-FQ): the flush queue invalidates whole domains now
        and then, far fewer invalidations than misses."""
        stats = self.run_viommu("lazy", "DMA-FQ")
        self.assertLess(stats["invalidations"], stats["misses"] // 4)

    def test_viommu_strict_packed(self):
        """The strict case with packed virtqueues (virtio-net-pci packed=on):
        the same checks, through the packed ring's descriptors and event areas."""
        stats = self.run_viommu("strict", "DMA", packed=True)
        self.assertGreater(stats["invalidations"], stats["misses"] // 2)

    def test_no_viommu(self):
        """No vIOMMU, device IOTLB off: guest-physical addresses, no IOTLB traffic."""
        sock = self.daemon.vhost_user_device("qemu-off", False, self.tmp)
        phases, text = self.boot("off", sock, "off")
        self.check_traffic(phases, "none", text)
        dev = self.finished_device("qemu-off")
        vu = dev["vhost_user"]
        stats = self.daemon.call("GET", "/v1/devices/qemu-off/iotlb/stats")[1]
        self.assertFalse(int(vu["features"], 16) & ACCESS_PLATFORM, vu)
        self.assertEqual(vu["misses_forwarded"], 0)
        self.assertEqual((stats["updates"], stats["invalidations"], stats["misses"], stats["access_failures"]),
                         (0, 0, 0, 0))
        self.assertEqual(sum(q["chains"] for q in stats["vqs"]), 8 * FRAMES, "2 phases × 2 sizes × TX and RX")
        self.check_no_refusals("qemu-off", dev)


if __name__ == "__main__":
    unittest.main(verbosity=2)
