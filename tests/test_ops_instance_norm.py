"""domain_instance_norm: every compiled backend against reference.py on random data."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import (COMPILED_BACKENDS, assert_low_precision, cast_params, devices_for, make_case, output_and_grads,
                      results_with_grads, run_in)

SHAPES = [(6, 5, (4, 3)), (5, 3, (1, 2)), (7, 4, (5,)), (3, 6, (9, 7)), (4, 3, (2, 3, 2)),
          (4, 20, (5, 7)), (3, 64, (6, 5))]  # C = 20, 64: the channels_last vector paths
AFFINES = [("domain", "domain"), ("universal", "universal"), ("universal", "domain"), (None, None)]


def _case(shape, num_domains, batch, weight, bias, seed, **kw):
    n, c, spatial = shape
    return make_case(n=n, c=c, spatial=spatial, num_domains=num_domains, mixed=batch != "pure",
                     absent=1 if batch == "mixed-absent" and num_domains > 1 else None, weight=weight, bias=bias,
                     stats=None, seed=seed, **kw)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("num_domains", [1, 3, 10])
@pytest.mark.parametrize("batch", ["pure", "mixed", "mixed-absent"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference_float64(backend, shape, num_domains, batch):
    for seed, ((weight, bias), relu, channels_last) in enumerate(itertools.product(AFFINES, [False, True],
                                                                                     [False, True])):
        if channels_last and len(shape[2]) < 2:
            continue
        case = _case(shape, num_domains, batch, weight, bias, seed, channels_last=channels_last,
                     device=devices_for(backend)[0])
        results = [output_and_grads(run_in, case, name, seed, relu=relu) for name in (backend, "reference")]
        for mine, ref in zip(*results):
            torch.testing.assert_close(mine, ref, atol=1e-10, rtol=1e-10)
        if channels_last:
            assert results[0][0].stride() == case["x"].stride()


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_domains", [1, 3, 10])
@pytest.mark.parametrize("batch", ["pure", "mixed", "mixed-absent"])
@pytest.mark.parametrize("shape", SHAPES)
def test_half_precision_grid(backend, shape, num_domains, batch, dtype):
    """float16 / bfloat16 over the grid of the float64 test: y, dx, dweight and dbias meet
    the low-precision criterion, contiguous and channels_last, with and without the ReLU."""
    layouts = [False, True] if len(shape[2]) >= 2 else [False]
    for seed, (channels_last, relu) in enumerate(itertools.product(layouts, [False, True])):
        case = _case(shape, num_domains, batch, "domain", "universal", seed, channels_last=channels_last,
                     device=devices_for(backend)[0])
        low = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
        ref64 = dict(case, x=low["x"].double())  # the same rounded input, exact arithmetic
        g = torch.randn(case["x"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        g = g.to(dtype).to(case["x"].device)
        mine = results_with_grads(run_in, low, backend, g, relu=relu)
        torch_low = results_with_grads(run_in, low, "reference", g, relu=relu)
        exact = results_with_grads(run_in, ref64, "reference", g.double(), relu=relu)
        assert mine["y"].dtype == dtype and mine["dx"].dtype == dtype
        if channels_last:
            assert mine["y"].stride() == low["x"].stride() and mine["dx"].stride() == low["x"].stride()
        for key in exact:
            assert_low_precision(mine[key], torch_low[key], exact[key], dtype,
                                 f"{key} (channels_last={channels_last}, relu={relu})")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision(backend, dtype, channels_last):
    case = _case((6, 5, (10, 10)), 3, "mixed", "domain", "domain", 3, channels_last=channels_last,
                 device=devices_for(backend)[0])
    low = cast_params(dict(case, x=case["x"].to(dtype)), torch.float32)
    y = run_in(low, backend, relu=True)
    y_torch = run_in(low, "reference", relu=True)
    y_ref = run_in(dict(case, x=low["x"].double()), "reference", relu=True)
    assert y.dtype == dtype
    if dtype == torch.float32:  # not rounding-dominated: an ordinary float32 tolerance
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
        return
    eps = torch.finfo(dtype).eps
    err = (y.double() - y_ref).abs()
    bound = 2 * (y_torch.double() - y_ref).abs() + eps * (1 + y_ref.abs())
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_large_offset(backend):
    case = _case((4, 3, (32, 32)), 2, "mixed", "domain", "domain", 1, offset=1e4, device=devices_for(backend)[0])
    low = cast_params(dict(case, x=case["x"].float()), torch.float32)
    y = run_in(low, backend)
    y_ref = run_in(dict(case, x=low["x"].double()), "reference")
    torch.testing.assert_close(y.double(), y_ref, atol=3e-3, rtol=0)
