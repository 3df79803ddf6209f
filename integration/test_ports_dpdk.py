#!/usr/bin/env python3
"""DPDK's virtio-user (dpdk-testpmd, a driver no one here wrote) through a TAP
port of iotlbd, in a network namespace the test makes (integration/netns.py: no
route out; iotlbd runs inside, its API on a Unix socket, integration/nsdaemon.py):

- TX: frames from a pcap file go out of testpmd's virtio-user port, through
  iotlbd, into the TAP, where tcpdump in the namespace captures them: the same
  frames, byte for byte, in order (IOTLB off, and on with the identity
  translator);
- RX: frames written into the TAP's interface from the namespace (a packet
  socket) reach testpmd, which writes them to a pcap file: the same frames;
- faults under traffic, while another device on the same datapath worker
  (the built-in guest on a loopback port) keeps moving frames: the TAP set
  down (tap_down drops, frames flow again once it is up), a frame longer than
  the guest's buffers from the TAP (oversize), the TAP deleted (tap_gone, the
  port's state "gone"; the device can still be deleted and made again);
- idle: a device with a TAP and a connected front-end with nothing to send
  costs the daemon at most 1 % of a core.

Needs root, 2 MiB huge pages (virtio-user's memory) and dpdk-testpmd (the
Makefile installs Debian's dpdk-dev): a missing tool fails; the test skips,
with a banner, only where the machine cannot reserve huge pages. Run by
`make test-ports`."""
import os
import shutil
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import wait_until  # noqa: E402
from netns import Netns  # noqa: E402
from nsdaemon import NsDaemon, iotlbd_path, tap_device_body  # noqa: E402
from test_vhost_user_dpdk import TESTPMD, hold_huge_pages, make_frames, read_pcap, write_pcap  # noqa: E402

# A packet socket in the namespace writes frames out of an interface (for a TAP:
# into its fd, i.e. to iotlbd). Frames as hex on stdin, one per line.
INJECT = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for line in sys.stdin:
    s.send(bytes.fromhex(line.strip()))
