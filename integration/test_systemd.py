#!/usr/bin/env python3
"""`make install` and the systemd unit it installs: the files, their modes and
the ExecStart fitted to PREFIX; `systemd-analyze verify` (clean) and
`systemd-analyze security --offline=yes` (exposure 2.5 or better) on the
installed unit; the installed binary's --help; and the installed binary
started with the unit's ExecStart arguments under the unit's seccomp sandbox
(SystemCallFilter, MemoryDenyWriteExecute, RestrictAddressFamilies,
LockPersonality, NoNewPrivileges, UMask, an unprivileged user), answering
/healthz, running a built-in guest and serving a vhost-user socket. The TLS
drop-in (examples/systemd/iotlbd-tls.conf: certificate, key, client CA,
scopes and tokens by LoadCredential=) keeps the exposure at 2.5 or better,
verifies clean, and its ExecStart serves TLS with client certificates under
the same sandbox, reading the credentials as the unprivileged user.

Needs systemd-analyze (Debian's systemd; `make test-systemd` installs it) and
fails without it. Does not need a running systemd. Run by `make test`
(stdlib unittest; `make install` builds the release binary first)."""
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import ROOT, free_port, wait_listening  # noqa: E402
from systemdrig import (  # noqa: E402
    InstalledUnit, MAX_EXPOSURE, PREFIX, Sandbox, TLS_DROPIN, UNIT_SOURCE, make, read_unit,
    systemd_analyze)


