"""Speed of domain-muxed batch normalization against what multi-domain code does without it.

For every case (a shape, a number of domains, pure or mixed batch, a memory layout) and
every mode (training forward, training forward+backward, eval forward) this times:

- our backends: "cpp" on the CPU ("cuda" / "triton" on a GPU, when built), and the
  "reference" backend (pure PyTorch) as an extra column;
- the case's baseline: native ``F.batch_norm`` for a pure batch (one domain), or the eager
  per-domain loop of existing multi-domain code for a mixed batch (for each domain present:
  select its samples, ``F.batch_norm`` them with that domain's weight/bias/running-stat rows,
  scatter the result back into the output);

and prints median times, ratios baseline/ours, effective bandwidth under a stated byte
model, and whether the issue's targets are met. It writes the same as markdown and JSON to
``--out`` as ``<device-name>-<YYYY-MM-DD>.md/.json``.

    python benchmarks/norm_speed.py --quick     # main case only, < 1 minute on 2 CPU cores
    python benchmarks/norm_speed.py             # + channels_last and ResNet-38 shapes

The module is meant to grow into the full suite: cases are data (:data:`MAIN_CASES`,
:data:`EXTRA_CASES`), baselines are functions (:data:`BASELINES`), modes are data
(:data:`MODES`), and :func:`time_callables` is the one timing helper.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import benchmark

HERE = os.path.dirname(os.path.abspath(__file__))
# Benchmark this checkout: with the repository root first on sys.path, `unirep_kernels` is
# the package beside this folder (and its built _C) even when the script runs from another
# folder or an editable install resolves the name differently.
sys.path.insert(0, os.path.dirname(HERE))

import unirep_kernels  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results")

MOMENTUM = 0.1
EPS = 1e-5
# Preallocated copies of every input that the timed calls cycle through, so consecutive
# calls do not find x (or dy) in cache: at least ROTATE copies and ROTATE_BYTES of x
# (3x the 32 MiB L3 of the 2-core development machine).
ROTATE = 3
ROTATE_BYTES = 96 * 2**20

# --------------------------------------------------------------------------------------
# Cases: data.


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    n: int
    c: int
    h: int
    w: int
    num_domains: int
    mixed: bool  # False: pure batch, domain given as the int 0; True: an int64 (N,) tensor
    channels_last: bool = False
    dtype: torch.dtype = torch.float32
    main: bool = False  # the case the targets are stated for

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def numel(self) -> int:
        return self.n * self.c * self.h * self.w

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def layout(self) -> str:
        return "NHWC" if self.channels_last else "NCHW"

    @property
    def baseline(self) -> str:
        return "eager_loop" if self.mixed else "native_bn"

    def describe(self) -> str:
        kind = f"D={self.num_domains} mixed" if self.mixed else f"D={self.num_domains} pure"
        dtype = str(self.dtype).replace("torch.", "")
        return f"N={self.n} C={self.c} {self.h}x{self.w} {dtype} {self.layout}, {kind}"


def _pair(name: str, n: int, c: int, h: int, w: int, channels_last: bool = False,
          main: bool = False) -> List[Case]:
    """A shape as a pure one-domain batch and a ten-domain mixed batch."""
    return [Case(f"{name}-pure-D1", n, c, h, w, 1, False, channels_last, main=main),
            Case(f"{name}-mixed-D10", n, c, h, w, 10, True, channels_last, main=main)]


# The main case: N=128, C=64, 32x32, float32, NCHW.
MAIN_CASES: List[Case] = _pair("main", 128, 64, 32, 32, main=True)
# Not with --quick: the main case in channels_last, and ResNet-38 shapes of the paper
# (64x64 inputs, N=128): stage widths 16 / 128 / 256 at 64x64 / 16x16 / 8x8.
EXTRA_CASES: List[Case] = (_pair("main-cl", 128, 64, 32, 32, channels_last=True)
                           + _pair("r38-c16", 128, 16, 64, 64)
                           + _pair("r38-c128", 128, 128, 16, 16)
                           + _pair("r38-c256", 128, 256, 8, 8))

# --------------------------------------------------------------------------------------
# Modes and the byte model.
#
# Bytes moved by the minimum algorithm, counted in units of x's size (N*C*H*W*itemsize);
# per-channel tables (weight, bias, statistics) are negligible and not counted:
# - train_fwd: read x for the statistics, read x again to normalize, write y   -> 3
#   (x does not fit in cache, so a two-pass batch norm must stream it twice)
# - eval_fwd: read x, write y (statistics are the running stats)                -> 2
# - backward alone: read dy and x for the reductions (sum dy, sum dy*(x-mean)),
#   read dy and x again for dx, write dx                                        -> 5
# - train_fwd_bwd: forward + backward                                           -> 8
# The copy bandwidth is counted the same way: dst.copy_(src) moves 2 units (read src,
# write dst; write-allocate traffic is not counted, here or there).
MODES: Dict[str, Dict[str, object]] = {
    "train_fwd": {"passes": 3, "training": True, "backward": False,
                  "title": "training forward (batch stats, running stats updated)"},
    "train_fwd_bwd": {"passes": 8, "training": True, "backward": True,
                      "title": "training forward + backward (grad of x, weight, bias)"},
    "eval_fwd": {"passes": 2, "training": False, "backward": False,
                 "title": "eval forward (running stats)"},
}

# --------------------------------------------------------------------------------------
# Inputs.


@dataclasses.dataclass
class Inputs:
    case: Case
    xs: List[Tensor]  # copies_for(case) copies, requires_grad, in the case's memory format
    dys: List[Tensor]  # as many upstream gradients, same format
    domain: Union[int, Tensor]
    weight: Tensor  # (D, C), requires_grad
    bias: Tensor  # (D, C), requires_grad
    running_mean: Tensor  # (D, C)
    running_var: Tensor  # (D, C)


def random_domains(n: int, num_domains: int, generator: torch.Generator) -> Tensor:
    """Random domain of every sample, with every domain present (needs n >= num_domains)."""
    d = torch.randint(0, num_domains, (n,), generator=generator)
    d[:num_domains] = torch.arange(num_domains)
    return d[torch.randperm(n, generator=generator)]


def copies_for(case: Case) -> int:
    return max(ROTATE, -(-ROTATE_BYTES // (case.numel * case.itemsize)))


def make_inputs(case: Case, device: torch.device, copies: Optional[int] = None, seed: int = 0) -> Inputs:
    copies = copies_for(case) if copies is None else copies
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format

    def tensor(scale: float = 1.0, offset: float = 0.0) -> Tensor:
        t = torch.randn(case.shape, generator=g) * scale + offset
        return t.to(device=device, dtype=case.dtype).contiguous(memory_format=fmt)

    xs = [tensor(2.0, 0.5).requires_grad_() for _ in range(copies)]
    dys = [tensor() for _ in range(copies)]
    d, c = case.num_domains, case.c
    domain: Union[int, Tensor] = random_domains(case.n, d, g).to(device) if case.mixed else 0
    weight = (1 + 0.1 * torch.randn(d, c, generator=g)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(d, c, generator=g)).to(device).requires_grad_()
    running_mean = (0.1 * torch.randn(d, c, generator=g)).to(device)
    running_var = (1 + 0.1 * torch.rand(d, c, generator=g)).to(device)
    return Inputs(case, xs, dys, domain, weight, bias, running_mean, running_var)


def fresh_stats(inp: Inputs) -> Inputs:
    """The same inputs with their own copy of the running stats (for the correctness check)."""
    return dataclasses.replace(inp, running_mean=inp.running_mean.clone(), running_var=inp.running_var.clone())


# --------------------------------------------------------------------------------------
# Implementations: ours (a backend of unirep_kernels) and the baselines. Each is a
# function (inputs, x, training) -> y that updates the running stats when training.

Impl = Callable[[Inputs, Tensor, bool], Tensor]


def ours(backend: str) -> Impl:
    def run(inp: Inputs, x: Tensor, training: bool) -> Tensor:
        return unirep_kernels.domain_batch_norm(
            x, inp.domain, inp.weight, inp.bias, inp.running_mean, inp.running_var,
            num_domains=inp.case.num_domains, use_batch_stats=training, momentum=MOMENTUM, eps=EPS,
            backend=backend)
    run.__name__ = backend
    return run


def native_bn(inp: Inputs, x: Tensor, training: bool) -> Tensor:
    """Native F.batch_norm with the rows of the batch's one domain (pure batches only)."""
    if not isinstance(inp.domain, int):
        raise ValueError("native_bn needs a pure batch (domain given as an int)")
    d = inp.domain
    return F.batch_norm(x, inp.running_mean[d], inp.running_var[d], inp.weight[d], inp.bias[d],
                        training=training, momentum=MOMENTUM, eps=EPS)


