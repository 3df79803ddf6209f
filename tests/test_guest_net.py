#!/usr/bin/env python3
"""The busybox guest on a network, through QEMU's own back-end (-netdev tap, no
vhost, no iotlbd): the harness the TAP port of issue 20 will be tested with,
proven on what exists. Each test makes its own network namespace (tests/netns.py:
no default route, no link out, 10.77.0.0/24 inside only), a TAP in it, and boots
the guest (tests/guestnet.py, scripts/qemu-guest/run.sh tap:IF) inside it:

- the guest pings the TAP's address;
- it sends a 50 MiB TCP stream to a receiver in the namespace, which checks the
  sha256 against scripts/qemu-guest/qgdata.py's stream (and the guest's own);
- TSO: HOST_TSO4 negotiated, and frames from the guest longer than 1514 bytes
  crossed the TAP (tcpdump in the namespace: a TAP without IFF_NAPI does no
  GRO, so a long frame there is one the guest sent whole);
- the other way: a 20 MiB stream from the namespace to the guest, which checks
  its sha256; GUEST_TSO4 negotiated and long frames went to the guest;
with an Intel vIOMMU (strict: iommu.strict=1, as tests/test_qemu.py) and without;
a multi_queue TAP (two queue pairs) with the lazy vIOMMU; and two guests, each
behind its own strict vIOMMU, on two TAPs bridged in the namespace, each sending
a stream to the other (the guest-to-guest check, both listen and both send).

To run the same checks on iotlbd, swap Tap("tap0") for VhostUser(socket) (the
device's port being that TAP): everything else stays. Root only. Fails (not
skips) when QEMU, tcpdump or the guest cannot be had. `make test-guest-net`."""
import os
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from guestnet import BUILD_SH, Guest, NetConfig, Tap  # noqa: E402
from netns import Netns, qgdata  # noqa: E402

TX_MB = 50           # guest → namespace
RX_MB = 20           # namespace → guest
PAIR_MB = 10         # each way between two guests
BOOT_TIMEOUT = 240   # seconds per QEMU run (TCG; strict vIOMMU ~2.5 MB/s guest TX here)
HOST = "10.77.0.1"
GUEST_IP = "10.77.0.2"


