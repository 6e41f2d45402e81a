"""Shared helpers: random inputs for the op contract, and the backends under test."""

from __future__ import annotations

import os

import pytest
import torch

import unirep_kernels

# Backends compared with the reference: every compiled one available here.
STATUS = unirep_kernels.backends()
HAS_CUDA = torch.cuda.is_available()
# Triton joins these (full-size) grids on CUDA tensors only: under TRITON_INTERPRET=1 on the
# CPU it is far too slow for them, and tests/test_triton.py runs a small grid instead.
COMPILED_BACKENDS = [name for name in ("cpp", "cuda", "triton") if STATUS[name][0] and (name != "triton" or HAS_CUDA)]
CPU_BACKENDS = [name for name in COMPILED_BACKENDS if name == "cpp"]

# Without the extension the suite would silently test nothing: CI builds it, so a missing
# extension there is a failure unless explicitly allowed.
if not STATUS["cpp"][0] and not os.environ.get("UNIREP_ALLOW_NO_EXTENSION"):
    raise RuntimeError(f"unirep_kernels._C is not available ({STATUS['cpp'][1]}); build it with "
                       "`pip install --no-build-isolation .` or set UNIREP_ALLOW_NO_EXTENSION=1")


def devices_for(backend: str):
    return ["cuda"] if backend in ("cuda", "triton") else ["cpu"]


def make_case(n=6, c=5, spatial=(4, 3), num_domains=3, mixed=True, absent=None, weight="domain", bias="domain",
              stats="domain", dtype=torch.float64, channels_last=False, offset=0.0, device="cpu", seed=0):
    """Random inputs for one call. ``weight``/``bias``/``stats`` are "domain" (D, C),
    "universal" (C,) or None; ``absent`` names a domain left out of a mixed batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=g, dtype=torch.float64) * 1.7 + 0.3 + offset
    # Per-domain shifts so that per-domain statistics really differ from whole-batch ones.
    if mixed:
        # Domains come in pairs so that every present domain has at least two samples
        # (batch statistics of a 1x1 map need them); all allowed domains present if n allows.
        choices = torch.tensor([d for d in range(num_domains) if d != absent], dtype=torch.long)
        pairs = torch.randint(len(choices), ((n + 1) // 2,), generator=g)
        pairs[: len(choices)] = torch.arange(len(choices))[: len(pairs)]
        domain = choices[pairs].repeat_interleave(2)[:n]
        if n % 2 and n > 1:
            domain[-1] = domain[-2]  # odd n: the unpaired last sample joins the pair before it
        domain = domain[torch.randperm(n, generator=g)]
        x = x + domain.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * 0.8
        domain = domain.to(device)
    else:
        domain = int(torch.randint(num_domains, (1,), generator=g))
    x = x.to(dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)

    def table(kind, scale, shift):
        if kind is None:
            return None
        shape = (num_domains, c) if kind == "domain" else (c,)
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device)

    weight_t = table(weight, 0.5, 1.0)
    bias_t = table(bias, 0.5, 0.0)
    running_mean = table(stats, 0.5, 0.0)
    running_var = None if stats is None else (table(stats, 0.3, 0.0).abs() + 0.5)
    return dict(x=x, domain=domain, weight=weight_t, bias=bias_t, running_mean=running_mean,
                running_var=running_var, num_domains=num_domains)


def cast_params(case, dtype):
    """Parameters and running stats in ``dtype`` (float32 for half inputs, as layers keep)."""
    out = dict(case)
    for key in ("weight", "bias", "running_mean", "running_var"):
        if out[key] is not None:
            out[key] = out[key].to(dtype)
    return out


def clone_stats(case):
    out = dict(case)
    for key in ("running_mean", "running_var"):
        if out[key] is not None:
            out[key] = out[key].clone()
    return out


def run_bn(case, backend, **kw):
    """domain_batch_norm on a case from make_case."""
    return unirep_kernels.domain_batch_norm(case["x"], case["domain"], case["weight"], case["bias"],
                                            case["running_mean"], case["running_var"],
                                            num_domains=case["num_domains"], backend=backend, **kw)


def run_in(case, backend, relu=False):
    """domain_instance_norm on a case from make_case."""
    return unirep_kernels.domain_instance_norm(case["x"], case["domain"], case["weight"], case["bias"],
                                               num_domains=case["num_domains"], relu=relu, backend=backend)


def compare_bn(case, backend, atol, rtol, **kw):
    """y and the updated running stats of ``backend`` against the reference; returns y."""
    mine, ref = clone_stats(case), clone_stats(case)
    y = run_bn(mine, backend, **kw)
    y_ref = run_bn(ref, "reference", **kw)
    assert y.dtype == case["x"].dtype and y.shape == case["x"].shape
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    if case["running_mean"] is not None:
        torch.testing.assert_close(mine["running_mean"], ref["running_mean"], atol=atol, rtol=rtol)
        torch.testing.assert_close(mine["running_var"], ref["running_var"], atol=atol, rtol=rtol)
        if kw.get("use_batch_stats"):
            # The update really happened (the check above cannot pass by both doing nothing).
            assert not torch.equal(mine["running_mean"], case["running_mean"])
    return y


def output_and_grads(run, case, backend, seed, **kw):
    """(y, grad x, grad weight, grad bias) of ``run`` (run_bn / run_in) for a random cotangent
    drawn from ``seed``; gradients only for the parameters the case has. The case's running
    stats are not touched."""
    c = clone_stats(case)
    inputs = [c["x"].detach().clone().requires_grad_()]
    c["x"] = inputs[0]
    for key in ("weight", "bias"):
        if c[key] is not None:
            c[key] = c[key].detach().clone().requires_grad_()
            inputs.append(c[key])
    y = run(c, backend, **kw)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed)).to(y.device)
    return (y,) + torch.autograd.grad(y, inputs, g)


def assert_low_precision(got, low, ref, dtype, what=""):
    """The low-precision criterion, elementwise: |got - ref| <= 2 |low - ref| + eps (1 + |ref|).

    ``ref`` is exact arithmetic (float64) on the same rounded inputs, ``low`` what PyTorch's
    own low-precision computation gives (float32 accumulation, rounded to ``dtype``), eps is
    ``dtype``'s: no worse than PyTorch at low precision, up to one rounding of the result.
    """
    got, low, ref = got.double(), low.double(), ref.double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got - ref).abs()
    bound = 2 * (low - ref).abs() + torch.finfo(dtype).eps * (1 + ref.abs())
    assert (err <= bound).all(), f"{what}: max excess {(err - bound).max().item():.3g}"


def results_with_grads(run, case, backend, cotangent, **kw):
    """{y, dx, dweight, dbias (those the case has), running stats} of ``run`` (run_bn /
    run_in) on a copy of ``case`` for the cotangent ``cotangent`` (cast to y's dtype)."""
    c = clone_stats(case)
    x = c["x"].detach().clone().requires_grad_()
    c["x"] = x
    inputs, names = [x], ["dx"]
    for key in ("weight", "bias"):
        if c[key] is not None:
            c[key] = c[key].detach().clone().requires_grad_()
            inputs.append(c[key])
            names.append("d" + key)
    y = run(c, backend, **kw)
    grads = torch.autograd.grad(y, inputs, cotangent.to(y.dtype))
    out = dict(zip(names, grads), y=y.detach())
    for key in ("running_mean", "running_var"):
        if c.get(key) is not None:
            out[key] = c[key]
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
