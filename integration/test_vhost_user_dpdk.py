#!/usr/bin/env python3
"""A virtio driver no one here wrote drives iotlbd: DPDK's virtio-user PMD in
dpdk-testpmd connects to a vhost-user device of the daemon. testpmd forwards
(io mode) between that port and a pcap port: frames read from a pcap file go
out through virtio-user, through iotlbd's loopback, back in, and into a second
pcap file, which must hold exactly the frames sent, byte for byte. Run with the
device IOTLB off, and on (the identity translator maps IOVA = GPA, 2 MiB at a
time) twice over one device, so the front-end also disconnects and reconnects.

Needs root for 2 MiB huge pages and dpdk-testpmd (Debian's dpdk-dev; the
Makefile installs it). A missing dpdk-testpmd is a failure; the test skips,
with a banner on stderr, only where the machine cannot reserve huge pages. Restores the
huge page count it found. Run by `make test`."""
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import Daemon  # noqa: E402

TESTPMD = shutil.which("dpdk-testpmd")
PAGES_NEEDED = 256  # 512 MiB: testpmd's memory with room to spare


def write_pcap(path, frames):
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, fr in enumerate(frames):
            f.write(struct.pack("<IIII", 1, i, len(fr), len(fr)))
            f.write(fr)


def read_pcap(path):
    frames = []
    with open(path, "rb") as f:
        magic = struct.unpack("<I", f.read(24)[:4])[0]
        assert magic in (0xA1B2C3D4, 0xA1B23C4D), hex(magic)
        while True:
            h = f.read(16)
            if len(h) < 16:
                return frames
            _, _, incl, _ = struct.unpack("<IIII", h)
            frames.append(f.read(incl))


def read_text(path):
    with open(path) as f:
        return f.read()


def make_frames(n, seed):
    """Ethernet frames of 60..1514 bytes: broadcast, a sequence number, random payload."""
    rng = random.Random(seed)
    frames = []
    for i in range(n):
        size = rng.choice([60, 64, 128, 512, 1000, 1514]) if i % 3 else rng.randint(60, 1514)
        head = b"\xff" * 6 + bytes([2, 0, 0, 0, 0, 1]) + b"\x88\xb5" + struct.pack(">I", i)
        frames.append(head + bytes(rng.getrandbits(8) for _ in range(size - len(head))))
    return frames


def free_huge_pages():
    with open("/proc/meminfo") as f:
        return int(next(l for l in f if l.startswith("HugePages_Free")).split()[1])


def hold_huge_pages(tests):
    """Entered HugePages, or a loud skip naming `tests`: the one case where the
    machine itself cannot (no huge pages), said as such."""
    huge = HugePages().__enter__()
    if huge.problem:
        huge.__exit__(None, None, None)
        why = (f"huge pages cannot be had on this machine ({huge.problem}); "
               f"DPDK virtio-user needs them, so {tests} DID NOT RUN")
        print("\n" + "!" * 78 + "\nSKIPPED: " + why + "\n" + "!" * 78, file=sys.stderr)
        raise unittest.SkipTest(why)
    return huge


class HugePages:
    """Reserves 2 MiB pages (testpmd runs --in-memory: its memory is memfd
    backed, no hugetlbfs mount or files involved); gives back what it took."""

    def __init__(self):
        self.before = None
        self.problem = None

    def __enter__(self):
        try:
            with open("/proc/sys/vm/nr_hugepages") as f:
                self.before = int(f.read())
            free = free_huge_pages()
            if free < PAGES_NEEDED:
                with open("/proc/sys/vm/nr_hugepages", "w") as f:
                    f.write(str(self.before + PAGES_NEEDED - free))
                free = free_huge_pages()
            if free < PAGES_NEEDED:
                self.problem = f"only {free} free 2 MiB huge pages after asking for {PAGES_NEEDED}"
                return self
        except (OSError, StopIteration, ValueError) as e:
            self.problem = f"cannot reserve 2 MiB huge pages: {e}"
            return self
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            try:
                with open("/proc/sys/vm/nr_hugepages", "w") as f:
                    f.write(str(self.before))
            except OSError:
                pass


