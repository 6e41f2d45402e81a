"""torch.library registration: gradcheck, opcheck, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unirep_kernels as uk
from conftest import CPU_BACKENDS, make_case

pytestmark = pytest.mark.skipif(not CPU_BACKENDS, reason="needs the compiled extension")


@pytest.mark.parametrize("use_batch_stats", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mixed", [True, False])
def test_gradcheck_batch_norm(use_batch_stats, channels_last, mixed):
    case = make_case(n=6, c=3, spatial=(3, 2), num_domains=3, mixed=mixed, weight="domain", bias="universal",
                     channels_last=channels_last, seed=5)
    x = case["x"].detach().requires_grad_()
    w = case["weight"].detach().requires_grad_()
    b = case["bias"].detach().requires_grad_()
    rm, rv = case["running_mean"], case["running_var"]

    def f(x, w, b):
        return uk.domain_batch_norm(x, case["domain"], w, b, None if use_batch_stats else rm,
                                    None if use_batch_stats else rv, num_domains=3,
                                    use_batch_stats=use_batch_stats, relu=True, backend="cpp")

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_instance_norm(channels_last):
    case = make_case(n=4, c=3, spatial=(3, 3), num_domains=2, weight="universal", bias="domain",
                     channels_last=channels_last, seed=6)
    x = case["x"].detach().requires_grad_()
    w = case["weight"].detach().requires_grad_()
    b = case["bias"].detach().requires_grad_()
    f = lambda x, w, b: uk.domain_instance_norm(x, case["domain"], w, b, num_domains=2, relu=True, backend="cpp")
    assert torch.autograd.gradcheck(f, (x, w, b))


def _opcheck_inputs(channels_last, dtype=torch.float32):
    case = make_case(n=6, c=4, spatial=(5, 3), num_domains=3, weight="domain", bias="domain",
                     channels_last=channels_last, dtype=dtype, seed=8)
    x = case["x"].requires_grad_()
    w = case["weight"].to(dtype).requires_grad_()
    b = case["bias"].to(dtype).requires_grad_()
    return case, x, w, b


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("use_batch_stats", [True, False])
@pytest.mark.parametrize("mixed", [True, False])
def test_opcheck_batch_norm(channels_last, use_batch_stats, mixed):
    case, x, w, b = _opcheck_inputs(channels_last)
    domain = case["domain"] if mixed else None
    pure = -1 if mixed else 1
    rm, rv = case["running_mean"].float(), case["running_var"].float()
    args = (x, domain, pure, w, b, None if use_batch_stats else rm, None if use_batch_stats else rv, 3,
            use_batch_stats, True, 1e-5, True)
    torch.library.opcheck(torch.ops.unirep.domain_batch_norm_forward, args)
    y, mean, var, count = torch.ops.unirep.domain_batch_norm_forward(*args)
    grad_y = torch.randn_like(y)
    torch.library.opcheck(torch.ops.unirep.domain_batch_norm_backward,
                          (grad_y, x.detach(), domain, pure, w.detach(), b.detach(), mean, var, count, 3,
                           use_batch_stats, True, 1e-5, True))
    torch.library.opcheck(torch.ops.unirep.update_running_stats, (rm.clone(), rv.clone(), mean, var, count, 0.1))
    counter = torch.tensor(3)
    torch.library.opcheck(torch.ops.unirep.update_running_stats,
                          (rm.clone(), rv.clone(), mean, var, count, 0.1, counter))


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_instance_norm(channels_last):
    case, x, w, b = _opcheck_inputs(channels_last)
    args = (x, case["domain"], -1, w, b, 3, 1e-5, False)
    torch.library.opcheck(torch.ops.unirep.domain_instance_norm_forward, args)
    y, mean, var = torch.ops.unirep.domain_instance_norm_forward(*args)
    torch.library.opcheck(torch.ops.unirep.domain_instance_norm_backward,
                          (torch.randn_like(y), x.detach(), case["domain"], -1, w.detach(), b.detach(), mean, var, 3,
                           1e-5, False))


class TinyNet(nn.Module):
    """A small conv net with every layer kind, driven by an explicit domain argument."""

    def __init__(self, num_domains=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = uk.DomainBatchNorm2d(8, num_domains, relu=True, backend="cpp")
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = uk.DomainBatchNorm2d(8, num_domains, domain_affine=False, domain_stats=False, backend="cpp")
        self.inorm = uk.DomainInstanceNorm2d(8, num_domains, backend="cpp")
        self.scale = uk.DomainScale2d(8, num_domains)
        self.head = nn.Linear(8, 4)

    def forward(self, x, domain):
        h = self.bn1(self.conv1(x), domain)
        h = self.bn2(self.conv2(h), domain)
        h = self.scale(torch.relu(self.inorm(h, domain)), domain)
        return self.head(h.mean((2, 3)))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    eager = TinyNet()
    compiled_model = TinyNet()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False)
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([0, 2, 0, 2, 1, 1])
    for step in range(2):  # training: outputs, gradients and running stats
        out_e, out_c = eager(x + step, domain), compiled(x + step, domain)
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, atol=1e-5, rtol=1e-5, msg=name)
    assert not torch.equal(compiled_model.bn1.running_mean, torch.zeros_like(compiled_model.bn1.running_mean))
    eager.eval(), compiled_model.eval()
    torch.testing.assert_close(compiled(x, domain), eager(x, domain), atol=1e-5, rtol=1e-5)


def test_compiled_layer_counts_only_calls_that_succeed():
    """Under torch.compile the value checks are the kernels' own; a call they reject must
    leave num_batches_tracked (not only the running stats) as it was. The count is part of
    the running-stat update op, which consumes the forward's outputs, so no compiled
    schedule can move it before the forward."""
    torch.manual_seed(0)
    bn = uk.DomainBatchNorm2d(4, 3, backend="cpp")
    compiled = torch.compile(bn, dynamic=False)
    x = torch.randn(6, 4, 1, 1)
    compiled(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert int(bn.num_batches_tracked) == 1
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for bad, message in ((torch.tensor([0, 1, 2, 0, 1, 3]), "domain values must lie in"),
                         (torch.tensor([0, 1, 2, 0, 1, 1]), "more than 1 value per channel")):
        with pytest.raises((ValueError, RuntimeError), match=message):
            compiled(x, bad)
        for k, v in bn.state_dict().items():
            assert torch.equal(v, before[k]), k
