#!/usr/bin/env python3
"""Charts for BENCHMARKS.md from the benchmarks' JSON reports (schema iotlb-bench/1).

Reads, under --results (default bench/results):
  datapath.json                 iotlb-bench datapath --repeats 3 --json …
  datapath-eager.json           iotlb-bench datapath --mappings dynamic --eager --repeats 3 --json …
  vhost-user-side-by-side.json  scripts/vhost-user-side-by-side.sh --json … ROUNDS SECONDS "64 1518"
  dpdk-side-by-side.json        scripts/dpdk-side-by-side.sh --json … (optional)
  pressure.json                 iotlb-bench pressure --repeats 3 --json …
and writes PNGs under --out (default bench/charts):
  iotlb-on-off.png     IOTLB on/off ratio of alternated pairs, static mappings, per page and frame size
  dynamic-mappings.png on/off ratio for static, dynamic and dynamic eager mappings (log scale)
  dpdk-vhost-user.png  one DPDK virtio-user front-end against DPDK's net_vhost and iotlbd (IOTLB off, on)
  dpdk-loopback.png    DPDK's vhost-user loopback against iotlbd's built-in guest (when its JSON exists)
  dpdk-vhost-user-packed.png  the same with packed rings (vhost-user-side-by-side-packed.json, optional)
  network-ports.png    TAP TX, TAP RX and guest to guest against DPDK (tap-/peer-side-by-side.json, optional)
  iotlb-size.png       dynamic 4 KiB mappings: Mpps against iotlb_max_entries, and the fraction of 2048's

A chart whose input is missing is skipped with a message saying which file and
which command makes it; the exit status is 1 when no chart could be made or an
input is not a report this script understands. Uses matplotlib's Agg backend
(no display needed): `make charts` installs matplotlib when it is missing.
"""
import argparse
import json
import os
import statistics
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "iotlb-bench/1"

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
except ImportError:  # pragma: no cover - said plainly, with the fix
    sys.exit("plot_benchmarks: matplotlib is missing; `make charts-deps` (or `python3 -m pip install matplotlib`) installs it")

import plot_network  # noqa: E402 (after the backend is chosen)

PAGE_ORDER = {"4k": 0, "2m": 1, "1g": 2}
PAGE_LABEL = {"4k": "4 KiB", "2m": "2 MiB", "1g": "1 GiB"}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
RATIO_COLORS = ["#8c564b", "#9467bd"]

# How each input is made, for the message when it is missing.
MAKES = {
    "datapath.json": ".build/release/iotlb-bench datapath --repeats 3 --json bench/results/datapath.json",
    "datapath-eager.json": ".build/release/iotlb-bench datapath --mappings dynamic --eager --repeats 3 "
                           "--json bench/results/datapath-eager.json",
    "vhost-user-side-by-side.json": "scripts/vhost-user-side-by-side.sh --json bench/results/vhost-user-side-by-side.json "
                                    "6 5 \"64 1518\"",
    "dpdk-side-by-side.json": "scripts/dpdk-side-by-side.sh --json bench/results/dpdk-side-by-side.json 3 5 \"64 1500\"",
    "vhost-user-side-by-side-packed.json": "RING=packed scripts/vhost-user-side-by-side.sh --json "
                                           "bench/results/vhost-user-side-by-side-packed.json 6 5 \"64 1518\"",
    "tap-side-by-side.json": "scripts/tap-side-by-side.py --rounds 3 --seconds 4 --json bench/results/tap-side-by-side.json",
    "peer-side-by-side.json": "scripts/peer-side-by-side.sh --json bench/results/peer-side-by-side.json 3 4 \"64 1518\"",
    "pressure.json": ".build/release/iotlb-bench pressure --repeats 3 --json bench/results/pressure.json",
}


class InputError(Exception):
    pass