class VirtioUserThroughIotlbd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if TESTPMD is None:
            raise AssertionError("dpdk-testpmd is missing: `make tools` installs it (Debian's dpdk-dev)")
        cls.huge = hold_huge_pages("the DPDK tests")
        cls.tmp = tempfile.mkdtemp(prefix="iotlbd-dpdk-")
        cls.daemon = Daemon("--vhost-user-dir", cls.tmp)  # socket paths must lie there

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)
        cls.huge.__exit__(None, None, None)

    def vring(self, name, n):
        return self.daemon.call("GET", f"/v1/devices/{name}/vrings/{n}")[1]

    def session(self, tag, vdevs, args, done, settle=0.0):
        """Runs one testpmd session until `done()` holds (60 s at most), waits
        `settle` seconds, asks it to exit; returns its log."""
        cmd = [TESTPMD, "-l", "0,1", "--no-pci", "--single-file-segments", "--in-memory", "-m", "256"]
        for v in vdevs:
            cmd += ["--vdev", v]
        cmd += ["--", "--nb-cores=1", "--total-num-mbufs=8192", "--no-lsc-interrupt", *args]
        path = os.path.join(self.tmp, f"{tag}-testpmd.log")
        with open(path, "w") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 60
                while time.time() < deadline and proc.poll() is None and not done():
                    time.sleep(0.1)
                time.sleep(settle)
                self.assertIsNone(proc.poll(), f"testpmd exited early: {read_text(path)[-3000:]}")
                proc.communicate(b"\n", timeout=30)  # testpmd: "Press enter to exit"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = read_text(path)
        self.assertEqual(proc.returncode, 0, text[-3000:])
        self.assertIn("Bye", text)
        return text

    def run_testpmd(self, name, sock, frames, tag, vdev_extra=""):
        """One testpmd session: returns the frames that came back."""
        src, out = os.path.join(self.tmp, f"{tag}-in.pcap"), os.path.join(self.tmp, f"{tag}-out.pcap")
        write_pcap(src, frames)
        delivered = 0

        def all_delivered():
            # iotlbd has put every frame in the RX ring (testpmd then passes them to the pcap port).
            nonlocal delivered
            rx = self.vring(name, 0)
            if rx["state"] == "running":
                self.last_rx = rx
                stats = self.daemon.call("GET", f"/v1/devices/{name}/iotlb/stats")[1]
                delivered = stats["vqs"][0]["chains"]
            return delivered >= len(frames)

        text = self.session(tag, [f"net_virtio_user0,path={sock},queues=1,queue_size=256{vdev_extra}",
                                  f"net_pcap0,rx_pcap={src},tx_pcap={out}"],
                            ["--forward-mode=io",
                             "--no-flush-rx"],  # testpmd would otherwise drain the pcap input before forwarding
                            all_delivered, settle=1.0)
        self.assertGreaterEqual(delivered, len(frames), text[-3000:])
        return read_pcap(out)

    def check_device_idle(self, name):
        deadline = time.time() + 10
        while time.time() < deadline:
            dev = self.daemon.call("GET", f"/v1/devices/{name}")[1]
            if not dev["vhost_user"]["connected"] and dev["mem_table"] is None:
                return dev
            time.sleep(0.05)
        self.fail(f"{name} did not go back to waiting: {dev}")

    def test_iotlb_off(self):
        sock = self.daemon.vhost_user_device("dpdk-off", False, self.tmp)
        frames = make_frames(200, seed=1)
        back = self.run_testpmd("dpdk-off", sock, frames, "off")
        self.assertEqual(len(back), len(frames))
        self.assertEqual(back, frames, "frames came back changed or reordered")
        dev = self.check_device_idle("dpdk-off")
        self.assertEqual(dev["vhost_user"]["connections"], 1)

    def test_iotlb_on_identity_and_reconnect(self):
        sock = self.daemon.vhost_user_device("dpdk-on", True, self.tmp)
        for round_ in range(2):
            frames = make_frames(200, seed=10 + round_)
            back = self.run_testpmd("dpdk-on", sock, frames, f"on{round_}")
            self.assertEqual(back, frames, f"round {round_}: frames came back changed")
            dev = self.check_device_idle("dpdk-on")
            self.assertEqual(dev["vhost_user"]["connections"], round_ + 1)
            self.assertGreater(dev["vhost_user"]["identity_updates"], 0)
        stats = self.daemon.call("GET", "/v1/devices/dpdk-on/iotlb/stats")[1]
        self.assertEqual(stats["access_failures"], 0)
        self.assertGreater(stats["hits"], 0)
        self.assertEqual(stats["entries"], 0, "the departed front-end's translations are flushed")

    def test_packed_rings(self):
        """DPDK's virtio-user with packed virtqueues (packed_vq=1), IOTLB off and on."""
        for iotlb in (False, True):
            name = "dpdk-packed-" + ("on" if iotlb else "off")
            sock = self.daemon.vhost_user_device(name, iotlb, self.tmp)
            # Fewer frames than the 256-slot ring, as in the split tests: the pcap
            # port injects them at once, and testpmd drops what its TX ring cannot
            # hold (its behaviour, not ours). Wrap-arounds are covered by the
            # hand-laid PackedRingTests and by QEMU's guest (2,000 frames).
            frames = make_frames(200, seed=30 + iotlb)
            self.last_rx = None
            back = self.run_testpmd(name, sock, frames, name, vdev_extra=",packed_vq=1")
            self.assertEqual(back, frames, f"{name}: frames came back changed or reordered")
            self.assertTrue(self.last_rx and self.last_rx["packed"], f"{name}: the ring was not packed: {self.last_rx}")
            stats = self.daemon.call("GET", f"/v1/devices/{name}/iotlb/stats")[1]
            self.assertEqual(stats["access_failures"], 0)
            if iotlb:
                self.assertGreater(stats["hits"], 0)

    def test_client_mode_virtio_user_server(self):
        """testpmd's virtio-user listens (server=1); the device, created first in
        client mode, keeps trying until it can connect; byte-exact frames both
        times, and after testpmd exits iotlbd reconnects to the next one alone."""
        sock = os.path.join(self.tmp, "client.sock")
        status, dev = self.daemon.call("POST", "/v1/devices",
                                       {"id": "dpdk-client", "iotlb": True, "vhost_user": {"socket": "client.sock", "mode": "client"}})
        self.assertEqual(status, 201, dev)
        self.assertEqual((dev["vhost_user"]["mode"], dev["vhost_user"]["socket"]), ("client", sock))
        deadline = time.time() + 10
        while self.daemon.call("GET", "/v1/devices/dpdk-client")[1]["vhost_user"]["reconnect_attempts"] < 2:
            self.assertLess(time.time(), deadline, "no connection attempts while nothing listens")
            time.sleep(0.05)
        for round_ in range(2):
            frames = make_frames(200, seed=20 + round_)
            back = self.run_testpmd("dpdk-client", sock, frames, f"client{round_}", vdev_extra=",server=1")
            self.assertEqual(len(back), len(frames))
            self.assertEqual(back, frames, f"round {round_}: frames came back changed or reordered")
            dev = self.check_device_idle("dpdk-client")
            self.assertEqual(dev["vhost_user"]["connections"], round_ + 1)
            self.assertEqual(dev["vhost_user"]["mode"], "client")
        self.assertGreater(dev["vhost_user"]["reconnect_attempts"], 2, "it tried again between the two testpmd runs")
        stats = self.daemon.call("GET", "/v1/devices/dpdk-client/iotlb/stats")[1]
        self.assertEqual(stats["access_failures"], 0)
        self.assertEqual(stats["entries"], 0, "the departed front-end's translations are flushed")

    def test_two_queue_pairs(self):
        """virtio-user with 2 queue pairs (MQ negotiated, its control queue emulated
        by virtio-user itself): tx-first bursts circulate on both pairs."""
        sock = os.path.join(self.tmp, "mq.sock")
        status, dev = self.daemon.call("POST", "/v1/devices", {"id": "dpdk-mq", "queues": 4, "vhost_user": {"socket": sock}})
        self.assertEqual(status, 201, dev)
        chains = []

        def both_pairs_busy():
            nonlocal chains
            chains = [q["chains"] for q in self.daemon.call("GET", "/v1/devices/dpdk-mq/iotlb/stats")[1]["vqs"]]
            return min(chains) > 10000

        text = self.session("mq", [f"net_virtio_user0,path={sock},queues=2"],
                            ["--forward-mode=io", "--tx-first", "--rxq=2", "--txq=2"], both_pairs_busy)
        self.assertGreater(min(chains), 10000, f"chains per queue {chains}: {text[-2000:]}")
        dev = self.check_device_idle("dpdk-mq")
        self.assertEqual(int(dev["vhost_user"]["features"], 16) >> 22 & 1, 1, "VIRTIO_NET_F_MQ negotiated")


if __name__ == "__main__":
    unittest.main(verbosity=2)
