"""domain_batch_norm: every compiled backend against reference.py on random data."""

from __future__ import annotations

import itertools

import pytest
import torch

import unirep_kernels as uk
from conftest import (COMPILED_BACKENDS, assert_low_precision, cast_params, clone_stats, compare_bn, devices_for,
                      make_case, output_and_grads, results_with_grads, run_bn)

SHAPES = [  # (N, C, spatial): 1x1, odd sizes, 1d, 3d and no spatial dims; C = 20 and 64 take the
    # channels_last vector paths (whole vectors plus leftover channels, or whole vectors only)
    (6, 5, (4, 3)), (9, 3, (1, 1)), (7, 4, (5,)), (4, 6, (3, 5)), (16, 8, (7, 7)), (12, 3, ()), (4, 3, (2, 3, 2)),
    (4, 20, (5, 7)), (3, 64, (6, 5)),
]
BATCHES = ["pure", "mixed", "mixed-absent"]
AFFINES = [("domain", "domain"), ("universal", "universal"), ("domain", "universal"), (None, None)]
STATS = ["domain", "universal", None]


def _case(shape, num_domains, batch, weight, bias, stats, seed, **kw):
    n, c, spatial = shape
    absent = 1 if (batch == "mixed-absent" and num_domains > 1) else None
    return make_case(n=n, c=c, spatial=spatial, num_domains=num_domains, mixed=batch != "pure", absent=absent,
                     weight=weight, bias=bias, stats=stats, seed=seed, **kw)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("num_domains", [1, 3, 10])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_float64(backend, shape, num_domains, batch):
    combos = itertools.product(AFFINES, STATS, [True, False], [True, False], [False, True])
    for seed, ((weight, bias), stats, use_batch_stats, per_domain, relu) in enumerate(combos):
        if not use_batch_stats and stats is None:
            continue
        case = _case(shape, num_domains, batch, weight, bias, stats, seed, device=devices_for(backend)[0])
        compare_bn(case, backend, atol=1e-10, rtol=1e-10, use_batch_stats=use_batch_stats,
                 stats_per_domain=per_domain, relu=relu, momentum=0.3)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("shape", [(6, 5, (4, 3)), (5, 8, (1, 1)), (4, 3, (2, 3, 2))])