def eager_loop(inp: Inputs, x: Tensor, training: bool) -> Tensor:
    """What multi-domain code does without a fused kernel: one F.batch_norm per domain present.

    Selects each domain's samples by index, normalizes them with that domain's rows of
    weight / bias / running stats (the running-stat rows are views, so F.batch_norm updates
    them in place), and scatters the result back into the output.
    """
    domain = inp.domain
    if isinstance(domain, int):
        domain = torch.full((x.shape[0],), domain, dtype=torch.long, device=x.device)
    y = torch.empty_like(x)
    for d in torch.unique(domain).tolist():
        idx = (domain == d).nonzero(as_tuple=True)[0]
        yd = F.batch_norm(x.index_select(0, idx), inp.running_mean[d], inp.running_var[d], inp.weight[d],
                          inp.bias[d], training=training, momentum=MOMENTUM, eps=EPS)
        y.index_copy_(0, idx, yd)
    return y


BASELINES: Dict[str, Impl] = {"native_bn": native_bn, "eager_loop": eager_loop}
BASELINE_TITLES = {"native_bn": "native F.batch_norm", "eager_loop": "eager per-domain loop"}

# Our backends per device type, in the order they are reported; unavailable ones are skipped.
OUR_BACKENDS = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


def our_backends(device: torch.device) -> List[str]:
    status = unirep_kernels.backends()
    return [b for b in OUR_BACKENDS.get(device.type, ()) if status.get(b, (False, ""))[0]]