def load(results, name, required=True):
    """The report `name`, or None (with a message) when it is missing."""
    path = os.path.join(results, name)
    if not os.path.exists(path):
        if required:
            print(f"plot_benchmarks: {path} is missing; make it with:\n    {MAKES.get(name, '?')}", file=sys.stderr)
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("rows"), list):
        raise InputError(f"{path}: not an {SCHEMA} report (expected keys schema, benchmark, meta, rows)")
    if not doc["rows"]:
        raise InputError(f"{path}: the report has no rows")
    doc["_path"] = os.path.relpath(path, ROOT)
    return doc


def footnote(fig, docs, extra=""):
    """The commands (and when, where) that produced the data, under the chart."""
    width = int(fig.get_figwidth() * 17)  # characters of 7 pt monospace per line
    lines = []
    for d in docs:
        m = d.get("meta", {})
        host = m.get("host", {})
        where = f"{m.get('date', '?')}, {host.get('cores', '?')} cores ({host.get('cpu') or '?'})"
        if m.get("build"):
            where += f", {m['build']} build"
        command = m.get("command", "?")
        if m.get("ring") and not command.startswith("RING="):
            command = f"RING={m['ring']} {command}"  # the side-by-side scripts read the ring from the environment
        lines += textwrap.wrap(f"$ {command}", width, subsequent_indent="    ", break_on_hyphens=False)
        lines.append(f"  {where}, {d['_path']}")
    if extra:
        lines += textwrap.wrap(extra, width)
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, family="monospace", va="bottom", ha="left", color="#444444")
    return len(lines)


