"""Layers: DomainBatchNorm2d (incl. BN+), DomainInstanceNorm2d, DomainScale2d, the domain
context, convert_domain_norm and loading plain norm-layer state dicts."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unirep
import unirep_kernels as uk
from conftest import CPU_BACKENDS

BACKENDS = ["reference"] + CPU_BACKENDS


def test_unirep_reexports_layers():
    assert unirep.DomainBatchNorm2d is uk.DomainBatchNorm2d
    assert uk.nn.DomainInstanceNorm2d is uk.DomainInstanceNorm2d


@pytest.mark.parametrize("domain_affine,domain_stats,weight_shape,stat_shape", [
    (True, True, (3, 8), (3, 8)), (False, True, (8,), (3, 8)), (True, False, (3, 8), (8,)), (False, False, (8,), (8,))])
def test_parameter_shapes(domain_affine, domain_stats, weight_shape, stat_shape):
    bn = uk.DomainBatchNorm2d(8, 3, domain_affine=domain_affine, domain_stats=domain_stats)
    assert bn.weight.shape == weight_shape and bn.bias.shape == weight_shape
    assert bn.running_mean.shape == stat_shape and bn.running_var.shape == stat_shape
    assert uk.DomainBatchNorm2d(8, 3, affine=False).weight is None
    assert uk.DomainBatchNorm2d(8, 3, track_running_stats=False).running_mean is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_updates_only_present_domains_and_eval_uses_own_moments(backend):
    torch.manual_seed(0)
    bn = uk.DomainBatchNorm2d(4, 3, momentum=1.0, backend=backend).double()
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    domain = torch.tensor([0, 2, 0, 2, 0, 2, 0, 2])
    x = x + domain.view(-1, 1, 1, 1) * 5
    bn(x, domain)
    for d in (0, 2):
        torch.testing.assert_close(bn.running_mean[d], x[domain == d].mean((0, 2, 3)))
        torch.testing.assert_close(bn.running_var[d], x[domain == d].var((0, 2, 3), unbiased=True))
    assert torch.equal(bn.running_mean[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(bn.running_var[1], torch.ones(4, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    y = bn(x, domain)
    for d in (0, 2):
        expected = F.batch_norm(x[domain == d], bn.running_mean[d], bn.running_var[d], bn.weight[d], bn.bias[d])
        torch.testing.assert_close(y[domain == d], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_plus_uses_batch_stats_at_eval_without_updating(backend):
    torch.manual_seed(1)
    bn = uk.DomainBatchNorm2d(4, 2, domain_affine=False, domain_stats=False, batch_stats_at_eval=True,
                              backend=backend).double().eval()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 3 + 7
    y = bn(x, 1)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, bn.weight, bn.bias, training=True))
    assert torch.equal(bn.running_mean, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_domain_context_and_explicit_domain_agree(backend):
    torch.manual_seed(2)
    bn = uk.DomainBatchNorm2d(3, 4, backend=backend).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.weight.normal_()
    x = torch.randn(5, 3, 4, 4)
    with uk.domain(2):
        y_ctx = bn(x)
        with uk.domain(torch.tensor([1, 1, 2, 3, 0])):
            y_inner = bn(x)
        assert uk.current_domain() == 2
    assert uk.current_domain() is None
    torch.testing.assert_close(y_ctx, bn(x, 2))
    torch.testing.assert_close(y_inner, bn(x, torch.tensor([1, 1, 2, 3, 0])))
    assert not torch.allclose(y_ctx, bn(x, 1))
    with pytest.raises(RuntimeError, match="needs a domain"):
        bn(x)
    with pytest.raises(TypeError, match="domain must be an int"):
        with uk.domain("sketches"):
            pass


def test_failing_layer_call_leaves_buffers_untouched():
    bn = uk.DomainBatchNorm2d(3, 2)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="domain values must lie in"):
        bn(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layers_reject_non_4d_input():
    with pytest.raises(ValueError, match="expected a 4D input"):
        uk.DomainBatchNorm2d(3, 2)(torch.randn(4, 3, 5), 0)
    with pytest.raises(ValueError, match="expected a 4D input"):
        uk.DomainInstanceNorm2d(3, 2)(torch.randn(4, 3), 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_layer_domain_affine(backend):
    torch.manual_seed(3)
    layer = uk.DomainInstanceNorm2d(3, 2, backend=backend)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(4, 3, 6, 6)
    domain = torch.tensor([1, 0, 0, 1])
    y = layer(x, domain)
    xhat = F.instance_norm(x)
    expected = xhat * layer.weight[domain][:, :, None, None] + layer.bias[domain][:, :, None, None]
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_domain_scale():
    torch.manual_seed(4)
    layer = uk.DomainScale2d(3, 2)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(4, 3, 2, 2)
    domain = torch.tensor([1, 0, 1, 1])
    y = layer(x, domain)
    for n in range(4):
        d = int(domain[n])
        torch.testing.assert_close(y[n], x[n] * layer.weight[d][:, None, None] + layer.bias[d][:, None, None])
    torch.testing.assert_close(layer(x, 0), x * layer.weight[0][:, None, None] + layer.bias[0][:, None, None])
    y.sum().backward()
    assert layer.weight.grad.shape == (2, 3) and torch.count_nonzero(layer.weight.grad[0]) > 0
    with pytest.raises(ValueError, match="domain must lie in"):
        layer(x, 2)


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 5, 3), nn.InstanceNorm2d(5, affine=True))
        self.bn = nn.BatchNorm2d(5, affine=False)

    def forward(self, x):
        return self.bn(self.features(x)).mean((2, 3))


def test_convert_domain_norm_copies_everything_into_every_row():
    torch.manual_seed(5)
    net = PlainNet()
    with torch.no_grad():  # non-trivial weights and moments to copy
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                m.weight.normal_()
                m.bias.normal_()
        net.features[1].running_mean.normal_()
        net.features[1].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 9, 9)
    net.eval()
    expected = net(x)
    converted = uk.convert_domain_norm(net, 3)
    assert isinstance(converted.features[1], uk.DomainBatchNorm2d)
    assert isinstance(converted.features[4], uk.DomainInstanceNorm2d)
    assert isinstance(converted.bn, uk.DomainBatchNorm2d) and converted.bn.weight is None
    assert not converted.features[1].training
    assert converted.features[1].weight.shape == (3, 6)
    for d in range(3):
        with uk.domain(d):
            torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
    with uk.domain(torch.tensor([0, 2, 1, 0])):
        torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
    # A converted top-level norm layer is returned as a new module.
    top = uk.convert_domain_norm(nn.BatchNorm2d(4), 2)
    assert isinstance(top, uk.DomainBatchNorm2d)


def test_convert_domain_norm_converts_sync_batch_norm_for_the_trainers_merging():
    """SyncBatchNorm becomes DomainBatchNorm2d (weights and moments in every row), whose
    running moments the trainer's StatsMerger merges across ranks after each step."""
    from unirep import distributed as udist

    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4, momentum=0.2))
    with torch.no_grad():
        net[1].weight.normal_()
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 6, 6)
    expected = net.eval()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing to warn about
        converted = uk.convert_domain_norm(net, 3)
    layer = converted[1]
    assert isinstance(layer, uk.DomainBatchNorm2d) and layer.momentum == 0.2 and layer.weight.shape == (3, 4)
    for d in range(3):
        with uk.domain(d):
            torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
    merged = {name for name, _, _ in udist.StatsMerger(converted, 3).entries}
    assert merged == {"1.running_mean", "1.running_var"}