# --------------------------------------------------------------------------------------
# Timing.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class TimingPlan:
    """How long to measure each callable: ``rounds`` calls of
    ``Timer.blocked_autorange(min_run_time=min_run_time / rounds)``, after ``warmup`` calls."""
    min_run_time: float = 1.0
    rounds: int = 4
    warmup: int = 2


def time_callables(fns: Dict[str, Callable[[], object]], device: torch.device,
                   plan: TimingPlan) -> Dict[str, Dict[str, float]]:
    """Median time per call of every ``fn()`` in ms, measured interleaved.

    Every callable is warmed up; then, ``plan.rounds`` times, each callable in turn gets a
    ``torch.utils.benchmark.Timer.blocked_autorange`` of ``min_run_time / rounds`` seconds
    (which first calibrates its block size with an untimed call: a fresh warm-up after the
    switch). The result is the median over all blocks of the time per call. Interleaving
    (A B C A B C ...) spreads background load on a shared machine over all the callables
    alike, so their ratios stay fair. The thread count is the process's (Timer would
    otherwise pin it to 1). On CUDA, Timer synchronizes the device before every clock read,
    so a block's time covers its kernels, not just their launches.
    """
    for fn in fns.values():
        for _ in range(plan.warmup):
            fn()
    synchronize(device)
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
              for name, fn in fns.items()}
    blocks: Dict[str, List[float]] = {name: [] for name in fns}
    calls: Dict[str, int] = {name: 0 for name in fns}
    for _ in range(plan.rounds):
        for name, timer in timers.items():
            m = timer.blocked_autorange(min_run_time=plan.min_run_time / plan.rounds)
            blocks[name].extend(m.times)
            calls[name] += m.number_per_run * len(m.times)
    out = {}
    for name, ts in blocks.items():
        ts = sorted(ts)
        q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
        out[name] = {"median_ms": statistics.median(ts) * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3,
                     "min_ms": ts[0] * 1e3, "blocks": len(ts), "calls": calls[name]}
    return out


def time_callable(fn: Callable[[], object], device: torch.device, plan: TimingPlan) -> Dict[str, float]:
    """:func:`time_callables` for one callable."""
    return time_callables({"fn": fn}, device, plan)["fn"]


def configure_allocator(mode: str, device: torch.device) -> str:
    """Make output allocations cost the same in every column (CPU, glibc).

    glibc serves blocks of 32 MiB and more (x of the main case) with a fresh mmap, so every
    new output pays a page fault per 4 KiB page (here ~25 ms per 32 MiB, more than the
    kernel itself), while smaller blocks come from a heap whose state depends on what ran
    before: results would then depend on the order of the cases. "reuse" turns mmap off and
    keeps freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB), so outputs reuse warm
    memory as they would with a caching allocator; "system" leaves the allocator alone.
    """
    if mode == "system" or device.type != "cpu":
        return "system"
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        if libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1:
            return "reuse"
    except (OSError, AttributeError):
        pass
    print("warning: --alloc reuse needs glibc's mallopt; using the system allocator as is", file=sys.stderr)
    return "system (reuse unavailable)"


def _alloc_text(ms: float) -> str:
    if ms < 0.5:
        return "no measurable extra cost for a fresh output"
    return f"every op returning a new x-sized tensor pays ~{ms:.1f} ms to get and first touch it, in every column"


def _extension_text(ext: Optional[Dict[str, object]]) -> str:
    return "unknown" if not ext else f"`{ext['path']}` built {ext['built_utc']} (sha256 {ext['sha256']})"


