#!/usr/bin/env python3
"""Runs the README's "Connect a VM to a network" guide, as written.

  python3 integration/readme_network.py IOTLBD README.md

Every ```sh block of that section runs, in order, in one bash session (set -e)
inside a network namespace of this test's own (integration/netns.py: no route out)
and a private mount namespace whose /run/iotlbd is a fresh tmpfs, with the
daemon started there as the guide says (`iotlbd --listen 127.0.0.1:8080`, as
root, sockets in /run/iotlbd). A ```text block after a ```sh block is that
block's expected output, compared line by line. The QEMU guest comes from
scripts/qemu-guest/build.sh (the Makefile builds it first). Root only; fails,
never skips, when something cannot run.
"""
import os
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netns import Netns  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Connect a VM to a network"


def guide(readme):
    """[(commands, expected output or None)] of the section's sh blocks."""
    text = open(readme).read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else len(text)]
    steps = []
    for m in re.finditer(r"```(sh|text)\n(.*?)```", section, re.S):
        kind, body = m.group(1), m.group(2)
        if kind == "sh":
            steps.append([body, None])
        elif steps and steps[-1][1] is None:
            steps[-1][1] = body.strip()
        else:
            raise SystemExit("a text block without the sh block it answers")
    return steps


def main():
    binary, readme = os.path.abspath(sys.argv[1]), sys.argv[2]
    steps = guide(readme)
    if not steps:
        print("no sh blocks in the section")
        return 1
    if os.geteuid() != 0:
        print("the guide runs as root (network and mount namespaces, TAPs)")
        return 1
    with Netns("guide") as ns:
        ns.check_isolated()
        out = [os.path.join(ns.tmp, f"step{i}.out") for i in range(len(steps))]
        log = os.path.join(ns.tmp, "iotlbd.log")
        lines = ["set -e", "mount -t tmpfs tmpfs /run/iotlbd 2>/dev/null || { mkdir -p /run/iotlbd; mount -t tmpfs tmpfs /run/iotlbd; }",
                 # Started from a subshell, so that the guide's own `wait` does not wait for it.
                 f"( {shlex.quote(binary)} --listen 127.0.0.1:8080 --log-level warning > {shlex.quote(log)} 2>&1 & echo $! > {shlex.quote(log)}.pid )",
                 f"trap 'kill $(cat {shlex.quote(log)}.pid) 2>/dev/null' EXIT",
                 "for i in $(seq 100); do curl -sf localhost:8080/healthz >/dev/null && break; sleep 0.1; done"]
        for i, (body, _) in enumerate(steps):
            lines.append(f"echo '>>> step {i}' >&2")
            lines.append("{\n" + body + "\n} > " + shlex.quote(out[i]))
        script = os.path.join(ns.tmp, "guide.sh")
        with open(script, "w") as f:
            f.write("\n".join(lines) + "\n")
        t0 = time.time()
        run = subprocess.run(ns.argv(["unshare", "-m", "--propagation", "private", "bash", script]), cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
        ran = failed = 0
        for i, (body, expected) in enumerate(steps):
            if not os.path.exists(out[i]):
                break
            ran += 1
            with open(out[i]) as f:
                got = f.read().strip()
            if expected is not None and got != expected:
                failed += 1
                print(f"MISMATCH in step {i}:\n{body}\n  expected:\n{expected}\n  got:\n{got}")
        if run.returncode != 0:
            with open(log) as f:
                daemon = f.read()[-2000:]
            print(f"the guide stopped (exit {run.returncode}) at step {ran - 1}:\n{run.stderr[-3000:]}\niotlbd:\n{daemon}")
            for name in ("vm1", "vm2", "vm3"):
                path = f"/tmp/{name}.log"
                if os.path.exists(path) and os.path.getmtime(path) >= t0:
                    with open(path, errors="replace") as f:
                        print(f"--- {path} (tail)\n{f.read()[-1500:]}")
            failed += 1
        print(f"readme network guide: {ran - failed} passed, {failed} failed ({len(steps)} steps, {time.time() - t0:.0f} s)")
        return 1 if failed or ran < len(steps) else 0


if __name__ == "__main__":
    sys.exit(main())
