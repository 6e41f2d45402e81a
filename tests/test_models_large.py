"""The large-scale models of section 4.2 (AlexNet, VGG-M-128): shapes and parameter counts
(no training)."""

from __future__ import annotations

import math

import pytest
import torch

from unirep.models import LARGE_SCALE_DOMAINS, LargeScaleNet, build_model, count_parameters, masked_cross_entropy
from unirep_kernels import DomainBatchNorm2d

SMALL_FC = (32, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conv5_shape(model, x, domain):
    """Actual (H, W) of the conv5 map, read with a hook."""
    seen = []
    trunk = model.trunk if model.sharing == "deep" else model.nets.copies[domain].trunk
    h = trunk.layers[-1].register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape[2:])))
    with torch.no_grad():
        model(x, domain)
    h.remove()
    return seen[0]


@pytest.mark.parametrize("arch, sizes, conv5, skip", [
    ("alexnet", [(127, 127), (67, 67), (35, 67)], [(7, 7), (3, 3), (1, 3)], [False, False, True]),
    ("vggm128", [(99, 99), (67, 45), (32, 64)], [(5, 5), (3, 2), (1, 3)], [False, True, True]),
])
def test_shapes_per_domain_input_size(arch, sizes, conv5, skip):
    torch.manual_seed(0)
    k = [5, 7, 3]
    model = build_model(arch, num_classes=k, input_sizes=sizes, fc=SMALL_FC).train()
    assert isinstance(model, LargeScaleNet)
    assert model.conv5_sizes == conv5 and model.skip_last_pool == skip
    channels = 256 if arch == "alexnet" else 512
    for d, (size, skipped) in enumerate(zip(sizes, skip)):
        x = torch.randn(2, 3, *size)
        assert conv5_shape(model, x, d) == conv5[d]
        h, w = model.feature_sizes[d]
        assert model.tails[d].fcs[0].in_features == channels * h * w
        if skipped:
            assert (h, w) == conv5[d]
        logits = model(x, d)
        assert logits.shape == (2, 7)
        assert torch.isfinite(logits[:, :k[d]]).all() and (logits[:, k[d]:] == -math.inf).all()
        masked_cross_entropy(logits, torch.tensor([0, k[d] - 1])).backward()
        assert model.tails[d].classifier.weight.grad is not None
    assert all(p.grad is not None for p in model.trunk.parameters())  # shared convs used by every domain


def test_paper_input_sizes():
    """224x224 ImageNet gives a 6x6 map; the Synth90k crop's map is too small for pool5."""
    sizes = [size for _, size in LARGE_SCALE_DOMAINS.values()]
    classes = [k for k, _ in LARGE_SCALE_DOMAINS.values()]
    with torch.device("meta"):
        vgg = build_model("vggm128", num_classes=classes, input_sizes=sizes)
        alex = build_model("alexnet", num_classes=classes[:2], input_sizes=sizes[:2])
    assert vgg.conv5_sizes[0] == (13, 13) and vgg.feature_sizes[0] == (6, 6)
    assert vgg.tails[0].fcs[0].in_features == 6 * 6 * 512
    assert vgg.skip_last_pool == [False, True, True]
    assert vgg.conv5_sizes[2] == (1, 7) and vgg.feature_sizes[2] == (1, 7)
    assert [fc.out_features for fc in vgg.tails[0].fcs] == [4096, 128]  # the 128-d bottleneck fc7
    assert vgg.tails[2].classifier.weight.shape == (88172, 128)
    assert alex.conv5_sizes[0] == (13, 13) and alex.feature_sizes[0] == (6, 6)
    assert alex.tails[0].fcs[0].in_features == 9216  # AlexNet's fc6
    assert alex.tails[1].fcs[0].in_features != 9216  # fc6 adapted to the VGG-Face crop


def _alexnet_conv_params(D_norm):
    weights = 3 * 96 * 121 + 48 * 256 * 25 + 256 * 384 * 9 + 192 * 384 * 9 + 192 * 256 * 9
    return weights + 2 * D_norm * (96 + 256 + 384 + 384 + 256)


def test_alexnet_parameter_count_matches_the_original():
    with torch.device("meta"):
        model = build_model("alexnet", num_classes=[1000])
    fc = 9216 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert count_parameters(model) == _alexnet_conv_params(1) + fc
    assert 60.9e6 < count_parameters(model) < 61.0e6  # AlexNet's ~61M


