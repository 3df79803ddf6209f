#!/usr/bin/env python3
"""Medians of a side-by-side script's Mpps columns per host phase, as a
Markdown table: for each frame size and each phase (fast, slow), every
side's median over the runs that saw that phase, with their count, and each
side's ratio to the first side's. Runs whose phase changed (mixed) count
there nowhere. A third row, "all", takes every run with a figure whatever
its phase: on a host whose probe hovers near the threshold the labels say
little, and that row is the one to read. Runs that gave no figure count
nowhere.

  phase_medians.py ROWS.tsv SIDE [SIDE …]

ROWS.tsv has columns frame_size, SIDE_mpps and SIDE's phase column
(SIDE_phase, or the side's first word then _phase: iotlbd_off -> off_phase).
"""
import statistics
import sys


def main():
    path, sides = sys.argv[1], sys.argv[2:]
    with open(path) as f:
        lines = [l.rstrip("\n").split("\t") for l in f if l.strip()]
    head, rows = lines[0], [dict(zip(lines[0], l)) for l in lines[1:]]

    def phase_col(side):
        for c in (side + "_phase", side.split("_")[-1] + "_phase"):
            if c in head:
                return c
        raise SystemExit(f"no phase column for {side}")

    print("| frame B | phase | " + " | ".join(f"{s} Mpps (runs)" for s in sides) + " | "
          + " | ".join(f"{s} / {sides[0]}" for s in sides[1:]) + " |")
    print("|---:|---|" + "---:|" * (2 * len(sides) - 1))
    for frame in dict.fromkeys(r["frame_size"] for r in rows):
        for phase in ("fast", "slow", "all"):
            meds = []
            for s in sides:
                vals = [float(r[s + "_mpps"]) for r in rows if r["frame_size"] == frame
                        and phase in ("all", r.get(phase_col(s))) and r.get(s + "_mpps") not in (None, "", "-", "0.00")]
                meds.append((statistics.median(vals), len(vals)) if vals else (None, 0))
            cells = [f"{m:.2f} ({n})" if m is not None else "- (0)" for m, n in meds]
            base = meds[0][0]
            ratios = [f"{m / base:.2f}" if m is not None and base else "-" for m, _ in meds[1:]]
            print(f"| {frame} | {phase} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
