"""The contract against PyTorch itself: one domain equals nn.BatchNorm2d / nn.InstanceNorm2d,
and a mixed batch equals the eager per-domain loop of F.batch_norm (for every backend,
reference included: this is what validates the oracle)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unirep_kernels as uk
from conftest import COMPILED_BACKENDS

BACKENDS = ["reference"] + [b for b in COMPILED_BACKENDS if b == "cpp"]


def _same_random_affine(ours, native):
    """Random scale/bias in our one-domain layer, copied into the native layer."""
    with torch.no_grad():
        ours.weight.copy_(torch.randn_like(ours.weight))
        ours.bias.copy_(torch.randn_like(ours.bias))
        native.weight.copy_(ours.weight[0])
        native.bias.copy_(ours.bias[0])


def _outputs_and_grads(ours, native, x):
    """Outputs and (x, weight, bias) gradients of both layers for one random cotangent."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa, 0), native(xb)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, (xa, ours.weight, ours.bias), g)
    gb = torch.autograd.grad(yb, (xb, native.weight, native.bias), g)
    return (ya,) + tuple(a.reshape(b.shape) for a, b in zip(ga, gb)), (yb,) + gb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_domain_equals_batchnorm2d_over_training_steps(backend, channels_last):
    torch.manual_seed(0)
    ours = uk.DomainBatchNorm2d(6, 1, momentum=0.2, backend=backend).double()
    native = nn.BatchNorm2d(6, momentum=0.2).double()
    _same_random_affine(ours, native)
    for step in range(4):
        x = torch.randn(8, 6, 5, 7, dtype=torch.float64) * (step + 1) + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mine, theirs = _outputs_and_grads(ours, native, x)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(ours.running_mean[0], native.running_mean)
        torch.testing.assert_close(ours.running_var[0], native.running_var)
    ours.eval(), native.eval()
    mine, theirs = _outputs_and_grads(ours, native, torch.randn(5, 6, 4, 4, dtype=torch.float64) + 2)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_domain_equals_instancenorm2d(backend):
    torch.manual_seed(1)
    ours = uk.DomainInstanceNorm2d(4, 1, backend=backend).double()
    native = nn.InstanceNorm2d(4, affine=True).double()
    _same_random_affine(ours, native)
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64) * 3 + 1
    mine, theirs = _outputs_and_grads(ours, native, x)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.eval()(x, 0), native.eval()(x))  # no running stats: same in eval


def _eager_per_domain_loop(x, domain, weight, bias, running_mean, running_var, num_domains, training, momentum,
                           eps=1e-5):
    """How existing multi-domain code does it: select, F.batch_norm per domain, scatter back."""
    y = torch.empty_like(x)
    for d in range(num_domains):
        idx = (domain == d).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y[idx] = F.batch_norm(x[idx], running_mean[d], running_var[d], weight[d], bias[d], training, momentum, eps)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_mixed_batch_equals_eager_per_domain_loop(backend, training):
    torch.manual_seed(2)
    D, C = 4, 5
    x = torch.randn(20, C, 3, 4, dtype=torch.float64) * 2
    domain = torch.randint(0, D - 1, (20,))  # domain D-1 absent
    x = x + domain.view(-1, 1, 1, 1)
    weight, bias = torch.randn(D, C, dtype=torch.float64), torch.randn(D, C, dtype=torch.float64)
    rm, rv = torch.randn(D, C, dtype=torch.float64), torch.rand(D, C, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = uk.domain_batch_norm(x, domain, weight, bias, rm, rv, num_domains=D, use_batch_stats=training,
                             momentum=0.3, backend=backend)
    y_loop = _eager_per_domain_loop(x, domain, weight, bias, rm2, rv2, D, training, 0.3)
    torch.testing.assert_close(y, y_loop)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_universal_running_stats_follow_round_robin_order(backend):
    """(C,) running stats with per-domain groups: as if the domains came as consecutive pure
    batches, in increasing domain order."""
    torch.manual_seed(3)
    D, C = 5, 3
    x = torch.randn(24, C, 4, 4, dtype=torch.float64) * 2
    domain = torch.tensor([4, 0, 2, 2, 0, 4] * 4)  # domains 1 and 3 absent
    x = x + domain.view(-1, 1, 1, 1) * 3
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    uk.domain_batch_norm(x, domain, None, None, rm, rv, num_domains=D, use_batch_stats=True, momentum=0.25,
                         backend=backend)
    for d in (0, 2, 4):
        F.batch_norm(x[domain == d], rm2, rv2, None, None, True, 0.25)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_batch_stats_equal_batch_norm(backend):
    """stats_per_domain=False with universal moments is plain batch norm over the mixed batch,
    with each sample's own domain affine."""
    torch.manual_seed(4)
    D, C = 3, 4
    x = torch.randn(12, C, 5, 5, dtype=torch.float64)
    domain = torch.randint(0, D, (12,))
    weight, bias = torch.randn(D, C, dtype=torch.float64), torch.randn(D, C, dtype=torch.float64)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    y = uk.domain_batch_norm(x, domain, weight, bias, rm, rv, num_domains=D, use_batch_stats=True,
                             stats_per_domain=False, backend=backend)
    xhat = F.batch_norm(x, rm2, rv2, None, None, True, 0.1)
    expected = xhat * weight[domain][:, :, None, None] + bias[domain][:, :, None, None]
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