"""


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TapPortWithVirtioUser(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise AssertionError("network namespaces and huge pages need root")
        if TESTPMD is None:
            raise AssertionError("dpdk-testpmd is missing: `make tools` installs it (Debian's dpdk-dev)")
        if shutil.which("tcpdump") is None and shutil.which("tcpdump", path="/usr/sbin:/sbin") is None:
            raise AssertionError("tcpdump is missing: `make net-tools` installs it")
        cls.huge = hold_huge_pages("the TAP port tests with DPDK")

    @classmethod
    def tearDownClass(cls):
        cls.huge.__exit__(None, None, None)

    def setUp(self):
        self.ns = Netns("pdpdk")
        self.addCleanup(self.ns.close)
        self.log = open(os.path.join(self.ns.tmp, "iotlbd.log"), "w")
        self.addCleanup(self.log.close)
        self.daemon = NsDaemon(self.ns, "--vhost-user-dir", self.ns.tmp, "--tap-create", binary=iotlbd_path(), log=self.log)
        self.addCleanup(self.daemon.stop)

    # --- helpers -----------------------------------------------------------------
    def device(self, name, tap, iotlb=False):
        sock = os.path.join(self.ns.tmp, name + ".sock")
        status, dev = self.daemon.call("POST", "/v1/devices", tap_device_body(name, sock, tap, iotlb))
        self.assertEqual(status, 201, dev)
        return sock

    def port(self, name):
        status, dev = self.daemon.call("GET", f"/v1/devices/{name}")
        self.assertEqual(status, 200, dev)
        return dev["port"]

    def run_testpmd(self, tag, vdevs, args):
        """testpmd with `vdevs`, running until stop_testpmd(); its log in the namespace's folder."""
        cmd = [TESTPMD, "-l", "0,1", "--no-pci", "--single-file-segments", "--in-memory", "-m", "256",
               "--file-prefix", f"{tag}-{os.getpid()}"]
        for v in vdevs:
            cmd += ["--vdev", v]
        cmd += ["--", "--nb-cores=1", "--total-num-mbufs=8192", "--no-lsc-interrupt", *args]
        path = os.path.join(self.ns.tmp, f"{tag}-testpmd.log")
        log = open(path, "w")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path, proc.log_file = path, log
        # With --stats-period testpmd does not read stdin: SIGINT ends it (cleanly, "Bye").
        proc.by_signal = any(a.startswith("--stats-period") for a in args)
        self.addCleanup(self.stop_testpmd, proc)
        return proc

    def stop_testpmd(self, proc):
        if proc.poll() is None:
            try:
                if proc.by_signal:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(timeout=30)
                else:
                    proc.communicate(b"\n", timeout=30)  # "Press enter to exit"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdin:
            proc.stdin.close()
        proc.log_file.close()
        with open(proc.log_path) as f:
            return f.read()

    def wait_for(self, what, cond, timeout=30):
        return wait_until(cond, timeout, 0.05, lambda: self.fail(f"timed out waiting for {what}"))

    def inject(self, ifname, frames):
        """Writes `frames` out of `ifname` inside the namespace (into the TAP's fd)."""
        out = self.ns.run([sys.executable, "-c", INJECT, ifname], input="\n".join(f.hex() for f in frames) + "\n",
                          check=False)
        self.assertEqual(out.returncode, 0, out.stderr)

    def connected(self, name):
        status, dev = self.daemon.call("GET", f"/v1/devices/{name}")
        return dev["vhost_user"]["connected"] and all(v["state"] == "running" for v in dev["vrings"])

    # --- tests ---------------------------------------------------------------------
    def both_ways(self, iotlb):
        ns = self.ns
        ns.add_tap("tap0")
        ns.check_isolated()
        name = "tx-" + ("on" if iotlb else "off")
        sock = self.device(name, "tap0", iotlb)
        out_frames = make_frames(200, seed=40 + iotlb)
        in_frames = make_frames(150, seed=50 + iotlb)
        src, dst = os.path.join(ns.tmp, f"{name}-in.pcap"), os.path.join(ns.tmp, f"{name}-out.pcap")
        write_pcap(src, out_frames)
        with ns.capture("tap0", snaplen=2048, direction="in") as cap:
            pmd = self.run_testpmd(name, [f"net_virtio_user0,path={sock},queues=1,queue_size=256",
                                      f"net_pcap0,rx_pcap={src},tx_pcap={dst}"],
                               ["--forward-mode=io", "--no-flush-rx"])
            self.wait_for("the front-end", lambda: self.connected(name))
            self.wait_for("the TX frames on the TAP", lambda: self.port(name)["counters"]["tx_frames"] >= 200)
            self.inject("tap0", in_frames)
            self.wait_for("the RX frames in the guest", lambda: self.port(name)["counters"]["rx_frames"] >= 150)
            time.sleep(0.5)  # testpmd moves them on to its pcap port
        text = self.stop_testpmd(pmd)
        self.assertIn("Bye", text)
        got = [data for _, data in cap.frames]
        self.assertEqual(len(got), len(out_frames), f"{len(got)} frames on the TAP")
        self.assertEqual(got, out_frames, "frames reached the TAP changed or reordered")
        back = read_pcap(dst)
        self.assertEqual(back, in_frames, "frames from the TAP reached testpmd changed or reordered")
        c = self.port(name)["counters"]
        self.assertEqual((c["tx_frames"], c["rx_frames"]), (200, 150), c)
        self.assertEqual({k: v for k, v in c["drops"].items() if v}, {}, c)
        stats = self.daemon.call("GET", f"/v1/devices/{name}/iotlb/stats")[1]
        self.assertEqual(stats["access_failures"], 0, stats)
        if iotlb:
            self.assertGreater(stats["hits"], 0, stats)

    def test_both_ways_iotlb_off(self):
        self.both_ways(False)

    def test_both_ways_iotlb_on(self):
        self.both_ways(True)

    def test_faults_under_traffic(self):
        ns = self.ns
        ns.add_tap("tap0", mtu=9000)
        ns.check_isolated()
        # The other device on the same (only) worker: the built-in guest on its loopback.
        status, _ = self.daemon.call("POST", "/v1/devices", {"id": "other"})
        self.assertEqual(status, 201)
        status, w = self.daemon.call("PUT", "/v1/devices/other/workload", {"packet_size": 64, "page_size": "4k"})
        self.assertEqual(status, 200, w)

        def other_moves(seconds=0.5):
            a = self.daemon.call("GET", "/v1/devices/other/workload")[1]["received"]
            time.sleep(seconds)
            b = self.daemon.call("GET", "/v1/devices/other/workload")[1]
            self.assertEqual(b["verify_errors"], 0, b)
            return b["received"] - a

        sock = self.device("f", "tap0")
        # mrg_rxbuf=0: one 2 KiB buffer per frame, so a 9000-byte frame cannot be taken.
        pmd = self.run_testpmd("faults", [f"net_virtio_user0,path={sock},queues=1,queue_size=256,mrg_rxbuf=0"],
                           ["--forward-mode=txonly", "--txpkts=64", "--stats-period=1"])
        self.wait_for("the front-end", lambda: self.connected("f"))
        self.wait_for("frames on the TAP", lambda: self.port("f")["counters"]["tx_frames"] > 10000)
        self.assertGreater(other_moves(), 0, "the other device stopped")

        # Oversize from the TAP: dropped by reason; a frame that fits after it still arrives.
        big = b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x07" + b"\x88\xb5" + bytes(8986)
        small = b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x07" + b"\x88\xb5" + bytes(50)
        rx0 = self.port("f")["counters"]["rx_frames"]
        self.inject("tap0", [big, small])
        self.wait_for("the oversize drop", lambda: self.port("f")["counters"]["drops"]["oversize"] == 1)
        self.wait_for("the small frame", lambda: self.port("f")["counters"]["rx_frames"] > rx0)

        # The TAP set down: frames are dropped (tap_down), the other device goes on; up again, they flow.
        ns.ip("link", "set", "tap0", "down")
        self.wait_for("tap_down drops", lambda: self.port("f")["counters"]["drops"]["tap_down"] > 1000)
        self.assertEqual(self.port("f")["state"], "down")
        self.assertGreater(other_moves(), 0, "the other device stopped while the TAP was down")
        sent = self.port("f")["counters"]["tx_frames"]
        ns.ip("link", "set", "tap0", "up")
        self.wait_for("frames again", lambda: self.port("f")["counters"]["tx_frames"] > sent + 10000)
        self.assertEqual(self.port("f")["state"], "up")

        # The TAP deleted: tap_gone, state gone; the daemon and the other device go on.
        ns.ip("link", "del", "tap0")
        ns.links.remove("tap0")
        self.wait_for("tap_gone drops", lambda: self.port("f")["counters"]["drops"]["tap_gone"] > 1000)
        self.assertEqual(self.port("f")["state"], "gone")
        self.assertGreater(other_moves(), 0, "the other device stopped after the TAP went")
        text = self.stop_testpmd(pmd)
        self.assertIn("Bye", text)
        self.assertEqual(self.daemon.call("DELETE", "/v1/devices/f")[0], 204)
        # Made again, with the daemon making the TAP this time.
        status, dev = self.daemon.call("POST", "/v1/devices", tap_device_body("f", sock, "tap0", False))
        self.assertEqual(status, 201, dev)
        self.assertTrue(dev["port"]["created"], dev["port"])
        self.assertIsNone(self.daemon.proc.poll(), "iotlbd died")

    def test_idle_costs_under_one_percent(self):
        """A TAP port whose front-end is connected and sends nothing: the
        worker sleeps on its eventfd and the TAP (ppoll)."""
        ns = self.ns
        ns.add_tap("tap0")
        ns.check_isolated()
        sock = self.device("idle", "tap0", iotlb=True)
        pmd = self.run_testpmd("idle", [f"net_virtio_user0,path={sock},queues=1,queue_size=256"], ["--forward-mode=rxonly"])
        self.wait_for("the front-end", lambda: self.connected("idle"))
        time.sleep(1)
        pid = self.daemon.proc.pid
        tasks = lambda: {t: cpu_seconds(f"{pid}/task/{t}") for t in os.listdir(f"/proc/{pid}/task")}
        t0, c0, per0 = time.time(), cpu_seconds(pid), tasks()
        time.sleep(10)
        share = (cpu_seconds(pid) - c0) / (time.time() - t0)
        per = {}
        for t, v in tasks().items():
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                per[f.read().strip()] = round(v - per0.get(t, 0), 3)
        sys.stderr.write(f"[CPU seconds by thread over 10 s: {per}] ")
        sys.stderr.write(f"[idle iotlbd with a TAP port and a connected front-end: {share * 100:.2f} % of a core] ")
        self.assertLess(share, 0.01, f"idle iotlbd used {share * 100:.2f} % of a core")
        self.assertTrue(self.connected("idle"))
        self.stop_testpmd(pmd)


