#!/usr/bin/env python3
"""Runs the README's "Remote orchestrators" section, as written.

  python3 integration/readme_remote.py IOTLBD README.md

The section's ```sh and ```console remote blocks run in order in one bash
session (set -e), in a scratch directory, with the daemon binary first on
PATH and examples/ reachable as written; port 8443 becomes a free one. After
each ```sh block the test waits for the daemon's port. Each `$ ` line of a
```console remote block is a command; the lines after it are its expected
output (compared as JSON when both parse, else as text). Background jobs the
guide starts (the daemon, the orchestrator) end with the session. Fails,
never skips."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import ROOT, free_port, wait_listening  # noqa: E402

SECTION = "## Remote orchestrators"


def section(readme):
    text = open(readme).read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end >= 0 else len(text)]


def steps(text):
    """[("sh", script) | ("console", command, expected)] in order."""
    out = []
    for m in re.finditer(r"```(sh|console remote)\n(.*?)```", text, re.S):
        if m.group(1) == "sh":
            out.append(("sh", m.group(2)))
            continue
        cmd, expected = None, []
        for line in m.group(2).splitlines():
            if line.startswith("$ "):
                if cmd is not None:
                    out.append(("console", cmd, "\n".join(expected)))
                cmd, expected = line[2:], []
            elif cmd is not None:
                expected.append(line)
        if cmd is not None:
            out.append(("console", cmd, "\n".join(expected)))
    return out


def same(expected, got):
    try:
        return json.loads(expected) == json.loads(got)
    except ValueError:
        return expected.strip() == got.strip()


class Session:
    """One bash reading commands from a pipe; each command's output ends at a marker line."""

    def __init__(self, cwd, env):
        self.err = open(os.path.join(cwd, "session.err"), "w+")
        self.bash = subprocess.Popen(["bash"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     cwd=cwd, env=env, text=True, start_new_session=True)
        self.n = 0
        self.run("set -e")

    def run(self, script, timeout=120):
        """(exit status, stdout) of `script`; a failing command ends the session (set -e)."""
        self.n += 1
        marker = f"__readme_remote_{self.n}__"
        self.bash.stdin.write(f"{{\n{script}\n}}\necho {marker} $?\n")
        self.bash.stdin.flush()
        lines = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.bash.stdout.readline()
            if not line:
                self.err.seek(0)
                raise AssertionError(f"the session ended during:\n{script}\nstderr:\n{self.err.read()[-3000:]}")
            if line.startswith(marker):
                return int(line.split()[1]), "".join(lines)
            lines.append(line)
        raise AssertionError(f"timed out: {script}")

    def close(self):
        try:
            os.killpg(self.bash.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.bash.wait(timeout=10)
        self.err.close()


def main():
    binary, readme = os.path.abspath(sys.argv[1]), sys.argv[2]
    port = free_port()
    work = tempfile.mkdtemp(prefix="iotlbd-readme-remote-")
    os.symlink(os.path.join(ROOT, "examples"), os.path.join(work, "examples"))
    env = dict(os.environ, PATH=os.path.dirname(binary) + os.pathsep + os.environ["PATH"])
    session = Session(work, env)
    ran = failed = 0
    try:
        todo = steps(section(readme))
        if not any(s[0] == "console" for s in todo):
            print("no console remote blocks in the section")
            return 1
        for step in todo:
            if step[0] == "sh":
                status, _ = session.run(step[1].replace("8443", str(port)))
                if status != 0:
                    print(f"FAILED ({status}): {step[1]}")
                    return 1
                try:
                    wait_listening(port)
                except RuntimeError:
                    print("the daemon did not listen")
                    return 1
                continue
            _, cmd, expected = step
            status, got = session.run(cmd.replace("8443", str(port)), timeout=120)
            ran += 1
            if status != 0 or not same(expected, got):
                failed += 1
                print(f"MISMATCH: {cmd}\n  expected: {expected}\n  got ({status}): {got.strip()}")
        print(f"readme remote orchestrators: {ran - failed} passed, {failed} failed")
        return 1 if failed else 0
    finally:
        session.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
