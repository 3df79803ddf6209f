#!/usr/bin/env python3
"""Two iotlb-bench builds' `lookup` side by side: build A then build B, round
after round, so drift on a shared machine hits both alike. Prints per table
size the min / median / max of each figure (ns per random hit, sequential
hit, miss, update+invalidate pair) for each build; --json writes the rows.

--instructions also counts each build's instructions per operation with
valgrind's callgrind (repeatable whatever the load): the inclusive cost of
each pattern's timing function (timeRandomHits, timeSequentialHits,
timeMisses, timeUpdateInvalidatePairs; the bench loop included) divided by
its operations. Both builds need those functions (iotlb-bench from issue 22
on). valgrind 3.19 cannot read the DWARF 5 of Swift 6.3, so it runs a copy
stripped of debug information (symbols kept).

  scripts/compare_lookup.py /tmp/bench-before .build/release/iotlb-bench --rounds 8 --instructions
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("a", help="iotlb-bench binary A (before)")
p.add_argument("b", help="iotlb-bench binary B (after)")
p.add_argument("--rounds", type=int, default=8)
p.add_argument("--entries", default="64,2048,65536")
p.add_argument("--lookups", default="4000000")
p.add_argument("--instructions", action="store_true", help="also count instructions per operation (callgrind)")
p.add_argument("--callgrind-entries", default="2048")
p.add_argument("--callgrind-lookups", type=int, default=400000)
p.add_argument("--json", help="write all rows here")
args = p.parse_args()

FIGURES = ("random_hit_ns", "sequential_hit_ns", "miss_ns", "update_invalidate_pair_ns")
rows = []
for r in range(args.rounds):
    for name, binary in (("A", args.a), ("B", args.b)):
        out = subprocess.run([binary, "lookup", "--entries", args.entries, "--lookups", args.lookups, "--json", "-"],
                             capture_output=True, text=True, check=True).stdout
        for row in json.loads(out)["rows"]:
            row["build"], row["round"] = name, r
            rows.append(row)
        print(f"round {r + 1}/{args.rounds} build {name} done", file=sys.stderr)

def spread(build, n, key):
    xs = [x[key] for x in rows if x["build"] == build and x["entries"] == n]
    return min(xs), statistics.median(xs), max(xs)

print("| entries | figure | A min / median / max | B min / median / max | B/A medians |")
print("|---:|---|---:|---:|---:|")
for n in sorted({x["entries"] for x in rows}):
    for key in FIGURES:
        a, b = spread("A", n, key), spread("B", n, key)
        print(f"| {n} | {key} | {a[0]:.1f} / {a[1]:.1f} / {a[2]:.1f} | {b[0]:.1f} / {b[1]:.1f} / {b[2]:.1f} | {b[1] / a[1]:.2f} |")

counts = []
if args.instructions:
    patterns = (("random_hit", "timeRandomHits", 1), ("sequential_hit", "timeSequentialHits", 1),
                ("miss", "timeMisses", 1), ("update_invalidate_pair", "timeUpdateInvalidatePairs", 8))
    tmp = tempfile.mkdtemp(prefix="compare-lookup-")
    for name, binary in (("A", args.a), ("B", args.b)):
        stripped = os.path.join(tmp, f"bench-{name}")
        subprocess.run(["objcopy", "--strip-debug", binary, stripped], check=True)
        out = os.path.join(tmp, f"callgrind.{name}")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", stripped, "lookup",
                        "--entries", args.callgrind_entries, "--lookups", str(args.callgrind_lookups)],
                       check=True, capture_output=True)
        ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", out], capture_output=True, text=True,
                             check=True).stdout
        ann = subprocess.run(["swift", "demangle", "--simplified"], input=ann, capture_output=True, text=True,
                             check=True).stdout
        for pattern, function, per in patterns:
            ir = next(int(m.group(1).replace(",", "")) for line in ann.splitlines()
                      for m in [re.match(r"\s*([\d,]+) .*\?\?\?:" + function + r"\(", line)] if m)
            counts.append({"build": name, "entries": int(args.callgrind_entries), "pattern": pattern,
                           "instructions_per_op": ir / (args.callgrind_lookups // per)})
    shutil.rmtree(tmp)
    print()
    print(f"| instructions per operation ({args.callgrind_entries} entries, callgrind) | A | B |")
    print("|---|---:|---:|")
    for pattern, _, _ in patterns:
        a, b = (next(c["instructions_per_op"] for c in counts if c["build"] == x and c["pattern"] == pattern)
                for x in ("A", "B"))
        print(f"| {pattern} | {a:.1f} | {b:.1f} |")

if args.json:
    with open(args.json, "w") as f:
        json.dump({"schema": "iotlb-bench/1", "benchmark": "compare-lookup", "a": args.a, "b": args.b,
                   "command": sys.argv, "rows": rows, "instructions": counts}, f, indent=1)