@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_channels_last_keeps_layout_and_values(backend, shape, use_batch_stats):
    for seed, (weight, bias) in enumerate(AFFINES):
        case = _case(shape, 3, "mixed", weight, bias, "domain", seed, channels_last=True,
                     device=devices_for(backend)[0])
        y = compare_bn(case, backend, atol=1e-10, rtol=1e-10, use_batch_stats=use_batch_stats, relu=True)
        fmt = torch.channels_last if len(shape[2]) == 2 else torch.channels_last_3d
        if shape[2] != (1, 1):
            assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_non_dense_input(backend):
    """A strided view (neither contiguous nor channels_last) is still computed correctly."""
    case = _case((8, 6, (5, 5)), 3, "mixed", "domain", "domain", "domain", 0, device=devices_for(backend)[0])
    case["x"] = case["x"][:, ::2, :, 1:]
    case["weight"], case["bias"] = case["weight"][:, ::2], case["bias"][:, ::2]
    case["running_mean"], case["running_var"] = case["running_mean"][:, ::2], case["running_var"][:, ::2]
    compare_bn(case, backend, atol=1e-10, rtol=1e-10, use_batch_stats=False)
    compare_bn(case, backend, atol=1e-10, rtol=1e-10, use_batch_stats=True)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_matches_float64_reference(backend, batch, channels_last):
    for seed, (stats, per_domain, use_batch_stats) in enumerate(itertools.product(
            ["domain", "universal"], [True, False], [True, False])):
        case = _case((16, 8, (9, 7)), 4, batch, "domain", "universal", stats, seed, channels_last=channels_last,
                     device=devices_for(backend)[0])
        case32 = clone_stats(cast_params(dict(case, x=case["x"].float()), torch.float32))
        ref = clone_stats(case)
        kw = dict(use_batch_stats=use_batch_stats, stats_per_domain=per_domain, relu=True)
        y = run_bn(case32, backend, **kw)
        y_ref = run_bn(ref, "reference", **kw)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(case32["running_var"].double(), ref["running_var"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_half_precision_criterion(backend, dtype, channels_last, use_batch_stats):
    """|ours - ref64| <= 2 |pytorch_lowprec - ref64| + atol, elementwise.

    pytorch_lowprec is the reference computed on the same low-precision input (float32
    accumulation, as PyTorch's own half batch norm does), rounded to the low precision.
    """
    case = _case((12, 6, (8, 8)), 3, "mixed-absent", "domain", "domain", "domain", 7, channels_last=channels_last,
                 device=devices_for(backend)[0])
    low = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
    ref64 = clone_stats(dict(case, x=low["x"].double()))  # same (rounded) input, exact arithmetic
    kw = dict(use_batch_stats=use_batch_stats, relu=True)
    y = run_bn(clone_stats(low), backend, **kw)
    y_torch = run_bn(clone_stats(low), "reference", **kw)
    y_ref = run_bn(ref64, "reference", **kw)
    assert y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    eps = torch.finfo(dtype).eps
    err = (y.double() - y_ref).abs()
    bound = 2 * (y_torch.double() - y_ref).abs() + eps * (1 + y_ref.abs())
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", ["pure", "mixed"])
def test_large_offset_is_stable(backend, channels_last, batch):
    """x = 1e4 + randn in float32: the naive E[x^2] - E[x]^2 fails this, Welford/shifted passes."""
    case = _case((32, 4, (16, 16)), 3, batch, "domain", "domain", "domain", 3, offset=1e4,
                 channels_last=channels_last, device=devices_for(backend)[0])
    case32 = clone_stats(cast_params(dict(case, x=case["x"].float()), torch.float32))
    ref = clone_stats(dict(case, x=case32["x"].double()))
    y = run_bn(case32, backend, use_batch_stats=True, momentum=1.0)
    y_ref = run_bn(ref, "reference", use_batch_stats=True, momentum=1.0)
    # 1e4 in float32 has a spacing of ~1e-3: that bounds any float32 result.
    torch.testing.assert_close(y.double(), y_ref, atol=3e-3, rtol=0)
    torch.testing.assert_close(case32["running_var"].double(), ref["running_var"], atol=0, rtol=1e-4)
    torch.testing.assert_close(case32["running_mean"].double(), ref["running_mean"], atol=2e-3, rtol=0)
    # The check can fail: the naive one-pass variance in float32 is far off on this data.
    xf = case32["x"].float().transpose(0, 1).reshape(4, -1)
    naive_var = (xf * xf).mean(1) - xf.mean(1) ** 2
    true_var = case32["x"].double().transpose(0, 1).reshape(4, -1).var(1, unbiased=False)
    assert ((naive_var.double() - true_var).abs() > 1e-2).any()


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_reference(backend, batch, channels_last):
    combos = itertools.product(AFFINES, ["domain", "universal"], [True, False], [True, False], [False, True])
    for seed, ((weight, bias), stats, use_batch_stats, per_domain, relu) in enumerate(combos):
        case = _case((10, 4, (3, 5)), 4, batch, weight, bias, stats, seed, channels_last=channels_last,
                     device=devices_for(backend)[0])
        grads = [output_and_grads(run_bn, case, name, seed, use_batch_stats=use_batch_stats,
                                  stats_per_domain=per_domain, relu=relu)[1:] for name in (backend, "reference")]
        for mine, ref in zip(*grads):
            assert mine.shape == ref.shape
            torch.testing.assert_close(mine, ref, atol=1e-9, rtol=1e-9)
        if batch == "mixed-absent" and weight == "domain":
            assert torch.count_nonzero(grads[0][1][1]) == 0  # absent domain: zero weight-grad row
            assert torch.count_nonzero(grads[0][1][0]) > 0


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_domains", [1, 3, 10])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES)
def test_half_precision_grid(backend, shape, num_domains, batch, dtype):
    """float16 / bfloat16 over the grid of the float64 test: y, the updated running stats, dx,
    dweight and dbias meet the low-precision criterion, in training and eval, contiguous and
    channels_last, with and without the fused ReLU."""
    layouts = [False, True] if len(shape[2]) >= 2 else [False]
    for seed, (channels_last, use_batch_stats, relu) in enumerate(
            itertools.product(layouts, [True, False], [False, True])):
        case = _case(shape, num_domains, batch, "domain", "universal", "domain", seed, channels_last=channels_last,
                     device=devices_for(backend)[0])
        low = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
        ref64 = dict(case, x=low["x"].double())  # the same rounded input, exact arithmetic
        g = torch.randn(case["x"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        g = g.to(dtype).to(case["x"].device)
        kw = dict(use_batch_stats=use_batch_stats, relu=relu, momentum=0.3)
        mine = results_with_grads(run_bn, low, backend, g, **kw)
        torch_low = results_with_grads(run_bn, low, "reference", g, **kw)
        exact = results_with_grads(run_bn, ref64, "reference", g.double(), **kw)
        assert mine["y"].dtype == dtype and mine["dx"].dtype == dtype
        if channels_last:
            assert mine["y"].stride() == low["x"].stride() and mine["dx"].stride() == low["x"].stride()
        for key in exact:
            assert_low_precision(mine[key], torch_low[key], exact[key], dtype,
                                 f"{key} (channels_last={channels_last}, batch stats={use_batch_stats}, relu={relu})")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_low_precision(backend, dtype):
    case = _case((12, 6, (6, 6)), 3, "mixed", "domain", "domain", "domain", 11, device=devices_for(backend)[0])
    low = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
    results = []
    for name, c in ((backend, clone_stats(low)), ("reference", clone_stats(dict(case, x=low["x"].double())))):
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


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("use_batch_stats", [True, False])
def test_nan_propagates_through_fused_relu(backend, use_batch_stats):
    """A NaN must not be hidden by the fused ReLU (torch.relu keeps NaN)."""
    case = _case((6, 4, (3, 3)), 3, "mixed", "domain", "domain", "domain", 2, device=devices_for(backend)[0])
    case["x"][1, 2, 1, 1] = float("nan")
    kw = dict(use_batch_stats=use_batch_stats, relu=True)
    y = run_bn(clone_stats(case), backend, **kw)
    y_ref = run_bn(clone_stats(case), "reference", **kw)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y).any()
    z = uk.domain_instance_norm(case["x"], case["domain"], None, None, num_domains=3, relu=True, backend=backend)
    assert torch.isnan(z[1, 2]).all()


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_non_contiguous_running_stats(backend):
    case = _case((6, 4, (3, 3)), 3, "mixed", "domain", "domain", "domain", 4, device=devices_for(backend)[0])
    case["running_mean"] = case["running_mean"].t().contiguous().t()  # same values, transposed strides
    case["running_var"] = case["running_var"].t().contiguous().t()
    compare_bn(case, backend, atol=1e-10, rtol=1e-10, use_batch_stats=False)
    compare_bn(case, backend, atol=1e-10, rtol=1e-10, use_batch_stats=True)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_calls_that_need_no_gradient_skip_autograd_and_give_the_same_results(backend):
    """Without grad mode, or with no input that requires grad, the compiled op is called
    below autograd (ops._below_autograd_unless_needed): the same outputs bitwise, no graph;
    an input that requires grad (here only the weight) still gets its gradient."""
    device = devices_for(backend)[0]
    case = cast_params(make_case(n=8, c=4, spatial=(5, 5), num_domains=2, dtype=torch.float32, device=device),
                       torch.float32)
    for norm in ("bn", "in"):
        def run(c):
            if norm == "in":
                return uk.domain_instance_norm(c["x"], c["domain"], c["weight"], c["bias"], num_domains=2,
                                               backend=backend)
            return uk.domain_batch_norm(c["x"], c["domain"], c["weight"], c["bias"], c["running_mean"],
                                        c["running_var"], num_domains=2, use_batch_stats=True, backend=backend)
        with torch.no_grad():
            plain = run(clone_stats(case))
        assert plain.grad_fn is None
        graded = clone_stats(case)
        graded["weight"] = graded["weight"].clone().requires_grad_()
        y = run(graded)
        assert torch.equal(y.detach(), plain) and y.grad_fn is not None
        y.square().sum().backward()
        assert graded["weight"].grad is not None and graded["weight"].grad.abs().sum() > 0