def test_vggm128_parameter_count():
    with torch.device("meta"):
        model = build_model("vggm128", num_classes=[1000])
    convs = 3 * 96 * 49 + 96 * 256 * 25 + 256 * 512 * 9 + 2 * 512 * 512 * 9 + 2 * (96 + 256 + 512 * 3)
    fc = 18432 * 4096 + 4096 + 4096 * 128 + 128 + 128 * 1000 + 1000
    assert count_parameters(model) == convs + fc


@pytest.mark.parametrize("arch", ["alexnet", "vggm128"])
def test_deep_sharing_shares_the_convolutions_only(arch):
    classes, sizes = [10, 20], [(99, 99), (67, 67)]
    with torch.device("meta"):
        deep = build_model(arch, num_classes=classes, input_sizes=sizes, fc=SMALL_FC)
        none = build_model(arch, num_classes=classes, input_sizes=sizes, fc=SMALL_FC, sharing="none")
        singles = [build_model(arch, num_classes=[k], input_sizes=[s], fc=SMALL_FC) for k, s in zip(classes, sizes)]
    trunk = count_parameters(deep.trunk)
    tails = count_parameters(deep.tails)
    assert count_parameters(deep) == trunk + tails
    assert count_parameters(none) == sum(count_parameters(m) for m in singles)
    single_trunk = count_parameters(singles[0].trunk)
    # deep: one trunk (with (D, C) norm parameters) instead of D
    norm_extra = sum(n.weight.numel() + n.bias.numel() for n in deep.trunk.modules()
                     if isinstance(n, DomainBatchNorm2d)) // 2
    assert trunk == single_trunk + norm_extra
    assert count_parameters(none) - count_parameters(deep) == single_trunk - norm_extra
    assert all(n.num_domains == 2 and n.weight.shape[0] == 2 for n in deep.trunk.modules()
               if isinstance(n, DomainBatchNorm2d))


@pytest.mark.parametrize("arch", ["alexnet", "vggm128"])
@pytest.mark.parametrize("sharing", ["deep", "none"])
def test_mixed_batch_equals_pure_in_eval(arch, sharing):
    torch.manual_seed(1)
    model = build_model(arch, num_classes=[4, 6], input_sizes=(99, 99), fc=SMALL_FC, sharing=sharing)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DomainBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
    model.eval()
    x = torch.randn(5, 3, 99, 99)
    domain = torch.tensor([1, 0, 0, 1, 1])
    with torch.no_grad():
        mixed = model(x, domain)
        assert mixed.shape == (5, 6)
        for d in (0, 1):
            idx = (domain == d).nonzero().squeeze(1)
            torch.testing.assert_close(mixed[idx], model(x[idx], d), rtol=1e-4, atol=1e-5)
    assert (mixed[1, 4:] == -math.inf).all() and torch.isfinite(mixed[0]).all()


def test_large_errors():
    with pytest.raises(ValueError, match="supports sharing"):
        build_model("alexnet", num_classes=[3, 4], sharing="partial-first")
    with pytest.raises(ValueError, match="too small"):
        build_model("vggm128", num_classes=[3], input_sizes=[(9, 9)])
    with pytest.raises(ValueError, match="input_sizes"):
        build_model("alexnet", num_classes=[3, 4], input_sizes=[(99, 99)] * 3)
    with pytest.raises(ValueError, match="skip_last_pool"):
        build_model("alexnet", num_classes=[3, 4], skip_last_pool=[True])
    with pytest.raises(ValueError, match="width"):
        build_model("vggm128", num_classes=[3], width=3)
    with pytest.raises(ValueError, match="unknown strategy"):
        build_model("vggm128", num_classes=[3], strategy="ln")
    model = build_model("alexnet", num_classes=[3, 4], input_sizes=(67, 67), fc=SMALL_FC)
    with pytest.raises(ValueError, match="domain must lie"):
        model(torch.randn(2, 3, 67, 67), 2)


def test_explicit_skip_and_strategy_none():
    model = build_model("alexnet", num_classes=[3, 4], input_sizes=(67, 67), fc=SMALL_FC,
                        skip_last_pool=[True, False], strategy="in-domain")
    assert model.feature_sizes == [(3, 3), (1, 1)]
    assert model.tails[0].fcs[0].in_features == 256 * 9 and model.tails[1].fcs[0].in_features == 256
    out = model(torch.randn(2, 3, 67, 67), torch.tensor([0, 1]))
    assert out.shape == (2, 4) and out[0, 3] == -math.inf
    none = build_model("vggm128", num_classes=[3], input_sizes=(67, 67), fc=SMALL_FC, strategy="none")
    assert none(torch.randn(2, 3, 67, 67), 0).shape == (2, 3)
