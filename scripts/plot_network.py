"""The network ports' chart for BENCHMARKS.md (issue 20): network-ports.png from
tap-side-by-side.json and peer-side-by-side.json, both optional. Called by
scripts/plot_benchmarks.py, whose helpers (load, footnote, finish, COLORS) it
gets as `kit`."""
import statistics

import matplotlib.pyplot as plt


def chart_ports(results, out, kit):
    """Network ports (issue 20): TX into a TAP, RX from it, and guest to guest (peer ports), each side's
    per-round Mpps (dots) and median (bar), DPDK's anchor beside iotlbd with the IOTLB off and on."""
    tap = kit.load(results, "tap-side-by-side.json", required=False)
    peer = kit.load(results, "peer-side-by-side.json", required=False)
    panels = []
    if tap is not None:
        for direction, key, what in [("tx", "ns_rx_mpps", "TX: virtio-user → back-end → TAP\n(frames counted on the TAP)"),
                                     ("rx", "frontend_rx_mpps", "RX: trafgen → TAP → back-end → virtio-user\n"
                                                                "(generator-bound)")]:
            rows = [r for r in tap["rows"] if r.get("direction") == direction]
            by = {}
            for r in rows:
                if r.get(key) is not None:
                    by.setdefault(r["frame_size"], {}).setdefault(r["side"], []).append(r[key])
            panels.append((what, by, ["dpdk", "iotlbd-off", "iotlbd-on"]))
    if peer is not None:
        by = {}
        for r in peer["rows"]:
            for side, key in [("dpdk", "dpdk_mpps"), ("iotlbd-off", "iotlbd_off_mpps"), ("iotlbd-on", "iotlbd_on_mpps")]:
                if r.get(key):
                    by.setdefault(r["frame_size"], {}).setdefault(side, []).append(r[key])
        panels.append(("Guest to guest: two virtio-user ports\nwired by the back-end", by, ["dpdk", "iotlbd-off", "iotlbd-on"]))
    if not panels:
        return None
    labels = {"dpdk": "DPDK 22.11 (net_vhost → net_tap / io-fwd)", "iotlbd-off": "iotlbd, IOTLB off",
              "iotlbd-on": "iotlbd, IOTLB on"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 5.2), squeeze=False)
    for ax, (title, by, sides) in zip(axes[0], panels):
        frames = sorted(by)
        w = 0.8 / len(sides)
        for j, side in enumerate(sides):
            for i, frame in enumerate(frames):
                vals = by[frame].get(side, [])
                if not vals:
                    continue
                x = i + (j - (len(sides) - 1) / 2) * w
                ax.bar([x], [statistics.median(vals)], width=w * 0.9, color=kit.COLORS[j],
                       label=labels[side] if i == 0 else None, alpha=0.85)
                ax.scatter([x] * len(vals), vals, s=10, color="#222222", zorder=3)
                ax.annotate(f"{statistics.median(vals):.2f}", (x, statistics.median(vals)), xytext=(0, 2),
                            textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(range(len(frames)), [f"{f} B" for f in frames])
        ax.set_ylabel("Mpps")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles, lbls = axes[0][0].get_legend_handles_labels()
    h = fig.get_figheight()
    fig.legend(handles, lbls, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.08 / h), ncol=3, fontsize=8, frameon=False)
    n = kit.footnote(fig, [d for d in (tap, peer) if d is not None],
                 "Bars: medians of the rounds (sides alternated within each round); dots: every round.")
    return kit.finish(fig, out, "network-ports.png", n, top=1 - 0.45 / h)
