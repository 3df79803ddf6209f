#!/usr/bin/env python3
"""Checks the Grafana dashboard and the Prometheus rules of examples/:
the dashboard JSON is a well-formed dashboard wired to the provisioned
datasource; promtool checks and unit-tests the rules; and, for real, a
Prometheus scraping a live `iotlbd --demo` every second loads the rules
healthy, fires the alerts the daemon's state calls for, and answers every
panel's query with data; and a Prometheus configured as examples/prometheus-tls.yml
scrapes a daemon over TLS with a client certificate of scope read (--metrics-auth),
and only so. Run by `make test-dashboards` (stdlib unittest;
needs Debian's prometheus and promtool, which `make tools` installs; fails
without them)."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import IOTLBD, ROOT, free_port, stop_process  # noqa: E402
from dashboardfiles import (  # noqa: E402,F401 (Dashboard, Rules: run with these tests)
    Dashboard, DEVICE_FORMS, load_dashboard, MACROS, PORT_DEVICE_FORMS, query_panels, RULES, Rules,
    tool)


class Live(unittest.TestCase):
    """One daemon (demo0 with static mappings; dyn0 with dynamic ones, so misses
    and round trips; stuck0 with a queue waiting on an unanswered miss; fail0
    with an access failure) and one Prometheus scraping it every second."""

    @classmethod
    def setUpClass(cls):
        prometheus = tool("prometheus")
        cls.tmp = tempfile.mkdtemp(prefix="iotlbd-dashboards-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)

        port = free_port()
        cls.url = f"http://127.0.0.1:{port}"
        cls.daemon = subprocess.Popen([IOTLBD, "--listen", f"127.0.0.1:{port}", "--log-level", "error", "--demo"])
        cls.addClassCleanup(cls.stop, cls.daemon)
        cls.wait_for(lambda: cls.call("GET", "/healthz")[0] == 200, 10, "iotlbd did not start")

        mem = {"regions": [{"guest_phys_addr": 0, "memory_size": "0x40000000", "userspace_addr": "0x7f0000000000"}]}
        ring = {"num": 256, "desc_addr": "0x800000", "avail_addr": "0x801000", "used_addr": "0x802000"}
        cls.must("POST", "/v1/devices", {"id": "dyn0"}, 201)
        cls.must("PUT", "/v1/devices/dyn0/workload", {"mapping": "dynamic", "page_size": "4k"})
        cls.must("POST", "/v1/devices", {"id": "stuck0", "translator": "external"}, 201)
        cls.must("PUT", "/v1/devices/stuck0/mem-table", mem)
        v = cls.must("PUT", "/v1/devices/stuck0/vrings/1", ring)
        assert v["state"] == "waiting_iotlb", v
        cls.stuck_since = time.time()
        cls.must("POST", "/v1/devices", {"id": "fail0", "translator": "external"}, 201)
        cls.must("PUT", "/v1/devices/fail0/mem-table", mem)
        cls.must("POST", "/v1/devices/fail0/iotlb/updates",
                 {"iova": "0x800000", "size": "0x3000", "uaddr": "0x7f0000800000", "perm": "ro"})
        assert cls.call("GET", "/v1/devices/nope")[0] == 404  # one error for the HTTP errors panel
        # Two devices wired to each other: their ports' series (no front-end: zeros).
        cls.must("POST", "/v1/devices", {"id": "pa", "port": {"type": "peer", "device": "pb"}}, 201)
        cls.must("POST", "/v1/devices", {"id": "pb", "port": {"type": "peer", "device": "pa"}}, 201)

        cls.prom_port = free_port()
        config = os.path.join(cls.tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    f"rule_files:\n  - {json.dumps(RULES)}\n"
                    "scrape_configs:\n  - job_name: iotlbd\n"
                    f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        cls.prom_log = open(os.path.join(cls.tmp, "prometheus.log"), "w+")
        cls.addClassCleanup(cls.prom_log.close)
        cls.prom = subprocess.Popen([prometheus, f"--config.file={config}",
                                     f"--storage.tsdb.path={os.path.join(cls.tmp, 'data')}",
                                     f"--web.listen-address=127.0.0.1:{cls.prom_port}", "--log.level=warn"],
                                    stdout=cls.prom_log, stderr=subprocess.STDOUT)
        cls.addClassCleanup(cls.stop, cls.prom)
        cls.wait_for(cls.prom_ready, 30, "prometheus did not become ready")

        # The failure happens once Prometheus has seen fail0's counter at 0, so increase() counts it.
        cls.wait_for(lambda: cls.query('iotlbd_iotlb_access_failures_total{device="fail0"}'), 15,
                     "prometheus did not scrape fail0")
        v = cls.must("PUT", "/v1/devices/fail0/vrings/1", ring)
        assert v["state"] == "failed", v
        # Enough samples for rates, and a couple of evaluations of every rule.
        cls.wait_for(lambda: cls.query('count_over_time(up{job="iotlbd"}[1m]) >= 12'), 30,
                     "prometheus gathered too few samples")

    stop = staticmethod(stop_process)

    @classmethod
    def wait_for(cls, predicate, timeout, message):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if predicate():
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)
        log = ""
        if getattr(cls, "prom_log", None) and not cls.prom_log.closed:
            cls.prom_log.seek(0)
            log = cls.prom_log.read()[-3000:]
        raise AssertionError(f"{message} within {timeout} s\n{log}")

    @classmethod
    def call(cls, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(cls.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    @classmethod
    def must(cls, method, path, body=None, status=200):
        got, answer = cls.call(method, path, body)
        assert got == status, f"{method} {path}: {got} {answer}"
        return answer

    @classmethod
    def prom_ready(cls):
        with urllib.request.urlopen(f"http://127.0.0.1:{cls.prom_port}/-/ready", timeout=2) as r:
            return r.status == 200

    @classmethod
    def api(cls, path, **params):
        url = f"http://127.0.0.1:{cls.prom_port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:
            answer = json.load(e)
        assert answer["status"] == "success", f"{url}: {answer}"
        return answer["data"]

    @classmethod
    def query(cls, expr):
        return cls.api("query", query=expr)["result"]

    @staticmethod
    def expand(expr, device):
        for macro, value in MACROS.items():
            expr = expr.replace(macro, value)
        return expr.replace("$device", device)

    @staticmethod
    def finite(series):
        return [s for s in series if math.isfinite(float(s["value"][1]))]

    def panel(self, title):
        return next(p for p in load_dashboard()["panels"] if p["title"] == title)

    def series(self, title, ref="A", device=".*"):
        t = next(t for t in self.panel(title)["targets"] if t["refId"] == ref)
        return self.query(self.expand(t["expr"], device))

    def values(self, title, ref="A", device=".*"):
        """{(device, vq or None): value} of one panel target for every device."""
        return {(s["metric"].get("device"), s["metric"].get("vq")): float(s["value"][1])
                for s in self.series(title, ref, device)}

    def test_every_panel_query_returns_series(self):
        for p, t in query_panels(load_dashboard()):
            # Port panels: the peer devices pa and pb (the demo's loopback port has no series of its own).
            forms = PORT_DEVICE_FORMS if "iotlbd_port_" in t["expr"] else DEVICE_FORMS
            for device in forms:
                expr = self.expand(t["expr"], device)
                with self.subTest(panel=p["title"], ref=t["refId"], device=device):
                    self.assertNotIn("$", expr)
                    result = self.query(expr)
                    self.assertGreaterEqual(len(result), 1, expr)
                    if device == ".*":
                        self.assertTrue(self.finite(result), f"only NaN: {expr}")

    def test_panels_show_the_daemons_state(self):
        hit = self.values("Hit rate per device")
        self.assertGreater(hit[("demo0", None)], 0.9)
        self.assertGreater(hit[("dyn0", None)], 0.5)
        self.assertGreater(self.values("Misses/s per device")[("dyn0", None)], 1)
        p99 = self.values("Miss round trip p50 / p99", "B")[("dyn0", None)]
        self.assertTrue(0 < p99 < 10, p99)
        buckets = {s["metric"]["le"]: float(s["value"][1]) for s in self.series("Miss round trip distribution")}
        self.assertGreater(buckets["+Inf"], 0)
        self.assertEqual(len(buckets), 14)
        self.assertEqual(self.values("Pending misses")[("stuck0", None)], 1)
        states = self.values("Queue states")
        self.assertEqual(states[("demo0", "0")], 1)           # running
        self.assertEqual(states[("stuck0", "1")], 2)          # waiting_iotlb
        self.assertEqual(states[("fail0", "1")], 3)           # failed
        self.assertEqual(states[("stuck0", "0")], 0)          # disabled
        waiting = self.values("Queue waiting for a translation")
        self.assertGreater(waiting[("stuck0", "1")], 5)
        self.assertEqual(waiting[("demo0", "0")], 0)
        self.assertGreaterEqual(self.values("Access failures (last 5 min)")[("fail0", None)], 1)
        self.assertEqual(self.values("Access failures (last 5 min)")[("demo0", None)], 0)
        self.assertGreater(self.values("Frames/s (built-in guest)", "B")[("demo0", None)], 100)
        self.assertEqual(self.values("Verify errors")[("demo0", None)], 0)
        self.assertEqual(set(self.values("Hit rate per device", device="demo0")), {("demo0", None)})
        self.assertEqual(self.values("Daemon up")[(None, None)], 1)
        build = self.series("Build")
        self.assertRegex(build[0]["metric"]["version"], r"^\d+\.\d+")
        self.assertGreater(self.values("Memory")[(None, None)], 1 << 20)

    def rules(self):
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def test_rules_are_loaded_and_healthy(self):
        with open(RULES) as f:
            names = re.findall(r"(?m)^\s*- (?:record|alert): (\S+)$", f.read())
        self.wait_for(lambda: all(r["health"] == "ok" for r in self.rules()), 10, "rules not all healthy")
        rules = self.rules()
        self.assertEqual(sorted(r["name"] for r in rules), sorted(names))
        for r in rules:
            self.assertEqual(r["health"], "ok", r)
            self.assertNotIn("lastError", {k for k, v in r.items() if v})
        self.assertEqual({g["name"] for g in self.api("rules")["groups"]}, {"iotlbd-recording", "iotlbd-alerts"})

    def test_recording_rules_produce_series(self):
        for r in self.rules():
            if r["type"] == "recording":
                with self.subTest(rule=r["name"]):
                    result = self.query(r["name"])
                    self.assertTrue(result, r["name"])
                    self.assertEqual({s["metric"]["job"] for s in result}, {"iotlbd"})
        ratio = self.query('device:iotlbd_iotlb_hit_ratio:rate1m{device="demo0"}')
        self.assertGreater(float(ratio[0]["value"][1]), 0.9)

    def alerts(self, state=None):
        return [a for a in self.api("alerts")["alerts"] if state is None or a["state"] == state]

    def test_alerts_fire_for_real(self):
        # fail0's access failure fires at once; nothing says the daemon is down.
        self.wait_for(lambda: any(a["labels"]["alertname"] == "IotlbdAccessFailures" for a in self.alerts("firing")),
                      10, "IotlbdAccessFailures did not fire")
        failing = {a["labels"]["device"] for a in self.alerts("firing") if a["labels"]["alertname"] == "IotlbdAccessFailures"}
        self.assertEqual(failing, {"fail0"})
        # IotlbdQueueFailed waits a minute; it is pending for fail0's queue 1 only.
        pending = [a["labels"] for a in self.alerts() if a["labels"]["alertname"] == "IotlbdQueueFailed"]
        self.assertEqual([(a["device"], a["vq"]) for a in pending], [("fail0", "1")])
        # stuck0's queue 1 has waited on its unanswered miss: past 30 s the alert fires, for it alone.
        self.wait_for(lambda: any(a["labels"]["alertname"] == "IotlbdQueueStuckWaitingIotlb" for a in self.alerts("firing")),
                      max(5, 40 - (time.time() - self.stuck_since)), "IotlbdQueueStuckWaitingIotlb did not fire")
        self.assertGreater(time.time() - self.stuck_since, 30)
        stuck = [a["labels"] for a in self.alerts() if a["labels"]["alertname"] == "IotlbdQueueStuckWaitingIotlb"]
        self.assertEqual([(a["device"], a["vq"]) for a in stuck], [("stuck0", "1")])
        names = {a["labels"]["alertname"] for a in self.alerts()}
        for quiet in ["IotlbdDown", "IotlbdTargetMissing", "IotlbdVerifyErrors"]:
            self.assertNotIn(quiet, names)
        # dyn0's dynamic mappings really miss thousands of times a second (the built-in
        # vIOMMU answers each on the datapath thread): a storm may be pending for it,
        # for no device with static mappings.
        storming = {a["labels"]["device"] for a in self.alerts() if a["labels"]["alertname"] == "IotlbdMissStorm"}
        self.assertLessEqual(storming, {"dyn0"})


class LiveTLS(unittest.TestCase):
    """examples/prometheus-tls.yml, for real: iotlbd --demo serving TLS with client
    certificates and --metrics-auth; Prometheus scrapes it with a certificate whose
    subject has scope read; a second job with no certificate is refused."""

    @classmethod
    def setUpClass(cls):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from tlspki import PKI
        prometheus = tool("prometheus")
        cls.tmp = tempfile.mkdtemp(prefix="iotlbd-dashboards-tls-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        pki = PKI(os.path.join(cls.tmp, "pki"))
        ca = pki.ca("ca", "dashboards CA")
        server = pki.server("server", ca)
        scraper = pki.client("prometheus", ca, "prometheus")
        scopes = os.path.join(cls.tmp, "client-scopes")
        with open(scopes, "w") as f:
            f.write(f"{PKI.subject(scraper[0])} read prometheus\n")
        port = free_port()
        cls.daemon = subprocess.Popen([IOTLBD, "--listen", f"127.0.0.1:{port}", "--log-level", "error", "--demo",
                                       "--tls-cert", server[0], "--tls-key", server[1], "--tls-client-ca", ca[0],
                                       "--tls-client-scopes", scopes, "--metrics-auth", "--audit-log", "none"])
        cls.addClassCleanup(Live.stop, cls.daemon)
        # The example, pointed at this daemon and these files; plus a job without a certificate.
        with open(os.path.join(ROOT, "examples", "prometheus-tls.yml")) as f:
            text = f.read()
        for old, new in [("/etc/prometheus/iotlbd/ca.pem", ca[0]), ("/etc/prometheus/iotlbd/prometheus.pem", scraper[0]),
                         ("/etc/prometheus/iotlbd/prometheus.key", scraper[1]), ("127.0.0.1:8443", f"127.0.0.1:{port}"),
                         ("prometheus/iotlbd-rules.yml", RULES), ("scrape_interval: 5s", "scrape_interval: 1s")]:
            assert old in text, old
            text = text.replace(old, new)
        text += (f"  - job_name: no-certificate\n    scheme: https\n    tls_config:\n      ca_file: {ca[0]}\n"
                 f"      server_name: localhost\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        cls.config = os.path.join(cls.tmp, "prometheus.yml")
        with open(cls.config, "w") as f:
            f.write(text)
        cls.prom_port = free_port()
        cls.prom_log = open(os.path.join(cls.tmp, "prometheus.log"), "w+")
        cls.addClassCleanup(cls.prom_log.close)
        cls.prom = subprocess.Popen([prometheus, f"--config.file={cls.config}",
                                     f"--storage.tsdb.path={os.path.join(cls.tmp, 'data')}",
                                     f"--web.listen-address=127.0.0.1:{cls.prom_port}", "--log.level=warn"],
                                    stdout=cls.prom_log, stderr=subprocess.STDOUT)
        cls.addClassCleanup(Live.stop, cls.prom)
        Live.prom_port = cls.prom_port
        Live.wait_for(Live.prom_ready, 30, "prometheus did not become ready")
        Live.wait_for(lambda: Live.query('up{job="iotlbd"} == 1') and Live.query('up{job="no-certificate"}'), 30,
                      "prometheus did not scrape iotlbd over TLS")

    def test_config_passes_promtool(self):
        out = subprocess.run([tool("promtool"), "check", "config", self.config], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_scrapes_over_tls_with_scope_read(self):
        self.assertEqual(float(Live.query('up{job="iotlbd"}')[0]["value"][1]), 1)
        Live.wait_for(lambda: Live.query('iotlbd_workload_frames_received_total{job="iotlbd",device="demo0"} > 0'), 15,
                      "no demo0 figures over TLS")
        self.assertGreater(float(Live.query('scrape_samples_scraped{job="iotlbd"}')[0]["value"][1]), 50)
        self.assertEqual(float(Live.query('iotlbd_auth_failures_total{job="iotlbd",reason="unknown_subject"}')[0]["value"][1]), 0)
        # The scraper without a certificate gets nothing; iotlbd counts it.
        self.assertEqual(float(Live.query('up{job="no-certificate"}')[0]["value"][1]), 0)
        Live.wait_for(lambda: Live.query('iotlbd_auth_failures_total{job="iotlbd",reason="no_client_cert"} > 0'), 15,
                      "the refused scrape was not counted")


if __name__ == "__main__":
    unittest.main(verbosity=2)