def _cores(v: Optional[float]) -> str:
    return "unknown" if v is None else f"{v:.2f} cores"


IDLE_CORES = 0.25  # other processes' CPU use below which the machine counts as idle
MAX_ATTEMPTS = 3  # measurements of one mode on a busy machine, with --wait-idle


def wait_idle(timeout: float, probe_seconds: float = 1.0) -> Tuple[float, Optional[float]]:
    """Sleep until other processes use less than IDLE_CORES cores (or ``timeout`` passes);
    returns the seconds waited and the last background load seen."""
    start = time.perf_counter()
    while True:
        load = LoadMonitor.probe(probe_seconds)
        waited = time.perf_counter() - start
        if load is None or load < IDLE_CORES or waited >= timeout:
            return max(0.0, waited - probe_seconds), load


class LoadMonitor:
    """CPU time that other processes used while a block of work ran, in cores (Linux)."""

    @classmethod
    def probe(cls, seconds: float = 1.0) -> Optional[float]:
        """Background load over the next ``seconds`` while this process sleeps."""
        monitor = cls()
        time.sleep(seconds)
        return monitor.background_cores()

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def background_cores(self) -> Optional[float]:
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        return max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / wall) if wall > 0 else None


def time_quietly(fns: Dict[str, Callable[[], object]], device: torch.device, plan: TimingPlan,
                 wait_idle_s: float = 0.0) -> Tuple[Dict[str, Dict[str, float]], Optional[float], int]:
    """:func:`time_callables`, recording the background load meanwhile. With ``wait_idle_s``
    > 0, first wait for an idle machine, and measure again (up to MAX_ATTEMPTS times) when
    other processes used more than IDLE_CORES cores; the quietest attempt is kept.
    Returns (times, background cores, attempts)."""
    best = None
    for attempt in range(MAX_ATTEMPTS if wait_idle_s > 0 else 1):
        if wait_idle_s > 0:
            wait_idle(wait_idle_s)
        monitor = LoadMonitor()
        times = time_callables(fns, device, plan)
        load = monitor.background_cores()
        if best is None or (load is not None and (best[1] is None or load < best[1])):
            best = (times, load, attempt + 1)
        if load is None or load < IDLE_CORES:
            break
    return best


def rotating(fn: Callable[[int], object], copies: int) -> Callable[[], object]:
    """fn(k) for k = 0, 1, ..., copies-1, 0, 1, ... on successive calls."""
    state = [0]

    def call() -> object:
        k = state[0]
        state[0] = (k + 1) % copies
        return fn(k)
    return call


def mode_step(impl: Impl, inp: Inputs, mode: str) -> Callable[[int], object]:
    """One timed call of ``impl`` in ``mode`` on the k-th copy of the inputs."""
    spec = MODES[mode]
    params = (inp.weight, inp.bias)
    if spec["backward"]:
        def step(k: int) -> object:
            x = inp.xs[k]
            y = impl(inp, x, True)
            return torch.autograd.grad(y, (x,) + params, inp.dys[k])  # no .grad accumulation
    elif spec["training"]:
        def step(k: int) -> object:
            with torch.enable_grad():  # as in training: the graph is recorded
                return impl(inp, inp.xs[k], True)
    else:
        def step(k: int) -> object:
            with torch.no_grad():
                return impl(inp, inp.xs[k], False)
    return step


def copy_bandwidth(case: Case, device: torch.device, plan: TimingPlan, wait_idle_s: float = 0.0) -> Dict[str, float]:
    """dst.copy_(src) of tensors of x's size, rotating over copies; GB/s = 2 * size / time.

    Also the same copy into a freshly allocated output (``torch.empty_like(src).copy_(src)``),
    which is what every op returning a new tensor pays: the difference is the cost of
    getting and first touching x-sized memory from the allocator.
    """
    srcs = [torch.randn(case.numel, device=device).to(case.dtype) for _ in range(ROTATE)]
    dsts = [torch.empty_like(s) for s in srcs]
    t, load, attempts = time_quietly({
        "copy": rotating(lambda k: dsts[k].copy_(srcs[(k + 1) % ROTATE]), ROTATE),
        "alloc_copy": rotating(lambda k: torch.empty_like(srcs[k]).copy_(srcs[(k + 1) % ROTATE]), ROTATE),
    }, device, dataclasses.replace(plan, warmup=max(plan.warmup, 3)), wait_idle_s)
    out = dict(t["copy"])
    out["background_cores"], out["attempts"] = load, attempts
    size = case.numel * case.itemsize
    out["bytes"] = 2 * size
    out["gbps"] = 2 * size / (out["median_ms"] * 1e-3) / 1e9
    out["alloc_copy_ms"] = t["alloc_copy"]["median_ms"]
    out["alloc_ms"] = t["alloc_copy"]["median_ms"] - out["median_ms"]
    return out


