"""Output of ``benchmarks/norm_speed.py``: machine info, the results table (plain text for
the terminal, markdown for the results file), headline ratios, the issue's targets, the
markdown file and the PNG plot."""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import re
import statistics
import subprocess
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import unirep_kernels

from norm_cases import BYTE_MODEL, MODES, NORM_TITLES, RESNET38_SWEEP, MiB, format_bytes
from norm_impls import BACKENDS, BASELINE_SHORT, BASELINE_TITLES
from norm_timing import IDLE_CORES

HERE = os.path.dirname(os.path.abspath(__file__))

# Cells of the table that hold no number.
CELL_CANNOT = ""  # the baseline cannot express the case
CELL_NOT_RUN = "-"  # not selected for this case (--baselines, --backends, --compile)
CELL_FAIL = "FAIL"  # output differs from the oracle: not timed
CELL_ERROR = "ERR"  # raised (e.g. a compile error): not timed, see the notes

LEGEND = (
    "Rows: one per (case, mode, backend of ours). 'ms': median time per call; 'GB/s': bytes of the byte model / "
    "median time; '% copy': that over the copy bandwidth measured at the start for the same x size. Baseline "
    "columns: the baseline's median ms, and 'vs': baseline time / our time (above 1: ours is faster), both "
    "measured interleaved in the same run. Empty cell: the baseline cannot express the case (native F.batch_norm "
    "has one set of statistics per call, so it has no BN / BN+ mixed-batch cell). '-': not run for this case "
    "(compiled reference outside the --compile selection, or left out by --baselines). 'FAIL': its output "
    "differed from reference.py, so it was not timed; 'ERR': it raised (see the notes). 'bg cores': CPU time "
    "other processes used while the row was measured (steal time included).")


# --------------------------------------------------------------------------------------
# Machine info.


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    """'cpu', or the slugified GPU name (e.g. 'nvidia-h100-80gb-hbm3')."""
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


def git_revision() -> Optional[str]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10)
        head = rev.stdout.strip()
        return (head + ("+uncommitted" if dirty.stdout.strip() else "")) if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def extension_build() -> Optional[Dict[str, object]]:
    """Which build of unirep_kernels._C was timed: path, modification time, sha256 prefix."""
    ext = getattr(unirep_kernels, "_C", None)  # set when the extension loaded
    path = getattr(ext, "__file__", None)
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    repo = os.path.dirname(HERE)
    path = os.path.abspath(path)
    shown = os.path.relpath(path, repo) if path.startswith(repo + os.sep) else path
    return {"path": shown, "built_utc": mtime.isoformat(timespec="seconds"), "sha256": digest}


def machine_info(device: torch.device) -> Dict[str, object]:
    info: Dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        # ATen's vectorized kernels, and unirep's C++ CPU kernels, run this instruction set
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "unirep_kernels": getattr(unirep_kernels, "__version__", None),
        "unirep_kernels_path": os.path.dirname(os.path.abspath(unirep_kernels.__file__)), "git": git_revision(),
        "extension": extension_build(),
        "backends": {k: {"available": v[0], "reason": v[1]} for k, v in unirep_kernels.backends().items()},
    }
    try:
        import triton

        info["triton"] = getattr(triton, "__version__", "?")
    except Exception:  # not installed, or broken: the backends entry says why
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------
# Cells, rows, tables.


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def baseline_cell(result: Dict[str, object], mode_row: Dict[str, object], name: str, ours_ms: float):
    """(ms cell, speedup cell) of baseline ``name`` for one row."""
    status = result["impl_status"].get(name)
    if status is None or status == "not run":
        return CELL_NOT_RUN, CELL_NOT_RUN
    if status == "cannot express":
        return CELL_CANNOT, CELL_CANNOT
    if status == "failed":
        return CELL_FAIL, ""
    if status == "error" or name in mode_row.get("errors", {}):
        return CELL_ERROR, ""
    t = mode_row["times"].get(name)
    if t is None:
        return CELL_NOT_RUN, CELL_NOT_RUN
    return _ms(t["median_ms"]), f"{t['median_ms'] / ours_ms:.2f}x"


def _load(v: Optional[float]) -> str:
    return "?" if v is None else f"{v:.2f}"


