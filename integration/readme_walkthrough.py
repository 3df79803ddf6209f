#!/usr/bin/env python3
"""Runs the README's curl walk-through, as written, against a live daemon.

Every ```console block whose commands start with `$ ` is run in order with
bash; the lines after a command, up to the next command, are its expected
output. JSON answers are compared as JSON, anything else as text. The daemon
listens on a free port, substituted for localhost:8080 in the commands.
"""
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import free_port, wait_listening  # noqa: E402


def blocks(readme):
    text = open(readme).read()
    for m in re.finditer(r"```console\n(.*?)```", text, re.S):
        yield m.group(1).splitlines()


def steps(lines):
    cmd, out = None, []
    for line in lines:
        if line.startswith("$ "):
            if cmd is not None:
                yield cmd, out
            cmd, out = line[2:], []
        elif cmd is not None:
            out.append(line)
    if cmd is not None:
        yield cmd, out


def same(expected, got):
    try:
        return json.loads(expected) == json.loads(got)
    except ValueError:
        return expected.strip() == got.strip()


def main():
    binary, readme = sys.argv[1], sys.argv[2]
    port = free_port()
    daemon = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--log-level", "warning"])
    try:
        wait_listening(port, timeout=15)
        ran = failed = 0
        for block in blocks(readme):
            for cmd, out in steps(block):
                real = cmd.replace("localhost:8080", f"127.0.0.1:{port}")
                res = subprocess.run(["bash", "-c", real], capture_output=True, text=True, timeout=30)
                expected = "\n".join(out).strip()
                got = res.stdout.strip()
                ran += 1
                if not same(expected, got):
                    failed += 1
                    print(f"MISMATCH: {cmd}\n  expected: {expected}\n  got:      {got}\n  stderr: {res.stderr.strip()}")
        print(f"readme walkthrough: {ran - failed} passed, {failed} failed")
        if ran == 0:
            print("no commands found in the README")
            return 1
        return 1 if failed else 0
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
