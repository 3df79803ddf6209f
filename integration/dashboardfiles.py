"""The dashboard and rules files of examples/ as files (run by
integration/test_dashboards.py, which imports these classes): the dashboard
JSON wired to the provisioned datasource, promtool's checks and unit tests of
the rules; and what the live tests share (where the files are, the tools,
the dashboard's panels)."""
import json
import os
import re
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import ROOT  # noqa: E402


DASHBOARD = os.path.join(ROOT, "examples", "grafana", "iotlbd.json")
PROVISIONING = os.path.join(ROOT, "examples", "grafana", "provisioning")
RULES = os.path.join(ROOT, "examples", "prometheus", "iotlbd-rules.yml")
RULE_TESTS = os.path.join(ROOT, "examples", "prometheus", "iotlbd-rules.test.yml")

# Grafana's interval macros, as a 1 s scrape would make them.
MACROS = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "1m"}
# $device as Grafana writes it into a regex matcher: All, one value, several.
DEVICE_FORMS = [".*", "demo0", "(demo0|dyn0)"]
PORT_DEVICE_FORMS = ("pa", "(pa|pb)", ".*")
DEVICE_MATCHER = 'device=~"$device"'
# Families that carry a device label: every panel selecting them must honour $device.
PER_DEVICE = re.compile(r"\b(iotlbd_(?:iotlb|vq|miss_resolution|workload|vhost_user|port|dirty_log)_[a-z_]+)\b")


def tool(name):
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} not found: run `make tools` (Debian package prometheus)")
    return path


def load_dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def query_panels(dashboard):
    """(panel, target) for every target of every panel that is not a row."""
    for p in dashboard["panels"]:
        if p["type"] != "row":
            for t in p.get("targets", []):
                yield p, t


def provisioned_uid():
    with open(os.path.join(PROVISIONING, "datasources", "iotlbd.yaml")) as f:
        uids = re.findall(r"^\s*uid:\s*['\"]?([\w-]+)", f.read(), re.M)
    assert len(uids) == 1, uids
    return uids[0]