# --------------------------------------------------------------------------------------
# Correctness: every implementation must compute the same thing as the baseline.


def _compare(name: str, got: Tensor, want: Tensor, tol: float) -> Dict[str, object]:
    got, want = got.detach().double(), want.detach().double()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    return {"what": name, "max_abs_err": err, "scale": scale, "ok": bool(err <= tol * scale)}


def check_case(inp: Inputs, impls: Dict[str, Impl], baseline: str, tol: float = 1e-4) -> Dict[str, object]:
    """Compare every implementation with the baseline once: train forward (y and updated
    running stats), its backward (dx, dweight, dbias), and eval forward."""
    x, dy = inp.xs[0], inp.dys[0]
    outs = {}
    for name, impl in impls.items():
        own = fresh_stats(inp)
        y = impl(own, x, True)
        grads = torch.autograd.grad(y, (x, inp.weight, inp.bias), dy)
        with torch.no_grad():
            y_eval = impl(inp, x, False)
        outs[name] = {"y_train": y, "running_mean": own.running_mean, "running_var": own.running_var,
                      "dx": grads[0], "dweight": grads[1], "dbias": grads[2], "y_eval": y_eval}
    report: Dict[str, object] = {"reference_impl": baseline, "tol": tol, "impls": {}}
    ok = True
    for name, out in outs.items():
        if name == baseline:
            continue
        rows = [_compare(k, out[k], outs[baseline][k], tol) for k in out]
        fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        layout_ok = all(out[k].is_contiguous(memory_format=fmt) for k in ("y_train", "dx", "y_eval"))
        ok = ok and layout_ok and all(r["ok"] for r in rows)
        report["impls"][name] = {"ok": layout_ok and all(r["ok"] for r in rows), "checks": rows}
    report["ok"] = ok
    return report


# --------------------------------------------------------------------------------------
# Running a case.