class Installed(InstalledUnit, unittest.TestCase):

    # --- make install / uninstall --------------------------------------------------------------

    def test_install_puts_binary_and_unit_with_modes_and_execstart(self):
        self.assertEqual(sorted(os.path.relpath(os.path.join(d, f), self.dest)
                                for d, _, files in os.walk(self.dest) for f in files),
                         ["usr/local/bin/iotlbd", "usr/local/lib/systemd/system/iotlbd.service"])
        b, u = os.stat(self.binary), os.stat(self.unit)
        self.assertTrue(stat.S_ISREG(b.st_mode))
        self.assertEqual(stat.S_IMODE(b.st_mode), 0o755)
        self.assertEqual(stat.S_IMODE(u.st_mode), 0o644)
        with open(self.binary, "rb") as f:
            self.assertEqual(f.read(4), b"\x7fELF")
        self.assertEqual(self.exec_start(), "/usr/local/bin/iotlbd --listen 127.0.0.1:8080 $IOTLBD_OPTS")
        with open(self.unit) as f:
            installed = f.read()
        self.assertNotIn("@BINDIR@", installed)
        with open(UNIT_SOURCE) as f:
            self.assertEqual(installed, f.read().replace("@BINDIR@", "/usr/local/bin"))

    def test_unit_declares_the_sandbox(self):
        unit = read_unit(self.unit)
        service = dict(unit["Service"])  # last value wins, as in systemd (for these one-value settings)
        expected = {
            "Type": "simple", "EnvironmentFile": "-/etc/default/iotlbd", "Restart": "on-failure",
            "DynamicUser": "yes", "RuntimeDirectory": "iotlbd", "StateDirectory": "iotlbd", "UMask": "0077",
            "CapabilityBoundingSet": "CAP_IPC_LOCK", "AmbientCapabilities": "CAP_IPC_LOCK",
            "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
            "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
            "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes",
            "ProtectHostname": "yes", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
            "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
            "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        }
        for key, value in expected.items():
            self.assertEqual(service.get(key), value, key)
        filters = [v for k, v in unit["Service"] if k == "SystemCallFilter"]
        self.assertEqual(filters[0], "@system-service")
        self.assertEqual(dict(unit["Install"]).get("WantedBy"), "multi-user.target")

    def test_install_is_idempotent_uninstall_removes_and_prefix_usr(self):
        dest = os.path.join(self.tmp, "usr-root")
        make("install", f"DESTDIR={dest}", "PREFIX=/usr")
        make("install", f"DESTDIR={dest}", "PREFIX=/usr")
        unit = os.path.join(dest, "usr/lib/systemd/system/iotlbd.service")
        binary = os.path.join(dest, "usr/bin/iotlbd")
        self.assertTrue(os.access(binary, os.X_OK))
        exec_start = [v for k, v in read_unit(unit)["Service"] if k == "ExecStart"]
        self.assertEqual(exec_start, ["/usr/bin/iotlbd --listen 127.0.0.1:8080 $IOTLBD_OPTS"])
        make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr")
        self.assertFalse(os.path.exists(unit))
        self.assertFalse(os.path.exists(binary))
        make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr")  # nothing left to remove: still fine

    # --- systemd-analyze ------------------------------------------------------------------------

    def verify_root(self, name):
        """A root holding what was installed plus the host's system units (verify follows the
        unit's dependencies, sysinit.target and the rest, under --root)."""
        root = os.path.join(self.tmp, name)
        shutil.copytree(self.dest, root, symlinks=True)
        shutil.copytree("/lib/systemd/system", os.path.join(root, "lib", "systemd", "system"), symlinks=True)
        return root

    def test_systemd_analyze_verify_is_clean(self):
        root = self.verify_root("verify-root")
        out = systemd_analyze("verify", f"--root={root}", "iotlbd.service", cwd=self.tmp)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        about_unit = [line for line in (out.stdout + out.stderr).splitlines() if "iotlbd" in line]
        self.assertEqual(about_unit, [])
        # ExecStart is resolved inside the root: without the installed binary, verify fails.
        os.unlink(os.path.join(root, PREFIX.lstrip("/"), "bin", "iotlbd"))
        out = systemd_analyze("verify", f"--root={root}", "iotlbd.service", cwd=self.tmp)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("/usr/local/bin/iotlbd is not executable", out.stdout + out.stderr)

    def test_systemd_analyze_security_exposure(self):
        out = systemd_analyze("security", "--offline=yes", self.unit, cwd=self.tmp)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        m = re.search(r"Overall exposure level for iotlbd\.service: (\d+\.\d+) (\w+)", out.stdout)
        self.assertIsNotNone(m, out.stdout + out.stderr)
        exposure = float(m.group(1))
        print(f"\nsystemd-analyze security: exposure {exposure} {m.group(2)}", flush=True)
        self.assertLessEqual(exposure, MAX_EXPOSURE, out.stdout)
        self.assertEqual(m.group(2), "OK")
        # systemd's own gate agrees (--threshold is in tenths).
        out = systemd_analyze("security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", self.unit,
                              cwd=self.tmp)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_tap_dropin_keeps_the_exposure(self):
        """The unit with examples/systemd/iotlbd-tap.conf merged (a drop-in's
        settings come after the unit's): still 2.5 or better."""
        merged = os.path.join(self.tmp, "iotlbd-tap", "iotlbd.service")
        os.makedirs(os.path.dirname(merged), exist_ok=True)
        with open(self.unit) as f, open(os.path.join(ROOT, "examples", "systemd", "iotlbd-tap.conf")) as d:
            dropin = d.read()
            text = f.read() + "\n" + dropin
        self.assertIn("DeviceAllow=/dev/net/tun rw", dropin)
        self.assertNotIn("CAP_NET_ADMIN", "".join(l for l in dropin.splitlines() if not l.startswith("#")))
        with open(merged, "w") as f:
            f.write(text)
        out = systemd_analyze("security", "--offline=yes", merged, cwd=self.tmp)
        m = re.search(r"Overall exposure level for iotlbd\.service: (\d+\.\d+) (\w+)", out.stdout)
        self.assertIsNotNone(m, out.stdout + out.stderr)
        print(f"\nsystemd-analyze security with the TAP drop-in: exposure {m.group(1)} {m.group(2)}", flush=True)
        self.assertLessEqual(float(m.group(1)), MAX_EXPOSURE, out.stdout)

    # --- the installed binary -------------------------------------------------------------------

    def test_installed_binary_help(self):
        out = subprocess.run([self.binary, "--help"], capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("--listen", out.stdout)

    def test_sandbox_model_refuses_what_the_unit_forbids(self):
        # The control for the next test: the same filters stop a process that tries what the unit
        # forbids, so the daemon passing under them means something.
        sandbox = Sandbox(read_unit(self.unit)["Service"])
        probe = (
            "import errno, mmap, os, socket\n"
            "def refused(f, code):\n"
            "    try:\n"
            "        f()\n"
            "    except OSError as e:\n"
            "        return e.errno == code\n"
            "    return False\n"
            "print(refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC),"
            " errno.EPERM),\n"
            "      refused(lambda: os.sched_setaffinity(0, {0}), errno.EPERM),\n"
            "      refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW), errno.EAFNOSUPPORT),\n"
            "      refused(lambda: os.setgroups([]), errno.EPERM),\n"
            "      socket.socket(socket.AF_INET6).close() is None)\n")
        out = subprocess.run([sys.executable, "-c", probe], preexec_fn=sandbox.apply, capture_output=True,
                             text=True, timeout=30)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.split(), ["True"] * 5)

    def test_starts_with_unit_arguments_under_its_sandbox(self):
        service = read_unit(self.unit)["Service"]
        sandbox = Sandbox(service)
        self.assertIn("mmap", sandbox.allowed)
        self.assertNotIn("setuid", sandbox.allowed)  # ~@privileged took it out
        self.assertNotIn("sched_setaffinity", sandbox.allowed)  # ~@resources too
        port = free_port()
        runtime = os.path.join(self.tmp, "run-iotlbd")  # stands for RuntimeDirectory=, /run/iotlbd
        state = os.path.join(self.tmp, "state-iotlbd")  # stands for StateDirectory= and WorkingDirectory=
        # What /etc/default/iotlbd would hold; systemd splits an unbraced $IOTLBD_OPTS on whitespace,
        # and the later --listen wins over the unit's default.
        opts = f"--listen 127.0.0.1:{port} --log-level warning"
        argv = []
        for word in shlex.split(self.exec_start()):
            argv.extend(opts.split() if word == "$IOTLBD_OPTS" else [word])
        self.assertEqual(argv[:3], ["/usr/local/bin/iotlbd", "--listen", "127.0.0.1:8080"])
        argv[0] = self.binary
        user = {}
        if os.geteuid() == 0:  # an unprivileged user, no supplementary groups, as DynamicUser= gives
            user = {"user": 65534, "group": 65534, "extra_groups": []}
        for d in (runtime, state):
            os.mkdir(d, 0o750)
            if user:
                os.chown(d, 65534, 65534)
        umask = int(dict(service)["UMask"], 8)
        log_path = os.path.join(self.tmp, "iotlbd.log")
        log = open(log_path, "w")
        # systemd tells the service its RuntimeDirectory= in $RUNTIME_DIRECTORY: iotlbd's
        # default vhost-user directory (socket paths must lie in it).
        env = dict(os.environ, RUNTIME_DIRECTORY=runtime)
        proc = subprocess.Popen(argv, cwd=state, umask=umask, preexec_fn=sandbox.apply, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, env=env, **user)

        def log_text():
            with open(log_path) as f:
                return f.read()

        url = f"http://127.0.0.1:{port}"

        def call(method, path, body=None):
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(url + path, data=data, method=method)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    raw = r.read()
                    return r.status, (json.loads(raw) if r.headers.get_content_type() == "application/json" else raw)
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        try:
            try:
                wait_listening(port, proc, 10, log_text)
            except RuntimeError as e:
                self.fail(str(e))
            self.assertEqual(call("GET", "/healthz"), (200, {"status": "ok"}))
            # The built-in guest: guest memory, rings, datapath and guest threads, IOTLB misses.
            self.assertEqual(call("POST", "/v1/devices", {"id": "g0"})[0], 201)
            status, body = call("PUT", "/v1/devices/g0/workload",
                                {"packet_size": 64, "page_size": "4k", "mapping": "dynamic", "packets": 2000,
                                 "ring_size": 32})
            self.assertEqual(status, 200, body)
            deadline = time.time() + 60
            while True:
                status, w = call("GET", "/v1/devices/g0/workload")
                if w.get("state") == "done":
                    break
                self.assertLess(time.time(), deadline, w)
                time.sleep(0.05)
            self.assertEqual((w["received"], w["verify_errors"]), (2000, 0))
            # A vhost-user socket in the runtime directory, made under the unit's umask.
            sock = os.path.join(runtime, "vu0.sock")
            status, body = call("POST", "/v1/devices", {"id": "vu0", "vhost_user": {"socket": sock}})
            self.assertEqual(status, 201, body)
            st = os.stat(sock)
            self.assertTrue(stat.S_ISSOCK(st.st_mode))
            self.assertEqual(stat.S_IMODE(st.st_mode) & 0o077, 0)
            if user:
                self.assertEqual(st.st_uid, 65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            self.assertEqual(call("GET", "/metrics")[0], 200)
            # Stopping is SIGTERM (systemctl stop): exit 0, socket removed.
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=10), 0, log_text())
            self.assertFalse(os.path.exists(sock))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


