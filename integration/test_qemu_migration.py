#!/usr/bin/env python3
"""Live migration through the IOTLB (issue 21): a QEMU guest behind the strict
Intel vIOMMU moves between two iotlbd daemons (separate processes, separate
vhost-user sockets, as on two hosts) while it sends and receives, and back.

Each daemon serves device m0 (server mode, IOTLB on, loopback port). The guest
(scripts/qemu-guest/init, qg_mode=continuous) sends pktgen bursts of UDP frames
with checksums to its own address; the loopback returns each one on RX, so the
device writes RX buffers, headers and used rings all along. The first hop
waits until the guest's clock reads SETTLED_UP seconds, and a ping-pong that
fails runs again from a fresh guest (3 tries): QEMU 7.2 under TCG now and then
loses a page the guest's CPU wrote while migrating (see QEMU_TCG_LOSS). Per
hop:

  1. the destination QEMU starts on the other daemon with `-incoming
     tcp:127.0.0.1:P -S` (paused when migration completes);
  2. QMP `migrate` on the source; `query-migrate` until completed: QEMU's
     downtime and total time are recorded;
  3. the source daemon stopped cleanly: every queue disabled (GET_VRING_BASE),
     none failed, logging was on, pages were logged, no log fault;
  4. memory: QMP `pmemsave` of all guest RAM on the paused source and the
     paused destination; they must be byte-identical (the differing 4 KiB
     pages are counted and named otherwise);
  5. the destination daemon's IOTLB is empty; `cont`; the guest's RX grows
     again on the destination's console and its IOTLB refilled by misses;
  6. the source QEMU quits; its daemon serves the next hop's destination.

At the end the guest stops and powers off; its last counters give frames
lost (sent by pktgen, never back: in flight at a stop, bounded) and frames
damaged (IP header or UDP checksum errors, rx errors: must be 0).

QG_MIGRATION_HOPS (default 3: there, back, there again) per ring layout,
split and packed. A third case runs both daemons with the test-only
IOTLBD_TEST_UNLOGGED_RX_BUFFERS=1 (RX buffers not logged) for one hop and
passes only if the memory comparison FAILS: the comparison catches missing
logging (up to 3 attempts). That case sends one endless burst with lazy invalidation, so the
device outruns the guest and frames it has not taken yet are in RX buffers
when its vCPU stops (the guest rewrites a buffer's page as it takes a
frame). Figures are printed on stderr. About 2.5 minutes here.
Run by `make test-qemu-migration` (part of `make test`)."""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import (  # noqa: E402
    ROOT, Daemon, GuestConsole as Console, build_test_guest, free_port, wait_until)

GUEST = os.path.join(ROOT, "scripts", "qemu-guest")
HOPS = int(os.environ.get("QG_MIGRATION_HOPS", "3"))
MEM_MB = 256
FRAMES = 100           # frames per pktgen burst
# QEMU_TCG_LOSS: QEMU 7.2 under TCG now and then loses a page the guest's CPU
# wrote while it migrates: the destination gets an older copy, and the guest
# may crash there (slab, timer-list, stack corruption). Measured here without
# iotlbd (QEMU's own virtio-net on its user-mode network, pmemsave of both
# sides at every hop): hops every ~0.8 s from boot on left differing pages
# in 4 guests of 6 at their first or second hop, pages of kernel data
# (0x4f57000-0x4f79000), and crashed 7 guests of ~50, all at guest uptimes
# below 3.5 s; single-threaded TCG and -cpu qemu64 alike. With iotlbd and
# traffic, 2-4 % of steady-state hops crashed, the build before issue 22's
# batches (296ed7e) alike; the differing pages seen there held kernel data,
# no frame, and DPDK's net_vhost as the back-end lost two of the same
# pages (0x11f7000, 0x11fd000). So the first hop waits for a settled guest
# (SETTLED_UP, its own clock), and a ping-pong that fails runs again from a
# fresh guest (3 tries).
SETTLED_UP = 10
DAMAGE = ("rx_errors", "tx_errors", "rx_crc_errors", "rx_frame_errors", "rx_length_errors", "ip_InHdrErrors",
          "ip_InAddrErrors", "udp_InErrors", "udp_InCsumErrors")