class TapPortRefusals(unittest.TestCase):
    """Bad ports are refused with the field named, and nothing half-made stays."""

    def setUp(self):
        self.ns = Netns("prefuse")
        self.addCleanup(self.ns.close)
        self.daemon = NsDaemon(self.ns, "--vhost-user-dir", self.ns.tmp, binary=iotlbd_path())  # no --tap-create
        self.addCleanup(self.daemon.stop)

    def refused(self, body, status, code, field):
        got, answer = self.daemon.call("POST", "/v1/devices", body)
        self.assertEqual((got, answer["error"]["code"], answer["error"].get("field")), (status, code, field), answer)
        self.assertEqual(self.daemon.call("GET", "/v1/devices")[1]["devices"], [], "a refused device stayed")
        return answer["error"]["message"]

    def test_refusals(self):
        sock = os.path.join(self.ns.tmp, "r.sock")
        why = self.refused({"id": "r", "port": {"type": "tap", "name": "nope0"}, "vhost_user": {"socket": sock}},
                           422, "port_unavailable", "port.name")
        self.assertIn("no such interface", why)
        self.assertIn("--tap-create", why)
        self.assertFalse(os.path.exists(sock), "the refused device's socket stayed")
        self.assertNotIn("nope0", self.ns.link_names())
        self.refused({"port": {"type": "tap", "name": "a/b"}}, 400, "invalid_field", "port.name")
        self.refused({"port": {"type": "tap", "name": "x" * 16}}, 400, "invalid_field", "port.name")
        self.refused({"port": {"type": "tap"}}, 400, "invalid_field", "port.name")
        self.refused({"port": {"type": "peer"}}, 400, "invalid_field", "port.device")
        self.refused({"id": "me", "port": {"type": "peer", "device": "me"}}, 400, "invalid_field", "port.device")
        self.refused({"port": {"type": "wire"}}, 400, "invalid_field", "port.type")
        self.refused({"port": {"type": "tap", "name": "t0", "mtu": 9000}}, 400, "unknown_field", "port.mtu")
        self.refused({"backend": "sink", "port": "loopback"}, 400, "invalid_field", "backend")
        self.refused({"backend": "tap"}, 400, "invalid_field", "backend")
        # The operator's TAP: attached, not made; deleting the device leaves it.
        self.ns.add_tap("op0", multi_queue=True)
        status, dev = self.daemon.call("POST", "/v1/devices", {"id": "ok", "queues": 4, "port": {"type": "tap", "name": "op0"}})
        self.assertEqual(status, 201, dev)
        self.assertEqual((dev["port"]["created"], dev["port"]["interface"]), (False, "op0"), dev["port"])
        self.assertEqual(len(dev["port"]["queues"]), 2, dev["port"])
        self.assertEqual(self.daemon.call("DELETE", "/v1/devices/ok")[0], 204)
        self.assertIn("op0", self.ns.link_names())


if __name__ == "__main__":
    unittest.main(verbosity=2)
