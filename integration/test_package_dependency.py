#!/usr/bin/env python3
"""A new user's package depends on this repository by URL and version and
uses the `IOTLB` library: SwiftPM refuses a dependency whose product targets
carry unsafe build flags, so this proves the library can be depended on.

A clone of this checkout gets a version tag (the release a user would pin),
a consumer package in a temporary folder names it as
`.package(url: "file://…", from: VERSION)` with `.product(name: "IOTLB", …)`,
builds, and runs a few IOTLB operations. Run by `make test`."""
import os
import re
import shutil
import subprocess
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def version():
    with open(os.path.join(ROOT, "Sources", "ControlPlane", "BuildInfo.swift")) as f:
        return re.search(r'version = "([0-9.]+)"', f.read()).group(1)


MANIFEST = """// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "consumer",
    dependencies: [.package(url: "file://{clone}", from: "{version}")],
    targets: [
        .executableTarget(name: "consumer", dependencies: [.product(name: "IOTLB", package: "vhost-iotlb")]),
    ]
)
"""

MAIN = """import IOTLB

let tlb = IOTLB(maxEntries: 2)
let range = AddressRange(start: IOVA(0x1000), size: 0x2000)!
tlb.update(IOTLBEntry(range: range, uaddr: UserAddr(0x7f00_0000_0000), perm: .readWrite))
tlb.update(IOTLBEntry(range: AddressRange(start: IOVA(0x10000), size: 0x1000)!, uaddr: UserAddr(0x7f00_0001_0000), perm: .read))
tlb.update(IOTLBEntry(range: AddressRange(start: IOVA(0x20000), size: 0x1000)!, uaddr: UserAddr(0x7f00_0002_0000), perm: .read))
print("entries", tlb.count)
print("evicted-first", tlb.translate(IOVA(0x1800), access: .read) == .miss)
print("denied", tlb.translate(IOVA(0x10010), access: .write) == .denied(perm: .read))
"""


class DependByVersion(unittest.TestCase):
    def test_a_package_depending_on_iotlb_by_version_builds_and_runs(self):
        tmp = tempfile.mkdtemp(prefix="iotlb-consumer-")
        try:
            clone = os.path.join(tmp, "vhost-iotlb")
            subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
            v = version()
            subprocess.run(["git", "-C", clone, "tag", "-f", v], check=True, capture_output=True)
            consumer = os.path.join(tmp, "consumer")
            os.makedirs(os.path.join(consumer, "Sources", "consumer"))
            with open(os.path.join(consumer, "Package.swift"), "w") as f:
                f.write(MANIFEST.format(clone=clone, version=v))
            with open(os.path.join(consumer, "Sources", "consumer", "main.swift"), "w") as f:
                f.write(MAIN)
            build = subprocess.run(["swift", "build"], cwd=consumer, capture_output=True, text=True, timeout=900)
            out = build.stdout + build.stderr
            self.assertEqual(build.returncode, 0, out[-3000:])
            self.assertNotIn("unsafe build flags", out)
            run = subprocess.run([os.path.join(consumer, ".build", "debug", "consumer")], capture_output=True,
                                 text=True, timeout=60)
            self.assertEqual(run.returncode, 0, run.stderr)
            self.assertEqual(run.stdout.split("\n")[:3], ["entries 2", "evicted-first true", "denied true"])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
