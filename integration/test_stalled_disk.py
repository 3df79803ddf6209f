#!/usr/bin/env python3
"""A stalled state directory costs only the changes that wait for it (issue 23, point 2).

--state-dir lies on a loop-mounted ext4 that the test freezes with `fsfreeze -f`:
every write and fsync there blocks until `fsfreeze -u`. While it is frozen:

- changes that the state file records (device creates, more of them than the
  daemon has HTTP threads; a memory table; a vring) do not answer: they wait
  for the disk, without holding a server thread or the completion thread;
- everything else keeps going: another device's built-in guest keeps moving
  frames, GETs answer (device list, a device, its memory table through its
  worker, /metrics), an IOTLB update (not recorded) and a long-poll answer;
- once thawed, every waiting change answers, and the state file holds them all.

Needs root (loop devices, mount, fsfreeze): it fails, not skips, without.
Run by `make test-stalled-disk` (part of `make test`)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import Daemon  # noqa: E402

FAST = 1.0  # seconds: what an answer that does not wait for the disk takes at most, on a loaded 2-core machine


def run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


class FrozenDisk:
    """An ext4 image mounted on `mnt`, frozen and thawed on demand."""

    def __init__(self, tmp):
        self.image = os.path.join(tmp, "disk.img")
        self.mnt = os.path.join(tmp, "mnt")
        self.frozen = False
        os.mkdir(self.mnt)
        with open(self.image, "wb") as f:
            f.truncate(32 << 20)
        run("mkfs.ext4", "-q", "-F", self.image)
        run("mount", "-o", "loop", self.image, self.mnt)

    def freeze(self):
        run("fsfreeze", "-f", self.mnt)
        self.frozen = True

    def thaw(self):
        if self.frozen:
            run("fsfreeze", "-u", self.mnt)
            self.frozen = False

    def close(self):
        self.thaw()  # first: a process blocked on a frozen disk cannot even be killed
        subprocess.run(["umount", self.mnt], capture_output=True, timeout=60)


class StalledDisk(unittest.TestCase):
    def setUp(self):
        self.assertEqual(os.geteuid(), 0, "this test needs root (loop device, mount, fsfreeze); it does not skip")
        for tool in ("mkfs.ext4", "fsfreeze", "mount", "umount"):
            self.assertIsNotNone(shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"),
                                 f"{tool} is missing")
        self.tmp = tempfile.mkdtemp(prefix="iotlbd-stalled-")
        self.disk = FrozenDisk(self.tmp)
        self.vu = os.path.join(self.tmp, "vu")
        os.mkdir(self.vu)
        self.state = os.path.join(self.disk.mnt, "state")
        self.daemon = Daemon("--state-dir", self.state, "--vhost-user-dir", self.vu, "--http-threads", "2")

    def tearDown(self):
        self.disk.thaw()
        self.daemon.stop()
        self.disk.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def ok(self, status, method, path, body=None, timeout=30):
        got, answer = self.daemon.call(method, path, body, timeout=timeout)
        self.assertEqual(got, status, f"{method} {path}: {answer}")
        return answer

    def quick(self, status, method, path, body=None):
        """The call answers `status` within FAST seconds although the disk is frozen."""
        began = time.monotonic()
        try:
            answer = self.ok(status, method, path, body, timeout=10)
        except TimeoutError:
            self.fail(f"{method} {path} did not answer in 10 s with the state disk frozen")
        took = time.monotonic() - began
        self.assertLess(took, FAST, f"{method} {path} took {took:.2f} s with the state disk frozen")
        return answer

    def received(self, device):
        return self.quick(200, "GET", f"/v1/devices/{device}/workload")["received"]

    def saved(self):
        with open(os.path.join(self.state, "config.json")) as f:
            return json.load(f)

    def test_changes_wait_for_the_disk_and_nothing_else_does(self):
        region = {"guest_phys_addr": 0, "memory_size": "0x200000", "userspace_addr": "0x7f0000000000"}
        self.ok(201, "POST", "/v1/devices", {"id": "busy"})
        self.ok(200, "PUT", "/v1/devices/busy/workload", {"mapping": "dynamic", "page_size": "4k"})
        self.ok(201, "POST", "/v1/devices", {"id": "other", "translator": "external"})
        self.ok(200, "PUT", "/v1/devices/other/mem-table", {"regions": [region]})
        self.ok(201, "POST", "/v1/devices", {"id": "slow"})
        self.assertEqual([d["id"] for d in self.saved()["devices"]], ["busy", "other", "slow"])

        self.disk.freeze()
        # Changes the state file records, from threads of our own: they must wait.
        changes = [("POST", "/v1/devices", {"id": f"late{i}"}, 201) for i in range(3)]
        changes += [("PUT", "/v1/devices/slow/mem-table", {"regions": [region]}, 200),
                    ("PUT", "/v1/devices/slow/vrings/1",
                     {"num": 64, "desc_addr": "0x1000", "avail_addr": "0x2000", "used_addr": "0x3000"}, 200)]
        answers = [None] * len(changes)

        def change(i, method, path, body):
            answers[i] = (self.daemon.call(method, path, body, timeout=120), time.monotonic())

        waiting = [threading.Thread(target=change, args=(i, m, p, b), daemon=True) for i, (m, p, b, _) in enumerate(changes)]
        for t in waiting:
            t.start()
        time.sleep(0.5)  # every change reached the daemon and waits for the disk

        # Everything else goes on: traffic, reads, worker commands, long-polls, metrics.
        first = self.received("busy")
        time.sleep(0.5)
        self.assertGreater(self.received("busy"), first, "the built-in guest's traffic stopped with the disk")
        ids = [d["id"] for d in self.quick(200, "GET", "/v1/devices")["devices"]]
        self.assertTrue({"busy", "other", "slow"} <= set(ids), ids)
        self.quick(200, "GET", "/v1/devices/other")
        self.quick(200, "GET", "/v1/devices/other/mem-table")
        self.quick(200, "POST", "/v1/devices/other/iotlb/updates",
                   {"iova": "0x10000", "size": 4096, "uaddr": "0x7f0000001000", "perm": "rw"})
        self.quick(200, "GET", "/v1/devices/other/iotlb/misses?after=0&timeout_ms=100")
        self.quick(200, "GET", "/v1/devices/busy/iotlb/stats")
        status, text = self.daemon.call("GET", "/metrics", timeout=10)
        self.assertEqual(status, 200)
        self.assertIn(b"iotlbd_", text)
        self.quick(200, "GET", "/v1/config")
        for t in waiting:
            self.assertTrue(t.is_alive(), "a change answered before the state file could hold it")
        self.assertEqual([d["id"] for d in self.saved()["devices"]], ["busy", "other", "slow"])

        thawed = time.monotonic()
        self.disk.thaw()
        for t in waiting:
            t.join(timeout=60)
            self.assertFalse(t.is_alive(), "a change did not answer once the disk was back")
        for (method, path, _, status), ((got, body), at) in zip(changes, answers):
            self.assertEqual(got, status, f"{method} {path}: {body}")
            self.assertGreaterEqual(at, thawed)
        saved = self.saved()
        ids = [d["id"] for d in saved["devices"]]
        self.assertEqual(ids[:3], ["busy", "other", "slow"])
        self.assertEqual(sorted(ids[3:]), ["late0", "late1", "late2"])  # sent at once: in any order
        slow = saved["devices"][2]
        self.assertEqual(slow["mem_table"]["regions"][0]["memory_size"], "0x200000")
        self.assertEqual([v["index"] for v in slow["vrings"]], [1])
        self.assertEqual(saved, self.ok(200, "GET", "/v1/config"), "the state file is the configuration")


if __name__ == "__main__":
    unittest.main()