def run_case(case: Case, device: torch.device, backends: Sequence[str], plan: TimingPlan,
             wait_idle_s: float = 0.0, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Check, then time every implementation in every mode.

    With ``wait_idle_s`` > 0 (a shared machine), each mode first waits for an idle machine,
    and is measured again (up to MAX_ATTEMPTS times) when other processes used more than
    IDLE_CORES cores meanwhile; the attempt with the least background load is kept.
    """
    inp = make_inputs(case, device)
    baseline = case.baseline
    impls: Dict[str, Impl] = {b: ours(b) for b in backends}
    impls["reference"] = ours("reference")
    impls[baseline] = BASELINES[baseline]
    t0 = time.perf_counter()
    # Our compiled backends against the baseline; the reference backend is the oracle the
    # test suite checks, so it is timed here but not checked again.
    check = check_case(inp, {n: f for n, f in impls.items() if n != "reference"}, baseline)
    log(f"  {case.name:<18} checked against {baseline} ({time.perf_counter() - t0:.1f} s): "
        + ("ok" if check["ok"] else "MISMATCH"))
    if not check["ok"]:
        log(f"  !! {case.name}: results differ from {baseline}: "
            + json.dumps({k: v for k, v in check["impls"].items() if not v["ok"]}))
    size = case.numel * case.itemsize
    result: Dict[str, object] = {
        "case": dataclasses.asdict(case) | {"dtype": str(case.dtype).replace("torch.", ""),
                                            "layout": case.layout, "description": case.describe(),
                                            "x_bytes": size},
        "baseline": baseline, "check": check, "modes": {}}
    for mode, spec in MODES.items():
        t0 = time.perf_counter()
        nbytes = spec["passes"] * size
        row: Dict[str, object] = {"bytes": nbytes, "times": {}, "ratios": {}, "ratios_of_min": {}}
        row["times"], row["background_cores"], row["attempts"] = time_quietly(
            {name: rotating(mode_step(impl, inp, mode), len(inp.xs)) for name, impl in impls.items()},
            device, plan, wait_idle_s)
        for t in row["times"].values():
            t["gbps"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
        base = row["times"][baseline]
        for name in impls:
            if name != baseline:
                row["ratios"][name] = base["median_ms"] / row["times"][name]["median_ms"]
                # Fastest block against fastest block: closer to an idle machine when busy.
                row["ratios_of_min"][name] = base["min_ms"] / row["times"][name]["min_ms"]
        result["modes"][mode] = row
        log(f"  {case.name:<18} {mode:<14} " + "  ".join(
            f"{n} {row['times'][n]['median_ms']:.2f} ms" for n in impls)
            + f"  ({time.perf_counter() - t0:.1f} s, background {_cores(row['background_cores'])})")
    loads = [m["background_cores"] for m in result["modes"].values() if m["background_cores"] is not None]
    result["background_cores"] = max(loads) if loads else None  # the busiest of the kept measurements
    if result["background_cores"] is not None and result["background_cores"] > IDLE_CORES:
        log(f"  warning: other processes used {result['background_cores']:.2f} cores while {case.name} was timed")
    return result


# --------------------------------------------------------------------------------------
# Targets of the issue (main case).


def evaluate_targets(results: List[Dict[str, object]], primary: Optional[str]) -> List[Dict[str, object]]:
    """One domain: no slower than native F.batch_norm (ratio >= 1). Ten domains mixed: at
    least 3x faster than the eager loop. Judged on the main case (NCHW), per mode."""
    targets = []
    if primary is None:
        return targets
    for r in results:
        case = r["case"]
        if not case["main"] or case["channels_last"]:
            continue
        if case["mixed"]:
            goal, text = 3.0, f"D={case['num_domains']} mixed: >= 3x faster than the eager per-domain loop"
        else:
            goal, text = 1.0, f"D={case['num_domains']} pure: no slower than native F.batch_norm"
        for mode in MODES:
            times = r["modes"][mode]["times"]
            ratio = r["modes"][mode]["ratios"][primary]
            # Relative uncertainty of the ratio from both medians' half interquartile ranges.
            spread = ratio * sum((times[n]["iqr_ms"] / 2 / times[n]["median_ms"]) ** 2
                                 for n in (primary, r["baseline"])) ** 0.5
            targets.append({"case": case["name"], "target": text, "mode": mode, "backend": primary,
                            "ratio": ratio, "ratio_spread": spread,
                            "ratio_of_min": r["modes"][mode]["ratios_of_min"][primary],
                            "background_cores": r["modes"][mode]["background_cores"],
                            "goal": goal, "met": bool(ratio >= goal),
                            "within_noise": bool(abs(ratio - goal) <= spread)})
    return targets


# --------------------------------------------------------------------------------------
# Machine info and output.


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
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type


def git_revision() -> Optional[str]:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        return rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def extension_build() -> Optional[Dict[str, object]]:
    """Which build of unirep_kernels._C was timed: path, modification time, sha256 prefix."""
    ext = getattr(unirep_kernels, "_C", None)
    path = getattr(ext, "__file__", None)
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return {"path": os.path.relpath(path, os.path.dirname(HERE)), "built_utc": mtime.isoformat(timespec="seconds"),
            "sha256": digest}


def machine_info(device: torch.device) -> Dict[str, object]:
    info = {
        "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "unirep_kernels": getattr(unirep_kernels, "__version__", None), "git": git_revision(),
        "extension": extension_build(),
        "backends": {k: {"available": v[0], "reason": v[1]} for k, v in unirep_kernels.backends().items()},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def impl_order(result: Dict[str, object]) -> List[str]:
    names = list(result["modes"]["train_fwd"]["times"])
    return [n for n in names if n != result["baseline"]] + [result["baseline"]]


def format_table(results: List[Dict[str, object]], copy_gbps: float, markdown: bool) -> str:
    """One row per (case, mode): time of every implementation, ratios baseline/ours, and the
    effective bandwidth of ours and of the baseline."""
    ours_names = [n for n in impl_order(results[0]) if n not in BASELINES]
    head = (["case", "mode"] + [f"{n} ms" for n in ours_names] + ["baseline", "base ms"]
            + [f"base/{n}" for n in ours_names]
            + [f"{ours_names[0]} GB/s", "% copy", "base GB/s", "bg cores"])
    rows = []
    for r in results:
        for mode, m in r["modes"].items():
            t = m["times"]
            base = r["baseline"]
            first = t[ours_names[0]]
            rows.append([r["case"]["name"], mode] + [f"{t[n]['median_ms']:.2f}" for n in ours_names]
                        + [base, f"{t[base]['median_ms']:.2f}"]
                        + [f"{m['ratios'][n]:.2f}x" for n in ours_names]
                        + [f"{first['gbps']:.1f}", f"{100 * first['gbps'] / copy_gbps:.0f}%",
                           f"{t[base]['gbps']:.1f}",
                           "?" if m["background_cores"] is None else f"{m['background_cores']:.2f}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w)  # noqa: E731
                                for i, (v, w) in enumerate(zip(row, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows]
    return "\n".join(lines)


def format_targets(targets: List[Dict[str, object]]) -> List[str]:
    lines = []
    for t in targets:
        lines.append(f"{t['target']} [{t['mode']}, {t['backend']}]: {t['ratio']:.2f}x "
                     f"+- {t['ratio_spread']:.2f} (goal {t['goal']:.0f}x) -> {'MET' if t['met'] else 'NOT MET'}"
                     + (" (within noise)" if t["within_noise"] else "")
                     + f"; fastest/fastest {t['ratio_of_min']:.2f}x")
    return lines


BYTE_MODEL = ("Bytes moved by the minimum algorithm, in units of x's size: train_fwd 3 (read x for the "
              "statistics, read x again to normalize, write y); eval_fwd 2 (read x, write y); "
              "train_fwd_bwd 8 (forward 3 + backward 5: read dy and x for the reductions, read both again "
              "for dx, write dx). Per-channel tables are not counted. GB/s = bytes / median time; "
              "'% copy' compares with dst.copy_(src) of x's size (counted as 2 units).")


def write_markdown(path: str, info: Dict[str, object], copy: Dict[str, float], results, targets,
                   args: argparse.Namespace, plan: TimingPlan, elapsed: float) -> None:
    cases = "\n".join(f"- `{r['case']['name']}`: {r['case']['description']}; baseline "
                      f"{BASELINE_TITLES[r['baseline']]}; check vs baseline "
                      f"{'ok' if r['check']['ok'] else 'FAILED'}; background load while timed: at most "
                      f"{_cores(r['background_cores'])}" for r in results)
    backends = ", ".join(f"{k}: {'yes' if v['available'] else 'no'} ({v['reason']})"
                         for k, v in info["backends"].items())
    text = f"""# Domain batch norm speed: {info['device_name']}, {info['date']}

Generated by `{shlex.join(['python', 'benchmarks/norm_speed.py'] + args.argv)}`
(device {info['device']}, {elapsed:.0f} s).

- Machine: {info['cpu_model']}, {info['cpu_count']} CPUs, torch {info['torch']} with \
{info['torch_threads']} threads, Python {info['python']}, {info['platform']}{
    f", GPU {info['gpu']} (CUDA {info['cuda']})" if 'gpu' in info else ''}
- Code: git {info['git']} (plus any uncommitted changes), unirep_kernels {info['unirep_kernels']}, extension \
{_extension_text(info['extension'])}
- Backends: {backends}
- Copy bandwidth (dst.copy_(src), {copy['bytes'] / 2 / 2**20:.0f} MiB): {copy['gbps']:.1f} GB/s \
(median {copy['median_ms']:.2f} ms). The same copy into a freshly allocated output: \
{copy['alloc_copy_ms']:.2f} ms ({_alloc_text(copy['alloc_ms'])}). Background load meanwhile: \
{_cores(copy['background_cores'])}.
- Allocator: {info['allocator']} (`--alloc`; "reuse": freed memory is kept and reused, as with a caching \
allocator, so no column pays page faults for its outputs)
- Background load (CPU used by other processes) before the run: {_cores(info['background_cores_at_start'])}
- Timing: torch.utils.benchmark.Timer.blocked_autorange, {plan.rounds} round(s) of \
{plan.min_run_time / plan.rounds:.2g} s per implementation, interleaved between implementations (A B C A B C ...),
  median over blocks, after {plan.warmup} warm-up call(s); inputs rotated over preallocated copies (at least \
{ROTATE}, and at least {ROTATE_BYTES // 2**20} MiB of x); gradients with torch.autograd.grad (no .grad accumulation).
  Weight, bias and running stats are (D, C).
- {BYTE_MODEL}
- Ratios are baseline time / our time: above 1 means ours is faster. "bg cores": CPU time that other
  processes used while that row was measured (the development machine is shared); rows measured on a
  busy machine are noisy, and the eager loop, made of many small multi-threaded ops, suffers most.

## Cases

{cases}

## Times (median, ms)

{format_table(results, copy['gbps'], markdown=True)}

## Targets (main case, N=128 C=64 32x32 float32 NCHW)

{chr(10).join('- ' + line for line in format_targets(targets)) or '- (no backend of ours to judge)'}
"""
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time domain-muxed batch norm (our backends and the reference backend) against native "
                    "F.batch_norm (one domain, pure batch) and the eager per-domain loop (mixed batch), in "
                    "training forward, training forward+backward and eval forward. Prints a table and writes "
                    "<device-name>-<YYYY-MM-DD>.md and .json to --out.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="only the main case (N=128 C=64 32x32 float32 NCHW, D=1 pure and D=10 mixed) with shorter "
                         "timing runs; finishes in under a minute on 2 CPU cores. Without it, also the "
                         "channels_last main case and ResNet-38 shapes (C=16 at 64x64, C=128 at 16x16, C=256 at "
                         "8x8), and longer timing runs.")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="folder for the markdown and JSON results, created if missing (default: benchmarks/results "
                         "beside this script)")
    ap.add_argument("--device", default="cpu",
                    help="'cpu' (times the cpp backend), or 'cuda' / 'cuda:N' when a GPU is available (times the "
                         "cuda and triton backends that are built; CUDA work is synchronized before every clock "
                         "read). Result files are named 'cpu' or after the slugified GPU name (default: cpu).")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="on a shared machine: before each measurement, wait up to SECONDS for other processes "
                         f"to use less than {IDLE_CORES} cores, and measure again (up to {MAX_ATTEMPTS} times) "
                         "when they used more meanwhile; the load seen is recorded either way (default 0: do not "
                         "wait)")
    ap.add_argument("--alloc", choices=("reuse", "system"), default="reuse",
                    help="CPU output allocations: 'reuse' keeps freed memory and never mmaps (glibc mallopt), so "
                         "outputs reuse warm memory in every column as with a caching allocator; 'system' leaves "
                         "glibc alone, which adds a page fault per 4 KiB of every fresh output of 32 MiB or more "
                         "(default: reuse)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds of timed calls per implementation and mode, split over interleaved rounds "
                         "(default: 0.3 with --quick, 1.2 otherwise)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.min_run_time is None:
        args.min_run_time = 0.3 if args.quick else 1.2
    if args.min_run_time <= 0:
        ap.error("--min-run-time must be positive")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"--device: {exc}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available in this torch build / machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.device = device
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device: torch.device = args.device
    start = time.perf_counter()
    torch.manual_seed(0)
    allocator = configure_allocator(args.alloc, device)
    info = machine_info(device)
    info["allocator"] = allocator
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE",
                                             "GLIBC_TUNABLES", "UNIREP_BACKEND") if k in os.environ}
    backends = our_backends(device)
    if not backends:
        print(f"warning: none of {OUR_BACKENDS.get(device.type)} is available on {device}; timing the reference "
              f"backend and baselines only", file=sys.stderr)
    cases = MAIN_CASES + ([] if args.quick else EXTRA_CASES)
    print(f"{info['cpu_model']}, torch {info['torch']}, {info['torch_threads']} threads, device {device}, "
          f"backends {backends + ['reference']}, allocator {allocator}")
    plan = TimingPlan(min_run_time=args.min_run_time, rounds=1 if args.quick else 4,
                      warmup=0 if args.quick else 2)  # with --quick the check and calibration calls warm up
    info["background_cores_at_start"] = LoadMonitor.probe()
    copy = copy_bandwidth(MAIN_CASES[0], device, plan, args.wait_idle)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['bytes'] / 2 / 2**20:.0f} MiB in "
          f"{copy['median_ms']:.2f} ms, background {_cores(copy['background_cores'])}); {_alloc_text(copy['alloc_ms'])}")
    results = []
    for case in cases:
        results.append(run_case(case, device, backends, plan, args.wait_idle))
    primary = backends[0] if backends else None
    targets = evaluate_targets(results, primary)
    elapsed = time.perf_counter() - start

    print()
    print(BYTE_MODEL)
    print()
    print(format_table(results, copy["gbps"], markdown=False))
    print()
    print("Targets (main case, N=128 C=64 32x32 float32 NCHW):")
    for line in format_targets(targets):
        print("  " + line)
    failed = [r["case"]["name"] for r in results if not r["check"]["ok"]]
    if failed:
        print(f"CORRECTNESS CHECK FAILED for {failed}: see 'check' in the JSON")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{info['device_name']}-{info['date']}")
    payload = {"machine": info, "options": {"quick": args.quick, "timing": dataclasses.asdict(plan),
                                            "alloc": args.alloc,
                                            "wait_idle_s": args.wait_idle,
                                            "rotate_copies_min": ROTATE, "rotate_bytes_min": ROTATE_BYTES,
                                            "momentum": MOMENTUM, "eps": EPS},
               "byte_model": BYTE_MODEL, "copy_bandwidth": copy, "cases": results, "targets": targets,
               "elapsed_s": elapsed}
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    write_markdown(stem + ".md", info, copy, results, targets, args, plan, elapsed)
    print(f"\nwrote {stem}.md and {stem}.json ({elapsed:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
