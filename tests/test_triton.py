"""The Triton backend against reference.py: a small version of the reference grid.

On CUDA tensors when CUDA is available; otherwise on CPU tensors under TRITON_INTERPRET=1,
which this module turns on for its own tests only (the interpreter runs programs one by one
in numpy: shapes stay tiny). Every BN test runs the three code paths of the training
forward: "fused" (one read: the channel's batch slice held on chip) and "two-pass" (moments,
then the affine pass); "split" (tiny tiles and several spatial blocks per plane, so the
chunk loops and the fixed-order merge of partials run) has tests of its own.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

pytest.importorskip("triton")

import unirep_kernels as uk  # noqa: E402
from conftest import (HAS_CUDA, cast_params, clone_stats, compare_bn, make_case, output_and_grads,  # noqa: E402
                      run_bn, run_in)

backends_mod = __import__("unirep_kernels.backends", fromlist=["resolve_backend"])

DEVICE = "cuda" if HAS_CUDA else "cpu"
AFFINES = [("domain", "domain"), ("universal", "universal"), ("domain", "universal"), (None, None)]
BATCHES = ["pure", "mixed", "mixed-absent"]


@pytest.fixture(autouse=True)
def _interpreter():
    """TRITON_INTERPRET=1 for the duration of each test when there is no GPU."""
    if HAS_CUDA:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _set_path(mp, path):
    from unirep_kernels.triton import _ops, geometry

    if path in ("two-pass", "split"):
        mp.setattr(geometry, "FUSED_MAX_ELEMENTS", 0)
    if path == "split":
        mp.setattr(geometry, "MAX_BLOCK_S", 4)
        mp.setattr(geometry, "TILE_ELEMENTS", 8)
        mp.setattr(_ops, "_sm_count", lambda device: 1 << 18)


@pytest.fixture(params=["fused", "two-pass"])
def path(request, monkeypatch):
    """The training forward's two paths; "split" (slow under the interpreter: many programs)
    has its own tests below."""
    _set_path(monkeypatch, request.param)
    return request.param


@pytest.fixture
def in_path(monkeypatch):
    _set_path(monkeypatch, "two-pass")
    return "two-pass"


def _bn_case(shape, num_domains, batch, weight, bias, stats, seed, **kw):
    n, c, spatial = shape
    absent = 1 if (batch == "mixed-absent" and num_domains > 1) else None
    return make_case(n=n, c=c, spatial=spatial, num_domains=num_domains, mixed=batch != "pure", absent=absent,
                     weight=weight, bias=bias, stats=stats, seed=seed, device=DEVICE, **kw)


# ---------------------------------------------------------------------------------------
# Batch norm (BN, BN+: use_batch_stats at eval is the same call).

BN_SHAPES = [(6, 3, (4, 3)), (5, 2, (1, 1)), (4, 3, (5,)), (6, 2, ()), (4, 2, (2, 3, 2))]


@pytest.mark.parametrize("num_domains", [1, 3])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_bn_forward_matches_reference_float64(path, shape, num_domains, batch):
    modes = [(u, p, r) for u, p, r in itertools.product([True, False], [True, False], [False, True])
             if u or p]  # per-domain grouping is irrelevant with running stats: one of the two
    for seed, (use_batch_stats, per_domain, relu) in enumerate(modes):
        weight, bias = AFFINES[seed % len(AFFINES)]
        stats = ["domain", "universal", None][seed % 3]
        if not use_batch_stats and stats is None:
            stats = "domain"
        channels_last = len(shape[2]) >= 2 and seed % 2 == 1
        case = _bn_case(shape, num_domains, batch, weight, bias, stats, seed, channels_last=channels_last)
        y = compare_bn(case, "triton", atol=1e-10, rtol=1e-10, use_batch_stats=use_batch_stats, stats_per_domain=per_domain,
                        relu=relu, momentum=0.3)
        if channels_last and shape[2] != (1, 1):
            assert y.stride() == case["x"].stride()


def test_bn_non_dense_input(path):
    case = _bn_case((6, 6, (4, 5)), 3, "mixed", "domain", "domain", "domain", 0)
    case["x"] = case["x"][:, ::2, :, 1:]
    for key in ("weight", "bias", "running_mean", "running_var"):
        case[key] = case[key][:, ::2]
    compare_bn(case, "triton", atol=1e-10, rtol=1e-10, use_batch_stats=False)
    compare_bn(case, "triton", atol=1e-10, rtol=1e-10, use_batch_stats=True)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_backward_matches_reference_float64(path, batch, channels_last):
    combos = list(itertools.product([True, False], [True, False], [False, True]))
    for seed, (use_batch_stats, per_domain, relu) in enumerate(combos):
        weight, bias = AFFINES[seed % len(AFFINES)]
        stats = ["domain", "universal"][seed % 2]
        case = _bn_case((6, 3, (3, 4)), 4, batch, weight, bias, stats, seed, channels_last=channels_last)
        grads = [output_and_grads(run_bn, case, name, seed, use_batch_stats=use_batch_stats,
                                  stats_per_domain=per_domain, relu=relu)[1:] for name in ("triton", "reference")]
        for mine, ref in zip(*grads):
            assert mine.shape == ref.shape and mine.dtype == ref.dtype
            torch.testing.assert_close(mine, ref, atol=1e-9, rtol=1e-9)
        if channels_last:
            assert grads[0][0].stride() == case["x"].stride()
        if batch == "mixed-absent" and weight == "domain":
            assert torch.count_nonzero(grads[0][1][1]) == 0  # absent domain: zero weight-grad row
            assert torch.count_nonzero(grads[0][1][0]) > 0


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_float32_matches_float64_reference(path, batch, channels_last):
    for seed, (stats, per_domain, use_batch_stats) in enumerate(itertools.product(
            ["domain", "universal"], [True, False], [True, False])):
        case = _bn_case((8, 4, (5, 5)), 3, batch, "domain", "universal", stats, seed, channels_last=channels_last)
        case32 = clone_stats(cast_params(dict(case, x=case["x"].float()), torch.float32))
        ref = clone_stats(case)
        kw = dict(use_batch_stats=use_batch_stats, stats_per_domain=per_domain, relu=True)
        y = run_bn(case32, "triton", **kw)
        y_ref = run_bn(ref, "reference", **kw)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(case32["running_var"].double(), ref["running_var"], atol=1e-5, rtol=1e-5)


def _half_criterion(y, y_lowprec_ref, y_ref, dtype):
    """|ours - ref64| <= 2 |pytorch_lowprec - ref64| + eps (1 + |ref64|), elementwise."""
    eps = torch.finfo(dtype).eps
    err = (y.double() - y_ref).abs()
    bound = 2 * (y_lowprec_ref.double() - y_ref).abs() + eps * (1 + y_ref.abs())
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_bn_half_precision_criterion(path, dtype, channels_last, use_batch_stats):
    case = _bn_case((8, 4, (5, 5)), 3, "mixed-absent", "domain", "domain", "domain", 7, channels_last=channels_last)
    low = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
    ref64 = clone_stats(dict(case, x=low["x"].double()))
    kw = dict(use_batch_stats=use_batch_stats, relu=True)
    y = run_bn(clone_stats(low), "triton", **kw)
    y_torch = run_bn(clone_stats(low), "reference", **kw)
    y_ref = run_bn(ref64, "reference", **kw)
    assert y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    _half_criterion(y, y_torch, y_ref, dtype)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", ["pure", "mixed"])
def test_bn_large_offset_is_stable(path, channels_last, batch):
    """x = 1e4 + randn in float32: the naive E[x^2] - E[x]^2 fails this."""
    case = _bn_case((8, 3, (8, 8)), 3, batch, "domain", "domain", "domain", 3, offset=1e4,
                    channels_last=channels_last)
    case32 = clone_stats(cast_params(dict(case, x=case["x"].float()), torch.float32))
    ref = clone_stats(dict(case, x=case32["x"].double()))
    y = run_bn(case32, "triton", use_batch_stats=True, momentum=1.0)
    y_ref = run_bn(ref, "reference", use_batch_stats=True, momentum=1.0)
    torch.testing.assert_close(y.double(), y_ref, atol=3e-3, rtol=0)
    torch.testing.assert_close(case32["running_var"].double(), ref["running_var"], atol=0, rtol=1e-4)
    torch.testing.assert_close(case32["running_mean"].double(), ref["running_mean"], atol=2e-3, rtol=0)
    xf = case32["x"].float().transpose(0, 1).reshape(3, -1)
    naive_var = (xf * xf).mean(1) - xf.mean(1) ** 2
    true_var = case32["x"].double().transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
    assert ((naive_var.double() - true_var).abs() > 1e-2).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bn_backward_low_precision(path, dtype):
    case = _bn_case((8, 4, (4, 4)), 3, "mixed", "domain", "domain", "domain", 11)
    low = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
    results = []
    for name, c in (("triton", clone_stats(low)), ("reference", clone_stats(dict(case, x=low["x"].double())))):
        x = c["x"].detach().clone().requires_grad_()
        w = c["weight"].detach().clone().requires_grad_()
        y = uk.domain_batch_norm(x, c["domain"], w, c["bias"], c["running_mean"], c["running_var"],
                                 num_domains=3, use_batch_stats=True, backend=name)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y)
        results.append(torch.autograd.grad(y, (x, w), g))
    (gx, gw), (gx_ref, gw_ref) = results
    assert gx.dtype == dtype and gw.dtype == torch.float32
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(gx.double(), gx_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gw.double(), gw_ref, atol=tol * 10, rtol=tol)


def test_bn_results_are_reproducible(path):
    """Fixed-order reductions, no atomics: two runs agree bitwise."""
    case = _bn_case((8, 3, (4, 4)), 3, "mixed", "domain", "domain", "domain", 5)
    x = case["x"].float().requires_grad_()
    outs = []
    for _ in range(2):
        c = clone_stats(cast_params(case, torch.float32))
        y = run_bn(dict(c, x=x), "triton", use_batch_stats=True)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) + x.detach())
        outs.append((y.detach(), gx, c["running_var"]))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Instance norm.

IN_SHAPES = [(4, 3, (4, 3)), (5, 2, (1, 2)), (3, 3, (5,)), (3, 2, (2, 3, 2))]


@pytest.mark.parametrize("num_domains", [1, 3])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", IN_SHAPES)
def test_in_forward_and_backward_match_reference_float64(in_path, shape, num_domains, batch):
    for seed, ((weight, bias), relu) in enumerate(itertools.product(AFFINES, [False, True])):
        channels_last = len(shape[2]) >= 2 and seed % 2 == 0
        n, c, spatial = shape
        case = make_case(n=n, c=c, spatial=spatial, num_domains=num_domains, mixed=batch != "pure",
                         absent=1 if batch == "mixed-absent" and num_domains > 1 else None, weight=weight, bias=bias,
                         stats=None, seed=seed, channels_last=channels_last, device=DEVICE)
        results = [output_and_grads(run_in, case, name, seed, relu=relu) for name in ("triton", "reference")]
        for mine, ref in zip(*results):
            torch.testing.assert_close(mine, ref, atol=1e-10, rtol=1e-10)
        if channels_last:
            assert results[0][0].stride() == case["x"].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_in_low_precision(in_path, dtype, channels_last):
    case = make_case(n=4, c=3, spatial=(6, 6), num_domains=3, weight="domain", bias="domain", stats=None, seed=3,
                     channels_last=channels_last, device=DEVICE)
    low = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
    y = run_in(low, "triton", relu=True)
    y_torch = run_in(low, "reference", relu=True)
    y_ref = run_in(dict(case, x=low["x"].double()), "reference", relu=True)
    assert y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    else:
        _half_criterion(y, y_torch, y_ref, dtype)
    x = low["x"].detach().clone().requires_grad_()
    w = low["weight"].detach().clone().requires_grad_()
    gx, gw = torch.autograd.grad(run_in(dict(low, x=x, weight=w), "triton", relu=True).float().sum(), (x, w))
    assert gx.dtype == dtype and gw.dtype == torch.float32 and torch.isfinite(gx.float()).all()


def test_in_large_offset(in_path):
    case = make_case(n=4, c=2, spatial=(16, 16), num_domains=2, weight="domain", bias="domain", stats=None,
                     offset=1e4, seed=1, device=DEVICE)
    low = cast_params(dict(case, x=case["x"].float()), torch.float32)
    y = run_in(low, "triton")
    y_ref = run_in(dict(case, x=low["x"].double()), "reference")
    torch.testing.assert_close(y.double(), y_ref, atol=3e-3, rtol=0)


# ---------------------------------------------------------------------------------------
# Registration and backend selection.


def test_ops_are_registered_with_the_cpp_signatures():
    import unirep_kernels.triton  # noqa: F401

    for name in ("domain_batch_norm_forward", "domain_batch_norm_backward", "domain_instance_norm_forward",
                 "domain_instance_norm_backward"):
        mine = getattr(torch.ops.unirep_triton, name).default._schema
        assert mine.name == f"unirep_triton::{name}"
        if uk.backends()["cpp"][0]:
            theirs = getattr(torch.ops.unirep, name).default._schema
            # Same argument names and types (Python ints infer as SymInt).
            assert [a.name for a in mine.arguments] == [a.name for a in theirs.arguments]
            assert len(mine.returns) == len(theirs.returns)


@pytest.mark.parametrize("mixed", [True, False])
def test_opcheck(mixed):
    import unirep_kernels.triton  # noqa: F401

    case = make_case(n=4, c=3, spatial=(3, 2), num_domains=3, mixed=mixed, weight="domain", bias="universal",
                     dtype=torch.float32, seed=8, device=DEVICE)
    x = case["x"].requires_grad_()
    w = case["weight"].float().requires_grad_()
    b = case["bias"].float().requires_grad_()
    domain = case["domain"] if mixed else None
    pure = -1 if mixed else case["domain"]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = (x, domain, pure, w, b, None, None, 3, True, True, 1e-5, True)
    torch.library.opcheck(torch.ops.unirep_triton.domain_batch_norm_forward, args, test_utils=utils)
    y, mean, var, count = torch.ops.unirep_triton.domain_batch_norm_forward(*args)
    torch.library.opcheck(torch.ops.unirep_triton.domain_batch_norm_backward,
                          (torch.randn_like(y), x.detach(), domain, pure, w.detach(), b.detach(), mean, var, count, 3,
                           True, True, 1e-5, True), test_utils=utils)
    args = (x, domain, pure, w, b, 3, 1e-5, False)
    torch.library.opcheck(torch.ops.unirep_triton.domain_instance_norm_forward, args, test_utils=utils)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", ["mixed", "mixed-absent"])
def test_split_path_bn(monkeypatch, channels_last, batch):
    """Spatial blocks merged across programs, several chunks per program, tiny tiles."""
    _set_path(monkeypatch, "split")
    for seed, (use_batch_stats, per_domain, relu) in enumerate([(True, True, True), (True, False, False),
                                                                (False, True, True)]):
        weight, bias = AFFINES[seed]
        case = _bn_case((4, 3, (5, 4)), 3, batch, weight, bias, "domain", seed, channels_last=channels_last)
        compare_bn(case, "triton", atol=1e-10, rtol=1e-10, use_batch_stats=use_batch_stats, stats_per_domain=per_domain,
                    relu=relu, momentum=0.3)
        grads = []
        for name in ("triton", "reference"):
            c = clone_stats(case)
            x = c["x"].detach().clone().requires_grad_()
            y = run_bn(dict(c, x=x), name, use_batch_stats=use_batch_stats, stats_per_domain=per_domain, relu=relu)
            grads.append(torch.autograd.grad(y, x, torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
                                             .to(y.device))[0])
        torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-9)
    # float32 with a large offset through the merge of partials
    case = _bn_case((4, 2, (6, 5)), 2, batch, "domain", "domain", "domain", 9, offset=1e4, channels_last=channels_last)
    case32 = clone_stats(cast_params(dict(case, x=case["x"].float()), torch.float32))
    ref = clone_stats(dict(case, x=case32["x"].double()))
    y = run_bn(case32, "triton", use_batch_stats=True, momentum=1.0)
    y_ref = run_bn(ref, "reference", use_batch_stats=True, momentum=1.0)
    torch.testing.assert_close(y.double(), y_ref, atol=3e-3, rtol=0)
    torch.testing.assert_close(case32["running_var"].double(), ref["running_var"], atol=0, rtol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_split_path_in(monkeypatch, channels_last):
    _set_path(monkeypatch, "split")
    case = make_case(n=3, c=3, spatial=(5, 4), num_domains=2, weight="domain", bias="universal", stats=None, seed=4,
                     channels_last=channels_last, device=DEVICE)
    results = []
    for name in ("triton", "reference"):
        x = case["x"].detach().clone().requires_grad_()
        w = case["weight"].detach().clone().requires_grad_()
        y = run_in(dict(case, x=x, weight=w), name, relu=True)
        results.append((y,) + torch.autograd.grad(y, (x, w), torch.cos(y.detach())))
    for mine, ref in zip(*results):
        torch.testing.assert_close(mine, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(4, 24, (7, 7)), (4, 200, (3, 3)), (3, 6, (14, 14))])
def test_geometry_planned_for_a_gpu(monkeypatch, shape, channels_last):
    """The tiles a 132-SM GPU gets (7x7 planes in runs of 8, spatial splits, the fused
    forward with one channel per program, tiles shrunk to fill the grid), run here under
    the interpreter: BN forward (the path geometry.fused_tiles picks) and backward, IN."""
    from unirep_kernels.triton import _ops, geometry

    monkeypatch.setattr(_ops, "_sm_count", lambda device: 132)
    n, c, spatial = shape
    s = spatial[0] * spatial[1]
    sc = 1 if channels_last else s
    fused = geometry.fused_tiles(n, c, s, sc, 8, 132)
    assert (fused is not None) == (c == 200)  # both paths of the training forward run here
    for seed, (weight, bias) in enumerate(AFFINES[:2]):
        case = _bn_case(shape, 3, "mixed-absent", weight, bias, "domain", seed, channels_last=channels_last)
        compare_bn(case, "triton", atol=1e-10, rtol=1e-10, use_batch_stats=True, relu=True, momentum=0.3)
        grads = [output_and_grads(run_bn, case, name, seed, use_batch_stats=True, relu=True)[1:]
                 for name in ("triton", "reference")]
        for mine, ref in zip(*grads):
            torch.testing.assert_close(mine, ref, atol=1e-9, rtol=1e-9)
        case["running_mean"] = case["running_var"] = None
        results = [output_and_grads(run_in, case, name, seed, relu=True) for name in ("triton", "reference")]
        for mine, ref in zip(*results):
            torch.testing.assert_close(mine, ref, atol=1e-10, rtol=1e-10)


def test_gradcheck_batch_norm():
    case = make_case(n=4, c=2, spatial=(3,), num_domains=2, weight="domain", bias="universal", seed=5,
                     device=DEVICE)
    x = case["x"].detach().requires_grad_()
    w = case["weight"].detach().requires_grad_()
    b = case["bias"].detach().requires_grad_()
    f = lambda x, w, b: uk.domain_batch_norm(x, case["domain"], w, b, num_domains=2, use_batch_stats=True,  # noqa
                                             relu=True, backend="triton")
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_double_backward_is_refused():
    x = make_case(n=4, c=2, spatial=(3,), num_domains=1, mixed=False, seed=6, device=DEVICE)["x"].requires_grad_()
    y = uk.domain_batch_norm(x, 0, num_domains=1, use_batch_stats=True, backend="triton")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_backend_status_and_selection():
    status, reason = uk.backends()["triton"]
    assert status, reason
    dev = torch.device(DEVICE)
    assert backends_mod.resolve_backend("triton", dev) == "triton"
    with uk.use_backend("triton"):
        assert backends_mod.resolve_backend(None, dev) == "triton"
    if not HAS_CUDA:
        assert "TRITON_INTERPRET=1" in reason
        assert backends_mod.resolve_backend("auto", dev) != "triton"  # never auto on the CPU (interpreter)


def test_auto_on_cuda_prefers_cuda_then_triton(monkeypatch):
    from dataclasses import replace

    cuda = torch.device("cuda")
    table = backends_mod.BACKENDS
    monkeypatch.setitem(table, "triton", replace(table["triton"], built=(True, "test")))
    monkeypatch.setitem(table, "cuda", replace(table["cuda"], built=(False, "not built")))
    assert backends_mod.resolve_backend("auto", cuda) == "triton"
    monkeypatch.setitem(table, "cuda", replace(table["cuda"], built=(True, "built")))
    assert backends_mod.resolve_backend("auto", cuda) == "cuda"


def test_unavailable_without_interpreter_or_gpu(monkeypatch):
    if HAS_CUDA:
        pytest.skip("a GPU is there: triton is available without the interpreter")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    available, reason = uk.backends()["triton"]
    assert not available and "no CUDA device" in reason and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        uk.domain_batch_norm(torch.randn(4, 3, 2, 2), 0, num_domains=1, use_batch_stats=True, backend="triton")


def test_no_triton_import_until_selected():
    """`import unirep_kernels` works without triton: the backend package loads lazily."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, unirep_kernels as uk\n"
            "assert not uk.backends()['triton'][0], uk.backends()['triton']\n"
            "assert 'not installed' in uk.backends()['triton'][1]\n"
            "print('OK')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile of Triton ops needs a GPU")
def test_compile_fullgraph_cuda():
    case = make_case(n=8, c=4, spatial=(5, 5), num_domains=3, weight="domain", bias="domain", dtype=torch.float32,
                     seed=2, device="cuda")
    rm, rv = case["running_mean"].float(), case["running_var"].float()

    def f(x, w, b):
        return uk.domain_batch_norm(x, case["domain"], w, b, rm, rv, num_domains=3, use_batch_stats=True,
                                    relu=True, backend="triton")

    w, b = case["weight"].float(), case["bias"].float()
    expected = f(case["x"], w, b)
    got = torch.compile(f, fullgraph=True)(case["x"], w, b)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
