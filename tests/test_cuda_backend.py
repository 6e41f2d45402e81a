"""The CUDA backend beyond the shared grids of test_ops_*: shapes big enough for chunked
reductions and vector loads, misaligned and odd-sized inputs, determinism, and where
domain indices are checked (device-side assert, or a host check on request).

The policy tests run everywhere; the rest need a GPU and the extension built with CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import unirep_kernels
from conftest import STATUS, clone_stats, make_case, output_and_grads, run_bn, run_in
from unirep_kernels import _checks

needs_cuda = pytest.mark.skipif(not STATUS["cuda"][0], reason=f"cuda backend unavailable: {STATUS['cuda'][1]}")


# ---- Where domain values are checked (no GPU needed).

@pytest.fixture
def restore_domain_check():
    previous = _checks._domain_check
    yield
    _checks._domain_check = previous


def test_domain_check_policy(restore_domain_check, monkeypatch):
    monkeypatch.delenv("UNIREP_DOMAIN_CHECK", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _checks.domain_check_mode() == "device"
    assert not _checks.host_value_checks("cuda", cuda)          # kernels check on the device
    for backend in ("triton", "reference"):                     # they do not: host check
        assert _checks.host_value_checks(backend, cuda)
    assert _checks.host_value_checks("cpp", cpu)                # free on the CPU
    unirep_kernels.set_domain_check("host")
    assert _checks.host_value_checks("cuda", cuda)
    unirep_kernels.set_domain_check(None)
    monkeypatch.setenv("UNIREP_DOMAIN_CHECK", "host")
    assert _checks.host_value_checks("cuda", cuda)
    monkeypatch.setenv("UNIREP_DOMAIN_CHECK", "sometimes")
    with pytest.raises(ValueError, match="UNIREP_DOMAIN_CHECK must be one of"):
        _checks.domain_check_mode()
    with pytest.raises(ValueError, match=r"set_domain_check\(mode\) must be one of"):
        unirep_kernels.set_domain_check("never")


def test_device_mode_skips_only_the_value_check(restore_domain_check):
    """With host_values=False the Python layer leaves the values to the kernels (no sync),
    but still checks everything that needs no data."""
    x = torch.randn(4, 3, 2, 2)
    bad = torch.tensor([0, 1, 2, 5])
    assert unirep_kernels.check_domain(bad, 3, x, where="op", check_values=False) is bad
    with pytest.raises(ValueError, match="op: domain values must lie in"):
        unirep_kernels.check_domain(bad, 3, x, where="op", check_values=True)
    with pytest.raises(ValueError, match=r"op: domain tensor must be int64 with shape \(N,\) = \(4,\)"):
        unirep_kernels.check_domain(bad[:3], 3, x, where="op", check_values=False)
    # CPU tensors are checked on the host whatever the mode.
    unirep_kernels.set_domain_check("device")
    with pytest.raises(ValueError, match="domain values must lie in"):
        unirep_kernels.domain_batch_norm(x, bad, num_domains=3, use_batch_stats=True)


# ---- On the GPU.

def _output_and_grads(run, case, backend, cotangent, as_float64=False, **kw):
    """(y, dx, dweight, dbias) for an explicit cotangent; ``as_float64`` runs on float64 copies."""
    c = clone_stats(case)
    for key in ("x", "weight", "bias", "running_mean", "running_var"):
        if c[key] is not None:
            c[key] = c[key].detach().clone().double() if as_float64 else c[key].detach().clone()
    inputs = [c[key].requires_grad_() for key in ("x", "weight", "bias") if c[key] is not None]
    y = run(c, backend, **kw)
    return (y,) + torch.autograd.grad(y, inputs, cotangent.to(y.dtype))


# Shapes that take the chunked reductions (K > 1), the vector loads, and the scalar paths.
BIG_SHAPES = [(8, 16, (64, 64)), (2, 3, (128, 96)), (32, 40, (7, 7)), (256, 64, ()), (4, 8, (5, 6, 7))]


@needs_cuda
@pytest.mark.parametrize("n,c,spatial", BIG_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mixed", [False, True])
def test_batch_norm_large_shapes_match_reference(n, c, spatial, dtype, channels_last, mixed):
    if channels_last and len(spatial) not in (2, 3):
        pytest.skip("channels_last needs 4-d or 5-d input")
    case = make_case(n, c, spatial, num_domains=5, mixed=mixed, absent=3 if mixed else None, dtype=dtype,
                     channels_last=channels_last, offset=100.0, device="cuda", seed=n + c)
    case = dict(case, **{k: case[k].float() for k in ("weight", "bias", "running_mean", "running_var")})
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=4e-2, rtol=2e-2)
    cotangent = torch.randn(case["x"].shape, dtype=torch.float64, device="cuda")
    for use_batch_stats in (True, False):
        got = _output_and_grads(run_bn, case, "cuda", cotangent, use_batch_stats=use_batch_stats, relu=True)
        want = _output_and_grads(run_bn, case, "reference", cotangent, as_float64=True,
                                 use_batch_stats=use_batch_stats, relu=True)
        assert got[0].dtype == dtype and got[0].stride() == case["x"].stride()
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, **tol)
        mine, ref = clone_stats(case), clone_stats(case)
        run_bn(mine, "cuda", use_batch_stats=use_batch_stats)
        run_bn(ref, "reference", use_batch_stats=use_batch_stats)
        torch.testing.assert_close(mine["running_mean"], ref["running_mean"], **tol)
        torch.testing.assert_close(mine["running_var"], ref["running_var"], **tol)


@needs_cuda
@pytest.mark.parametrize("n,c,spatial", BIG_SHAPES[:3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_large_shapes_match_reference(n, c, spatial, channels_last):
    case = make_case(n, c, spatial, num_domains=4, mixed=True, dtype=torch.float32, channels_last=channels_last,
                     offset=1e4, device="cuda", seed=3)
    cotangent = torch.randn(case["x"].shape, dtype=torch.float64, device="cuda")
    got = _output_and_grads(run_in, case, "cuda", cotangent, relu=True)
    want = _output_and_grads(run_in, case, "reference", cotangent, as_float64=True, relu=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-3, rtol=1e-3)


@needs_cuda
def test_misaligned_input_takes_the_scalar_path():
    base = torch.randn(1 + 6 * 4 * 16 * 16, device="cuda")
    x = base[1:].view(6, 4, 16, 16)  # 4-byte offset: no 16-byte vectors
    assert x.data_ptr() % 16 != 0
    domain = torch.tensor([0, 1, 1, 0, 2, 2], device="cuda")
    y = unirep_kernels.domain_batch_norm(x, domain, num_domains=3, use_batch_stats=True, backend="cuda")
    ref = unirep_kernels.domain_batch_norm(x.double(), domain, num_domains=3, use_batch_stats=True,
                                           backend="reference")
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_results_are_bitwise_deterministic():
    case = make_case(64, 32, (32, 32), num_domains=10, dtype=torch.float32, device="cuda", seed=7)
    first = output_and_grads(run_bn, case, "cuda", seed=3, use_batch_stats=True)
    second = output_and_grads(run_bn, case, "cuda", seed=3, use_batch_stats=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cuda
def test_forward_statistics_match_the_cpu_kernels():
    case = make_case(16, 8, (9, 9), num_domains=4, absent=2, dtype=torch.float64, seed=5)
    args = (case["domain"], -1, case["weight"], case["bias"], None, None, 4, True, True, 1e-5, False)
    cpu = torch.ops.unirep.domain_batch_norm_forward(case["x"], *args)
    gpu = torch.ops.unirep.domain_batch_norm_forward(
        case["x"].cuda(), *[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, atol=1e-12, rtol=1e-12)


def _run_isolated(code: str):
    """Runs code in a fresh process: a device-side assert leaves the CUDA context unusable."""
    env = dict(os.environ, UNIREP_DOMAIN_CHECK="device")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


@needs_cuda
def test_out_of_range_domain_is_a_device_side_assert():
    proc = _run_isolated("""
        import torch, unirep_kernels
        x = torch.randn(4, 3, 8, 8, device="cuda")
        domain = torch.tensor([0, 1, 2, 3], device="cuda")  # 3 is out of range for 3 domains
        try:
            unirep_kernels.domain_batch_norm(x, domain, num_domains=3, use_batch_stats=True, backend="cuda")
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("RAISED", "device-side assert" in str(exc))
        """)
    assert "RAISED True" in proc.stdout, (proc.stdout, proc.stderr)
    assert "domain values must lie in [0, num_domains)" in proc.stderr


@needs_cuda
def test_host_mode_raises_a_value_error(restore_domain_check):
    unirep_kernels.set_domain_check("host")
    x = torch.randn(4, 3, 8, 8, device="cuda")
    with pytest.raises(ValueError, match=r"domain values must lie in \[0, num_domains=3\), got 3"):
        unirep_kernels.domain_batch_norm(x, torch.tensor([0, 1, 2, 3], device="cuda"), num_domains=3,
                                         use_batch_stats=True, backend="cuda")


@needs_cuda
def test_single_value_group_is_a_device_side_assert():
    proc = _run_isolated("""
        import torch, unirep_kernels
        x = torch.randn(3, 5, device="cuda")  # (N, C): a domain with one sample has one value
        try:
            unirep_kernels.domain_batch_norm(x, torch.tensor([0, 0, 1], device="cuda"), num_domains=2,
                                             use_batch_stats=True, backend="cuda")
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("RAISED", "device-side assert" in str(exc))
        """)
    assert "RAISED True" in proc.stdout, (proc.stdout, proc.stderr)
    assert "more than 1 value per channel" in proc.stderr