class QMP:
    """A blocking QMP client on a Unix socket: commands and their answers; events are kept."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf, self.events = b"", []
        self.message()  # the greeting
        self.run("qmp_capabilities")

    def message(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, command, **arguments):
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            m = self.message()
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError(f"QMP {command}: {m['error']}")
            return m.get("return")

    def close(self):
        self.sock.close()


class Side:
    """One host: a daemon with device m0 on its socket, and the QEMU it serves now."""

    def __init__(self, test, name):
        self.name = name
        self.dir = os.path.join(test.tmp, name)
        os.mkdir(self.dir)
        self.log_path = os.path.join(self.dir, "iotlbd.log")
        with open(self.log_path, "w") as log:
            self.daemon = Daemon("--vhost-user-dir", self.dir, log=log, log_level="info")
        status, dev = self.daemon.call("POST", "/v1/devices", {"id": "m0", "iotlb": True, "vhost_user": {"socket": "m0.sock"}})
        test.assertEqual(status, 201, dev)
        self.sock = os.path.join(self.dir, "m0.sock")
        self.qemu, self.qmp, self.console = None, None, None

    def device(self):
        return self.daemon.call("GET", "/v1/devices/m0", timeout=5)[1]

    def stats(self):
        return self.daemon.call("GET", "/v1/devices/m0/iotlb/stats", timeout=5)[1]

    def start_qemu(self, test, env, incoming=None):
        n = len(test.consoles)
        qmp = os.path.join(self.dir, f"qmp{n}.sock")
        args = [os.path.join(GUEST, "run.sh"), self.sock, env.get("QG_IOMMU", "strict"), "-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming:
            args += ["-incoming", incoming, "-S"]
        self.qemu = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.console = Console(self.qemu, os.path.join(test.tmp, f"console{n}-{self.name}.log"))
        test.consoles.append(self.console)
        self.qmp = QMP(qmp)

    def quit_qemu(self):
        if self.qemu is None:
            return
        try:
            self.qmp.run("quit")
        except (OSError, EOFError, RuntimeError):
            pass
        try:
            self.qemu.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.qemu.kill()
            self.qemu.wait()
        self.console.thread.join(5)
        self.qmp.close()
        self.qemu = self.qmp = None

    def close(self):
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.kill()
            self.qemu.wait()
        if self.console is not None:
            self.console.thread.join(5)  # it closes QEMU's pipe and the console log at their end
        if self.qmp is not None:
            self.qmp.close()
        if self.daemon.proc.poll() is None:
            self.daemon.proc.kill()
            self.daemon.proc.wait()


def differing_pages(a, b):
    """The 4 KiB page numbers where files a and b differ."""
    out, page = [], 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if not x and not y:
                return out
            if x != y:
                for k in range(0, max(len(x), len(y)), 4096):
                    if x[k:k + 4096] != y[k:k + 4096]:
                        out.append(page + k // 4096)
            page += (1 << 20) // 4096


class QemuMigration(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        build_test_guest("test-qemu-migration")

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="iotlbd-migration-")
        self.consoles, self.sides = [], []

    def tearDown(self):
        for s in self.sides:
            s.close()
        if os.environ.get("KEEP_QEMU_LOGS"):
            sys.stderr.write(f"logs kept in {self.tmp}\n")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def wait_for(self, what, predicate, timeout, poll=0.05):
        tail = lambda: self.consoles[-1].text()[-3000:] if self.consoles else ""  # noqa: E731
        return wait_until(predicate, timeout, poll, lambda: self.fail(f"{what}: not within {timeout} s\n{tail()}"))

    def all_counters(self):
        return [c for con in self.consoles for c in con.counters()]

    def migrate(self, src, dst, env, hop, compare_only=False):
        """One hop, checked; returns its figures. `compare_only`: stop after
        the memory comparison (a destination missing pages may crash its guest)."""
        port = free_port()
        announced = dst.device()["vhost_user"]["announcements"]
        dst.start_qemu(self, env, incoming=f"tcp:127.0.0.1:{port}")
        src.qmp.run("migrate-set-parameters", **{"max-bandwidth": 4 << 30, "downtime-limit": 300})
        logged_before = src.device()["dirty_log"]["pages_logged"]
        rx_before = src.stats()["vqs"][0]["chains"]
        src.qmp.run("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = self.wait_for(f"hop {hop}: migration completes",
                             lambda: (lambda m: m if m.get("status") in ("completed", "failed", "cancelled") else None)(
                                 src.qmp.run("query-migrate")), 90, poll=0.1)
        self.assertEqual(info["status"], "completed", f"hop {hop}: {info}\n{src.console.text()[-2000:]}")
        self.wait_for(f"hop {hop}: destination paused after the migration",
                      lambda: dst.qmp.run("query-status")["status"] == "paused", 30)
        # The source back-end stopped cleanly: every queue stopped by GET_VRING_BASE, none failed.
        sdev = src.device()
        log = sdev["dirty_log"]
        for v in sdev["vrings"]:
            self.assertEqual(v["state"], "disabled", f"hop {hop}: source vring {v}")
        self.assertTrue(log["enabled"], f"hop {hop}: {log}")
        self.assertEqual(log["faults"], 0, f"hop {hop}: {log}")
        pages = log["pages_logged"] - logged_before
        self.assertGreater(pages, 0, f"hop {hop}: nothing logged")
        # The destination back-end has not run: its IOTLB is empty, its queues never started.
        dstats = dst.stats()
        self.assertEqual(dstats["entries"], 0, f"hop {hop}: destination IOTLB before cont: {dstats}")
        # Memory: the paused source and the paused destination, byte for byte.
        a, b = os.path.join(self.tmp, "src.mem"), os.path.join(self.tmp, "dst.mem")
        size = MEM_MB << 20
        src.qmp.run("pmemsave", val=0, size=size, filename=a)
        dst.qmp.run("pmemsave", val=0, size=size, filename=b)
        diff = differing_pages(a, b)
        os.unlink(a)
        os.unlink(b)
        figures = {"downtime_ms": info.get("downtime"), "total_ms": info.get("total-time"),
                   "ram_mb": info.get("ram", {}).get("transferred", 0) / 1e6, "pages_logged": pages,
                   "differing_pages": diff, "dst_misses": 0,
                   "rx_during": src.stats()["vqs"][0]["chains"] - rx_before}
        if compare_only:
            return figures
        # Checked before the destination runs: a guest that crashes there
        # (see QEMU_TCG_LOSS) still shows whether its memory arrived whole.
        self.assertEqual(diff, [], f"hop {hop}: guest memory differs after migration ({len(diff)} pages)")
        # The destination runs: traffic goes on there, its IOTLB refills by misses.
        t_cont = time.monotonic()
        mark = max((c["rx_packets"] for t, c in self.all_counters()), default=0)
        dst.qmp.run("cont")
        got = self.wait_for(f"hop {hop}: the guest's RX grows on the destination",
                            lambda: [c for t, c in dst.console.counters() if t > t_cont and c["rx_packets"] > mark], 30)
        resumed = got[0]
        dstats = dst.stats()
        self.assertGreater(dstats["misses"], 0, f"hop {hop}: {dstats}")
        self.assertGreater(dstats["entries"], 0, f"hop {hop}: {dstats}")
        self.assertEqual(dstats["access_failures"], 0, f"hop {hop}: {dstats}")
        ddev = dst.device()
        self.assertEqual([v for v in ddev["vrings"] if v["state"] == "failed"], [], f"hop {hop}")
        # QEMU asked the destination to announce the guest (SEND_RARP, no GUEST_ANNOUNCE).
        self.assertGreater(ddev["vhost_user"]["announcements"], announced, f"hop {hop}: {ddev['vhost_user']}")
        src.quit_qemu()
        self.wait_for(f"hop {hop}: the source front-end gone",
                      lambda: not src.device()["vhost_user"]["connected"], 10)
        figures.update(dst_misses=dstats["misses"], rx_on_destination=resumed["rx_packets"] - mark)
        return figures

    def run_migrations(self, packed, hops, unlogged=False):
        env = dict(os.environ, QG_FRAMES=str(FRAMES), QG_MODE="continuous", QG_MEM=f"{MEM_MB}M",
                   QG_SECONDS=str(SETTLED_UP + 9 * hops))
        if packed:
            env["QG_PACKED"] = "1"
        if unlogged:
            os.environ["IOTLBD_TEST_UNLOGGED_RX_BUFFERS"] = "1"
            # The guest writes into every RX buffer's page as it takes the frame
            # (build_skb's shared info), so only frames it has not taken when its
            # vCPU stops leave a page that differs. Make those certain: one
            # endless pktgen burst, and lazy invalidation so the device answers
            # from its IOTLB and outruns the guest (strict mode waits on a miss
            # per frame, the guest keeps up, and often nothing is left over).
            env.update(QG_FRAMES=str(10 ** 8), QG_IOMMU="lazy")
        try:
            a, b = Side(self, "a"), Side(self, "b")
        finally:
            os.environ.pop("IOTLBD_TEST_UNLOGGED_RX_BUFFERS", None)
        self.sides = [a, b]
        a.start_qemu(self, env)
        a.qmp.run("cont") if a.qmp.run("query-status")["status"] != "running" else None
        self.wait_for("the guest's first frames back",
                      lambda: any(c["rx_packets"] > 0 for _, c in a.console.counters()), 120, poll=0.1)
        blockers = a.qmp.run("query-migrate")
        self.assertNotIn("blocked-reasons", blockers, blockers)
        # The first hop waits for a settled guest (see SETTLED_UP).
        self.wait_for(f"the guest's clock at {SETTLED_UP} s, sending",
                      lambda: any(c["up"] >= SETTLED_UP and c["rx_packets"] > 0 for _, c in a.console.counters()),
                      120, poll=0.1)
        figures, src, dst = [], a, b
        for hop in range(1, hops + 1):
            f = self.migrate(src, dst, env, hop, compare_only=unlogged)
            figures.append(f)
            kind = "packed" if packed else "split"
            sys.stderr.write(f"\n[{kind} hop {hop} {src.name}->{dst.name}: downtime {f['downtime_ms']} ms, "
                             f"total {f['total_ms']} ms, RAM sent {f['ram_mb']:.1f} MB, pages logged {f['pages_logged']}, "
                             f"differing pages {len(f['differing_pages'])} {f['differing_pages'][:16]}, "
                             f"frames into RX buffers meanwhile {f['rx_during']}, destination misses {f['dst_misses']}] ")
            if unlogged:
                return figures
            src, dst = dst, src
        # The guest stops sending and powers off; its last counters.
        try:
            src.qemu.wait(timeout=6 + 9 * hops + 60)
        except subprocess.TimeoutExpired:
            self.fail(f"the guest did not finish:\n{src.console.text()[-3000:]}")
        src.console.thread.join(5)
        text = src.console.text()
        self.assertIn("QG done", text, text[-3000:])
        self.assertEqual([line for line in text.splitlines() if line.startswith("QG error")], [])
        last = src.console.counters()[-1][1]
        damaged = {k: last[k] for k in DAMAGE}
        lost = last["pktgen_sent"] - last["udp_NoPorts"]
        sys.stderr.write(f"\n[{'packed' if packed else 'split'}: guest pktgen sent {last['pktgen_sent']}, back intact "
                         f"{last['udp_NoPorts']}, lost {lost}, damaged {sum(damaged.values())}; downtime median "
                         f"{statistics.median(f['downtime_ms'] for f in figures)} ms, pages logged "
                         f"{sum(f['pages_logged'] for f in figures)}] ")
        self.assertEqual(sum(damaged.values()), 0, damaged)
        self.assertEqual(last["ip_InReceives"], last["udp_NoPorts"], last)
        self.assertLessEqual(last["udp_NoPorts"], last["pktgen_sent"], last)
        # Lost frames: only those in flight when a source stopped (a ring's worth per hop at most).
        self.assertLess(lost, 256 * hops, last)
        # QEMU complained of nothing (a miss sent just before a source stopped its
        # rings reaches QEMU after: benign, as in integration/test_qemu.py).
        qemu_errors = [line for con in self.consoles for line in con.text().splitlines()
                       if line.startswith("qemu-system-x86_64:") and "Unexpected IOTLB message when virtio device is stopped" not in line]
        self.assertEqual(qemu_errors, [], "QEMU reported errors; IOTLB stats: " +
                         json.dumps({s.name: s.stats() for s in self.sides}))
        for s in self.sides:
            dev = s.device()
            self.assertEqual(dev["dirty_log"]["faults"], 0, dev["dirty_log"])
            with open(s.log_path, errors="replace") as f:
                bad = [line for line in f if "refused" in line or "not supported" in line]
            self.assertEqual(bad, [], f"daemon {s.name} refused requests of QEMU")
        return figures

    def ping_pong(self, packed):
        """HOPS hops there and back; up to 3 attempts, each from a fresh guest
        (QEMU_TCG_LOSS: ~2-4 % of hops). A device that misses log writes fails
        every attempt: the unlogged control loses pages on every hop."""
        kind = "packed" if packed else "split"
        for attempt in range(1, 4):
            if attempt > 1:
                self.tearDown()
                self.setUp()
            try:
                return self.run_migrations(packed=packed, hops=HOPS)
            except self.failureException as e:
                if attempt == 3:
                    raise
                why = str(e)
                sys.stderr.write(f"\n[{kind}: attempt {attempt} failed (QEMU_TCG_LOSS?); again from a fresh guest. "
                                 f"It failed with: {why[:400]}{' ...' if len(why) > 400 else ''}] ")

    def test_split_ping_pong(self):
        self.ping_pong(packed=False)

    def test_packed_ping_pong(self):
        self.ping_pong(packed=True)

    def test_unlogged_rx_buffers_break_the_memory_compare(self):
        # A page differs only if the guest has not taken a frame when its vCPU
        # stops: likely, not certain (1 run in ~20 had none). Up to 3 attempts,
        # each with a fresh guest and daemons; one that differs shows the
        # comparison catches missing logging.
        found = []
        for attempt in range(3):
            if attempt:
                self.tearDown()
                self.setUp()
            f = self.run_migrations(packed=False, hops=1, unlogged=True)[0]
            self.assertGreater(f["rx_during"], 0, "the device wrote no RX buffer while migrating: the control tests nothing")
            found.append(len(f["differing_pages"]))
            if found[-1] > 0:
                break
        self.assertGreater(found[-1], 0, "with RX buffers unlogged the memories should differ: the comparison would "
                                         f"catch nothing (differing pages per attempt: {found})")


if __name__ == "__main__":
    unittest.main(verbosity=2)
