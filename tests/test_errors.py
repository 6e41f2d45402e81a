"""Every bad input of the contract gets a clear exception naming the argument, on every
backend, and a failing call writes nothing to the running stats."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import unirep_kernels as uk
from conftest import CPU_BACKENDS

# Validation is shared by all backends; these inputs are CPU tensors.
BACKENDS = ["reference"] + CPU_BACKENDS
D, C = 3, 4


def _good():
    return dict(x=torch.randn(6, C, 3, 3), domain=torch.tensor([0, 1, 2, 0, 1, 2]), weight=torch.randn(D, C),
                bias=torch.randn(D, C), running_mean=torch.randn(D, C), running_var=torch.rand(D, C) + 0.5)


BAD_BATCH_NORM = [  # (change to the good inputs, extra kwargs, pattern the message must contain)
    (dict(x=torch.randn(6)), {}, "x must have shape"),
    (dict(x=torch.randint(0, 5, (6, C, 3, 3))), {}, "x has unsupported dtype"),
    (dict(x=torch.randn(6, C + 1, 3, 3)), {}, "weight must have shape"),
    (dict(domain=3), {}, r"domain must lie in \[0, num_domains=3\)"),
    (dict(domain=-1), {}, r"domain must lie in \[0, num_domains=3\)"),
    (dict(domain=torch.tensor([0, 1, 2, 0, 1, 3])), {}, r"domain values must lie in \[0, num_domains=3\), got 3"),
    (dict(domain=torch.tensor([0, 1, 2, 0, 1, -2])), {}, r"domain values must lie in .* got -2"),
    (dict(domain=torch.tensor([0, 1, 2])), {}, r"domain tensor must be int64 with shape \(N,\) = \(6,\) on cpu .*; "
     r"got shape \(3,\)"),
    (dict(domain=torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)), {},
     r"domain tensor must be int64 with shape \(N,\) = \(6,\) on cpu .*; got dtype torch.int32"),
    (dict(domain=torch.zeros(6, 1, dtype=torch.long)), {}, r"domain tensor must be int64 .*; got shape \(6, 1\)"),
    (dict(domain=1.5), {}, r"domain must be an int in \[0, num_domains=3\) .* or an int64 tensor of shape \(N,\) "
     r"= \(6,\) on cpu .*; got float"),
    (dict(domain=True), {}, "domain must be an int .*; got a bool"),
    (dict(domain=np.int64(3)), {}, r"domain must lie in \[0, num_domains=3\), got 3"),
    (dict(weight=torch.randn(D + 1, C)), {}, "weight must have shape"),
    (dict(bias=torch.randn(C + 1)), {}, "bias must have shape"),
    (dict(bias=torch.ones(D, C, dtype=torch.long)), {}, "bias must be a floating-point tensor"),
    (dict(running_mean=torch.randn(C)), {}, "running_mean .* and running_var .* must have the same shape"),
    (dict(running_var=torch.rand(D, C + 1)), {}, "running_var must have shape"),
    (dict(running_var=None), {}, "running_mean and running_var must be given together"),
    (dict(running_mean=None, running_var=None), dict(use_batch_stats=False), "use_batch_stats=False normalizes by"),
    (dict(x=torch.randn(1, C, 1, 1), domain=0), {}, "expected more than 1 value per channel"),
    (dict(x=torch.randn(4, C, 1, 1), domain=torch.tensor([0, 0, 1, 2])), {},
     "expected more than 1 value per channel in every domain's stat group"),
    (dict(x=torch.randn(0, C, 3, 3), domain=0), {}, "x must not be empty"),
    ({}, dict(num_domains=0), "num_domains must be a positive int"),
    ({}, dict(eps=0.0), "eps must be positive"),
    ({}, dict(momentum=1.5), r"momentum must lie in \[0, 1\]"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change,kwargs,pattern", BAD_BATCH_NORM)
def test_bad_batch_norm_input_names_the_argument(backend, change, kwargs, pattern):
    args = dict(_good(), **change)
    before = {k: args[k].clone() for k in ("running_mean", "running_var") if isinstance(args[k], torch.Tensor)}
    call = dict(num_domains=D, use_batch_stats=True, backend=backend)
    call.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=pattern):
        uk.domain_batch_norm(args["x"], args["domain"], args["weight"], args["bias"], args["running_mean"],
                             args["running_var"], **call)
    for key, value in before.items():
        assert torch.equal(args[key], value), f"{key} was written by a failing call"


def test_good_inputs_are_accepted():
    """The baseline of the table above is valid, so each failure is due to its one change."""
    for backend in BACKENDS:
        args = _good()
        y = uk.domain_batch_norm(*args.values(), num_domains=D, use_batch_stats=True, backend=backend)
        assert y.shape == args["x"].shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_mismatch_is_reported(backend):
    meta = torch.tensor([0, 1, 2, 0, 1, 2], device="meta")
    args = _good()
    with pytest.raises(ValueError, match=r"domain tensor must be int64 .* on cpu \(x's device\); got device meta"):
        uk.domain_batch_norm(args["x"], meta, None, None, None, None, num_domains=D, use_batch_stats=True,
                             backend=backend)
    with pytest.raises(ValueError, match="weight is on meta"):
        uk.domain_batch_norm(args["x"], 0, torch.ones(C, device="meta"), None, None, None, num_domains=D,
                             use_batch_stats=True, backend=backend)


BAD_INSTANCE_NORM = [
    (dict(x=torch.randn(6, C)), {}, "expected more than 1 spatial value per channel"),
    (dict(x=torch.randn(6, C, 3, 3).half().bool()), {}, "x has unsupported dtype"),
    (dict(domain=torch.tensor([0, 1, 2, 0, 1, 5])), {}, "domain values must lie in"),
    (dict(domain=7), {}, "domain must lie in"),
    (dict(weight=torch.randn(C, D)), {}, "weight must have shape"),
    ({}, dict(eps=-1.0), "eps must be positive"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change,kwargs,pattern", BAD_INSTANCE_NORM)
def test_bad_instance_norm_input_names_the_argument(backend, change, kwargs, pattern):
    args = dict(_good(), **change)
    call = dict(num_domains=D, backend=backend)
    call.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=pattern):
        uk.domain_instance_norm(args["x"], args["domain"], args["weight"], args["bias"], **call)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernels_check_domain_range_themselves(backend):
    """The kernel-side guard (what protects torch.compile'd calls, where the Python value
    checks are skipped) rejects an out-of-range domain before writing anything."""
    args = _good()
    bad = torch.tensor([0, 1, 2, 0, 1, 9])
    rm = args["running_mean"].clone()
    with pytest.raises((ValueError, RuntimeError), match="domain values must lie in"):
        torch.ops.unirep.domain_batch_norm_forward(args["x"], bad, -1, None, None, None, None, D, True, True, 1e-5,
                                                   False)
    with pytest.raises((ValueError, RuntimeError), match="domain values must lie in"):
        torch.ops.unirep.domain_instance_norm_forward(args["x"], bad, -1, None, None, D, 1e-5, False)
    with pytest.raises((ValueError, RuntimeError), match="more than 1 value per channel in stat group"):
        torch.ops.unirep.domain_batch_norm_forward(torch.randn(3, C, 1, 1), torch.tensor([0, 0, 1]), -1, None, None,
                                                   None, None, D, True, True, 1e-5, False)
    assert torch.equal(rm, args["running_mean"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_stats_that_share_memory_are_rejected_before_any_write(backend):
    args = _good()
    rm = torch.zeros(D, C)
    rv = torch.ones(C).expand(D, C)  # one storage row for every domain
    with pytest.raises(ValueError, match="running_var has elements that share memory"):
        uk.domain_batch_norm(args["x"], args["domain"], None, None, rm, rv, num_domains=D, use_batch_stats=True,
                             backend=backend)
    assert torch.equal(rm, torch.zeros(D, C))
    shared = torch.ones(D, C)
    with pytest.raises(ValueError, match="must not share memory"):
        uk.domain_batch_norm(args["x"], args["domain"], None, None, shared, shared, num_domains=D,
                             use_batch_stats=True, backend=backend)
    # eval only reads the running stats: shared memory is allowed there, and reads the same
    y = uk.domain_batch_norm(args["x"], args["domain"], None, None, shared, rv, num_domains=D,
                             use_batch_stats=False, backend=backend)
    want = uk.domain_batch_norm(args["x"], args["domain"], None, None, shared.clone(), rv.contiguous(),
                                num_domains=D, use_batch_stats=False, backend=backend)
    assert torch.equal(y, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["momentum", "eps"])
def test_non_numeric_momentum_or_eps_is_named(backend, name):
    args = _good()
    with pytest.raises(TypeError, match=f"{name} must be a float"):
        uk.domain_batch_norm(*args.values(), num_domains=D, use_batch_stats=True, backend=backend, **{name: None})


# The compiled kernels and the device their tensors live on.
KERNEL_DEVICES = [(b, "cpu") for b in CPU_BACKENDS] + ([("cuda", "cuda")] if uk.backends()["cuda"][0] else [])


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
def test_compiled_ops_check_parameter_shapes_themselves(backend, device):
    """Direct torch.ops calls bypass the Python checks: the kernels must not read out of bounds."""
    x = torch.randn(4, 3, 2, 2, device=device)

    def t(*shape):
        return torch.ones(*shape, device=device)

    with pytest.raises(ValueError, match=r"weight must have shape \(num_domains, C\) = \(3, 3\)"):
        torch.ops.unirep.domain_batch_norm_forward(x, None, 2, t(1, 3), None, None, None, 3, True, True, 1e-5, False)
    with pytest.raises(ValueError, match="bias must have shape"):
        torch.ops.unirep.domain_instance_norm_forward(x, None, 0, None, t(5), 3, 1e-5, False)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        torch.ops.unirep.domain_batch_norm_forward(x, None, 0, None, None, t(2, 3), t(2, 3), 3, False, True, 1e-5,
                                                   False)
    # (D, C) moments with a (C,) variance would read the variance out of bounds.
    with pytest.raises(ValueError, match="running_mean .* and running_var .* must have the same shape"):
        torch.ops.unirep.domain_batch_norm_forward(x, None, 0, None, None, t(3, 3), t(3), 3, False, True, 1e-5,
                                                   False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_is_refused(backend):
    x = torch.randn(6, C, 3, 3, dtype=torch.float64, requires_grad=True)
    y = uk.domain_batch_norm(x, 0, None, None, None, None, num_domains=1, use_batch_stats=True, backend=backend)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    z = uk.domain_instance_norm(x, 0, None, None, num_domains=1, backend=backend)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(z.square().sum(), x, create_graph=True)


# One domain contract: unirep_kernels.check_domain behind the ops, the layers and the models.

def _domain_callers():
    from unirep.models import build_model

    model = build_model(num_classes=[2, 3, 4], widths=(4, 4, 4, 4), stem_width=4, units_per_stage=1)
    scale, bn = uk.DomainScale2d(3, D), uk.DomainBatchNorm2d(3, D)
    return [("domain_batch_norm", lambda x, d: uk.domain_batch_norm(x, d, num_domains=D, use_batch_stats=True)),
            ("domain_instance_norm", lambda x, d: uk.domain_instance_norm(x, d, num_domains=D)),
            ("DomainScale2d", scale), ("ResNet38", model),
            ("domain_batch_norm", bn),  # the layer reports the op it runs
            ("unirep_kernels.domain", lambda x, d: uk.domain(d).__enter__())]


@pytest.mark.parametrize("bad,pattern", [
    (3, r"domain must lie in \[0, num_domains=3\), got 3"),
    (np.int64(-1), r"domain must lie in \[0, num_domains=3\), got -1"),
    (1.0, r"domain must be an int in \[0, num_domains=3\) \(a pure batch\) or an int64 tensor of shape \(N,\) = "
          r"\(4,\) on cpu \(a mixed batch\); got float"),
    (torch.tensor([0, 1, 2, 1], dtype=torch.int32),
     r"domain tensor must be int64 with shape \(N,\) = \(4,\) on cpu \(x's device\); got dtype torch.int32"),
    (torch.tensor([0, 1, 2]), r"domain tensor must be int64 with shape \(N,\) = \(4,\) on cpu \(x's device\); "
                              r"got shape \(3,\)"),
    (torch.tensor([0, 1, 2, 0], device="meta"),
     r"domain tensor must be int64 .* on cpu \(x's device\); got device meta"),
    (torch.tensor([0, 1, 2, 5]), r"domain values must lie in \[0, num_domains=3\), got 5"),
])
def test_one_domain_check_with_one_message_everywhere(bad, pattern):
    x = torch.randn(4, 3, 4, 4)
    checked_everywhere = 0
    for where, call in _domain_callers():
        if where == "unirep_kernels.domain" and not isinstance(bad, float):
            continue  # the context checks the type only (it knows no x, no num_domains)
        with pytest.raises((ValueError, TypeError)) as info:
            call(x, bad)
        message = str(info.value)
        assert message.startswith(where + ": "), message
        if where != "unirep_kernels.domain":
            assert re.search(pattern, message), message
            checked_everywhere += 1
    assert checked_everywhere == 5


@pytest.mark.parametrize("value", [np.int64(2), np.int32(2), np.uint8(2), 2])
def test_numpy_integer_domains_are_pure_batches(value):
    x = torch.randn(4, 3, 4, 4)
    expected = uk.domain_batch_norm(x, 2, num_domains=D, use_batch_stats=True)
    for _, call in _domain_callers()[:-1]:
        call(x, value)  # accepted everywhere
    torch.testing.assert_close(uk.domain_batch_norm(x, value, num_domains=D, use_batch_stats=True), expected)
    with uk.domain(value):
        assert uk.current_domain() == 2 and type(uk.current_domain()) is int
    assert uk.check_domain(value, D) == 2 and type(uk.check_domain(value, D)) is int