def test_convert_domain_norm_warns_naming_each_layer_it_skips():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                        nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm3d(4), nn.InstanceNorm1d(4, affine=True)),
                        nn.InstanceNorm1d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match="convert_domain_norm: left 3 normalization layer") as caught:
        converted = uk.convert_domain_norm(net, 2)
    assert len(caught) == 1
    message = str(caught[0].message)
    for name in ("2.0 (BatchNorm1d)", "2.1 (BatchNorm3d)", "2.2 (InstanceNorm1d)"):
        assert name in message, message
    assert "GroupNorm" not in message and "LayerNorm" not in message  # per-sample: nothing domain-specific
    assert isinstance(converted[1], uk.DomainBatchNorm2d) and isinstance(converted[2][0], nn.BatchNorm1d)


def test_plain_batchnorm_state_dict_loads_into_every_domain_row():
    torch.manual_seed(6)
    plain = nn.BatchNorm2d(5)
    with torch.no_grad():
        plain.weight.normal_()
        plain.running_var.uniform_(0.5, 2)
    layer = uk.DomainBatchNorm2d(5, 4)
    layer.load_state_dict(plain.state_dict())
    for d in range(4):
        assert torch.equal(layer.weight[d], plain.weight) and torch.equal(layer.running_var[d], plain.running_var)
    universal = uk.DomainBatchNorm2d(5, 4, domain_affine=False, domain_stats=False)
    universal.load_state_dict(plain.state_dict())
    assert torch.equal(universal.weight, plain.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(nn.BatchNorm2d(6).state_dict())


def test_extra_repr_is_readable():
    text = repr(uk.DomainBatchNorm2d(16, 10, domain_affine=False, batch_stats_at_eval=True, relu=True))
    assert "DomainBatchNorm2d(16, num_domains=10" in text
    assert "affine=universal" in text and "stats=domain" in text and "batch_stats_at_eval=True" in text
    assert "DomainInstanceNorm2d(8, num_domains=2" in repr(uk.DomainInstanceNorm2d(8, 2))
    assert "DomainScale2d(4, num_domains=3)" in repr(uk.DomainScale2d(4, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_trains_under_sgd(backend):
    """End to end: a converted net learns (loss falls) with mixed batches on the layers."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), uk.DomainBatchNorm2d(8, 2, relu=True, backend=backend),
                        uk.DomainScale2d(8, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(32, 3, 8, 8)
    labels = (x[:, 0].mean((1, 2)) > 0).long()
    domain = torch.arange(32) % 2
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def loss_fn():
        h = x
        for m in net:
            h = m(h, domain) if isinstance(m, (uk.DomainBatchNorm2d, uk.DomainScale2d)) else m(h)
        return F.cross_entropy(h, labels)

    first = loss_fn().item()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_convert_keeps_dtype_and_frozen_parameters():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).double()
    net[1].weight.requires_grad_(False)
    converted = uk.convert_domain_norm(net, 2)
    assert converted[1].weight.dtype == torch.float64 and converted[1].running_var.dtype == torch.float64
    assert not converted[1].weight.requires_grad and converted[1].bias.requires_grad


def test_old_batchnorm_state_dict_without_num_batches_tracked_loads():
    plain = nn.BatchNorm2d(5)
    state = {k: v for k, v in plain.state_dict().items() if k != "num_batches_tracked"}
    layer = uk.DomainBatchNorm2d(5, 3)
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 0


def test_domain_scale_rejects_out_of_range_domain_tensor():
    with pytest.raises(ValueError, match=r"DomainScale2d: domain values must lie in \[0, num_domains=2\), got 2"):
        uk.DomainScale2d(3, 2)(torch.randn(2, 3, 2, 2), torch.tensor([0, 2]))
