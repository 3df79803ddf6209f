"""A tcpdump capture inside a test's network namespace (netns.Netns.capture):
the frames an interface saw, read back from the pcap file with their
original lengths and IPv4 sources."""
import re
import signal
import socket
import struct
import subprocess
import time

from iotlbtest import stop_process


def read_pcap(path):
    """[(original length, captured bytes)] of a pcap file (tcpdump -w)."""
    out = []
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return out
        magic = struct.unpack("<I", head[:4])[0]
        end = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        while True:
            h = f.read(16)
            if len(h) < 16:
                return out
            _, _, incl, orig = struct.unpack(end + "IIII", h)
            out.append((orig, f.read(incl)))


def ipv4_src(frame):
    """The IPv4 source address of an Ethernet frame (None when not IPv4)."""
    if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
        return socket.inet_ntoa(frame[26:30])
    return None


class Capture:
    """tcpdump on an interface of the namespace, into a pcap file; `lengths` and
    `frames` once stopped (the context manager stops it)."""

    def __init__(self, ns, ifname, path, snaplen=128, direction=None, bpf=None):
        self.ns, self.path = ns, path
        argv = ["tcpdump", "-i", ifname, "-n", "-s", str(snaplen), "-U", "-w", path, "-Z", "root", "--immediate-mode"]
        if direction:
            argv += ["-Q", direction]  # in: frames the interface received (for a TAP: what its fd wrote)
        if bpf:
            argv += bpf.split()
        self.err_path = path + ".stderr"
        self.err = open(self.err_path, "w")
        self.proc = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=self.err)
        deadline = time.time() + 10
        while "listening on" not in self.stderr():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"tcpdump did not start: {self.stderr()}")
            time.sleep(0.05)
        self.lengths = None

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def lengths_from(self, src):
        """Original lengths of the IPv4 frames from address `src`."""
        return [orig for orig, data in self.frames if ipv4_src(data) == src]

    def stop(self):
        if self.lengths is not None:
            return self.lengths
        stop_process(self.proc, signal.SIGINT)
        self.err.close()
        self.frames = read_pcap(self.path)
        self.lengths = [orig for orig, _ in self.frames]
        m = re.search(r"(\d+) packets? dropped by kernel", self.stderr())
        self.kernel_drops = int(m.group(1)) if m else None
        return self.lengths

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
