"""Ahead-of-time compile, without a GPU, of every Triton kernel the launchers would launch
on a 132-SM GPU (H100/H200) for sm_90 and sm_80, over a fixed list of realistic shapes
(benchmarks/triton_resources.py: ResNet-38 at batch 128, 7x7 and 14x14 planes, 1x1 heads,
small batches; float32/bfloat16/float16; NCHW and channels_last; BN training forward,
eval forward and backward, IN forward and backward). Fails on a compile error or on any
register spill, with the table of kernel, tile, registers and spills in the report.

The launches are recorded from the launchers themselves (their geometry code, on meta
tensors), then compiled by triton's own JIT under a stand-in driver; registers and spills
come from triton's ptxas -v. About a minute of CPU time (52-58 s under triton 3.6 and 3.9 on
2026-12-01, a 2-core VM), in two compiler processes.
Skipped without triton (or with TRITON_INTERPRET set) unless UNIREP_REQUIRE_TRITON_COMPILE=1,
which .ci/run sets so that CI cannot pass by skipping it.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

REQUIRED = os.environ.get("UNIREP_REQUIRE_TRITON_COMPILE") == "1"
if not REQUIRED:
    pytest.importorskip("triton")
import triton  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import triton_resources as tr  # noqa: E402

ARCHS = (90, 80)


def _skip_reason():
    from unirep_kernels.triton.kernels import interpreting

    if interpreting():
        return "TRITON_INTERPRET is set: the GPU kernels are not built"
    if "nvidia" not in triton.backends.backends:
        return "this triton has no NVIDIA backend (ptxas)"
    return None


@pytest.fixture(scope="module")
def compiled():
    reason = _skip_reason()
    if reason:
        (pytest.fail if REQUIRED else pytest.skip)(reason)
    cases = tr.default_cases()
    start = time.perf_counter()
    results = tr.compile_cases(cases, tr.H100_H200_SMS, ARCHS, workers=min(2, os.cpu_count() or 1))
    seconds = time.perf_counter() - start
    print(f"\ntriton {triton.__version__}: {len(cases)} op calls compiled in {seconds:.0f} s\n{tr.summary(results)}\n"
          f"{tr.table(results)}")
    return cases, results


def test_every_launch_compiles(compiled):
    cases, results = compiled
    errors = [f"sm_{r.arch} {r.kernel} {r.tile} ({r.cases[0]}): {r.error}" for r in results if r.error]
    assert not errors, "\n".join(errors)
    launches = len(tr.record(cases))
    for arch in ARCHS:
        assert sum(len(r.cases) for r in results if r.arch == arch) == launches  # every launch, every arch


def test_no_register_spills(compiled):
    _, results = compiled
    spilling = [f"sm_{r.arch} {r.kernel} {r.dtype} tile {r.tile} warps {r.num_warps}: {r.registers} registers, "
                f"spill {r.spill_stores}/{r.spill_loads} bytes ({r.cases[0]})" for r in results if r.spills]
    assert not spilling, "\n".join(spilling)
    assert all(0 < r.registers <= 255 for r in results)


def test_every_kernel_and_path_is_covered(compiled):
    """The list reaches every kernel, the fused and the two-pass training forward, both
    layouts and all three dtypes, on each arch."""
    cases, results = compiled
    for arch in ARCHS:
        rs = [r for r in results if r.arch == arch]
        assert {r.kernel for r in rs} == {"_moments", "_affine", "_bn_train_fused", "_grad_sums", "_input_grad"}
        assert {r.dtype for r in rs} == {"fp32", "bf16", "fp16"}
    trains = {str(c) for c in cases if c.op == "bn-train"}
    fused = {case for r in results if r.kernel == "_bn_train_fused" for case in r.cases}
    two_pass = {case for r in results if r.kernel == "_moments" for case in r.cases} & trains
    assert fused and two_pass and fused.isdisjoint(two_pass)
    assert {c.layout for c in cases} == {"nchw", "cl"}


def test_parse_ptxas_report():
    log = ("ptxas info    : Compiling entry function '_affine' for 'sm_90a'\n"
           "ptxas info    : Function properties for _affine\n"
           "    160 bytes stack frame, 156 bytes spill stores, 152 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 160 bytes cumulative stack size\n")
    assert tr.parse_ptxas(log) == (255, 160, 156, 152)
    with pytest.raises(ValueError, match="unexpected ptxas"):
        tr.parse_ptxas("ptxas info    : Used 40 registers\n")
