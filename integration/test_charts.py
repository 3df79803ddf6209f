#!/usr/bin/env python3
"""The charts of BENCHMARKS.md can be remade: scripts/plot_benchmarks.py turns
the committed reports (bench/results/*.json) into non-trivial PNGs, says which
file is missing when one is, and `iotlb-bench … --json FILE` writes a report
with the keys the plotting script reads. Cheap (seconds); needs matplotlib
(`make charts-deps`) and a built iotlb-bench (`make build`; IOTLB_BENCH=path
picks another). Fails, never skips, when it cannot run. Run by `make test-charts`."""
import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(ROOT, "scripts", "plot_benchmarks.py")
RESULTS = os.path.join(ROOT, "bench", "results")
CHARTS = ["iotlb-on-off.png", "dynamic-mappings.png", "dpdk-vhost-user.png"]
INPUTS = ["datapath.json", "datapath-eager.json", "vhost-user-side-by-side.json"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_binary():
    explicit = os.environ.get("IOTLB_BENCH")
    if explicit:
        return explicit
    for config in ("debug", "release"):
        path = os.path.join(ROOT, ".build", config, "iotlb-bench")
        if os.access(path, os.X_OK):
            return path
    return None


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def plot(*args):
    return subprocess.run([sys.executable, PLOT, *args], capture_output=True, text=True, timeout=300)


class Charts(unittest.TestCase):
    def test_committed_reports_make_every_chart(self):
        for name in INPUTS:
            self.assertTrue(os.path.exists(os.path.join(RESULTS, name)), f"bench/results/{name} is not committed")
        with tempfile.TemporaryDirectory() as out:
            p = plot("--results", RESULTS, "--out", out)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            for name in CHARTS:
                path = os.path.join(out, name)
                self.assertTrue(os.path.exists(path), f"{name} not written: {p.stderr}")
                width, height = png_size(path)
                self.assertGreaterEqual(width, 600, name)
                self.assertGreaterEqual(height, 400, name)
                # A chart with axes, dots and text compresses to tens of kB; a blank one to a few.
                self.assertGreater(os.path.getsize(path), 20_000, f"{name} looks empty")

    def test_footnote_names_the_ring(self):
        """A side-by-side report says its ring in meta (the scripts read RING from
        the environment, so argv lacks it): the footnote's command starts with
        it, so the command shown reproduces the data."""
        sys.path.insert(0, os.path.dirname(PLOT))
        try:
            import plot_benchmarks
        finally:
            sys.path.pop(0)
        doc = {"meta": {"command": "scripts/vhost-user-side-by-side.sh 8 5 '64 1518'", "ring": "packed",
                        "date": "2026-12-05T14:52:27Z", "host": {"cores": 2, "cpu": "x"}}, "_path": "r.json"}
        fig = plot_benchmarks.plt.figure()
        plot_benchmarks.footnote(fig, [doc, {"meta": {"command": "iotlb-bench lookup"}, "_path": "l.json"}])
        text = fig.texts[-1].get_text()
        plot_benchmarks.plt.close(fig)
        self.assertIn("$ RING=packed scripts/vhost-user-side-by-side.sh 8 5 '64 1518'", text)
        self.assertIn("$ iotlb-bench lookup", text)

    def test_missing_report_is_named(self):
        with tempfile.TemporaryDirectory() as results, tempfile.TemporaryDirectory() as out:
            for name in ("datapath.json", "datapath-eager.json"):
                with open(os.path.join(RESULTS, name)) as src, open(os.path.join(results, name), "w") as dst:
                    dst.write(src.read())
            p = plot("--results", results, "--out", out)
            self.assertIn("vhost-user-side-by-side.json is missing", p.stderr)
            self.assertIn("scripts/vhost-user-side-by-side.sh --json", p.stderr, "says how to make it")
            self.assertTrue(os.path.exists(os.path.join(out, "iotlb-on-off.png")), "the other charts are still made")
            self.assertFalse(os.path.exists(os.path.join(out, "dpdk-vhost-user.png")))

    def test_not_a_report_fails_plainly(self):
        with tempfile.TemporaryDirectory() as results, tempfile.TemporaryDirectory() as out:
            with open(os.path.join(results, "datapath.json"), "w") as f:
                f.write('[{"packet_size": 64}]')
            p = plot("--results", results, "--out", out)
            self.assertEqual(p.returncode, 1)
            self.assertIn("not an iotlb-bench/1 report", p.stderr)

    def test_bench_json_report(self):
        binary = bench_binary()
        self.assertIsNotNone(binary, "no iotlb-bench binary: run `make build` (or set IOTLB_BENCH)")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sub", "lookup.json")
            p = subprocess.run([binary, "lookup", "--entries", "64,256", "--lookups", "2000", "--json", path],
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("| entries |", p.stdout, "the Markdown table is still printed")
            with open(path) as f:
                doc = json.load(f)
        self.assertEqual(doc["schema"], "iotlb-bench/1")
        self.assertEqual(doc["benchmark"], "lookup")
        meta = doc["meta"]
        for key in ("date", "duration_s", "command", "argv", "build", "host", "parameters"):
            self.assertIn(key, meta)
        self.assertIn("--json", meta["argv"])
        self.assertGreaterEqual(meta["host"]["cores"], 1)
        self.assertEqual(meta["parameters"], {"entries": [64, 256], "lookups": 2000})
        self.assertEqual([r["entries"] for r in doc["rows"]], [64, 256])
        for r in doc["rows"]:
            self.assertEqual(r["benchmark"], "lookup")
            for key in ("random_hit_ns", "sequential_hit_ns", "miss_ns", "update_invalidate_pair_ns"):
                self.assertGreater(r[key], 0, key)
        # '-' puts the JSON on stdout instead of the table.
        p = subprocess.run([binary, "lookup", "--entries", "64", "--lookups", "1000", "--json", "-"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout)["rows"][0]["entries"], 64)

    def test_phase_medians_per_phase_and_all(self):
        """scripts/phase_medians.py (the side-by-side scripts' summary): a phase's
        row takes only the runs that saw it; "all" takes every run with a
        figure, mixed ones too; a run with no figure ("-") counts nowhere."""
        rows = ["frame_size\tround\tdpdk_mpps\tiotlbd_off_mpps\tiotlbd_on_mpps\tdpdk_phase\toff_phase\ton_phase",
                "64\t1\t8.00\t12.00\t11.00\tfast\tmixed\tfast",
                "64\t2\t4.00\t6.00\t7.00\tslow\tslow\tslow",
                "64\t3\t-\t10.00\t9.00\tmixed\tfast\tmixed"]
        with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as f:
            f.write("\n".join(rows) + "\n")
        try:
            p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "phase_medians.py"), f.name,
                                "dpdk", "iotlbd_off", "iotlbd_on"], capture_output=True, text=True, timeout=60)
        finally:
            os.unlink(f.name)
        self.assertEqual(p.returncode, 0, p.stderr)
        table = {tuple(c.strip() for c in l.split("|")[1:3]): [c.strip() for c in l.split("|")[3:-1]]
                 for l in p.stdout.splitlines()[2:]}
        self.assertEqual(table[("64", "fast")], ["8.00 (1)", "10.00 (1)", "11.00 (1)", "1.25", "1.38"])
        self.assertEqual(table[("64", "slow")], ["4.00 (1)", "6.00 (1)", "7.00 (1)", "1.50", "1.75"])
        self.assertEqual(table[("64", "all")], ["6.00 (2)", "10.00 (3)", "9.00 (3)", "1.67", "1.50"])

    def test_committed_datapath_report_has_the_plotted_keys(self):
        with open(os.path.join(RESULTS, "datapath.json")) as f:
            doc = json.load(f)
        row = doc["rows"][0]
        for key in ("packet_size", "page_size", "mapping", "eager", "iotlb", "repeat", "mpps", "gbps",
                    "hit_rate", "allocations_per_frame", "retains_per_frame"):
            self.assertIn(key, row)
        self.assertIn("ratios", doc["summary"][0])


if __name__ == "__main__":
    unittest.main(verbosity=2)
