#!/usr/bin/env python3
"""Two iotlb-bench builds side by side: `datapath` cells run alternately,
build A then build B, round after round, so drift on a shared machine hits
both alike. Prints per cell the median Mpps of each build (IOTLB on and off),
their ratio B/A, the on/off ratio of each, and B's allocations and retains
per frame; --json writes the raw rows.

  scripts/compare_builds.py /tmp/bench-before /tmp/bench-after --rounds 7
"""
import argparse, json, statistics, subprocess, sys

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("a", help="iotlb-bench binary A (before)")
p.add_argument("b", help="iotlb-bench binary B (after)")
p.add_argument("--rounds", type=int, default=7)
p.add_argument("--sizes", default="64,1500")
p.add_argument("--pages", default="2m,4k")
p.add_argument("--mappings", default="static")
p.add_argument("--seconds", default="1")
p.add_argument("--json", help="write all rows here")
args = p.parse_args()

rows = []
for r in range(args.rounds):
    for name, binary in (("A", args.a), ("B", args.b)):
        out = subprocess.run([binary, "datapath", "--sizes", args.sizes, "--pages", args.pages,
                              "--mappings", args.mappings, "--repeats", "1", "--seconds", args.seconds,
                              "--json", "-"], capture_output=True, text=True, check=True).stdout
        for row in json.loads(out)["rows"]:
            row["build"], row["round"] = name, r
            rows.append(row)
        print(f"round {r + 1}/{args.rounds} build {name} done", file=sys.stderr)

def med(build, size, page, mapping, side, key="mpps"):
    return statistics.median(x[key] for x in rows if x["build"] == build and x["packet_size"] == size
                             and x["page_size"] == page and x["mapping"] == mapping and x["iotlb"] == side)

print("| bytes | page | mapping | A on Mpps | B on Mpps | B/A on | A off Mpps | B off Mpps | B/A off | A on/off | B on/off | B allocs/frame | B retains/frame |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
cells = sorted({(x["packet_size"], x["page_size"], x["mapping"]) for x in rows})
for size, page, mapping in cells:
    aon, bon = med("A", size, page, mapping, "on"), med("B", size, page, mapping, "on")
    aoff, boff = med("A", size, page, mapping, "off"), med("B", size, page, mapping, "off")
    allocs = max(x["allocations_per_frame"] for x in rows if x["build"] == "B" and x["packet_size"] == size
                 and x["page_size"] == page and x["mapping"] == mapping and x["iotlb"] == "on")
    retains = max(x["retains_per_frame"] for x in rows if x["build"] == "B" and x["packet_size"] == size
                  and x["page_size"] == page and x["mapping"] == mapping and x["iotlb"] == "on")
    print(f"| {size} | {page} | {mapping} | {aon:.2f} | {bon:.2f} | {bon / aon:.3f} | {aoff:.2f} | {boff:.2f} | "
          f"{boff / aoff:.3f} | {aon / aoff:.3f} | {bon / boff:.3f} | {allocs:.4f} | {retains:.4f} |")
if args.json:
    with open(args.json, "w") as f:
        json.dump({"schema": "iotlb-bench/1", "benchmark": "compare-builds", "a": args.a, "b": args.b,
                   "rows": rows}, f, indent=1)