def table_rows(results: Sequence[Dict[str, object]], baselines: Sequence[str]) -> List[List[str]]:
    rows = []
    for r in results:
        c = r["case"]
        head = [c["shape"], c["dtype"], c["layout"], c["norm"], f"D={c['num_domains']} {c['batch']}"]
        for mode, m in r["modes"].items():
            for backend in r["backends"]:
                status = r["impl_status"][backend]
                t = m["times"].get(backend)
                if t is None:
                    cell = {"failed": CELL_FAIL, "error": CELL_ERROR}.get(status, CELL_NOT_RUN)
                    if backend in m.get("errors", {}):
                        cell = CELL_ERROR
                    rows.append(head + [mode, backend, cell, "", ""] + [""] * (2 * len(baselines))
                                + [_load(m["background_cores"])])
                    continue
                cells = []
                for b in baselines:
                    cells += list(baseline_cell(r, m, b, t["median_ms"]))
                rows.append(head + [mode, backend, _ms(t["median_ms"]), f"{t['gbps']:.1f}", f"{t['pct_copy']:.0f}%"]
                            + cells + [_load(m["background_cores"])])
    return rows


def table_header(baselines: Sequence[str]) -> List[str]:
    head = ["shape", "dtype", "layout", "norm", "domains", "mode", "backend", "ms", "GB/s", "% copy"]
    for b in baselines:
        head += [f"{BASELINE_SHORT[b]} ms", f"vs {BASELINE_SHORT[b]}"]
    return head + ["bg cores"]