class GuestOnTap(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if os.geteuid() != 0:
            raise AssertionError("network namespaces need root")
        for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("tcpdump", "tcpdump"), ("ip", "iproute2")):
            if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
                raise AssertionError(f"{tool} is missing: `make test-guest-net` installs {pkg}")
        out = subprocess.run([BUILD_SH], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise AssertionError(f"scripts/qemu-guest/build.sh failed:\n{out.stdout}{out.stderr}")
        cls.keep = os.environ.get("KEEP_QEMU_LOGS")

    def boot_checked(self, guest):
        r = guest.wait(BOOT_TIMEOUT)
        self.assertFalse(r["timed_out"], f"QEMU still running after {BOOT_TIMEOUT} s:\n{r['text'][-3000:]}")
        self.assertEqual(r["returncode"], 0, r["text"][-3000:])
        self.assertEqual(r["errors"], [], r["text"][-3000:])
        self.assertEqual(r["qemu_errors"], [], "QEMU complained")
        self.assertTrue(r["done"], r["text"][-3000:])
        return r

    def check_guest(self, r, iommu):
        self.assertEqual(r["net"]["iommu"], {"strict": "DMA", "lazy": "DMA-FQ", "off": "none"}[iommu], r["net"])
        f = r["features"]
        self.assertEqual(f["access_platform"], 0 if iommu == "off" else 1, f)
        for bit in ("csum", "guest_csum", "host_tso4", "guest_tso4", "mrg_rxbuf"):
            self.assertEqual(f[bit], 1, f"{bit} not negotiated: {f}")
        p = r["ping"]
        self.assertEqual((p["transmitted"], p["received"]), (5, 5), p)
        self.assertEqual(r["net-result"]["ok"], 1, r["net-result"])

    def run_tap(self, iommu, multi_queue=False):
        """One guest on tap0 in a fresh namespace: ping, TX_MB out, RX_MB in."""
        with Netns("gnet") as ns:
            ns.add_tap("tap0", multi_queue=multi_queue)
            ns.add_address("tap0", HOST + "/24")
            ns.check_isolated()
            rx = ns.tcp_receiver(HOST, 5001, mb=TX_MB, timeout=BOOT_TIMEOUT)
            cfg = NetConfig(ip=GUEST_IP + "/24", peer=HOST, mb=TX_MB, port=5001, listen=5002, rx_mb=RX_MB, wait=180)
            guest = Guest(Tap("tap0", queues=2 if multi_queue else 1), iommu, cfg,
                          console=os.path.join(ns.tmp, "console.log"), ns=ns)
            try:
                with ns.capture("tap0", bpf="tcp") as cap:
                    guest.start()
                    got = rx.result(timeout=BOOT_TIMEOUT)
                    guest.wait_line("QG tcp-send", timeout=60)
                    sent = ns.tcp_sender(GUEST_IP, 5002, RX_MB, timeout=60).result(timeout=120)
                    r = self.boot_checked(guest)
                counters = ns.counters("tap0")
            finally:
                guest.stop()
                if self.keep:
                    shutil.copy(guest.console, f"/tmp/test_guest_net-{iommu}{'-mq' if multi_queue else ''}.log")
            self.check_guest(r, iommu)
            # guest → namespace: every byte, the stream qgdata.py makes, and what the guest says it sent.
            self.assertTrue(got["match"], got)
            self.assertEqual(got["sha256"], r["tcp-send"]["sha256"], (got, r["tcp-send"]))
            self.assertEqual(r["tcp-send"]["rc"], 0, r["tcp-send"])
            # namespace → guest
            self.assertEqual(r["tcp-recv"]["match"], 1, r["tcp-recv"])
            self.assertEqual(r["tcp-recv"]["sha256"], sent["sha256"])
            self.assertEqual(sent["sha256"], qgdata.stream_sha256(RX_MB))
            # TSO both ways: frames longer than the MTU's 1514 crossed the TAP.
            out_long = [n for n in cap.lengths_from(GUEST_IP) if n > 1514]
            in_long = [n for n in cap.lengths_from(HOST) if n > 1514]
            self.assertGreater(len(out_long), 0, "no frame from the guest longer than 1514 bytes: no TSO")
            self.assertGreater(len(in_long), 0, "no frame to the guest longer than 1514 bytes: no GUEST_TSO")
            self.assertEqual(cap.kernel_drops, 0)
            self.assertGreater(counters["rx_bytes"], TX_MB << 20)
            self.assertGreater(counters["tx_bytes"], RX_MB << 20)
            sys.stderr.write(
                f"[{iommu}{' mq' if multi_queue else ''}: guest→ns {got['mbytes_per_s']} MB/s "
                f"(guest says {r['tcp-send']['mbytes_per_s']}), ns→guest {sent['mbytes_per_s']} MB/s; "
                f"frames >1514 B: {len(out_long)} of {len(cap.lengths_from(GUEST_IP))} out (max "
                f"{max(out_long)}), {len(in_long)} of {len(cap.lengths_from(HOST))} in; ping avg "
                f"{r['ping']['rtt_avg_ms']} ms; QEMU ran {r['wall_s']} s] ")

    def test_tap_strict_viommu(self):
        self.run_tap("strict")

    def test_tap_no_viommu(self):
        self.run_tap("off")

    def test_multiqueue_tap_lazy_viommu(self):
        """A multi_queue TAP (what a TAP port with IFF_MULTI_QUEUE attaches to),
        two queue pairs, lazy invalidation."""
        self.run_tap("lazy", multi_queue=True)

    def test_two_guests_bridged(self):
        """Two guests, each behind its own strict vIOMMU, on tap0 and tap1 of a
        bridge in the namespace: each pings the other, listens, and sends the
        other PAIR_MB MiB; each checks what it received."""
        with Netns("g2g") as ns:
            ns.add_tap("tap0")
            ns.add_tap("tap1")
            ns.add_bridge("br0", ["tap0", "tap1"])
            ns.check_isolated()
            a, b = "10.77.0.2", "10.77.0.3"
            guests = []
            for i, (me, peer) in enumerate(((a, b), (b, a))):
                cfg = NetConfig(ip=me + "/24", peer=peer, mb=PAIR_MB, port=5001, listen=5001, wait=120)
                guests.append(Guest(Tap(f"tap{i}"), "strict", cfg, console=os.path.join(ns.tmp, f"console{i}.log"),
                                    ns=ns, mac=f"52:54:00:77:00:0{i + 2}"))
            try:
                for g in guests:
                    g.start()
                rs = [self.boot_checked(g) for g in guests]
            finally:
                for i, g in enumerate(guests):
                    g.stop()
                    if self.keep:
                        shutil.copy(g.console, f"/tmp/test_guest_net-pair{i}.log")
            want = qgdata.stream_sha256(PAIR_MB)
            for r, other in zip(rs, reversed(rs)):
                self.check_guest(r, "strict")
                self.assertEqual(r["tcp-send"]["sha256"], want)
                self.assertEqual(r["tcp-recv"]["match"], 1, r["tcp-recv"])
                self.assertEqual(r["tcp-recv"]["sha256"], other["tcp-send"]["sha256"])
            sys.stderr.write(f"[pair: {rs[0]['tcp-send']['mbytes_per_s']} and {rs[1]['tcp-send']['mbytes_per_s']} "
                             f"MB/s (guests' figures, both ways at once); QEMU ran {rs[0]['wall_s']}, "
                             f"{rs[1]['wall_s']} s] ")


if __name__ == "__main__":
    unittest.main(verbosity=2)
