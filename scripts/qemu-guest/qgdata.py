#!/usr/bin/env python3
"""The guest's TCP test stream, byte for byte (scripts/qemu-guest/init, qg_mode=net).

A stream of MB mebibytes is MB blocks of exactly 1 MiB; block i is the
16-byte line "QGBLK%010d\\n" % i followed by DATA, the first 1 MiB - 16 bytes
of SHA-256 in counter mode (sha256(b"qg-data-%d" % n) for n = 0, 1, ...).
DATA is built here once and packed into the initramfs as /qg-data
(build.sh); the guest sends `printf 'QGBLK%010d\\n' $i; cat /qg-data` per
block, so every block differs (a lost, repeated or swapped block changes the
sha256) and the host can compute what the guest must have sent without it.

    qgdata.py --block FILE      write DATA to FILE (build.sh)
    qgdata.py --sha256 MB       print the stream's sha256
    qgdata.py --stream MB       write the stream to stdout
"""
import argparse
import hashlib
import sys

BLOCK = 1 << 20
HEADER = 16
DATA_LEN = BLOCK - HEADER
_data = None


def data():
    """DATA: 1 MiB - 16 bytes of SHA-256 counter-mode output (deterministic)."""
    global _data
    if _data is None:
        out = bytearray()
        n = 0
        while len(out) < DATA_LEN:
            out += hashlib.sha256(b"qg-data-%d" % n).digest()
            n += 1
        _data = bytes(out[:DATA_LEN])
    return _data


def header(i):
    h = b"QGBLK%010d\n" % i
    assert len(h) == HEADER
    return h


def blocks(mb):
    """The stream of `mb` MiB, one 1 MiB block at a time."""
    d = data()
    for i in range(mb):
        yield header(i) + d


def stream_sha256(mb):
    h = hashlib.sha256()
    for b in blocks(mb):
        h.update(b)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--block", metavar="FILE")
    g.add_argument("--sha256", metavar="MB", type=int)
    g.add_argument("--stream", metavar="MB", type=int)
    a = ap.parse_args()
    if a.block:
        with open(a.block, "wb") as f:
            f.write(data())
    elif a.sha256 is not None:
        print(stream_sha256(a.sha256))
    else:
        for b in blocks(a.stream):
            sys.stdout.buffer.write(b)


if __name__ == "__main__":
    main()
