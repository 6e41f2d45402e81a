"""Ahead-of-time compile of every Triton kernel the launchers would launch on a GPU, without
a GPU: registers and spills per kernel specialisation, from triton's own ``ptxas -v``.

    python benchmarks/triton_resources.py            # sm_90 and sm_80, 132 SMs; writes
                                                     # benchmarks/results/triton-resources-<triton version>.md
    python benchmarks/triton_resources.py --arch 90 --out -   # print only

How: the Triton ops run on meta tensors (no memory, no device) inside
``unirep_kernels.triton._ops.record_launches(sm_count)``, which records each launch (kernel,
grid, arguments, constexprs, num_warps) with the launchers' own geometry for a GPU of that
many SMs instead of launching. Each recorded launch is then compiled with
``JITFunction.warmup`` (triton's own argument specialisation: dtypes, 16-byte divisibility
of sizes and strides, ints equal to 1) under a stand-in driver that reports
``GPUTarget("cuda", arch, 32)`` and nothing else, into an empty private cache so that every
specialisation runs ptxas; triton prints ptxas's ``-v`` report when
``knobs.nvidia.dump_ptxas_log`` is set, and that report gives registers, stack frame and
spill bytes. Launches with the same specialisation compile once.

tests/test_triton_compile.py runs the same cases and asserts no compile error and no spill.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import os
import platform
import re
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402

from unirep_kernels.triton import _ops  # noqa: E402

H100_H200_SMS = 132
ARCHS = (90, 80)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
NUM_DOMAINS = 3

# ResNet-38 (the paper's, widths x1 = 32-64-128-256, stem 16, 64x64 input) at batch 128:
# the input of every normalization layer.
RESNET38_B128 = [(128, 16, 64, 64), (128, 32, 64, 64), (128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8)]
# ResNet-50-style layers (224x224 input): 7x7 and 14x14 planes, and the 1x1 head.
RESNET50 = [(64, 512, 7, 7), (128, 512, 7, 7), (64, 256, 14, 14), (256, 2048, 1, 1)]
# Small batches (a pure-domain slice of a mixed step, a tiny per-GPU batch).
SMALL = [(8, 64, 8, 8), (2, 256, 8, 8), (32, 128, 16, 16), (16, 32, 64, 64)]
SHAPES = RESNET38_B128 + RESNET50 + SMALL


@dataclass(frozen=True)
class Case:
    """One op call: ``op`` in bn-train, bn-eval, bn-backward, in (forward and backward)."""
    op: str
    shape: Tuple[int, ...]
    layout: str  # "nchw" or "cl" (channels_last)
    dtype: str

    def __str__(self) -> str:
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"


OPS = ("bn-train", "bn-eval", "bn-backward", "in")


def default_cases(dtypes=("fp32", "bf16", "fp16")) -> List[Case]:
    """Every op x shape x layout x dtype of the fixed list (1x1 planes: NCHW only, where
    both layouts are the same tensor)."""
    cases = []
    for op, shape, layout, dtype in itertools.product(OPS, SHAPES, ("nchw", "cl"), dtypes):
        if layout == "cl" and shape[2] * shape[3] == 1:
            continue
        cases.append(Case(op, shape, layout, dtype))
    return cases


def _meta(shape, dtype, layout="nchw"):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if layout == "cl" else t


def run_case(case: Case) -> None:
    """The op call of ``case`` on meta tensors, through the Triton custom ops (the model's
    configuration: per-domain statistics, scale and bias, fused ReLU; a pure batch)."""
    dtype = DTYPES[case.dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, c = case.shape[:2]
    x = _meta(case.shape, dtype, case.layout)
    w = torch.empty((NUM_DOMAINS, c), dtype=acc, device="meta")
    ops = torch.ops.unirep_triton
    if case.op == "bn-train":
        ops.domain_batch_norm_forward(x, None, 1, w, w, None, None, NUM_DOMAINS, True, True, 1e-5, True)
    elif case.op == "bn-eval":
        ops.domain_batch_norm_forward(x, None, 1, w, w, w, w, NUM_DOMAINS, False, True, 1e-5, True)
    elif case.op == "bn-backward":
        mean = torch.empty((NUM_DOMAINS, c), dtype=acc, device="meta")
        count = torch.empty((NUM_DOMAINS,), dtype=acc, device="meta")
        ops.domain_batch_norm_backward(_meta(case.shape, dtype, case.layout), x, None, 1, w, w, mean, mean, count,
                                       NUM_DOMAINS, True, True, 1e-5, True)
    elif case.op == "in":
        ops.domain_instance_norm_forward(x, None, 1, w, w, NUM_DOMAINS, 1e-5, True)
        stats = torch.empty((n, c), dtype=acc, device="meta")
        ops.domain_instance_norm_backward(_meta(case.shape, dtype, case.layout), x, None, 1, w, w, stats, stats,
                                          NUM_DOMAINS, 1e-5, True)
    else:
        raise ValueError(f"unknown op {case.op!r}")


def record(cases: List[Case], sm_count: int = H100_H200_SMS) -> List[Tuple[Case, tuple]]:
    """(case, launch) for every kernel launch the cases make on a GPU of ``sm_count`` SMs."""
    out = []
    for case in cases:
        with _ops.record_launches(sm_count) as launches:
            run_case(case)
        if not launches:
            raise AssertionError(f"{case}: no kernel launch recorded")
        out.extend((case, launch) for launch in launches)
    return out


class StandInDriver:
    """The three things ``JITFunction.run(warmup=True)`` asks of a driver: a device key, a
    stream, and the target. Nothing is loaded or launched. A fresh device key per instance
    gives fresh in-process kernel caches."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"aot-sm{arch}-{uuid.uuid4().hex[:8]}"

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@dataclass
class Result:
    """One compiled specialisation (launches with the same one share it)."""
    arch: int
    kernel: str
    dtype: str
    tile: str
    num_warps: int
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    error: Optional[str] = None
    cases: List[str] = field(default_factory=list)
    seconds: float = 0.0
    key: str = ""  # triton's hash of the compiled kernel (or the error)

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)