class Dashboard(unittest.TestCase):
    def setUp(self):
        self.d = load_dashboard()
        self.uid = provisioned_uid()

    def test_required_keys(self):
        for key in ["title", "uid", "schemaVersion", "panels", "templating", "time", "annotations"]:
            self.assertIn(key, self.d)
        self.assertGreaterEqual(self.d["schemaVersion"], 36)
        self.assertIsNone(self.d.get("id"), "an importable dashboard has no database id")
        self.assertRegex(self.d["uid"], r"^[A-Za-z0-9_-]{1,40}$")
        self.assertNotIn("__inputs", self.d, "provisioning cannot fill ${DS_…} inputs")
        self.assertNotIn("${DS_", json.dumps(self.d))

    def test_panel_ids_unique_and_laid_out(self):
        ids = [p["id"] for p in self.d["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "duplicate panel ids")
        cells = set()
        for p in self.d["panels"]:
            g = p.get("gridPos")
            self.assertIsNotNone(g, p["title"])
            self.assertTrue(all(isinstance(g.get(k), int) for k in "hwxy"), p["title"])
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    self.assertNotIn((x, y), cells, f"{p['title']} overlaps another panel")
                    cells.add((x, y))
            if p["type"] == "row":
                self.assertFalse(p.get("collapsed"), "a collapsed row hides its panels from this test")
                self.assertNotIn("targets", p)

    def test_every_panel_queries_the_provisioned_datasource(self):
        self.assertEqual(self.uid, "iotlbd-prometheus")
        for p in self.d["panels"]:
            if p["type"] == "row":
                continue
            self.assertEqual(p.get("datasource"), {"type": "prometheus", "uid": self.uid}, p["title"])
            self.assertTrue(p.get("targets"), f"{p['title']} has no targets")
            refs = [t["refId"] for t in p["targets"]]
            self.assertEqual(len(refs), len(set(refs)), p["title"])
            for t in p["targets"]:
                self.assertTrue(t.get("expr", "").strip(), f"{p['title']} {t['refId']} has no expr")
                self.assertEqual(t.get("datasource", p["datasource"]), p["datasource"], p["title"])

    def test_device_variable(self):
        variables = {v["name"]: v for v in self.d["templating"]["list"]}
        self.assertIn("device", variables)
        v = variables["device"]
        self.assertEqual(v["type"], "query")
        self.assertEqual(v["datasource"]["uid"], self.uid)
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        self.assertEqual(query, "label_values(iotlbd_iotlb_entries, device)")
        self.assertTrue(v["multi"])
        self.assertTrue(v["includeAll"])
        self.assertEqual(v.get("allValue"), ".*")

    def test_device_is_used_only_in_regex_label_matchers(self):
        used = 0
        for p, t in query_panels(self.d):
            expr = t["expr"]
            used += expr.count(DEVICE_MATCHER)
            rest = expr.replace(DEVICE_MATCHER, "")
            self.assertNotIn("$device", rest, f"{p['title']}: $device outside {DEVICE_MATCHER}")
            self.assertNotIn("${device", rest, p["title"])
            # Every selector of a per-device family filters by the variable.
            for m in PER_DEVICE.finditer(expr):
                selector = expr[m.end():]
                self.assertTrue(selector.startswith("{") and DEVICE_MATCHER in selector[:selector.index("}")],
                                f"{p['title']}: {m.group(1)} is not filtered by $device")
        self.assertGreater(used, 20)

    def test_every_required_view_has_a_panel(self):
        exprs = "\n".join(t["expr"] for _, t in query_panels(self.d))
        for needle in ["iotlbd_iotlb_hits_total", "iotlbd_vq_hits_total", "iotlbd_iotlb_misses_total",
                       "histogram_quantile(0.5,", "histogram_quantile(0.99,", "iotlbd_iotlb_pending_misses",
                       "iotlbd_vq_state", "iotlbd_vq_waiting_seconds", "iotlbd_iotlb_evictions_total",
                       "iotlbd_iotlb_access_failures_total", "iotlbd_workload_frames_received_total",
                       "iotlbd_vq_bytes_total", "process_cpu_seconds_total", "process_resident_memory_bytes",
                       "process_open_fds", "iotlbd_http_requests_total", "iotlbd_http_long_polls_waiting",
                       "iotlbd_build_info", "iotlbd_port_frames_total", "iotlbd_port_bytes_total",
                       "iotlbd_port_drops_total", "iotlbd_port_tx_back_pressure_total",
                       "iotlbd_dirty_log_pages_total", "iotlbd_dirty_log_enabled", "iotlbd_dirty_log_faults_total"]:
            self.assertIn(needle, exprs)
        self.assertIn("heatmap", [p["type"] for p in self.d["panels"]])

    def test_provisioning_points_at_a_file_provider(self):
        with open(os.path.join(PROVISIONING, "dashboards", "iotlbd.yaml")) as f:
            text = f.read()
        self.assertRegex(text, r"(?m)^apiVersion: 1$")
        self.assertRegex(text, r"(?m)^\s+type: file$")
        self.assertRegex(text, r"(?m)^\s+path: /\S+$")


class Rules(unittest.TestCase):
    def test_promtool_check_rules(self):
        out = subprocess.run([tool("promtool"), "check", "rules", RULES], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_promtool_unit_tests_pass(self):
        out = subprocess.run([tool("promtool"), "test", "rules", RULE_TESTS], capture_output=True, text=True,
                             cwd=os.path.dirname(RULE_TESTS))
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_every_alert_has_a_unit_test(self):
        with open(RULES) as f:
            alerts = set(re.findall(r"(?m)^\s*- alert: (\w+)$", f.read()))
        with open(RULE_TESTS) as f:
            tested = set(re.findall(r"(?m)^\s*alertname: (\w+)$", f.read()))
        self.assertGreaterEqual(len(alerts), 5)
        self.assertEqual(alerts - tested, set())

    def test_prometheus_config_loads_the_rules(self):
        config = os.path.join(ROOT, "examples", "prometheus.yml")
        out = subprocess.run([tool("promtool"), "check", "config", config], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("SUCCESS: 1 rule files found", out.stdout)
