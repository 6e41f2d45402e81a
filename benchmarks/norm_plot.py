"""The PNG of ``benchmarks/norm_speed.py``: effective bandwidth against x size, per
implementation, one panel per mode, with the measured copy bandwidth as the roofline."""

from __future__ import annotations

import statistics
from typing import Dict, List, Tuple

from norm_cases import MODES, MiB, format_bytes
from norm_impls import BACKENDS, BASELINE_SHORT

MARKERS = {"cpp": "o", "cuda": "o", "triton": "s", "reference": "v", "eager_loop": "x", "module_list": "+",
           "native": "D", "compiled": "^"}


def write_plot(path: str, payload: Dict[str, object]) -> None:
    """Save the plot as ``path``: for each mode, every timed (case, implementation) as a
    marker at (x bytes, GB/s), a line through each implementation's median per size over
    the float32 cases (all cases when there are none), the copy bandwidth per size
    (dashed) and at the largest size (horizontal line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, copies = payload["cases"], payload["copy_bandwidth"]
    modes = [m for m in MODES if any(m in r["modes"] for r in results)]
    impls = list(payload["backends"]) + list(payload["baselines"])
    cols = min(2, max(1, len(modes)))
    rows = max(1, -(-len(modes) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.8 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colors = {name: cmap(i % 10) for i, name in enumerate(impls)}
    for i, mode in enumerate(modes):
        ax = axes[i // cols][i % cols]
        for name in impls:
            points: List[Tuple[float, float, bool]] = [
                (r["case"]["x_bytes"] / MiB, r["modes"][mode]["times"][name]["gbps"],
                 r["case"]["dtype"] == "float32")
                for r in results if mode in r["modes"] and name in r["modes"][mode]["times"]]
            if not points:
                continue
            label = name if name in BACKENDS else BASELINE_SHORT[name]
            xs, ys, _ = zip(*points)
            ax.scatter(xs, ys, marker=MARKERS.get(name, "o"), color=colors[name], s=18, alpha=0.5)
            line = [p for p in points if p[2]] or points
            sizes = sorted({p[0] for p in line})
            med = [statistics.median(p[1] for p in line if p[0] == s) for s in sizes]
            ax.plot(sizes, med, marker=MARKERS.get(name, "o"), color=colors[name], label=label,
                    linewidth=2 if name in BACKENDS else 1.2)
        if copies:
            cs = sorted(copies, key=lambda c: c["x_bytes"])
            ax.plot([c["x_bytes"] / MiB for c in cs], [c["gbps"] for c in cs], "k--", linewidth=1,
                    label="copy (same size)")
            ax.axhline(cs[-1]["gbps"], color="k", linewidth=1.5,
                       label=f"copy bandwidth {cs[-1]['gbps']:.0f} GB/s ({format_bytes(cs[-1]['x_bytes'])})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("x size (MiB)")
        ax.set_ylabel("effective GB/s (byte model)")
        ax.set_title(f"{mode}: {MODES[mode].title}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0)
    for j in range(len(modes), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles: Dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("copy bandwidth"):
                handles.setdefault(label, handle)
            else:  # one entry per panel differs only by the number: keep the first
                handles.setdefault("copy bandwidth", handle)
                handles["copy bandwidth"].set_label(label)
    fig.legend(list(handles.values()), [h.get_label() for h in handles.values()], loc="lower center",
               ncol=min(5, len(handles)), fontsize=8)
    info = payload["machine"]
    fig.suptitle(f"Domain-muxed normalization, {info['device_name']} ({info.get('gpu') or info['cpu_model']}), "
                 f"{info['date']}: markers = cases, lines = float32 median per size", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
