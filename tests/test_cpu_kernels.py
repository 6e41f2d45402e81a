"""The C++ CPU kernels beyond the op grids: every instruction-set build they select, the
non-temporal store path, and bitwise determinism at 1 and 2 threads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import (CPU_BACKENDS, assert_low_precision, cast_params, clone_stats, make_case, results_with_grads,
                      run_bn, run_in)
import cpu_kernel_outputs

pytestmark = pytest.mark.skipif(not CPU_BACKENDS, reason="the C++ CPU kernels are not built")

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = torch.backends.cpu.get_cpu_capability()  # the instruction set this process runs
# The kernel builds an ATEN_CPU_CAPABILITY value selects, where this CPU supports it.
CAPABILITIES = {"DEFAULT": ["default"], "AVX2": ["default", "avx2"],
                "AVX512": ["default", "avx2", "avx512"]}.get(NATIVE, ["default"])


def _start(tmp_path, capability, stream):
    """Starts cpu_kernel_outputs.py in a fresh process with this ISA and store mode; returns
    (process, where it writes its results)."""
    out = tmp_path / f"{capability}-{stream}.pt"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, UNIREP_CPU_STREAM_STORES=stream)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "cpu_kernel_outputs.py"), str(out)], env=env,
                            stderr=subprocess.PIPE, text=True)
    return proc, out


def _reference_results():
    """{case name: (exact float64 results, PyTorch's low-precision results or None)}."""
    refs = {}
    for name, case, g, mode, kw in cpu_kernel_outputs.cases():
        run = run_in if mode == "in" else run_bn
        exact = results_with_grads(run, dict(case, x=case["x"].double()), "reference", g.double(), **kw)
        half = case["x"].dtype in (torch.float16, torch.bfloat16)
        refs[name] = (exact, results_with_grads(run, case, "reference", g, **kw) if half else None, case["x"].dtype)
    return refs


def _check_against_reference(results, refs, what):
    """Every output of every case against reference.py: float64 to 1e-10, float32 to 1e-4
    (relative to the output's scale), half types by the low-precision criterion."""
    for name, (exact, low, dtype) in refs.items():
        for key, want in exact.items():
            got = results[name][key]
            if key in ("y", "dx"):
                assert got.dtype == dtype, f"{what}: {name} {key} has dtype {got.dtype}"
            if low is not None:
                assert_low_precision(got, low[key], want, dtype, f"{what}: {name} {key}")
            else:
                tol = 1e-10 if dtype == torch.float64 else 1e-4
                scale = max(1.0, want.abs().max().item())
                err = (got.double() - want).abs().max().item()
                assert err <= tol * scale, f"{what}: {name} {key}: max abs err {err:.3g} (scale {scale:.3g})"


def _check_conversions(outputs, what):
    """Bitwise what torch computes, NaN for NaN (payloads may differ)."""
    for name, x in cpu_kernel_outputs.conversion_inputs().items():
        got, want = outputs[name], cpu_kernel_outputs.conversion_expected(x)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), f"{what}: {name}: NaN where torch has none, or the reverse"
        same = got.view(torch.int16) == want.view(torch.int16)
        assert bool((same | nan).all()), (f"{what}: {name}: {int((~same & ~nan).sum())} of {x.numel()} bit patterns "
                                          f"differ, e.g. x={x.flatten()[~same.flatten() & ~nan.flatten()][:3]}")


def test_every_instruction_set_and_streaming_store(tmp_path):
    """Each kernel build (baseline, AVX2, AVX-512: as many as this CPU runs) with
    non-temporal stores forced on matches reference.py, converts every float16 and bfloat16
    value to float and back exactly as torch does, and streaming changes no bit."""
    started = {cap: _start(tmp_path, cap, "always") for cap in CAPABILITIES}
    here = cpu_kernel_outputs.outputs()  # this process: native ISA, small outputs, regular stores
    refs = _reference_results()
    streamed = {}
    for cap, (proc, out) in started.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={cap}: {err[-2000:]}"
        streamed[cap] = torch.load(out)
    _check_against_reference(here, refs, f"{NATIVE} in this process")
    _check_conversions(cpu_kernel_outputs.conversion_outputs(), f"{NATIVE} in this process")
    for cap, saved in streamed.items():
        _check_against_reference(saved["cases"], refs, f"ATEN_CPU_CAPABILITY={cap}, streaming stores")
        _check_conversions(saved["conversions"], f"ATEN_CPU_CAPABILITY={cap}, streaming stores")
    streamed = {cap: saved["cases"] for cap, saved in streamed.items()}
    native = NATIVE.lower() if NATIVE.lower() in streamed else "default"
    for name in here:
        for key in here[name]:
            assert torch.equal(here[name][key], streamed[native][name][key]), \
                f"{native}: {name} {key} differs between regular and streaming stores"


def test_bad_stream_store_setting_is_a_clear_error():
    env = dict(os.environ, UNIREP_CPU_STREAM_STORES="sometimes")
    code = ("import torch, unirep_kernels as uk\n"
            "uk.domain_instance_norm(torch.randn(2, 3, 4, 4), 0, num_domains=1, backend='cpp')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "UNIREP_CPU_STREAM_STORES must be auto, always or never, got 'sometimes'" in proc.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op", ["bn-mixed", "bn-pure", "in"])
def test_results_do_not_depend_on_thread_count(op, channels_last, dtype):
    """Fixed-order reductions, one writer per output: y, the running stats and every
    gradient are bitwise equal with 1 thread and with 2 (large enough for several tasks per
    parallel loop)."""
    case = make_case(n=64, c=24, spatial=(12, 12), num_domains=5, mixed=op != "bn-pure",
                     stats=None if op == "in" else "domain", channels_last=channels_last, seed=5)
    case = dict(case, x=case["x"].to(dtype))
    for key in ("weight", "bias", "running_mean", "running_var"):
        if case[key] is not None:
            case[key] = case[key].float()
    g = torch.randn(case["x"].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    run, kw = (run_in, dict(relu=True)) if op == "in" else (run_bn, dict(use_batch_stats=True, relu=True))
    outs = []
    threads = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            outs.append(results_with_grads(run, clone_stats(case), "cpp", g, **kw))
        finally:
            torch.set_num_threads(threads)
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), f"{key} differs between 1 and 2 threads"


def _bn_training_matches_float64(case, g, dtype):
    """BN training forward and backward (fused ReLU) of the C++ kernels on ``case`` in
    ``dtype`` against reference.py in float64: 1e-4 of the scale in float32, the
    low-precision criterion in half types."""
    kw = dict(use_batch_stats=True, relu=True)
    exact = results_with_grads(run_bn, case, "reference", g, **kw)
    low_case = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
    got = results_with_grads(run_bn, low_case, "cpp", g.to(dtype), **kw)
    if dtype == torch.float32:
        for key, want in exact.items():
            err = (got[key].double() - want).abs().max().item()
            assert err <= 1e-4 * max(1.0, want.abs().max().item()), f"{key}: max abs err {err:.3g}"
    else:
        low = results_with_grads(run_bn, low_case, "reference", g.to(dtype), **kw)
        for key, want in exact.items():
            assert_low_precision(got[key], low[key], want, dtype, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("spatial", [(8, 8), (64, 64)])
def test_batch_norm_training_forward_in_memory_order_and_by_channel(spatial, dtype):
    """The NCHW training forward walks planes of fewer than kChannelWalkPlaneBytes (8 KiB)
    in memory order, larger ones channel by channel (norm_passes.h): 8x8 takes the first,
    64x64 the second (16 KiB in float32, 8 KiB in float16). Both match reference.py."""
    case = make_case(n=10, c=3, spatial=spatial, num_domains=3, mixed=True, stats="domain", seed=13)
    g = torch.randn(case["x"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _bn_training_matches_float64(case, g, dtype)


@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_one_value_maps_take_the_rows_walk(use_batch_stats):
    """(N, C, 1, 1), e.g. features after global pooling, is walked as (N, C) rows (one
    vectorized pass over C per sample), not as N * C planes of one value: bitwise the results
    of the same values given as (N, C), and PyTorch's for one domain."""
    import torch.nn.functional as F
    case = make_case(n=64, c=37, spatial=(1, 1), num_domains=1, mixed=False, stats="domain", seed=5)
    case = cast_params(dict(case, x=case["x"].float()), torch.float32)
    rows = dict(case, x=case["x"].reshape(64, 37))
    g = torch.randn(64, 37, generator=torch.Generator().manual_seed(2))
    kw = dict(use_batch_stats=use_batch_stats)
    four = results_with_grads(run_bn, case, "cpp", g.view(64, 37, 1, 1), **kw)
    two = results_with_grads(run_bn, rows, "cpp", g, **kw)
    for key in four:
        assert torch.equal(four[key].reshape(two[key].shape), two[key]), key
    x = case["x"].clone().requires_grad_()
    w, b = case["weight"][0].clone().requires_grad_(), case["bias"][0].clone().requires_grad_()
    rm, rv = case["running_mean"][0].clone(), case["running_var"][0].clone()
    y = F.batch_norm(x, rm, rv, w, b, training=use_batch_stats)
    y.backward(g.view(64, 37, 1, 1))
    torch.testing.assert_close(four["y"], y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(four["dx"], x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(four["dweight"].reshape(-1), w.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(four["dbias"].reshape(-1), b.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", ["pure", "sorted", "mixed"])
def test_batch_norm_backward_over_runs_of_one_domain(batch, dtype):
    """The NCHW backward sums each run of consecutive samples of one domain in one set of
    vector registers, cut into pieces of kSumValues values (norm_passes.h). 7x7 planes (a
    partial last vector), 200 samples: a run of one domain spans three pieces, and runs of
    a sorted or shuffled mixed batch start and end anywhere. Every gradient matches
    reference.py in float64."""
    case = make_case(n=200, c=3, spatial=(7, 7), num_domains=3, mixed=batch != "pure", stats="domain", seed=11)
    if batch == "sorted":
        order = torch.argsort(case["domain"], stable=True)
        case = dict(case, x=case["x"][order].contiguous(), domain=case["domain"][order])
    g = torch.randn(case["x"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _bn_training_matches_float64(case, g, dtype)
