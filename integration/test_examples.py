#!/usr/bin/env python3
"""Runs every example against a live iotlbd, and checks the operator surface:
promtool on /metrics and on examples/prometheus.yml, the OpenAPI document,
SIGTERM. Run by `make test` (stdlib unittest; needs promtool and
openapi-spec-validator, which the Makefile installs)."""
import os
import signal
import subprocess
import shutil
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import IOTLBD, ROOT, Daemon, free_port  # noqa: E402,F401


class Examples(unittest.TestCase):
    def test_walkthrough_script(self):
        d = Daemon()
        try:
            out = subprocess.run([os.path.join(ROOT, "examples", "walkthrough.sh"), d.url], capture_output=True,
                                 text=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr + out.stdout)
            self.assertIn('"state":"waiting_iotlb"', out.stdout)
            self.assertIn('"resolved_misses":1', out.stdout)
            self.assertIn('"state":"running"', out.stdout)
            self.assertTrue(out.stdout.strip().endswith("204"))
        finally:
            d.stop()

    def run_workload(self, d, device, packets=3000):
        self.assertEqual(d.call("POST", "/v1/devices", {"id": device, "translator": "external"})[0], 201)
        status, _ = d.call("PUT", f"/v1/devices/{device}/workload",
                           {"packet_size": 64, "page_size": "4k", "mapping": "dynamic", "packets": packets, "ring_size": 32})
        self.assertEqual(status, 200)
        w = d.wait_done(device)
        self.assertEqual(w["received"], packets)
        self.assertEqual(w["verify_errors"], 0)
        self.assertEqual(w["translator_answers"], 0)  # all answers came from the orchestrator

    def test_orchestrator_answers_and_stops_on_sigterm(self):
        d = Daemon()
        orch = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "orchestrator.py"), "--url", d.url,
                                 "--device", "o1", "--poll-ms", "200", "--log-level", "WARNING"])
        try:
            self.run_workload(d, "o1")
            t0 = time.time()
            orch.send_signal(signal.SIGTERM)
            self.assertEqual(orch.wait(timeout=5), 0)
            self.assertLess(time.time() - t0, 2.0)
        finally:
            if orch.poll() is None:
                orch.kill()
            d.stop()

    def test_orchestrator_survives_daemon_restart(self):
        port = free_port()
        orch = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "orchestrator.py"), "--url",
                                 f"http://127.0.0.1:{port}", "--device", "o2", "--poll-ms", "200", "--log-level", "WARNING"])
        try:
            time.sleep(0.3)  # it starts before the daemon: retries
            d = Daemon(port=port)
            self.run_workload(d, "o2", packets=1500)
            d.stop()
            d = Daemon(port=port)
            self.run_workload(d, "o2", packets=1500)
            d.stop()
            orch.send_signal(signal.SIGTERM)
            self.assertEqual(orch.wait(timeout=5), 0)
        finally:
            if orch.poll() is None:
                orch.kill()

    def test_metrics_pass_promtool(self):
        d = Daemon("--demo")
        try:
            time.sleep(0.5)
            status, text = d.call("GET", "/metrics")
            self.assertEqual(status, 200)
            text = text.decode()
            for family in ["iotlbd_iotlb_hits_total", "iotlbd_iotlb_misses_total", "iotlbd_miss_resolution_seconds_bucket",
                           "iotlbd_vq_hits_total", "iotlbd_workload_frames_received_total", "iotlbd_http_requests_total"]:
                self.assertIn(family, text)
            self.assertIn('device="demo0"', text)
            check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        finally:
            d.stop()

    def test_prometheus_config_is_valid(self):
        check = subprocess.run(["promtool", "check", "config", os.path.join(ROOT, "examples", "prometheus.yml")],
                               capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

    def test_openapi_document_validates(self):
        import yaml
        from openapi_spec_validator import validate
        with open(os.path.join(ROOT, "api", "openapi.yaml")) as f:
            validate(yaml.safe_load(f))

    def test_token_file_guards_v1(self):
        tok = os.path.join(ROOT, ".build", "test-token")
        with open(tok, "w") as f:
            f.write("  t0ken-with-newline\n")
        d = Daemon("--token-file", tok)
        try:
            self.assertEqual(d.call("GET", "/v1/devices")[0], 401)
            self.assertEqual(d.call("GET", "/healthz")[0], 200)
            self.assertEqual(d.call("GET", "/metrics")[0], 200)
            req = urllib.request.Request(d.url + "/v1/devices", headers={"Authorization": "Bearer t0ken-with-newline"})
            with urllib.request.urlopen(req, timeout=10) as r:
                self.assertEqual(r.status, 200)
        finally:
            d.stop()

    def test_schemathesis_finds_no_server_errors_and_answers_conform(self):
        """Schema-driven fuzzing of every operation but the long-poll (its waits outlast
        the fuzzer's request time-out; Tests/ControlPlaneTests cover it): no 5xx, status
        codes, content types, bodies and headers as documented, invalid input refused,
        auth enforced. Bounded and seeded."""
        tok = os.path.join(ROOT, ".build", "fuzz-token")
        with open(tok, "w") as f:
            f.write("fuzz\n")
        # Fuzzed vhost-user socket paths are relative, or absolute: the former land
        # in the vhost-user directory (a scratch one), the latter are refused unless
        # inside it; nothing lands in the daemon's working directory, and every socket
        # the daemon made goes when it stops.
        scratch = tempfile.mkdtemp(prefix="iotlbd-fuzz-")
        cwd = tempfile.mkdtemp(prefix="iotlbd-fuzz-cwd-")
        # schemathesis keeps a cache in its working directory: not in the checkout.
        st_cwd = tempfile.mkdtemp(prefix="iotlbd-st-")
        # schemathesis sends wrong and missing tokens on purpose (auth checks): a failure
        # budget that never runs out keeps its valid requests from a 429; no audit lines.
        d = Daemon("--demo", "--token-file", tok, "--vhost-user-dir", scratch, "--auth-failure-limit", "1000000/1",
                   "--audit-log", "none", cwd=cwd)
        try:
            run = subprocess.run(
                ["st", "run", os.path.join(ROOT, "api", "openapi.yaml"), "--url", d.url, "-H", "Authorization: Bearer fuzz",
                 "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "25",
                 "--phases", "examples,coverage,fuzzing", "--exclude-operation-id", "pollMisses", "--seed", "1",
                 "--no-color"], capture_output=True, text=True, timeout=600, cwd=st_cwd)
            tail = run.stdout[-3000:]
            self.assertEqual(run.returncode, 0, tail)
            self.assertIn("passed", tail)
            self.assertEqual(d.call("GET", "/healthz")[0], 200)  # still up
        finally:
            d.stop()
            self.assertEqual(os.listdir(scratch), [], "sockets left after the daemon stopped")
            self.assertEqual(os.listdir(cwd), [], "nothing made in the working directory")
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(cwd, ignore_errors=True)
            shutil.rmtree(st_cwd, ignore_errors=True)

    def test_sigterm_releases_long_polls_and_exits_zero(self):
        d = Daemon("--demo")
        self.assertEqual(d.call("POST", "/v1/devices", {"id": "lp", "translator": "external"})[0], 201)
        result = {}

        def poll():
            result["status"] = d.call("GET", "/v1/devices/lp/iotlb/misses?timeout_ms=30000")[0]

        import threading
        t = threading.Thread(target=poll)
        t.start()
        time.sleep(0.3)
        t0 = time.time()
        d.proc.send_signal(signal.SIGTERM)
        self.assertEqual(d.proc.wait(timeout=5), 0)
        self.assertLess(time.time() - t0, 2.0)
        t.join(timeout=5)
        self.assertIn(result.get("status"), (404, 503))


class Load(unittest.TestCase):
    """wrk against the stats and update routes while the demo's traffic runs."""

    def wrk(self, url, script=None, seconds=3, connections=50):
        cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
        if script:
            cmd += ["-s", script]
        out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 30)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("Non-2xx", out.stdout, out.stdout)
        self.assertNotIn("Socket errors", out.stdout, out.stdout)
        rps = float(out.stdout.split("Requests/sec:")[1].split()[0])
        print(f"\n  wrk {url.split('/v1/')[-1]}: {rps:.0f} req/s", file=sys.stderr)
        return rps

    def test_stats_and_updates_under_traffic(self):
        d = Daemon("--demo")
        try:
            self.assertEqual(d.call("POST", "/v1/devices", {"id": "w"})[0], 201)
            self.assertEqual(d.call("PUT", "/v1/devices/w/mem-table", {"regions": [
                {"guest_phys_addr": 0, "memory_size": "0x40000000", "userspace_addr": "0x7f0000000000"}]})[0], 200)
            script = os.path.join(ROOT, ".build", "wrk-update.lua")
            with open(script, "w") as f:
                f.write('wrk.method = "POST"\n'
                        'wrk.headers["Content-Type"] = "application/json"\n'
                        'local n = 0\n'
                        'request = function()\n'
                        '  n = n + 1\n'
                        '  local body = string.format(\'{"iova":%d,"size":4096,"uaddr":"0x7f0000000000","perm":"rw"}\', (n % 4096) * 4096)\n'
                        '  return wrk.format(nil, "/v1/devices/w/iotlb/updates", nil, body)\n'
                        'end\n')
            before = d.call("GET", "/v1/devices/demo0/workload")[1]["received"]
            self.assertGreater(self.wrk(d.url + "/v1/devices/demo0/iotlb/stats"), 500)
            self.assertGreater(self.wrk(d.url + "/v1/devices/w/iotlb/updates", script), 500)
            w = d.call("GET", "/v1/devices/demo0/workload")[1]
            self.assertGreater(w["received"], before)
            self.assertEqual(w["verify_errors"], 0)
            self.assertEqual(d.call("GET", "/v1/devices/w/iotlb/stats")[1]["entries"], 2048)
        finally:
            d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