def finish(fig, out, name, note_lines, top=1.0):
    # 7 pt lines are ~0.12 in apart: keep that much of the figure's height for the footnote.
    fig.tight_layout(rect=(0, (0.12 * note_lines + 0.1) / fig.get_figheight(), 1, top))
    path = os.path.join(out, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")
    return path


def pairs(doc, mapping, eager=None):
    """{(packet_size, page_size): [on/off ratio of each alternated pair]} and the on Mpps per cell."""
    runs = {}
    for r in doc["rows"]:
        if r.get("mapping") != mapping or (eager is not None and bool(r.get("eager")) != eager):
            continue
        key = (r["packet_size"], r["page_size"])
        runs.setdefault(key, {}).setdefault(r["repeat"], {})[r["iotlb"]] = r["mpps"]
    ratios, on = {}, {}
    for key, reps in runs.items():
        ratios[key] = [p["on"] / p["off"] for _, p in sorted(reps.items()) if "on" in p and p.get("off")]
        on[key] = [p["on"] for p in reps.values() if "on" in p]
    return ratios, on


def spread(ax, x, values, color, label=None, width=0.22, text=True, fmt="{:.3f}", clip=None):
    """Every pair as a dot, min–max as a line, the median as a bar and a number.
    Values above `clip` are drawn as a triangle at the clip line, with their value."""
    if not values:
        return
    med = statistics.median(values)
    top = max(values) if clip is None else min(max(values), clip)
    ax.vlines(x, min(values), top, color=color, lw=1.2, alpha=0.7)
    n = len(values)
    xs = [x + (i - (n - 1) / 2) * (width / max(n, 4)) for i in range(n)]
    inside = [(a, v) for a, v in zip(xs, values) if clip is None or v <= clip]
    ax.scatter([a for a, _ in inside], [v for _, v in inside], s=18, color=color, alpha=0.55, zorder=3,
               edgecolors="none")
    for a, v in zip(xs, values):
        if clip is not None and v > clip:
            ax.scatter([a], [clip], marker="^", s=40, color=color, zorder=3, clip_on=False)
            ax.annotate(f"{v:.2f}", (a, clip), xytext=(0, -11), textcoords="offset points", ha="center",
                        fontsize=7, color=color)
    ax.hlines(med, x - width / 2, x + width / 2, color=color, lw=3, zorder=4, label=label)
    if text:
        ax.annotate(fmt.format(med), (x + width / 2, med), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8, color=color)


def chart_on_off(results, out):
    doc = load(results, "datapath.json")
    if doc is None:
        return None
    ratios, _ = pairs(doc, "static")
    if not ratios:
        raise InputError(f"{doc['_path']}: no static-mapping rows")
    pages = sorted({p for _, p in ratios}, key=lambda p: PAGE_ORDER.get(p, 9))
    sizes = sorted({s for s, _ in ratios})
    fig, ax = plt.subplots(figsize=(9, 5.4))
    step = 0.8 / len(sizes)
    clip = 2.0  # a pair whose off run fell into a slow phase would flatten the rest
    for j, size in enumerate(sizes):
        for i, page in enumerate(pages):
            x = i + (j - (len(sizes) - 1) / 2) * step
            spread(ax, x, ratios.get((size, page), []), COLORS[j], label=f"{size} B payload" if i == 0 else None,
                   width=step * 0.7, clip=clip)
    ax.set_ylim(0, clip)
    ax.axhline(1.0, color="#888888", lw=0.8)
    ax.axhline(0.99, color="#d62728", lw=0.8, ls="--", label="target ≥ 0.99 (2 MiB)")
    ax.set_xticks(range(len(pages)), [PAGE_LABEL.get(p, p) for p in pages])
    ax.set_xlabel("guest IOMMU page size (static mappings)")
    ax.set_ylabel("throughput ratio IOTLB on / off (Mpps ÷ Mpps)")
    n = max(len(v) for v in ratios.values())
    ax.set_title(f"Device IOTLB on vs off, built-in guest, one datapath thread\n"
                 f"bar: median of {n} alternated on/off pairs; dots: each pair; line: min–max; ▲: above {clip:g}",
                 fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return finish(fig, out, "iotlb-on-off.png", footnote(fig, [doc]))


def chart_dynamic(results, out):
    doc = load(results, "datapath.json")
    if doc is None:
        return None
    eager_doc = load(results, "datapath-eager.json", required=False)
    series = [("static", *pairs(doc, "static")), ("dynamic (lazy)", *pairs(doc, "dynamic", eager=False))]
    docs = [doc]
    if eager_doc is not None:
        series.append(("dynamic, --eager", *pairs(eager_doc, "dynamic", eager=True)))
        docs.append(eager_doc)
    series = [s for s in series if s[1]]
    if len(series) < 2:
        raise InputError(f"{doc['_path']}: needs static and dynamic rows (--mappings static,dynamic)")
    sizes = sorted({s for _, r, _ in series for s, _ in r})
    pages = sorted({p for _, r, _ in series for _, p in r}, key=lambda p: PAGE_ORDER.get(p, 9))
    fig, axes = plt.subplots(1, len(sizes), figsize=(10, 5.4), sharey=True, squeeze=False)
    step = 0.8 / len(series)
    for ax, size in zip(axes[0], sizes):
        for j, (label, ratios, _) in enumerate(series):
            for i, page in enumerate(pages):
                x = i + (j - (len(series) - 1) / 2) * step
                spread(ax, x, ratios.get((size, page), []), COLORS[j], label=label if i == 0 else None,
                       width=step * 0.7, fmt="{:.2f}" if label == "static" else "{:.3f}")
        ax.set_yscale("log")
        ax.axhline(0.25, color="#9467bd", lw=0.8, ls="--", label="target dynamic / static ≥ 0.25 (4 KiB)")
        ax.axhline(1.0, color="#888888", lw=0.8)
        ax.set_xticks(range(len(pages)), [PAGE_LABEL.get(p, p) for p in pages])
        ax.set_xlabel("guest IOMMU page size")
        ax.set_title(f"{size} B payload")
        ax.grid(axis="y", which="both", alpha=0.25)
    axes[0][0].set_ylabel("throughput ratio IOTLB on / off (log scale)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Static vs dynamic guest mappings: IOTLB-on throughput against the no-IOMMU baseline\n"
                 "(each side's own alternated on/off pairs; bar: median, dots: pairs, line: min–max)", fontsize=11)
    extra = "" if eager_doc is not None else "(datapath-eager.json missing: no --eager series)"
    return finish(fig, out, "dynamic-mappings.png", footnote(fig, docs, extra))


def col(rows, key, frame_key, frame):
    return [(r.get("round"), r.get(key)) for r in rows if r.get(frame_key) == frame]


def chart_vhost_user(results, out, name="vhost-user-side-by-side.json", png="dpdk-vhost-user.png", ring="split"):
    doc = load(results, name, required=ring == "split")
    if doc is None:
        return None
    rows = doc["rows"]
    frames = sorted({r["frame_size"] for r in rows})
    backends = [("dpdk_mpps", "DPDK 22.11 net_vhost"), ("iotlbd_off_mpps", "iotlbd, IOTLB off"),
                ("iotlbd_on_mpps", "iotlbd, IOTLB on")]
    backends = [b for b in backends if any(r.get(b[0]) is not None for r in rows)]
    fig, axes = plt.subplots(2, len(frames), figsize=(10, 7.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for k, frame in enumerate(frames):
        ax = axes[0][k]
        fr = [r for r in rows if r["frame_size"] == frame]
        rounds = [r["round"] for r in fr]
        w = 0.8 / len(backends)
        for j, (key, label) in enumerate(backends):
            xs = [i + (j - (len(backends) - 1) / 2) * w for i in range(len(fr))]
            ys = [r.get(key) if r.get(key) is not None else 0 for r in fr]
            ax.bar(xs, ys, width=w * 0.95, color=COLORS[j], label=label)
            for x, r in zip(xs, fr):
                if r.get(key) is None:
                    ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(fr)), [str(r) for r in rounds])
        ax.set_xlabel("round (backends alternated within each round)")
        ax.set_ylabel("Mpps (median of per-second Rx-pps)")
        ax.set_title(f"{frame} B frames on the wire")
        ax.grid(axis="y", alpha=0.3)
        ax = axes[1][k]
        ratio_series = [("off_over_dpdk", "iotlbd off / DPDK"), ("on_over_off", "iotlbd on / off")]
        for j, (key, label) in enumerate(ratio_series):
            vals = [r[key] for r in fr if r.get(key) is not None]
            spread(ax, j, vals, RATIO_COLORS[j], label=label, width=0.5, fmt="{:.2f}")
        ax.axhline(1.0, color="#888888", lw=0.8)
        ax.set_xticks(range(len(ratio_series)), [l for _, l in ratio_series])
        ax.set_xlim(-0.6, len(ratio_series) - 0.4)
        ax.set_ylabel("ratio (per round)")
        ax.grid(axis="y", alpha=0.3)
    # Title and legend above the panels, placed by hand (tight_layout leaves figure legends alone).
    h = fig.get_figheight()
    fig.text(0.5, 1 - 0.08 / h, f"The same DPDK virtio-user front-end (dpdk-testpmd, {ring} rings) against three vhost-user "
             "backends\n"
             "bottom, per-round ratios: bar = median, dots = rounds, line = min–max", ha="center", va="top", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.55 / h), ncol=len(backends), fontsize=8,
               frameon=False)
    m = doc.get("meta", {})
    extra = (f"DPDK {m.get('dpdk_version', '?')}; DPDK runs repeated after a lost tx-first burst: "
             f"{m.get('dpdk_retries', '?')}; n/a: no figure after 3 attempts")
    return finish(fig, out, png, footnote(fig, [doc], extra), top=1 - 0.85 / fig.get_figheight())


def chart_vhost_user_packed(results, out):
    return chart_vhost_user(results, out, "vhost-user-side-by-side-packed.json", "dpdk-vhost-user-packed.png", "packed")


def chart_ports(results, out):
    return plot_network.chart_ports(results, out, sys.modules[__name__])


def chart_dpdk_loopback(results, out):
    doc = load(results, "dpdk-side-by-side.json", required=False)
    if doc is None:
        print("plot_benchmarks: no dpdk-side-by-side.json (optional); dpdk-loopback.png not made", file=sys.stderr)
        return None
    rows = doc["rows"]
    sizes = sorted({r["payload_size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(9, 4.8), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        fr = [r for r in rows if r["payload_size"] == size]
        w = 0.38
        for j, (key, label) in enumerate([("dpdk_mpps", "DPDK vhost-user ↔ virtio-user loopback"),
                                          ("iotlbd_on_mpps", "iotlbd, IOTLB on, built-in guest")]):
            xs = [i + (j - 0.5) * w for i in range(len(fr))]
            ax.bar(xs, [r.get(key) or 0 for r in fr], width=w * 0.95, color=COLORS[j], label=label)
            for x, r in zip(xs, fr):
                if r.get(key) is None:
                    ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(fr)), [str(r["round"]) for r in fr])
        ratios = [r["ratio"] for r in fr if r.get("ratio") is not None]
        med = f", median ratio {statistics.median(ratios):.2f}" if ratios else ""
        ax.set_title(f"{size} B payload{med}")
        ax.set_xlabel("round (A B alternated)")
        ax.set_ylabel("Mpps")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("DPDK's own vhost-user loopback vs iotlbd's engine with its verifying guest", fontsize=11)
    return finish(fig, out, "dpdk-loopback.png", footnote(fig, [doc]))


def chart_iotlb_size(results, out):
    """The IOTLB under pressure: dynamic 4 KiB Mpps per IOTLB size (every round, medians joined), and
    each size's figure as a fraction of the 2048-entry one in the same round (medians, 0.25 target)."""
    doc = load(results, "pressure.json")
    if doc is None:
        return None
    dyn = {}
    for r in doc["rows"]:
        if r.get("mapping") == "dynamic":
            dyn.setdefault(r["packet_size"], {}).setdefault(r["iotlb_max_entries"], []).append(r["mpps"])
    if not dyn:
        raise InputError(f"{doc['_path']}: no dynamic-mapping rows")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.8))
    for k, (size, by) in enumerate(sorted(dyn.items())):
        color = COLORS[k % len(COLORS)]
        xs = sorted(by)
        for x in xs:
            ax.scatter([x] * len(by[x]), by[x], s=14, color=color, alpha=0.45, edgecolors="none")
        ax.plot(xs, [statistics.median(by[x]) for x in xs], color=color, marker="o", label=f"{size} B frames")
        fr = {s["iotlb_max_entries"]: s.get("over_2048_median") for s in doc.get("summary", [])
              if s.get("packet_size") == size and s.get("over_2048_median") is not None}
        if fr:
            fx = sorted(fr)
            bx.plot(fx, [fr[x] for x in fx], color=color, marker="o", label=f"{size} B frames")
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("iotlb_max_entries (log scale)")
        a.grid(True, alpha=0.3)
    ax.set_ylabel("Mpps (built-in guest, dynamic 4 KiB, lazy)")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput against the IOTLB size")
    ax.legend(fontsize=8)
    bx.axhline(0.25, color="#444444", ls="--", lw=1)
    bx.annotate("target 0.25 (256 entries, 64 B)", (16, 0.25), xytext=(0, 4), textcoords="offset points", fontsize=8)
    bx.set_ylabel("× the 2048-entry figure (same round, median)")
    bx.set_ylim(bottom=0)
    bx.set_title("Graceful degradation: no stall, no collapse")
    bx.legend(fontsize=8)
    n = footnote(fig, [doc], "Dots: every run; lines: medians. Each round runs every size in turn (side by side).")
    return finish(fig, out, "iotlb-size.png", n)


CHARTS = [chart_on_off, chart_dynamic, chart_vhost_user, chart_vhost_user_packed, chart_ports, chart_dpdk_loopback,
          chart_iotlb_size]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"), help="folder of the JSON reports")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "charts"), help="folder for the PNGs")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.results):
        print(f"plot_benchmarks: no results folder {args.results}; the benchmarks write their JSON there "
              f"(see BENCHMARKS.md, 'Charts')", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    made, failed = [], False
    for chart in CHARTS:
        try:
            path = chart(args.results, args.out)
        except InputError as e:
            print(f"plot_benchmarks: {e}", file=sys.stderr)
            failed = True
            continue
        if path:
            made.append(path)
    if not made:
        print("plot_benchmarks: no chart made", file=sys.stderr)
    return 1 if failed or not made else 0


if __name__ == "__main__":
    sys.exit(main())
