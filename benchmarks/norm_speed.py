"""Speed of domain-muxed normalization: every backend against every baseline, on the roofline.

For every case of a grid (shape x dtype x layout x BN / BN+ / IN x number of domains x
pure or mixed batch; see ``norm_cases.py``) and every mode (training forward, eval forward,
backward, training forward+backward) this times, interleaved in the same run:

- the backends of unirep_kernels built for the device ("cpp" and "reference" on the CPU;
  "cuda", "triton" and "reference" on a GPU);
- the baselines (``norm_impls.py``): the eager per-domain loop, a ModuleList of
  nn.BatchNorm2d / nn.InstanceNorm2d indexed by domain, native F.batch_norm /
  F.instance_norm (where one call can express the case) and torch.compile of reference.py.

Before timing, every implementation is checked against reference.py; one that differs is
not timed. For every row it reports the median time, the bytes of the minimum algorithm,
the effective bandwidth, the percentage of the copy bandwidth measured at the start, and
the speedup over each baseline; it prints a table and writes
``<out>/<device>-<date>.{json,md,png}``.

    python benchmarks/norm_speed.py --quick        # main case, < 1 minute on 2 CPU cores
    python benchmarks/norm_speed.py                # default suite (see --help for its size)
    python benchmarks/norm_speed.py --device cuda --out DIR   # on a GPU

Modules: norm_cases.py (grid, byte model), norm_impls.py (implementations, correctness
guard), norm_timing.py (timing, load, copy bandwidth), norm_report.py (tables, markdown,
PNG). It benchmarks the ``unirep_kernels`` that ``import`` finds (an install, or the
checkout on PYTHONPATH); the results name its path and extension build.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

try:
    import unirep_kernels
except ImportError as exc:
    raise SystemExit(f"norm_speed.py: unirep_kernels is not importable ({exc}); install it (pip install "
                     "--no-build-isolation -e .) or put the checkout on PYTHONPATH") from None

import norm_cases
import norm_impls
import norm_report
import norm_timing
from norm_cases import MODES, MiB, Case
from norm_impls import BACKENDS, BASELINES
from norm_timing import TimingPlan

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")
SMOKE_SHAPE = "16x8x6x6"
QUICK_SHAPE = norm_cases.RESNET38_SWEEP
# Saved tensors of one backward graph, in x-sized float32 tensors, assumed when deciding
# how many graphs the backward mode can keep (the reference and the loops hold several).
SAVED_PER_GRAPH = 6
GRAPH_MEMORY_SHARE = 0.4  # of the available memory, for the retained backward graphs


# --------------------------------------------------------------------------------------
# One case.


def backward_graphs(case: Case, impls: int, copies: int, rotate_bytes: int, device: torch.device) -> int:
    """How many forward graphs per implementation the backward mode retains and rotates over.

    A backward call reads x and dy, so half the pool's copies already cover ``rotate_bytes``
    (at least 3); fewer when the graphs' saved tensors would not fit in
    GRAPH_MEMORY_SHARE of the available memory (at least 1: then x is far larger than any
    cache anyway).
    """
    wanted = min(copies, max(3, -(-rotate_bytes // (2 * case.x_bytes))))
    available = norm_timing.available_memory_bytes(device)
    if not available:
        return wanted
    per_graph = SAVED_PER_GRAPH * case.numel * 4
    return max(1, min(wanted, int(GRAPH_MEMORY_SHARE * available / max(1, impls * per_graph))))


class ImplementationFailed(Exception):
    """An implementation raised while being timed."""

    def __init__(self, name: str, exc: BaseException) -> None:
        self.name = name
        self.message = norm_impls.describe_error(exc)
        super().__init__(f"{name}: {self.message}")


def _guarded(name: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call() -> object:
        try:
            return fn()
        except Exception as exc:
            raise ImplementationFailed(name, exc) from exc
    return call


def time_mode(case: Case, tensors: norm_impls.CaseTensors, prepared: Dict[str, norm_impls.Prepared],
              names: Sequence[str], pool: norm_impls.InputPool, mode: str, device: torch.device, plan: TimingPlan,
              rotate_bytes: int, wait_idle_s: float, attempts: int):
    """Time implementations ``names`` in ``mode``, interleaved: (times, background cores,
    attempts, copies rotated over per implementation). ImplementationFailed names the one
    that raised."""
    graphs = backward_graphs(case, len(names), pool.copies, rotate_bytes, device) if mode == "backward" else 0
    fns, copies = {}, {}
    for n in names:
        try:
            step, copies[n] = norm_impls.mode_step(n, case, tensors, prepared[n], pool, mode, graphs)
        except Exception as exc:  # building the retained graphs of the backward mode
            raise ImplementationFailed(n, exc) from exc
        fns[n] = _guarded(n, norm_timing.rotating(step, copies[n]))
    times, load, made = norm_timing.time_quietly(fns, device, plan, wait_idle_s, attempts)
    return times, load, made, copies


def run_case(case: Case, pool: norm_impls.InputPool, device: torch.device, backends: Sequence[str],
             baselines: Sequence[str], compile_this: bool, plan: TimingPlan, copy_gbps: Dict[int, float],
             rotate_bytes: int, wait_idle_s: float = 0.0, attempts: int = norm_timing.MAX_ATTEMPTS,
             log: Callable[[str], None] = print) -> Dict[str, object]:
    """Check every implementation against reference.py, then time the ones that passed in
    every mode of the case (all implementations of a mode interleaved)."""
    start = time.perf_counter()
    if compile_this and "compiled" in baselines:
        norm_impls.reset_compiler()
    tensors = norm_impls.make_case_tensors(case, device)
    status: Dict[str, str] = {}
    reasons: Dict[str, str] = {}
    names: List[str] = []
    for name in list(backends) + list(baselines):
        reason = norm_impls.cannot_express(name, case)
        if name == "compiled" and not compile_this:
            status[name], reasons[name] = "not run", "not in the --compile selection"
        elif reason:
            status[name], reasons[name] = "cannot express", reason
        else:
            names.append(name)
    check = norm_impls.check_case(case, pool, tensors, names, backends)
    notes: List[str] = []
    for name in names:
        entry = check["impls"][name]
        if entry["ok"]:
            status[name] = "ok"
        elif entry["error"]:
            status[name] = "error"
            notes.append(f"{name} raised, not timed: {entry['error']}")
        else:
            status[name] = "failed"
            bad = [c for c in entry["checks"] if not c["ok"]]
            notes.append(f"{name} differs from reference.py, not timed: "
                         + "; ".join(f"{c['what']} " + (f"max abs err {c['max_abs_err']:.3g} (scale {c['scale']:.3g})"
                                                         if c.get("max_abs_err") is not None else c.get("problem", ""))
                                     for c in bad))
    if "compiled" in check["impls"] and status.get("compiled") == "ok":
        notes.append(f"compiled reference: its first calls (compiling the case's graphs; inductor's on-disk cache "
                     f"may hold them from an earlier run) took {check['impls']['compiled']['seconds']:.1f} s")
    log(f"  {case.name}: checked in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{n} {status[n]}" for n in names))
    for note in notes:
        if "not timed" in note:
            log(f"  !! {note}")
    timed = [n for n in names if status[n] == "ok"]
    prepared = {n: norm_impls.prepare(n, case, tensors) for n in timed}
    result: Dict[str, object] = {"case": case.to_json(), "backends": [b for b in backends], "impl_status": status,
                                 "reasons": reasons, "check": check, "notes": notes, "modes": {}}
    for mode in case.modes:
        t0 = time.perf_counter()
        nbytes = norm_cases.bytes_moved(case.norm, mode, case.x_bytes)
        row: Dict[str, object] = {"bytes": nbytes, "copies": {}, "times": {}, "speedups": {}, "errors": {},
                                  "background_cores": None, "attempts": 0}
        active = list(timed)
        while active:  # an implementation that raises while timed is dropped from the mode, with a note
            try:
                row["times"], row["background_cores"], row["attempts"], row["copies"] = time_mode(
                    case, tensors, prepared, active, pool, mode, device, plan, rotate_bytes, wait_idle_s, attempts)
                break
            except ImplementationFailed as failure:
                row["errors"][failure.name] = failure.message
                notes.append(f"{failure.name} raised while {mode} was timed, no time for it: {failure.message}")
                log(f"  !! {notes[-1]}")
                active.remove(failure.name)
                gc.collect()
                if device.type == "cuda":  # e.g. out of memory: give the failed attempt's memory back
                    torch.cuda.empty_cache()
        for t in row["times"].values():
            t["gbps"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
            t["pct_copy"] = 100 * t["gbps"] / copy_gbps[case.x_bytes] if copy_gbps.get(case.x_bytes) else float("nan")
        for b in backends:
            if b in row["times"]:
                row["speedups"][b] = {base: row["times"][base]["median_ms"] / row["times"][b]["median_ms"]
                                      for base in baselines if base in row["times"]}
        row["elapsed_s"] = time.perf_counter() - t0
        result["modes"][mode] = row
        log(f"    {mode:<14} " + "  ".join(f"{n} {row['times'][n]['median_ms']:.3g}" for n in row["times"])
            + f" ms  ({row['elapsed_s']:.1f} s, bg {norm_report.format_cores(row['background_cores'])})")
    loads = [m["background_cores"] for m in result["modes"].values() if m["background_cores"] is not None]
    result["background_cores"] = max(loads) if loads else None
    result["elapsed_s"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------
# Command line.

HELP = """\
Cases. The grid's axes: shapes (--suite / --shapes), --dtypes, --layouts, --norms, --domains x --batches
(a mixed batch needs D > 1), and per case the --modes it has (BN: train_fwd, eval_fwd, backward,
train_fwd_bwd; BN+: eval_fwd; IN: all four). --grid sweep (default) times every shape in the main
configuration (float32, NCHW, BN, D=1 pure and D=10 mixed) and varies one axis at a time at each suite's
sweep shape (resnet38: r38-c64-32x32; bandwidth: its smallest size); --grid product times every
combination of the selected values (450 cases per 5 shapes when nothing is filtered: hours on a CPU).
--list prints the cases and exits.

