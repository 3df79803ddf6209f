#!/usr/bin/env python3
"""Writes a side-by-side script's rows as an iotlb-bench/1 JSON report, the
same layout `iotlb-bench … --json FILE` writes (see Sources/iotlb-bench/Report.swift):

    {"schema": "iotlb-bench/1", "benchmark": NAME,
     "meta": {"date", "duration_s", "command", "argv", "host": {…}, "parameters": {…}, …},
     "rows": [{"benchmark": NAME, …}, …], "summary": [{"benchmark": NAME, …}, …]}

Rows come on stdin as tab-separated lines under a header line; "-" or an empty
field becomes null, numbers become numbers. With --group-by KEY, one summary
line per value of KEY gives, for every --median COLUMN, the median over the rows
(nulls left out) and how many rows had a value.

  bench_json.py --benchmark NAME --out FILE --started EPOCH [--param key=value …]
      [--param-list key="v1 v2 …" …] [--meta key=value …] [--group-by KEY --median COLUMN …]
      -- SCRIPT ARGS… < rows.tsv
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import sys

SCHEMA = "iotlb-bench/1"


def value(text):
    if text in ("", "-"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_tsv(lines):
    lines = [l.rstrip("\n") for l in lines if l.strip()]
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, map(value, l.split("\t")))) for l in lines[1:]]


def first_value(path, key):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line[len(key):].lstrip(" \t:=").strip().strip('"')
    except OSError:
        pass
    return None


def host():
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = None
    return {"hostname": socket.gethostname(), "cores": os.cpu_count(),
            "cpu": first_value("/proc/cpuinfo", "model name"), "kernel": platform.release(),
            "machine": platform.machine(), "os": first_value("/etc/os-release", "PRETTY_NAME"),
            "memory_bytes": memory}


def pairs(items, raw=False):
    out = {}
    for item in items or []:
        key, _, text = item.partition("=")
        out[key] = text if raw else value(text)
    return out


def layout(doc):
    """One top-level member per line, one row per line (small diffs when committed)."""
    lines = []
    for key, val in doc.items():
        k = json.dumps(key) + ": "
        if isinstance(val, list) and val:
            lines.append(k + "[\n" + ",\n".join("  " + json.dumps(v, separators=(",", ":")) for v in val) + "\n]")
        else:
            lines.append(k + json.dumps(val, separators=(",", ":")))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", required=True)
    ap.add_argument("--out", required=True, help="file to write ('-': stdout)")
    ap.add_argument("--started", type=float, required=True, help="start time, seconds since the epoch")
    ap.add_argument("--param", action="append", help="key=value: a parameter of the run")
    ap.add_argument("--param-list", action="append", help="key=\"v1 v2 …\": a parameter that is a list")
    ap.add_argument("--meta", action="append", help="key=value: more metadata (e.g. dpdk_version)")
    ap.add_argument("--group-by", help="summary: one line per value of this column")
    ap.add_argument("--median", action="append", default=[], help="summary: median of this column")
    ap.add_argument("argv", nargs="+", help="the command line that produced the rows (after --)")
    args = ap.parse_args()

    started = datetime.datetime.fromtimestamp(args.started, datetime.timezone.utc)
    meta = {"date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "duration_s": round(datetime.datetime.now(datetime.timezone.utc).timestamp() - args.started, 1),
            "command": shlex.join(args.argv), "argv": args.argv, "host": host(),
            "parameters": pairs(args.param)}
    meta["parameters"].update({k: [value(x) for x in v.split()] for k, v in pairs(args.param_list, raw=True).items()})
    meta.update(pairs(args.meta))
    bench = {"benchmark": args.benchmark}
    rows = [dict(bench, **r) for r in read_tsv(sys.stdin)]
    summary = []
    if args.group_by:
        for key in dict.fromkeys(r.get(args.group_by) for r in rows):
            group = [r for r in rows if r.get(args.group_by) == key]
            line = dict(bench, **{args.group_by: key})
            for col in args.median:
                vals = [r[col] for r in group if isinstance(r.get(col), (int, float))]
                line[col + "_median"] = statistics.median(vals) if vals else None
                line[col + "_n"] = len(vals)
            summary.append(line)
    doc = {"schema": SCHEMA, "benchmark": args.benchmark, "meta": meta, "rows": rows, "summary": summary}
    text = layout(doc)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