class TLSDropIn(InstalledUnit, unittest.TestCase):
    """The unit with examples/systemd/iotlbd-tls.conf, as systemd merges a drop-in."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with open(TLS_DROPIN) as f:
            cls.dropin = f.read().replace("@BINDIR@", "/usr/local/bin")
        # A drop-in's lines come after the unit's, in the same sections ("ExecStart=" resets).
        cls.merged = os.path.join(cls.tmp, "merged", "iotlbd.service")
        os.makedirs(os.path.dirname(cls.merged))
        with open(cls.unit) as f, open(cls.merged, "w") as out:
            out.write(f.read() + "\n" + cls.dropin)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_security_exposure_stays_with_the_credentials(self):
        service = read_unit(self.merged)["Service"]
        creds = [v for k, v in service if k == "LoadCredential"]
        self.assertEqual([c.split(":")[0] for c in creds],
                         ["server.pem", "server.key", "client-ca.pem", "client-scopes", "tokens"])
        out = systemd_analyze("security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", self.merged,
                              cwd=self.tmp)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        m = re.search(r"Overall exposure level for iotlbd\.service: (\d+\.\d+) (\w+)", out.stdout)
        print(f"\nsystemd-analyze security with the TLS drop-in: exposure {m.group(1)} {m.group(2)}", flush=True)
        self.assertLessEqual(float(m.group(1)), MAX_EXPOSURE)

    def test_verify_is_clean_with_the_dropin(self):
        root = os.path.join(self.tmp, "verify-tls")
        shutil.copytree(self.dest, root, symlinks=True)
        shutil.copytree("/lib/systemd/system", os.path.join(root, "lib", "systemd", "system"), symlinks=True)
        d = os.path.join(root, "etc", "systemd", "system", "iotlbd.service.d")
        os.makedirs(d)
        # ExecReload= runs /bin/kill, which verify resolves inside the root too.
        os.makedirs(os.path.join(root, "bin"), exist_ok=True)
        shutil.copy("/bin/kill", os.path.join(root, "bin", "kill"))
        with open(os.path.join(d, "tls.conf"), "w") as f:
            f.write(self.dropin)
        out = systemd_analyze("verify", f"--root={root}", "iotlbd.service", cwd=self.tmp)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertEqual([line for line in (out.stdout + out.stderr).splitlines() if "iotlbd" in line], [])

    def test_serves_tls_from_its_credentials_under_the_sandbox(self):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from tlspki import PKI
        service = read_unit(self.merged)["Service"]
        sandbox = Sandbox(service)
        pki = PKI(os.path.join(self.tmp, "pki"))
        ca = pki.ca("ca", "test CA")
        server = pki.server("server", ca)
        client = pki.client("orch1", ca, "orch1")
        # What systemd makes of LoadCredential=: a directory of copies the service's user alone reads.
        creds = os.path.join(self.tmp, "credentials")
        os.mkdir(creds, 0o500)
        sources = {"server.pem": server[0], "server.key": server[1], "client-ca.pem": ca[0]}
        for name, src in sources.items():
            shutil.copy(src, os.path.join(creds, name))
        with open(os.path.join(creds, "client-scopes"), "w") as f:
            f.write(f"{PKI.subject(client[0])} translate orch1\n")
        with open(os.path.join(creds, "tokens"), "w") as f:
            f.write("r3ad-0nly-t0ken read dashboard\n")
        user = {}
        for name in os.listdir(creds):
            os.chmod(os.path.join(creds, name), 0o400)
            if os.geteuid() == 0:
                os.chown(os.path.join(creds, name), 65534, 65534)
        if os.geteuid() == 0:
            os.chown(creds, 65534, 65534)
            user = {"user": 65534, "group": 65534, "extra_groups": []}
        port = free_port()
        exec_start = [v for k, v in service if k == "ExecStart"][-1]
        argv = []
        for word in shlex.split(exec_start.replace("%d", creds)):
            argv.extend(f"--listen 127.0.0.1:{port} --log-level warning".split() if word == "$IOTLBD_OPTS" else [word])
        argv[0] = self.binary
        runtime = os.path.join(self.tmp, "run-tls")
        os.mkdir(runtime, 0o755)
        log_path = os.path.join(self.tmp, "iotlbd-tls.log")
        log = open(log_path, "w")
        proc = subprocess.Popen(argv, cwd=runtime, umask=0o077, preexec_fn=sandbox.apply, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, env=dict(os.environ, RUNTIME_DIRECTORY=runtime), **user)

        def curl(*args):
            out = subprocess.run(["curl", "-s", "-m", "10", "--cacert", ca[0], *args], capture_output=True, text=True,
                                 timeout=30)
            return json.loads(out.stdout) if out.stdout else out.returncode

        try:
            try:
                wait_listening(port, proc, 10, lambda: open(log_path).read())
            except RuntimeError as e:
                self.fail(str(e))
            url = f"https://127.0.0.1:{port}"
            self.assertEqual(curl(url + "/healthz"), {"status": "ok"})
            self.assertEqual(curl("--cert", client[0], "--key", client[1], url + "/v1/devices"), {"devices": []})
            self.assertEqual(curl(url + "/v1/devices")["error"]["code"], "unauthorized")
            refused = curl("--cert", client[0], "--key", client[1], "-X", "DELETE", url + "/v1/devices/x")
            self.assertIn("needs scope admin", refused["error"]["message"])
            proc.send_signal(signal.SIGTERM)
            with open(log_path) as f:
                self.assertEqual(proc.wait(timeout=10), 0, f.read())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


if __name__ == "__main__":
    unittest.main()