Suites. resnet38: the norm-layer inputs of the paper's ResNet-38 at N=128 (r38-c16-64x64, r38-c32-64x64,
r38-c64-32x32, r38-c128-16x16, r38-c256-8x8). bandwidth: x of 256 MiB and 1 GiB on a GPU; on a CPU sized
to the machine (the largest power of two <= max(64 MiB, last-level cache), and a quarter of it).

Run time. --quick: the main shape only (BN, BN+ and IN at D=1 pure and D=10 mixed, float32, NCHW), short
timing, no torch.compile: under a minute on 2 CPU cores. Default suite: 40 cases; on the 2-core
development CPU about 20-40 minutes (more on a loaded machine, or with --wait-idle); on an H100 / H200 a
few minutes plus the cold compiles of torch.compile (about 2 graphs per case; --compile main skips most).

Output: a table on the terminal, and <out>/<name>.json, .md and .png (name: <device>-<YYYY-MM-DD>,
device 'cpu' or the slugified GPU name). Exit status 1 when an implementation's output differed from
reference.py (it is then not timed) or one of our backends raised.

GPU: python benchmarks/norm_speed.py --device cuda --out DIR
"""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python benchmarks/norm_speed.py",
        description="Time domain-muxed BN / BN+ / IN (every unirep_kernels backend built for the device) against "
                    "the eager per-domain loop, a ModuleList of nn.BatchNorm2d indexed by domain, native "
                    "F.batch_norm / F.instance_norm and torch.compile of the reference, on a grid of cases; "
                    "report time, bytes moved, effective bandwidth, % of copy bandwidth and speedups.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = ap.add_argument_group("what to run")
    sel.add_argument("--quick", action="store_true",
                     help="main shape only (N=128 C=64 32x32), float32 NCHW, BN/BN+/IN at D=1 pure and D=10 "
                          "mixed, every mode, short timing, no torch.compile unless --compile says so; under a "
                          "minute on 2 CPU cores")
    sel.add_argument("--smoke", action="store_true",
                     help=f"pipeline check: a tiny shape ({SMOKE_SHAPE}), BN/BN+/IN at D=1 pure and D=10 mixed, "
                          "float32, minimal timing (the numbers mean nothing); a few seconds")
    sel.add_argument("--suite", default=None,
                     help="comma list of resnet38, bandwidth (default: both; --quick: the main shape only)")
    sel.add_argument("--shapes", default=None,
                     help="comma list of shape labels (r38-c64-32x32, bw-64MiB, ...: see --list) or custom "
                          "NxCxHxW shapes; replaces --suite")
    sel.add_argument("--grid", choices=("sweep", "product"), default="sweep",
                     help="sweep: main configuration at every shape + one axis at a time at the sweep shape "
                          "(default); product: every combination of the selected values")
    sel.add_argument("--dtypes", default=None,
                     help="comma list of float32, bfloat16, float16 (aliases f32, bf16, f16; default: all; "
                          "--quick/--smoke: float32)")
    sel.add_argument("--layouts", default=None, help="comma list of NCHW, NHWC (channels_last) (default: both; "
                                                     "--quick/--smoke: NCHW)")
    sel.add_argument("--norms", default=None, help="comma list of bn, bn+ (batch stats at eval), in (default: all)")
    sel.add_argument("--domains", default=None, help="comma list of domain counts D (default: 1,3,10; "
                                                     "--quick/--smoke: 1,10)")
    sel.add_argument("--batches", default=None, help="comma list of pure, mixed (default: both; a mixed batch "
                                                     "needs D > 1; --quick/--smoke: D=1 pure and D=10 mixed only)")
    sel.add_argument("--modes", default=None,
                     help=f"comma list of {', '.join(MODES)} (default: all; each case runs those its norm has)")
    sel.add_argument("--backends", default=None,
                     help="comma list of our backends to time (default: every one built for the device: cpp, "
                          "reference on the CPU; cuda, triton, reference on a GPU)")
    sel.add_argument("--baselines", default=None,
                     help=f"comma list of {', '.join(BASELINES)} (default: all; 'none' for none)")
    sel.add_argument("--compile", choices=("auto", "all", "main", "none"), default="auto",
                     help="which cases time torch.compile of the reference (a cold compile costs ~5-20 s per graph "
                          "on a CPU, about 2 graphs per case): all; main (the main configuration at the sweep "
                          "shapes: 4 cases in the default suite); none. auto (default): all on a GPU, main on "
                          "a CPU, none with --quick / --smoke")
    sel.add_argument("--list", action="store_true", help="print the selected cases and exit")
    run = ap.add_argument_group("how to run")
    run.add_argument("--device", default="cpu",
                     help="cpu, or cuda / cuda:N (CUDA events for timing, 256 MiB+ bandwidth cases, backends cuda "
                          "and triton when built) (default: cpu)")
    run.add_argument("--out", default=DEFAULT_OUT,
                     help="folder for the .json, .md and .png results, created if missing (default: "
                          "benchmarks/results beside this script)")
    run.add_argument("--name", default=None,
                     help="file name stem of the results (default: <device>-<YYYY-MM-DD>)")
    run.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    run.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                     help="on a shared machine: before each measurement wait up to SECONDS for other processes to "
                          f"use less than {norm_timing.IDLE_CORES} cores, and measure again (up to --attempts "
                          "times) when they used more meanwhile, keeping the quietest; the load seen is recorded "
                          "per row either way (default 0: do not wait)")
    run.add_argument("--attempts", type=int, default=norm_timing.MAX_ATTEMPTS,
                     help=f"with --wait-idle: measurements of a row on a busy machine (default "
                          f"{norm_timing.MAX_ATTEMPTS}; 1 on a machine that stays busy)")
    run.add_argument("--min-run-time", type=float, default=None,
                     help="seconds of timed calls per implementation and mode, in interleaved blocks (default: "
                          "0.5 on a CPU, 0.2 with --quick, 0.3 on a GPU)")
    run.add_argument("--rotate-mib", type=float, default=None,
                     help="MiB of x the timed calls rotate over, at least (default: CPU max(96, 2 x last-level "
                          "cache) up to 1024; GPU max(256, 4 x L2))")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    run.add_argument("--clock", choices=("wall", "thread"), default="wall",
                     help="CPU timer: wall (elapsed time) or thread (CPU time of the timing thread: on a shared "
                          "machine it leaves out the time a call spends descheduled; needs --threads 1) "
                          "(default: wall)")
    run.add_argument("--alloc", choices=("reuse", "system"), default="reuse",
                     help="CPU output allocations: 'reuse' keeps freed memory and never mmaps (glibc mallopt), so "
                          "outputs reuse warm memory in every column as with a caching allocator; 'system' leaves "
                          "glibc alone (default: reuse)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _resolve_args(args)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def _resolve_args(args: argparse.Namespace) -> None:
    """Turn the option strings into values; ValueError with a clear message when one is bad."""
    if args.quick and args.smoke:
        raise ValueError("--quick and --smoke exclude each other")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available in this torch build / machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = device
    small = args.quick or args.smoke
    args.dtype_list = norm_cases.parse_list(args.dtypes or ("float32" if small else "all"), list(norm_cases.DTYPES),
                                            "--dtypes", norm_cases.DTYPE_ALIASES)
    args.layout_list = norm_cases.parse_list(args.layouts or ("NCHW" if small else "all"), norm_cases.LAYOUTS,
                                             "--layouts", norm_cases.LAYOUT_ALIASES)
    args.norm_list = norm_cases.parse_list(args.norms or "all", norm_cases.NORMS, "--norms")
    args.domain_list = norm_cases.parse_domains(args.domains or ("1,10" if small else "1,3,10"))
    args.batch_list = norm_cases.parse_list(args.batches or "pure,mixed", norm_cases.BATCHES, "--batches")
    # --quick / --smoke: D=1 pure and D=10 mixed only, unless --domains / --batches say otherwise
    args.variant_list = (list(norm_cases.MAIN_DOMAIN_VARIANTS) if small and args.domains is None
                         and args.batches is None else None)
    args.mode_list = norm_cases.parse_list(args.modes or "all", list(MODES), "--modes")
    args.suite_list = norm_cases.parse_list(args.suite or "all", norm_cases.SUITES, "--suite")
    shapes = args.shapes
    if shapes is None and args.suite is None:
        shapes = SMOKE_SHAPE if args.smoke else QUICK_SHAPE if args.quick else None
    args.shape_args = [s.strip() for s in shapes.split(",") if s.strip()] if shapes else []
    if shapes is not None and not args.shape_args:
        raise ValueError("--shapes: empty list")
    status = unirep_kernels.backends()
    if args.backends:
        args.backend_list = norm_cases.parse_list(args.backends, list(BACKENDS), "--backends")
        for b in args.backend_list:
            if not status[b][0]:
                raise ValueError(f"--backends: {b!r} is not available: {status[b][1]}")
            if b not in norm_impls.DEVICE_BACKENDS[device.type]:
                raise ValueError(f"--backends: {b!r} does not run on {device.type} tensors in this benchmark "
                                 f"(choose from {', '.join(norm_impls.DEVICE_BACKENDS[device.type])}; triton on "
                                 "CPU tensors is the test-only interpreter)")
    else:
        args.backend_list = [b for b in norm_impls.DEVICE_BACKENDS[device.type] if status[b][0]]
    if args.baselines and args.baselines.strip() == "none":
        args.baseline_list = []
    else:
        args.baseline_list = norm_cases.parse_list(args.baselines or "all", list(BASELINES), "--baselines")
    if args.compile == "auto":
        args.compile = "none" if small else ("all" if device.type == "cuda" else "main")
    if args.min_run_time is None:
        args.min_run_time = 0.01 if args.smoke else 0.2 if args.quick else 0.3 if device.type == "cuda" else 0.5
    if args.min_run_time <= 0:
        raise ValueError("--min-run-time must be positive")
    if args.rotate_mib is not None and args.rotate_mib < 0:
        raise ValueError("--rotate-mib must not be negative")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be at least 1")
    if args.clock == "thread" and (device.type != "cpu" or args.threads != 1):
        raise ValueError("--clock thread measures one thread's CPU time: it needs --device cpu and --threads 1")
    if args.wait_idle < 0:
        raise ValueError("--wait-idle must not be negative")
    if args.attempts < 1:
        raise ValueError("--attempts must be at least 1")


def timing_plan(args: argparse.Namespace) -> TimingPlan:
    if args.smoke:
        return TimingPlan(min_run_time=args.min_run_time, block_time=0.002, min_blocks=2, max_rounds=3, warmup=0,
                          clock=args.clock)
    if args.device.type == "cuda":
        return TimingPlan(min_run_time=args.min_run_time, block_time=0.01, min_blocks=5, warmup=3)
    return TimingPlan(min_run_time=args.min_run_time, block_time=0.05, min_blocks=3, clock=args.clock,
                      warmup=0)  # the check and the calibration call warm up


def build_case_list(args: argparse.Namespace, cache: Optional[int], available: Optional[int]) -> List[Case]:
    try:
        shapes = norm_cases.select_shapes(args.suite_list, args.shape_args, args.device.type, cache, available)
        flt = norm_cases.GridFilter(shapes=shapes, dtypes=args.dtype_list, layouts=args.layout_list,
                                    norms=args.norm_list, domains=args.domain_list, batches=args.batch_list,
                                    modes=args.mode_list, variants=args.variant_list)
        cases = norm_cases.build_cases(flt, args.grid)
    except ValueError as exc:
        raise SystemExit(f"norm_speed.py: error: {exc}")
    if not cases:
        raise SystemExit("norm_speed.py: error: no case matches the selection (a norm without any of the --modes, "
                         "e.g. bn+ has only eval_fwd?)")
    too_small = [c.name for c in cases if c.mixed and c.dims[0] < c.num_domains]
    if too_small:
        raise SystemExit(f"norm_speed.py: error: a mixed batch needs N >= D (every domain present): {too_small}")
    return cases


def compile_selection(args: argparse.Namespace, cases: Sequence[Case]) -> set:
    """Names of the cases that time torch.compile of the reference."""
    if args.compile == "none" or "compiled" not in args.baseline_list:
        return set()
    if args.compile == "all":
        return {c.name for c in cases}
    sweep = {s.label for s in norm_cases.sweep_shape_of_suites([c.shape for c in cases])}
    return {c.name for c in cases if c.is_main_config and c.shape.label in sweep}


def measure(args: argparse.Namespace) -> Optional[Dict[str, object]]:
    """Run the selected cases: the payload of the results files (None with --list, after
    printing the cases)."""
    device: torch.device = args.device
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    allocator = norm_timing.configure_allocator(args.alloc, device)
    cache = norm_timing.cache_bytes(device)
    available = norm_timing.available_memory_bytes(device)
    rotate = (int(args.rotate_mib * MiB) if args.rotate_mib is not None
              else 0 if args.smoke else norm_timing.rotation_bytes(device, cache))
    cases = build_case_list(args, cache, available)
    compiled_cases = compile_selection(args, cases)
    if args.list:
        for c in cases:
            print(f"{c.name:<48} {c.describe()}; modes {', '.join(c.modes)}"
                  + ("; + torch.compile" if c.name in compiled_cases else ""))
        print(f"{len(cases)} cases, {sum(len(c.modes) for c in cases)} (case, mode) rows")
        return None
    if compiled_cases:
        norm_impls.configure_compiler()
        if device.type == "cpu" and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
            # On a small CPU machine compile in this process, not in a pool of worker processes
            # that would compete with the timed calls (a GPU host keeps inductor's parallel compile).
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
    info = norm_report.machine_info(device)
    info["allocator"] = allocator
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLIBC_TUNABLES",
                                             "UNIREP_BACKEND", "UNIREP_CPU_STREAM_STORES", "ATEN_CPU_CAPABILITY",
                                             "TORCHINDUCTOR_COMPILE_THREADS") if k in os.environ}
    plan = timing_plan(args)
    print(f"{info.get('gpu') or info['cpu_model']}, torch {info['torch']}, {info['torch_threads']} threads, device "
          f"{device}, backends {args.backend_list}, baselines {args.baseline_list}, {len(cases)} cases "
          f"(torch.compile on {len(compiled_cases)}), allocator {allocator}")
    if not args.backend_list:
        print("warning: no backend of ours selected or available: timing baselines only", file=sys.stderr)
    info["background_cores_at_start"] = norm_timing.LoadMonitor.probe(0.2 if args.smoke else 1.0)
    busy = info["background_cores_at_start"]
    if device.type == "cpu" and busy is not None and busy > norm_timing.IDLE_CORES and \
            torch.get_num_threads() > 1 and torch.get_num_threads() >= (os.cpu_count() or 1):
        print(f"warning: other processes use {busy:.2f} cores and torch uses all {torch.get_num_threads()} cores: "
              "every parallel region waits for a descheduled thread, so times grow several-fold, most for the "
              "loops of many small ops; consider --threads 1 (stable single-thread ratios) or --wait-idle",
              file=sys.stderr)
    copy_plan = dataclasses.replace(plan, min_run_time=min(plan.min_run_time, 0.5))
    copies, copy_gbps = [], {}
    for nbytes in sorted({c.x_bytes for c in cases}):
        copies.append(norm_timing.copy_bandwidth(nbytes, device, copy_plan, rotate, args.wait_idle, args.attempts))
        copy_gbps[nbytes] = copies[-1]["gbps"]
        print(f"copy bandwidth at {norm_cases.format_bytes(nbytes)}: {copies[-1]['gbps']:.1f} GB/s "
              f"(bg {norm_report.format_cores(copies[-1]['background_cores'])})")

    results_by_name: Dict[str, Dict[str, object]] = {}
    groups: Dict[tuple, List[Case]] = {}
    for c in cases:  # cases sharing x (shape, dtype, layout) share one pool of rotated inputs
        groups.setdefault((c.dims, c.dtype, c.layout), []).append(c)
    for (dims, dtype, layout), group in groups.items():
        copies_n = norm_impls.pool_copies(group[0].x_bytes, rotate)
        pool = norm_impls.make_pool(dims, norm_cases.DTYPES[dtype], layout == "NHWC", device, copies_n)
        print(f"x {'x'.join(map(str, dims))} {dtype} {layout}: {copies_n} rotated copies")
        for case in group:
            results_by_name[case.name] = run_case(case, pool, device, args.backend_list, args.baseline_list,
                                                  case.name in compiled_cases, plan, copy_gbps, rotate,
                                                  args.wait_idle, args.attempts)
        del pool
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = [results_by_name[c.name] for c in cases]

    primary = next((b for b in args.backend_list if b != "reference"), args.backend_list[0] if args.backend_list
                   else None)
    payload: Dict[str, object] = {
        "command": shlex.join(["python", "benchmarks/norm_speed.py"] + args.argv), "machine": info,
        "options": {"quick": args.quick, "smoke": args.smoke, "grid": args.grid, "suites": args.suite_list,
                    "shapes": args.shape_args, "dtypes": args.dtype_list, "layouts": args.layout_list,
                    "norms": args.norm_list, "domains": args.domain_list, "batches": args.batch_list,
                    "modes": args.mode_list, "compile": args.compile, "timing": dataclasses.asdict(plan),
                    "alloc": args.alloc, "wait_idle_s": args.wait_idle, "attempts": args.attempts,
                    "threads": args.threads, "rotate_bytes": rotate, "cache_bytes": cache,
                    "available_memory_bytes": available,
                    "momentum": norm_impls.MOMENTUM, "eps": norm_impls.EPS},
        "byte_model": norm_cases.BYTE_MODEL, "legend": norm_report.LEGEND,
        "backends": args.backend_list, "primary_backend": primary, "baselines": args.baseline_list,
        "baseline_titles": {b: norm_impls.BASELINE_TITLES[b] for b in args.baseline_list},
        "copy_bandwidth": copies, "cases": results,
        "headline": norm_report.headline(results, args.backend_list, args.baseline_list),
        "targets": norm_report.evaluate_targets(results, primary),
        "load": norm_report.load_summary(results),
    }
    payload["elapsed_s"] = time.perf_counter() - start
    return payload


def print_summary(payload: Dict[str, object]) -> None:
    """The results table, legend, headline ratios, targets and load on the terminal."""
    print()
    print(norm_report.results_table(payload["cases"], payload["baselines"], markdown=False))
    print()
    print(norm_report.LEGEND)
    if payload["headline"]:
        print()
        print(norm_report.headline_table(payload["headline"], markdown=False))
    if payload["targets"]:
        print("\nTargets (main case, N=128 C=64 32x32 float32 NCHW BN):")
        for line in norm_report.format_targets(payload["targets"]):
            print("  " + line)
    load = payload["load"]
    if load["busy_rows"]:
        print(f"\nnote: the machine was loaded while {load['busy_rows']} of {load['rows']} rows were measured "
              f"(background up to {norm_report.format_cores(load['max'])})")


def write_results(payload: Dict[str, object], out: str, name: Optional[str], plot: bool) -> List[str]:
    """<out>/<name>.json, .md and (with ``plot``, when matplotlib is there) .png; the paths written."""
    os.makedirs(out, exist_ok=True)
    info = payload["machine"]
    stem = os.path.join(out, name or f"{info['device_name']}-{info['date']}")
    png = None
    if plot:
        try:
            norm_report.write_plot(stem + ".png", payload)
            png = os.path.basename(stem) + ".png"
        except ImportError as exc:  # matplotlib missing: results without the plot
            print(f"warning: no plot ({exc})", file=sys.stderr)
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1, default=str)
    norm_report.write_markdown(stem + ".md", payload, payload["command"], png)
    return [stem + ext for ext in (".md", ".json") + ((".png",) if png else ())]


def exit_status(payload: Dict[str, object]) -> int:
    """1 when one of our backends failed the guard or raised, else 0. A baseline that raises
    or differs is left out of the timing and reported, not fatal: torch.compile of the
    reference, for one, can fail or lose precision on some CPUs (see docs/benchmarks.md)."""
    results, ours = payload["cases"], payload["backends"]
    bad = [f"{r['case']['name']}: {n}" for r in results for n, s in r["impl_status"].items()
           if s in ("failed", "error") and n in ours]
    bad += [f"{r['case']['name']} {mode}: {n} raised" for r in results for mode, m in r["modes"].items()
            for n in m["errors"] if n in ours]
    excluded = [f"{r['case']['name']}: {n} ({s})" for r in results for n, s in r["impl_status"].items()
                if s in ("failed", "error") and n not in ours]
    if excluded:
        print("warning: baselines left out of the timing (see the notes in the results): " + "; ".join(excluded),
              file=sys.stderr)
    if bad:
        print("CORRECTNESS CHECK FAILED (not timed): " + "; ".join(bad))
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    payload = measure(args)
    if payload is None:  # --list
        return 0
    print_summary(payload)
    written = write_results(payload, args.out, args.name, plot=not args.no_plot)
    print(f"\nwrote {', '.join(os.path.basename(p) for p in written)} to {os.path.dirname(written[0]) or '.'} "
          f"({payload['elapsed_s']:.0f} s)")
    return exit_status(payload)


if __name__ == "__main__":
    sys.exit(main())