_REGS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> Tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) from a ``ptxas -v`` report of one
    entry function."""
    regs, frame = _REGS.findall(log), _FRAME.findall(log)
    if len(regs) != 1 or len(frame) != 1:
        raise ValueError(f"unexpected ptxas -v report:\n{log}")
    stack, stores, loads = map(int, frame[0])
    return int(regs[0]), stack, stores, loads


def _tile(meta: dict) -> str:
    dims = [meta[k] for k in ("BLOCK_N", "BLOCK_C", "BLOCK_S") if k in meta]
    return "x".join(map(str, dims))


def _int_class(v: int) -> str:
    return "1" if v == 1 else ("16" if v % 16 == 0 else "")


def specialisation_groups(recorded: List[Tuple[Case, tuple]]) -> List[List[int]]:
    """Indices of the recorded launches grouped by (kernel, constexprs, num_warps, tensor
    dtypes, which ints are 1 or multiples of 16): launches in one group compile to the
    same kernel, as far as triton's specialisation goes (triton still decides: each group
    compiles in one process, whose JIT cache tells the specialisations apart)."""
    groups: Dict[tuple, List[int]] = {}
    for i, (_, (kernel, _grid, args, meta)) in enumerate(recorded):
        fixed = [getattr(p, "do_not_specialize", False) for p in kernel.params]
        sig = tuple("-" if dns else str(a.dtype) if isinstance(a, torch.Tensor) else
                    (_int_class(a) if isinstance(a, int) and not isinstance(a, bool) else repr(a))
                    for a, dns in zip(args, fixed))
        groups.setdefault((kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in meta.items())), sig),
                          []).append(i)
    return list(groups.values())


def _compile(recorded: List[Tuple[Case, tuple]], indices: List[int], archs) -> List[Result]:
    """Compile the given recorded launches for each arch in this process; one Result per
    distinct (arch, compiled kernel)."""
    results: List[Result] = []
    for arch in archs:
        by_hash: Dict[str, Result] = {}
        stand_in = StandInDriver(arch)
        previous = driver._active  # not .active: on a machine without a GPU that raises
        with tempfile.TemporaryDirectory(prefix="unirep-triton-aot-") as cache, triton.knobs.cache.scope(), \
                triton.knobs.nvidia.scope(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice
            triton.knobs.cache.dir = cache  # empty: every specialisation runs ptxas, which reports
            triton.knobs.nvidia.dump_ptxas_log = True
            driver.set_active(stand_in)
            try:
                for i in indices:
                    case, (kernel, grid, args, meta) = recorded[i]
                    wargs = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
                    name = kernel.fn.__name__
                    log = io.StringIO()
                    start = time.perf_counter()
                    try:
                        with contextlib.redirect_stdout(log):
                            compiled = kernel.warmup(*wargs, grid=grid, **meta)
                    except Exception as e:  # a compile error is a result, reported per specialisation
                        text = str(e).strip()
                        message = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
                        key = f"error:{name}:{sorted(meta.items())}:{message}"
                        res = by_hash.setdefault(key, Result(arch, name, case.dtype, _tile(meta),
                                                             meta.get("num_warps", 4), error=message, key=key))
                        res.cases.append(str(case))
                        continue
                    res = by_hash.get(compiled.hash)
                    if res is None:
                        regs, stack, stores, loads = parse_ptxas(log.getvalue())
                        res = Result(arch, name, case.dtype, _tile(meta), compiled.metadata.num_warps, regs, stores,
                                     loads, stack, seconds=time.perf_counter() - start, key=compiled.hash)
                        by_hash[compiled.hash] = res
                    res.cases.append(str(case))
            finally:
                driver._active = previous
        results.extend(by_hash.values())
    return results


def _compile_share(cases: List[Case], sm_count: int, archs, groups: List[int]) -> List[Result]:
    """A worker process: record the cases again (deterministic) and compile its groups."""
    recorded = record(cases, sm_count)
    all_groups = specialisation_groups(recorded)
    return _compile(recorded, [i for g in groups for i in all_groups[g]], archs)


def compile_cases(cases: List[Case], sm_count: int = H100_H200_SMS, archs=ARCHS, workers: int = 1) -> List[Result]:
    """Record the cases' launches and compile them for each arch, in ``workers`` processes
    (each specialisation group in one of them); one Result per distinct specialisation."""
    recorded = record(cases, sm_count)
    groups = specialisation_groups(recorded)
    if workers <= 1:
        parts = _compile(recorded, [i for g in groups for i in g], archs)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        shares = [list(range(w, len(groups), workers)) for w in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_compile_share, cases, sm_count, tuple(archs), share) for share in shares]
            parts = [r for f in futures for r in f.result()]
    merged: Dict[Tuple[int, str], Result] = {}
    for r in parts:  # the same kernel compiled in two workers (groups coarser than triton's): one row
        if (r.arch, r.key) in merged:
            merged[(r.arch, r.key)].cases.extend(r.cases)
        else:
            merged[(r.arch, r.key)] = r
    return list(merged.values())


def table(results: List[Result]) -> str:
    """Markdown table, one row per specialisation."""
    lines = ["| arch | kernel | x dtype | tile | warps | registers | spill bytes (st/ld) | stack | launches | "
             "example |",
             "|---|---|---|---|---|---:|---|---:|---:|---|"]
    for r in sorted(results, key=lambda r: (-r.arch, r.kernel, r.dtype, r.tile, r.num_warps)):
        if r.error:
            lines.append(f"| sm_{r.arch} | {r.kernel} | {r.dtype} | {r.tile} | {r.num_warps} | ERROR | {r.error} | | "
                         f"{len(r.cases)} | {r.cases[0]} |")
        else:
            lines.append(f"| sm_{r.arch} | {r.kernel} | {r.dtype} | {r.tile} | {r.num_warps} | {r.registers} | "
                         f"{r.spill_stores}/{r.spill_loads} | {r.stack} | {len(r.cases)} | {r.cases[0]} |")
    return "\n".join(lines)


def summary(results: List[Result]) -> str:
    lines = []
    for arch in sorted({r.arch for r in results}, reverse=True):
        rs = [r for r in results if r.arch == arch]
        ok = [r for r in rs if not r.error]
        spilling = [r for r in ok if r.spills]
        lines.append(f"sm_{arch}: {len(rs)} specialisations, {len(rs) - len(ok)} compile errors, "
                     f"{len(spilling)} spilling, max {max((r.registers for r in ok), default=0)} registers")
    return "\n".join(lines)


def report(results: List[Result], cases: List[Case], sm_count: int, seconds: float) -> str:
    archs = sorted({r.arch for r in results}, reverse=True)
    launches = sum(len(r.cases) for r in results) // max(1, len(archs))
    return "\n".join([
        f"# Triton kernel resources (triton {triton.__version__})",
        "",
        f"Ahead-of-time compile, no GPU: `python benchmarks/triton_resources.py` on "
        f"{datetime.date.today().isoformat()}, {platform.machine()} CPU, torch {torch.__version__}. Launch geometry "
        f"for a {sm_count}-SM GPU (H100/H200), as the launchers in unirep_kernels/triton/_ops.py plan it. "
        f"{len(cases)} op calls ({', '.join(OPS)}; shapes {', '.join('x'.join(map(str, s)) for s in SHAPES)}; "
        f"NCHW and channels_last; {', '.join(sorted({c.dtype for c in cases}))}; per-domain statistics and affine, "
        f"fused ReLU) make {launches} launches, compiled for {', '.join(f'sm_{a}' for a in archs)}; each row is "
        f"one distinct specialisation (registers, stack frame and spill bytes from triton's own `ptxas -v`). Compile time "
        f"{seconds:.0f} s.",
        "",
        "```",
        summary(results),
        "```",
        "",
        table(results),
        "",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 90 and 80)")
    parser.add_argument("--sm-count", type=int, default=H100_H200_SMS)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="compiler processes (default: 2, or 1 on a 1-core machine)")
    parser.add_argument("--fp64", action="store_true", help="add float64 inputs (reported, may spill)")
    parser.add_argument("--out", default=None,
                        help="markdown output ('-' to print only; default "
                             "benchmarks/results/triton-resources-<triton version>.md)")
    args = parser.parse_args(argv)
    archs = tuple(args.arch) if args.arch else ARCHS
    cases = default_cases(("fp32", "bf16", "fp16", "fp64") if args.fp64 else ("fp32", "bf16", "fp16"))
    start = time.perf_counter()
    results = compile_cases(cases, args.sm_count, archs, args.workers)
    text = report(results, cases, args.sm_count, time.perf_counter() - start)
    print(text)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"triton-resources-{triton.__version__}.md")
    if out != "-":
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}", file=sys.stderr)
    bad = [r for r in results if r.error or (r.spills and r.dtype != "fp64")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
