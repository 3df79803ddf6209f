#!/usr/bin/env python3
"""Restarts, state and client mode, with the real binary (issue 14):

- --state-dir: configure, kill -9, start again: GET /v1/config and the devices
  (memory tables, vrings, vhost-user sockets) are as they were; the IOTLB is not.
- A damaged or foreign state file stops the start-up (exit status not 0) with
  a message naming the file and the field, and the file is left as it is.
- --config FILE loads a GET /v1/config document (round trip).
- Socket paths outside --vhost-user-dir are 400 invalid_field vhost_user.socket.
- --listen unix:PATH (mode 0660) next to --also-listen HOST:PORT: curl
  --unix-socket and examples/orchestrator.py --url unix:PATH.

Run by `make test-restarts` (stdlib unittest)."""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import IOTLBD, ROOT, Daemon, free_port  # noqa: E402


def curl_unix(path, method, url_path, body=None):
    cmd = ["curl", "-s", "--unix-socket", path, "-X", method, "-w", "\n%{http_code}", "http://localhost" + url_path]
    if body is not None:
        cmd += ["-d", json.dumps(body)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), (json.loads(text) if text else None)


class Restarts(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="iotlbd-restarts-")
        self.vu = os.path.join(self.tmp, "vu")
        self.state = os.path.join(self.tmp, "state")
        os.mkdir(self.vu)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def daemon(self, *extra, port=None):
        return Daemon("--vhost-user-dir", self.vu, *extra, port=port)

    def configure(self, d):
        def ok(status, method, path, body=None):
            got, answer = d.call(method, path, body)
            self.assertEqual(got, status, f"{method} {path}: {answer}")
            return answer
        ok(201, "POST", "/v1/devices", {"id": "h", "queues": 4, "translator": "external", "iotlb_max_entries": 64})
        ok(200, "PUT", "/v1/devices/h/mem-table", {"regions": [
            {"guest_phys_addr": 0, "memory_size": "0x40000000", "userspace_addr": "0x7f0000000000"}]})
        ok(200, "PUT", "/v1/devices/h/vrings/1",
           {"num": 256, "desc_addr": "0x800000", "avail_addr": "0x801000", "used_addr": "0x802000"})
        ok(200, "PUT", "/v1/devices/h/vrings/3",
           {"num": 64, "desc_addr": "0x900000", "avail_addr": "0x901000", "used_addr": "0x902000", "event_idx": True,
            "enabled": False})
        ok(200, "POST", "/v1/devices/h/iotlb/updates",
           {"iova": "0x800000", "size": "0x3000", "uaddr": "0x7f0000800000", "perm": "rw"})
        ok(201, "POST", "/v1/devices", {"id": "vs", "iotlb": False, "vhost_user": {"socket": "vs.sock"}})
        ok(201, "POST", "/v1/devices", {"id": "vc", "vhost_user": {"socket": "vc.sock", "mode": "client"}})
        ok(201, "POST", "/v1/devices", {"id": "tmp"})
        ok(204, "DELETE", "/v1/devices/tmp")

    def observed(self, d):
        config = d.call("GET", "/v1/config")[1]
        h = d.call("GET", "/v1/devices/h")[1]
        rings = [{k: v[k] for k in ("num", "desc_addr", "avail_addr", "used_addr", "enabled", "event_idx")}
                 for v in h["vrings"]]
        return config, h["mem_table"], rings, [dev["id"] for dev in d.call("GET", "/v1/devices")[1]["devices"]]

    def test_kill_9_and_restart_keeps_the_configuration(self):
        port = free_port()
        d = self.daemon("--state-dir", self.state, port=port)
        try:
            self.configure(d)
            before = self.observed(d)
            with open(os.path.join(self.state, "config.json")) as f:
                self.assertEqual(json.load(f), before[0], "the state file is the configuration, written before the answer")
        finally:
            d.proc.kill()  # kill -9: no clean-up at all
            d.proc.wait()
        self.assertEqual(sorted(os.listdir(self.state)), ["config.json"])
        d = self.daemon("--state-dir", self.state, port=port)
        try:
            after = self.observed(d)
            self.assertEqual(after, before)
            self.assertEqual(before[3], ["h", "vs", "vc"])
            self.assertEqual(before[0]["devices"][1]["vhost_user"],
                             {"socket": os.path.join(self.vu, "vs.sock"), "mode": "server"})
            # Soft state: the IOTLB starts empty; the ring's miss is announced again.
            self.assertEqual(d.call("GET", "/v1/devices/h/iotlb/entries")[1], {"entries": []})
            self.assertEqual(d.call("GET", "/v1/devices/h/vrings/1")[1]["state"], "waiting_iotlb")
            # The stale socket of the killed daemon was replaced by a live one.
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(os.path.join(self.vu, "vs.sock"))
            deadline = time.time() + 5
            while d.call("GET", "/v1/devices/vc")[1]["vhost_user"]["reconnect_attempts"] == 0:
                self.assertLess(time.time(), deadline, "the client device does not try to connect")
                time.sleep(0.05)
        finally:
            d.stop()
        self.assertFalse(os.path.exists(os.path.join(self.vu, "vs.sock")), "SIGTERM removes server sockets")
        with open(os.path.join(self.state, "config.json")) as f:
            self.assertEqual(json.load(f), before[0], "stopping the daemon does not change the configuration")

    def start_refused(self, *args):
        out = subprocess.run([IOTLBD, "--listen", f"127.0.0.1:{free_port()}", "--vhost-user-dir", self.vu, *args],
                             capture_output=True, text=True, timeout=30)
        self.assertNotEqual(out.returncode, 0, out.stderr)
        return out.stderr

    def test_damaged_or_foreign_state_file_is_refused_and_left_alone(self):
        os.mkdir(self.state)
        path = os.path.join(self.state, "config.json")
        cases = [
            ('{"format":"iotlbd-config","version":1,"devices":[{"id":"a","queues":0}]}', "devices[0].queues"),
            ('{"format":"iotlbd-config","version":1,"devices":[{"id":"a","vhost_user":{"socket":"/etc/x.sock"}}]}',
             "devices[0].vhost_user.socket"),
            ('{"format":"iotlbd-config","version":1,"devices":[{"id":"a","vrings":[{"index":0,"num":3,'
             '"desc_addr":0,"avail_addr":0,"used_addr":0}]}]}', "devices[0].vrings[0].num"),
            ('{"format":"something-else","version":1,"devices":[]}', "field format"),
            ('{"format":"iotlbd-config","version":1,"devices":[{"id":"a"', "line 1"),
            ('\x00\x01garbage', "not JSON"),
        ]
        for text, field in cases:
            with self.subTest(field=field):
                with open(path, "w") as f:
                    f.write(text)
                os.utime(path, (1_000_000_000, 1_000_000_000))
                err = self.start_refused("--state-dir", self.state)
                self.assertIn(path, err)
                self.assertIn(field, err)
                with open(path) as f:
                    self.assertEqual(f.read(), text)
                self.assertEqual(os.stat(path).st_mtime, 1_000_000_000, "not rewritten")
                self.assertEqual(os.listdir(self.state), ["config.json"])
                self.assertEqual(os.listdir(self.vu), [], "nothing of the refused configuration stays")

    def test_port_taken_at_start_leaves_no_sockets(self):
        d = self.daemon("--state-dir", self.state)
        try:
            self.assertEqual(d.call("POST", "/v1/devices", {"id": "vs", "vhost_user": {"socket": "vs.sock"}})[0], 201)
        finally:
            d.stop()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            out = subprocess.run([IOTLBD, "--listen", f"127.0.0.1:{taken.getsockname()[1]}", "--vhost-user-dir", self.vu,
                                  "--state-dir", self.state], capture_output=True, text=True, timeout=30)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("cannot listen", out.stderr)
        self.assertEqual(os.listdir(self.vu), [], "the restored device's socket went with the failed start")

    def test_config_file_round_trip(self):
        d = self.daemon()
        try:
            self.configure(d)
            exported = d.call("GET", "/v1/config")[1]
        finally:
            d.stop()
        path = os.path.join(self.tmp, "exported.json")
        with open(path, "w") as f:
            json.dump(exported, f)
        d = self.daemon("--config", path)
        try:
            self.assertEqual(d.call("GET", "/v1/config")[1], exported)
        finally:
            d.stop()
        err = self.start_refused("--config", os.path.join(self.tmp, "missing.json"))
        self.assertIn("missing.json", err)

    def test_socket_paths_outside_the_directory_are_400(self):
        d = self.daemon()
        try:
            for bad in ["../x.sock", "/tmp/x.sock", os.path.join(self.vu, "..", "x.sock")]:
                status, body = d.call("POST", "/v1/devices", {"vhost_user": {"socket": bad}})
                self.assertEqual(status, 400, body)
                self.assertEqual(body["error"]["code"], "invalid_field")
                self.assertEqual(body["error"]["field"], "vhost_user.socket")
            self.assertEqual(d.call("GET", "/v1/devices")[1], {"devices": []})
            status, body = d.call("POST", "/v1/devices", {"id": "ok", "vhost_user": {"socket": "ok.sock"}})
            self.assertEqual(status, 201, body)
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.vu, "ok.sock")).st_mode), 0o600)
        finally:
            d.stop()
        self.assertEqual(os.listdir(self.vu), [])

    def test_unix_socket_api_with_curl_and_the_orchestrator(self):
        api = os.path.join(self.tmp, "api.sock")
        port = free_port()
        proc = subprocess.Popen([IOTLBD, "--listen", f"unix:{api}", "--also-listen", f"127.0.0.1:{port}",
                                 "--vhost-user-dir", self.vu, "--log-level", "warning"])
        orch = None
        try:
            deadline = time.time() + 10
            while curl_unix(api, "GET", "/healthz")[0] != 200:
                self.assertLess(time.time(), deadline, "iotlbd did not listen on its Unix socket")
                time.sleep(0.05)
            self.assertEqual(stat.S_IMODE(os.stat(api).st_mode), 0o660)
            self.assertEqual(curl_unix(api, "GET", "/healthz"), (200, {"status": "ok"}))
            status, dev = curl_unix(api, "POST", "/v1/devices", {"id": "u1", "translator": "external"})
            self.assertEqual(status, 201, dev)
            # The same API on TCP, beside it.
            tcp = Daemon.__new__(Daemon)
            tcp.url = f"http://127.0.0.1:{port}"
            self.assertEqual(tcp.call("GET", "/v1/devices/u1")[0], 200)
            orch = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "orchestrator.py"),
                                     "--url", f"unix:{api}", "--device", "u1", "--poll-ms", "200",
                                     "--log-level", "WARNING"])
            status, w = curl_unix(api, "PUT", "/v1/devices/u1/workload",
                                  {"packet_size": 64, "page_size": "4k", "mapping": "dynamic", "packets": 1500,
                                   "ring_size": 32})
            self.assertEqual(status, 200, w)
            deadline = time.time() + 60
            while w["state"] != "done":
                self.assertLess(time.time(), deadline, w)
                time.sleep(0.05)
                w = curl_unix(api, "GET", "/v1/devices/u1/workload")[1]
            self.assertEqual((w["received"], w["verify_errors"], w["translator_answers"]), (1500, 0, 0),
                             "every miss answered by the orchestrator over the Unix socket")
            orch.send_signal(signal.SIGTERM)
            self.assertEqual(orch.wait(timeout=5), 0)
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=10), 0)
            self.assertFalse(os.path.exists(api), "the API socket goes with the daemon")
        finally:
            for p in (orch, proc):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    unittest.main(verbosity=2)