def render(head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool, right_from: int = 0) -> str:
    """A table as markdown, or as aligned plain text (columns from ``right_from`` right-aligned)."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(v).rjust(w) if i >= right_from else str(v).ljust(w)
                         for i, (v, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows])


def results_table(results: Sequence[Dict[str, object]], baselines: Sequence[str], markdown: bool) -> str:
    return render(table_header(baselines), table_rows(results, baselines), markdown, right_from=7)


# --------------------------------------------------------------------------------------
# Headline ratios and the targets.


def headline(results: Sequence[Dict[str, object]], backends: Sequence[str],
             baselines: Sequence[str]) -> List[Dict[str, object]]:
    """Per (backend, baseline, batch kind, mode): geometric mean, min and max of baseline
    time / our time over the cases where both were timed. The reference backend is left
    out when a compiled backend is there (the full table has it)."""
    compiled = [b for b in backends if b != "reference"]
    out = []
    for backend in compiled or list(backends):
        for b in baselines:
            for batch in ("pure", "mixed"):
                for mode in MODES:
                    ratios = [m["times"][b]["median_ms"] / m["times"][backend]["median_ms"]
                              for r in results if r["case"]["batch"] == batch
                              for md, m in r["modes"].items()
                              if md == mode and backend in m["times"] and b in m["times"]]
                    if ratios:
                        out.append({"backend": backend, "baseline": b, "batch": batch, "mode": mode,
                                    "cases": len(ratios),
                                    "geomean": math.exp(sum(math.log(v) for v in ratios) / len(ratios)),
                                    "min": min(ratios), "max": max(ratios)})
    return out


def headline_table(rows: Sequence[Dict[str, object]], markdown: bool) -> str:
    """One row per (backend, baseline, batch kind), one column per mode: 'geomean [min-max] (cases)'."""
    modes = [m for m in MODES if any(h["mode"] == m for h in rows)]
    keys: List[tuple] = []
    cells: Dict[tuple, Dict[str, str]] = {}
    for h in rows:
        key = (h["backend"], h["baseline"], h["batch"])
        if key not in cells:
            keys.append(key)
            cells[key] = {}
        cells[key][h["mode"]] = f"{h['geomean']:.2f}x [{h['min']:.2f}-{h['max']:.2f}] ({h['cases']})"
    head = ["backend", "baseline", "batch"] + modes
    body = [[k[0], BASELINE_SHORT[k[1]], k[2]] + [cells[k].get(m, "") for m in modes] for k in keys]
    return render(head, body, markdown, right_from=3)


def evaluate_targets(results: Sequence[Dict[str, object]], primary: Optional[str]) -> List[Dict[str, object]]:
    """The kernel-core issue's targets, on the main case (N=128 C=64 32x32 float32 NCHW BN):
    D=1 pure no slower than native F.batch_norm (ratio >= 1), D=10 mixed at least 3x faster
    than the eager per-domain loop; per mode, for the primary backend."""
    targets = []
    if primary is None:
        return targets
    for r in results:
        c = r["case"]
        if c["shape"] != RESNET38_SWEEP or not c["main_config"]:
            continue
        if c["batch"] == "mixed":
            goal, baseline, text = 3.0, "eager_loop", f"D={c['num_domains']} mixed: >= 3x faster than the eager loop"
        else:
            goal, baseline, text = 1.0, "native", f"D={c['num_domains']} pure: no slower than native F.batch_norm"
        for mode, m in r["modes"].items():
            times = m["times"]
            if primary not in times or baseline not in times:
                continue
            ratio = times[baseline]["median_ms"] / times[primary]["median_ms"]
            # Relative uncertainty of the ratio from both medians' half interquartile ranges.
            spread = ratio * sum((times[n]["iqr_ms"] / 2 / times[n]["median_ms"]) ** 2
                                 for n in (primary, baseline)) ** 0.5
            targets.append({"case": c["name"], "target": text, "mode": mode, "backend": primary,
                            "baseline": baseline, "ratio": ratio, "ratio_spread": spread,
                            "ratio_of_min": times[baseline]["min_ms"] / times[primary]["min_ms"],
                            "background_cores": m["background_cores"], "goal": goal, "met": bool(ratio >= goal),
                            "within_noise": bool(abs(ratio - goal) <= spread)})
    return targets


def format_targets(targets: Iterable[Dict[str, object]]) -> List[str]:
    return [f"{t['target']} [{t['mode']}, {t['backend']}]: {t['ratio']:.2f}x +- {t['ratio_spread']:.2f} "
            f"(goal {t['goal']:.0f}x) -> {'MET' if t['met'] else 'NOT MET'}"
            + (" (within noise)" if t["within_noise"] else "")
            + f"; fastest/fastest {t['ratio_of_min']:.2f}x; bg {_load(t['background_cores'])} cores"
            for t in targets]


# --------------------------------------------------------------------------------------
# Markdown file.


def format_cores(v: Optional[float]) -> str:
    """A background load for people: '0.12 cores', or 'unknown'."""
    return "unknown" if v is None else f"{v:.2f} cores"


def _extension_text(ext: Optional[Dict[str, object]]) -> str:
    return "unknown" if not ext else f"`{ext['path']}` built {ext['built_utc']} (sha256 {ext['sha256']})"


def load_summary(results: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """How loaded the machine was while rows were measured."""
    loads = [m["background_cores"] for r in results for m in r["modes"].values()
             if m["background_cores"] is not None]
    busy = [v for v in loads if v > IDLE_CORES]
    return {"rows": len(loads), "busy_rows": len(busy), "max": max(loads) if loads else None,
            "median": sorted(loads)[len(loads) // 2] if loads else None}


def copy_table(copies: Sequence[Dict[str, object]], markdown: bool) -> str:
    head = ["x size", "copy GB/s", "median ms", "fresh output ms", "bg cores"]
    body = [[format_bytes(c["x_bytes"]), f"{c['gbps']:.1f}", _ms(c["median_ms"]), _ms(c["alloc_copy_ms"]),
             _load(c["background_cores"])] for c in copies]
    return render(head, body, markdown, right_from=1)


def write_markdown(path: str, payload: Dict[str, object], command: str, png_name: Optional[str]) -> None:
    info, opts, results = payload["machine"], payload["options"], payload["cases"]
    load = payload["load"]
    loaded = load["busy_rows"] > 0
    backends = ", ".join(f"{k}: {'yes' if v['available'] else 'no'} ({v['reason']})"
                         for k, v in info["backends"].items())
    baselines = payload["baselines"]
    failed = [r["case"]["name"] + f" ({', '.join(n for n, s in r['impl_status'].items() if s == 'failed')})"
              for r in results if any(s == "failed" for s in r["impl_status"].values())]
    notes = [f"- `{r['case']['name']}`: {n}" for r in results for n in r["notes"]]
    gpu = f", GPU {info['gpu']} ({info['gpu_memory_gib']} GiB, CUDA {info['cuda']})" if "gpu" in info else ""
    load_line = (f"**The machine was loaded**: other processes used more than {IDLE_CORES} cores while "
                 f"{load['busy_rows']} of {load['rows']} rows were measured (at most {format_cores(load['max'])}, median "
                 f"{format_cores(load['median'])}; see 'bg cores' per row). Absolute times of those rows are pessimistic "
                 f"and noisy; ratios, measured interleaved, are what to read."
                 + (f" With {info['torch_threads']} torch threads on {info['cpu_count']} cores, every parallel region "
                    "of a loaded machine waits for descheduled threads: the loops of many small ops suffer most, "
                    "which inflates our ratios over them (--threads 1 avoids it)."
                    if info["torch_threads"] > 1 and info["torch_threads"] >= (info["cpu_count"] or 1) else "")
                 if loaded else f"The machine was idle while rows were measured (background load at most "
                                f"{format_cores(load['max'])}).")
    plan = opts["timing"]
    timer = ("one block of calls per round between CUDA events (device synchronized before each block)"
             if info["device"].startswith("cuda") else
             "torch.utils.benchmark.Timer.blocked_autorange per round (blocks sized by an untimed calibration call)"
             + (", timed in CPU time of the timing thread (--clock thread, one torch thread)"
                if plan.get("clock") == "thread" else ""))
    text = f"""# Domain-muxed normalization speed: {info['device_name']}, {info['date']}

