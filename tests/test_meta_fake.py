"""Meta and fake tensors: the functional ops, the layers and build_model give the right
shapes on the meta device and under FakeTensorMode / torch.export (shapes only: no .item(),
no memory-overlap check on storage that does not exist), for pure and mixed batches."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import unirep_kernels as uk
from conftest import CPU_BACKENDS
from unirep.models import build_model

BACKENDS = ["reference"] + CPU_BACKENDS
BATCHES = ["pure", "mixed"]
D, C = 3, 4
SMALL = dict(widths=(4, 4, 8, 8), stem_width=4, units_per_stage=1)


def _domain(batch, n=6):
    return 1 if batch == "pure" else torch.tensor([0, 1, 2, 0, 1, 2][:n])


def _layers(backend):
    return [uk.DomainBatchNorm2d(C, D, backend=backend),
            uk.DomainBatchNorm2d(C, D, domain_affine=False, domain_stats=False, backend=backend),
            uk.DomainBatchNorm2d(C, D, track_running_stats=False, batch_stats_at_eval=True, backend=backend),
            uk.DomainInstanceNorm2d(C, D, backend=backend), uk.DomainScale2d(C, D)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("training", [True, False])
def test_layers_on_meta(backend, batch, training):
    with torch.device("meta"):
        layers = _layers(backend)
        x = torch.randn(6, C, 5, 5).contiguous(memory_format=torch.channels_last)
        domain = _domain(batch)
    for layer in layers:
        layer.train(training)
        y = layer(x, domain)
        assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype, layer
        assert y.is_contiguous(memory_format=torch.channels_last), layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_layers_under_fake_tensor_mode(backend, batch):
    with FakeTensorMode():
        layers = _layers(backend)
        x = torch.randn(6, C, 5, 5)
        domain = _domain(batch)
        for layer in layers:
            y = layer(x, domain)
            assert y.shape == x.shape and y.dtype == x.dtype, layer
            y.sum().backward()  # the backward traces too
            assert layer.weight.grad.shape == layer.weight.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_functional_ops_on_meta(backend, batch):
    with torch.device("meta"):
        x = torch.randn(6, C, 3, 2, dtype=torch.bfloat16)
        w, b, rm, rv = torch.ones(D, C), torch.zeros(D, C), torch.zeros(C), torch.ones(C)
        domain = _domain(batch)
    y = uk.domain_batch_norm(x, domain, w, b, rm, rv, num_domains=D, use_batch_stats=True, stats_per_domain=True,
                             backend=backend)
    assert (y.device.type, y.shape, y.dtype) == ("meta", x.shape, x.dtype)
    y = uk.domain_batch_norm(x, domain, w, b, rm, rv, num_domains=D, use_batch_stats=False, backend=backend)
    assert y.shape == x.shape
    y = uk.domain_instance_norm(x, domain, w, None, num_domains=D, backend=backend)
    assert y.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_inputs_still_get_shape_errors(backend):
    """Shape-only does not mean unchecked: what needs no data is still checked."""
    with torch.device("meta"):
        x = torch.randn(6, C, 3, 3)
    with pytest.raises(ValueError, match=r"domain tensor must be int64 with shape \(N,\) = \(6,\) on meta"):
        uk.domain_batch_norm(x, torch.zeros(5, dtype=torch.long, device="meta"), num_domains=D,
                             use_batch_stats=True, backend=backend)
    with pytest.raises(ValueError, match=r"domain must lie in \[0, num_domains=3\), got 3"):
        uk.domain_batch_norm(x, 3, num_domains=D, use_batch_stats=True, backend=backend)
    with pytest.raises(ValueError, match="weight must have shape"):
        uk.domain_batch_norm(x, 0, torch.ones(C + 1, device="meta"), num_domains=D, use_batch_stats=True,
                             backend=backend)


@pytest.mark.parametrize("sharing", ["deep", "none", "partial-first", "full"])
@pytest.mark.parametrize("batch", BATCHES)
def test_build_model_on_meta(sharing, batch):
    with torch.device("meta"):
        model = build_model(num_classes=[5, 5, 5], sharing=sharing, **SMALL)
        x = torch.randn(6, 3, 16, 16)
        domain = _domain(batch)
        logits = model(x, domain)
    assert (logits.device.type, tuple(logits.shape)) == ("meta", (6, 5))


@pytest.mark.parametrize("batch", BATCHES)
def test_large_model_on_meta(batch):
    with torch.device("meta"):
        model = build_model("alexnet", num_classes=[4, 7, 2], input_sizes=[(64, 64)] * 3, fc=(16, 16))
        logits = model(torch.randn(6, 3, 64, 64), _domain(batch))
    assert tuple(logits.shape) == (6, 7)


@pytest.mark.parametrize("batch", BATCHES)
def test_build_model_under_fake_tensor_mode(batch):
    model = build_model(num_classes=[5, 3, 4], **SMALL)
    with FakeTensorMode(allow_non_fake_inputs=True):
        logits = model(torch.randn(6, 3, 16, 16), _domain(batch))
    assert tuple(logits.shape) == (6, 5)


def test_mixed_batch_through_per_domain_copies_is_refused_under_fake_mode():
    """The split of a mixed batch into per-domain groups depends on the data: under fake
    tensors it is refused with a clear error instead of tracing something else."""
    model = build_model(num_classes=[5, 3, 4], sharing="none", **SMALL)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match="needs the domain values"):
            model(torch.randn(6, 3, 16, 16), _domain("mixed"))
        assert tuple(model(torch.randn(6, 3, 16, 16), 2).shape) == (6, 5)  # a pure batch traces


@pytest.mark.parametrize("batch", BATCHES)
def test_torch_export_of_build_model(batch):
    torch.manual_seed(0)
    model = build_model(num_classes=[5, 3, 4], **SMALL).eval()
    with torch.no_grad():  # moments that differ per domain, so a wrong row would show
        for m in model.modules():
            if isinstance(m, uk.DomainBatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    x, domain = torch.randn(6, 3, 16, 16), _domain(batch)
    args = (x,) if batch == "pure" else (x, domain)

    class Wrapper(torch.nn.Module):  # a pure batch's int domain is a constant of the graph
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, d=None):
            return self.model(x, domain if d is None else d)

    exported = torch.export.export(Wrapper(), args)
    torch.testing.assert_close(exported.module()(*args), model(x, domain))


def test_torch_export_of_a_training_layer_updates_running_stats():
    layer = uk.DomainBatchNorm2d(C, D).train()
    x, domain = torch.randn(6, C, 3, 3), _domain("mixed")
    exported = torch.export.export(layer, (x, domain))
    eager = uk.DomainBatchNorm2d(C, D).train()
    module = exported.module()
    torch.testing.assert_close(module(x, domain), eager(x, domain))
    torch.testing.assert_close(module.running_mean, eager.running_mean)
    assert int(module.num_batches_tracked) == 1