Generated by `{command}` (device {info['device']}, {payload['elapsed_s']:.0f} s, {len(results)} cases,
grid `{opts['grid']}`). {load_line}

- Machine: {info['cpu_model']}, {info['cpu_count']} CPUs (ATen CPU capability {info.get('cpu_capability', '?')}), \
torch {info['torch']} with {info['torch_threads']} \
thread(s){f" (--threads {opts['threads']})" if opts.get('threads') else ""}, Python {info['python']}, triton {info['triton']}, {info['platform']}{gpu}
- Code: git {info['git']}, unirep_kernels {info['unirep_kernels']} from `{info.get('unirep_kernels_path')}`, \
extension {_extension_text(info['extension'])}
- Backends: {backends}{_env_text(info.get('env'))}
- Background load (CPU used by other processes) before the run: {format_cores(info['background_cores_at_start'])}; \
`--wait-idle {opts['wait_idle_s']:g} --attempts {opts['attempts']}`
- Allocator: {info['allocator']}
- Timing: {timer}; implementations interleaved in rounds of ~{plan['block_time'] * 1e3:.0f} ms each \
(A B C A B C ...), median time per call over all blocks; each gets at least {plan['min_blocks']} blocks and \
{plan['min_run_time']:g} s timed, after the correctness check and {plan['warmup']} warm-up call(s). Inputs rotate over preallocated copies (at \
least 3, and at least {opts['rotate_bytes'] / MiB:.0f} MiB of x; cache {_size(opts['cache_bytes'])}); backward \
rotates over retained forward graphs covering the same bytes of x and dy together (at least 3; fewer if \
memory is short: 'copies' in the JSON). Weight, bias and running stats are (D, C) float32 tables; gradients \
via torch.autograd.grad.
- Correctness guard: before timing, every implementation runs once and is compared with reference.py \
(max abs error <= tol x max(1, max |reference|), tol 1e-3 float32, 1e-2 float16, 4e-2 bfloat16: y, updated \
running stats, dx, dweight, dbias as the modes need; our backends must also keep x's memory format). \
{('FAILED: ' + '; '.join(failed)) if failed else 'Every implementation that ran passed.'}

## Byte model

{BYTE_MODEL}

## Copy bandwidth (measured at the start)

{copy_table(payload['copy_bandwidth'], markdown=True)}

## Implementations

Backends of ours: {', '.join(f'`{b}`' for b in payload['backends'])}. Baselines:

{chr(10).join(f'- `{b}` ({BASELINE_SHORT[b]}): {BASELINE_TITLES[b]}' for b in baselines)}

Normalizations: {'; '.join(f'`{k}`: {v}' for k, v in NORM_TITLES.items())}.
Modes: {'; '.join(f'`{m.name}`: {m.title}' for m in MODES.values())}.

## Results

{LEGEND}

{results_table(results, baselines, markdown=True)}

## Headline: speedup of each backend over each baseline

Baseline time / our time: geometric mean [min-max] (number of cases) over the cases of this run where both were
timed, pure and mixed batches apart (ratios measured side by side).

{headline_table(payload['headline'], markdown=True)}

## Targets of the kernel-core issue (main case N=128 C=64 32x32 float32 NCHW BN)

{chr(10).join('- ' + line for line in format_targets(payload['targets'])) or '- (not in this run)'}

## Notes

{chr(10).join(notes) or '- none'}
"""
    if png_name:
        text += f"\n## Plot\n\n![effective bandwidth against x size]({png_name})\n"
    with open(path, "w") as f:
        f.write(text)


def _env_text(env: Optional[Dict[str, str]]) -> str:
    return "" if not env else "\n- Environment: " + ", ".join(f"`{k}={v}`" for k, v in env.items())


def _size(v: Optional[int]) -> str:
    return "unknown" if not v else f"{v / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------
# Plot: effective bandwidth against x size, per implementation, one panel per mode, with
# the measured copy bandwidth as the roofline.

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
