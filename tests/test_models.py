"""The paper's ResNet-38 family (unirep.models): strategies x sharing schemes, parameter
shapes and counts, backends, mixed vs pure batches, heads and the masked loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import unirep_kernels
from unirep.models import (SHARINGS, STRATEGIES, DomainHeads, PreActUnit, ResNet38, build_model, count_parameters,
                           masked_cross_entropy)
from unirep_kernels import DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d

ALL_STRATEGIES = ["bn-universal", "bn+", "bn-domain-moments", "bn-domain", "in-universal", "in-domain", "none"]
ALL_SHARINGS = ["none", "deep", "full", "partial-first", "partial-last"]
PAPER_CLASSES = [50, 257, 10, 2, 43, 10, 1623, 121, 250, 10]  # Table 1
SMALL = dict(widths=(8, 16, 16, 32), stem_width=4)  # same structure, fewer filters: fast tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster than two fighting on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def classes_for(sharing):
    return [4, 4, 4] if sharing == "full" else [3, 5, 2]


def randomize(model, seed=0):
    """Random norm/scale parameters and moments, so that domains really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def mixed_domain(n, num_domains):
    return torch.arange(n) % num_domains


def test_api_lists_match_issue():
    assert sorted(STRATEGIES) == sorted(ALL_STRATEGIES)
    assert list(SHARINGS) == ALL_SHARINGS


@pytest.mark.parametrize("sharing", ALL_SHARINGS)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_forward_backward_pure_and_mixed(strategy, sharing):
    torch.manual_seed(0)
    k = classes_for(sharing)
    model = build_model("resnet38", num_classes=k, strategy=strategy, sharing=sharing, width=1, **SMALL)
    model.train()
    x = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])

    # pure batch of domain 1
    logits = model(x, 1)
    assert logits.shape == (6, max(k))
    assert torch.isfinite(logits[:, :k[1]]).all()
    assert (logits[:, k[1]:] == -math.inf).all()
    masked_cross_entropy(logits, labels).backward()
    shared_conv = model.head if sharing == "none" else model.body[0].conv
    for p in shared_conv.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    model.zero_grad(set_to_none=True)

    # mixed batch holding every domain: every parameter gets a gradient
    domain = mixed_domain(6, len(k))
    logits = model(x, domain)
    assert logits.shape == (6, max(k))
    for i, d in enumerate(domain.tolist()):
        assert torch.isfinite(logits[i, :k[d]]).all() and (logits[i, k[d]:] == -math.inf).all()
    masked_cross_entropy(logits, labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_default_model_is_resnet38_at_paper_resolution():
    model = build_model(num_classes=[10, 2])
    assert isinstance(model, ResNet38)
    assert (model.strategy, model.sharing, model.width) == ("bn-domain", "deep", 1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    one = [c for c in convs if c.kernel_size == (1, 1)]
    assert (len(three), len(one)) == (33, 4)  # stem + 16 units x 2, 4 projection shortcuts
    assert len(convs) + 1 == 38  # + the classifier
    units = [m for m in model.modules() if isinstance(m, PreActUnit)]
    assert len(units) == 16
    # 64x64 input: four stages at 64, 32, 16, 8
    sizes = []
    hooks = [model.body[i].register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape[1:])))
             for i in range(1, 5)]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), 0)
    for h in hooks:
        h.remove()
    assert sizes == [(32, 64, 64), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
    assert out.shape == (1, 10)


@pytest.mark.parametrize("width", [1, 2, 4])
def test_width_multiplies_filters(width):
    with torch.device("meta"):
        model = build_model(num_classes=[3, 4], width=width)
    assert model.widths == tuple(w * width for w in (32, 64, 128, 256))
    assert model.stem_width == 16 * width
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[-1].out_channels == 256 * width


def _norms(model):
    return [m for m in model.modules() if isinstance(m, (DomainBatchNorm2d, DomainInstanceNorm2d))]


@pytest.mark.parametrize("strategy, layer, weight, moments", [
    ("bn-domain", DomainBatchNorm2d, "domain", "domain"),
    ("bn-domain-moments", DomainBatchNorm2d, "universal", "domain"),
    ("bn-universal", DomainBatchNorm2d, "universal", "universal"),
    ("bn+", DomainBatchNorm2d, "universal", None),
    ("in-domain", DomainInstanceNorm2d, "domain", None),
    ("in-universal", DomainInstanceNorm2d, "universal", None),
])
def test_parameter_shapes_follow_strategy(strategy, layer, weight, moments):
    D = 3
    model = build_model(num_classes=[3, 5, 2], strategy=strategy, **SMALL)
    norms = _norms(model)
    assert norms and all(type(n) is layer for n in norms)
    final = model.body[-1]
    if layer is DomainInstanceNorm2d:
        # no IN right before pooling (see resolve_final_norm): the final layer is the
        # strategy's scale and bias alone
        assert len(norms) == 16 * 2 and final.norm is None
        assert final.affine.weight.shape == ((D, final.affine.weight.shape[-1]) if weight == "domain"
                                             else (final.affine.weight.shape[-1],))
        assert [type(m) for m in model.modules() if isinstance(m, DomainScale2d)] == (
            [DomainScale2d] if weight == "domain" else [])
    else:
        assert not any(isinstance(m, DomainScale2d) for m in model.modules())
        assert len(norms) == 16 * 2 + 1 and final.norm is norms[-1]  # two per unit + the final one
    for n in norms:
        C = n.num_features
        assert n.num_domains == D
        assert n.relu  # ReLU fused into every norm of a pre-activation net
        assert n.weight.shape == ((D, C) if weight == "domain" else (C,))
        assert n.bias.shape == n.weight.shape
        buffers = dict(n.named_buffers())
        if moments is None:
            assert buffers.get("running_mean") is None and buffers.get("running_var") is None
        else:
            assert n.running_mean.shape == ((D, C) if moments == "domain" else (C,))
            assert n.running_var.shape == n.running_mean.shape
    if strategy == "bn+":
        assert all(n.batch_stats_at_eval for n in norms)
    if layer is DomainBatchNorm2d and moments is not None:
        assert all(n.domain_stats == (moments == "domain") for n in norms)


def test_strategy_none_scales_after_every_conv():
    D = 2
    model = build_model(num_classes=[3, 5], strategy="none", **SMALL)
    assert not _norms(model)
    scales = [m for m in model.modules() if isinstance(m, DomainScale2d)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(scales) == len(convs) == 37
    assert all(s.weight.shape == (D, s.num_features) for s in scales)
    # the residual branch's last scale starts at zero, the others at one
    for unit in (m for m in model.modules() if isinstance(m, PreActUnit)):
        assert (unit.scale2.weight == 0).all() and (unit.scale1.weight == 1).all()


def test_domain_specific_parts_have_single_domain_norms():
    D = 3
    for sharing, specific in [("partial-first", 1), ("partial-last", 4)]:
        model = build_model(num_classes=[3, 5, 2], sharing=sharing, **SMALL)
        per = model.body[specific]
        assert len(per.copies) == D
        assert all(n.num_domains == 1 for n in _norms(per))
        shared = [n for i, part in enumerate(model.body) if i != specific for n in _norms(part)]
        assert shared and all(n.num_domains == D for n in shared)
    model = build_model(num_classes=[3, 5, 2], sharing="none", **SMALL)
    assert len(model.body.copies) == D and all(n.num_domains == 1 for n in _norms(model))
    # separate networks really are separate
    ids = [{id(p) for p in c.parameters()} for c in model.body.copies]
    assert not (ids[0] & ids[1])


def _run(model, x, domain):
    with torch.no_grad():
        return model(x, domain)


@pytest.mark.parametrize("sharing", ALL_SHARINGS)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_mixed_batch_equals_pure_batches_in_eval(strategy, sharing):
    torch.manual_seed(1)
    k = classes_for(sharing)
    model = randomize(build_model(num_classes=k, strategy=strategy, sharing=sharing, **SMALL)).eval()
    x = torch.randn(7, 3, 16, 16)
    domain = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    mixed = _run(model, x, domain)
    expected = torch.full_like(mixed, -math.inf)
    for d in range(len(k)):
        idx = (domain == d).nonzero().squeeze(1)
        expected[idx] = _run(model, x[idx], d)
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-5)
    # the domains' outputs differ (the domain really is used) unless fully shared and universal
    if sharing != "full":
        assert not torch.allclose(_run(model, x[:2], 0)[:, :2], _run(model, x[:2], 1)[:, :2])


@pytest.mark.skipif(not unirep_kernels.backends()["cpp"][0], reason="C++ backend not built")
@pytest.mark.parametrize("strategy, sharing", [(s, "deep") for s in ALL_STRATEGIES]
                         + [("bn-domain", "partial-first"), ("bn-domain", "none"), ("in-universal", "partial-last"),
                            ("bn-universal", "full")])
def test_backends_reference_and_cpp_agree(strategy, sharing):
    torch.manual_seed(2)
    k = classes_for(sharing)
    base = randomize(build_model(num_classes=k, strategy=strategy, sharing=sharing, **SMALL)).double()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    domain = mixed_domain(6, len(k))
    results = {}
    for backend in ("reference", "cpp"):
        model = build_model(num_classes=k, strategy=strategy, sharing=sharing, **SMALL).double()
        model.load_state_dict(base.state_dict())
        with unirep_kernels.use_backend(backend):
            out = {}
            for name, dom in (("pure", 1), ("mixed", domain)):
                model.train()
                model.zero_grad()
                logits = model(x, dom)
                masked_cross_entropy(logits, labels).backward()
                out[name + "-train"] = logits.detach()
                out[name + "-grads"] = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
                model.eval()
                out[name + "-eval"] = _run(model, x, dom)
            out["state"] = {key: v.clone() for key, v in model.state_dict().items()}
        results[backend] = out
    ref, cpp = results["reference"], results["cpp"]
    for key in ("pure-train", "mixed-train", "pure-eval", "mixed-eval"):
        torch.testing.assert_close(cpp[key], ref[key], rtol=1e-9, atol=1e-10, msg=key)
    for key in ("pure-grads", "mixed-grads"):
        for a, b in zip(cpp[key], ref[key]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for key in ref["state"]:  # running moments updated the same way
        torch.testing.assert_close(cpp["state"][key], ref["state"][key], rtol=1e-9, atol=1e-10)


def test_pure_batch_touches_only_its_domain():
    model = build_model(num_classes=[3, 5, 2], strategy="bn-domain", sharing="partial-first", **SMALL).train()
    masked_cross_entropy(model(torch.randn(4, 3, 16, 16), 2), torch.tensor([0, 1, 1, 0])).backward()
    copies = model.body[1].copies
    assert all(p.grad is None for d in (0, 1) for p in copies[d].parameters())
    assert all(p.grad is not None for p in copies[2].parameters())
    norm = model.body[2][0].norm1
    assert norm.weight.grad[:2].abs().sum() == 0 and norm.weight.grad[2].abs().sum() > 0
    assert (norm.running_mean[:2] == 0).all() and (norm.running_mean[2] != 0).any()
    heads = model.head
    assert heads.weight.grad[:8].abs().sum() == 0 and heads.head_weight(2).shape == (2, 32)


# --------------------------------------------------------------------------------------
# Parameter counts


def _expected_deep_count(num_classes, widths=(32, 64, 128, 256), stem=16, per_norm_rows=None):
    """ResNet-38 with deep sharing and bn-domain, counted by hand."""
    D = len(num_classes)
    rows = D if per_norm_rows is None else per_norm_rows
    total = 3 * stem * 9
    cin = stem
    for w in widths:
        for u in range(4):
            c = cin if u == 0 else w
            total += c * w * 9 + w * w * 9          # two 3x3 convs
            total += 2 * rows * (c + w)             # norm1 (c channels) and norm2 (w), scale + bias
            if u == 0:
                total += c * w                      # 1x1 projection
        cin = w
    total += 2 * rows * widths[-1]                  # final norm
    total += sum(k * (widths[-1] + 1) for k in num_classes)  # heads
    return total


def test_count_parameters_exact():
    with torch.device("meta"):
        deep = build_model(num_classes=PAPER_CLASSES, sharing="deep")
        none = build_model(num_classes=PAPER_CLASSES, sharing="none")
    assert count_parameters(deep) == _expected_deep_count(PAPER_CLASSES)
    per_net = sum(_expected_deep_count([k], per_norm_rows=1) for k in PAPER_CLASSES)
    assert count_parameters(none) == per_net


def test_deep_sharing_is_a_tenth_of_no_sharing():
    with torch.device("meta"):
        counts = {s: count_parameters(build_model(num_classes=PAPER_CLASSES, sharing=s))
                  for s in ("none", "deep", "partial-first", "partial-last")}
    ratio = counts["deep"] / counts["none"]
    assert 0.08 < ratio < 0.14, counts
    assert counts["deep"] < counts["partial-first"] < counts["partial-last"] < counts["none"]


def test_width_scales_parameters_about_4_and_16_times():
    with torch.device("meta"):
        counts = [count_parameters(build_model(num_classes=[10, 10, 10], sharing="full", width=w)) for w in (1, 2, 4)]
    assert 3.8 < counts[1] / counts[0] < 4.1
    assert 15 < counts[2] / counts[0] < 16.5


def test_count_parameters_counts_shared_tensors_once():
    model = build_model(num_classes=[3, 5], **SMALL)
    n = count_parameters(model)
    assert n == sum(p.numel() for p in model.parameters())
    model.again = model.body[0]  # the same module registered twice
    assert count_parameters(model) == n
    extra = torch.nn.Linear(4, 4)
    model.tied = extra
    model.tied2 = torch.nn.Linear(4, 4)
    model.tied2.weight = extra.weight  # a tied weight
    assert count_parameters(model) == n + 20 + 4
    view = torch.nn.Module()
    view.w = torch.nn.Parameter(extra.weight.data)  # another Parameter over the same memory
    model.view = view
    assert count_parameters(model) == n + 20 + 4
    extra.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == n + 4 + 4 + 16  # view.w is still trainable


# --------------------------------------------------------------------------------------
# Heads and loss


def test_domain_heads_match_separate_linear_layers():
    torch.manual_seed(3)
    heads = DomainHeads(6, [3, 7, 1])
    x = torch.randn(5, 6)
    domain = torch.tensor([1, 0, 2, 1, 0])
    out = heads(x, domain)
    assert out.shape == (5, 7)
    for i, d in enumerate(domain.tolist()):
        ref = F.linear(x[i], heads.head_weight(d), heads.head_bias(d))
        torch.testing.assert_close(out[i, :len(ref)], ref)
        assert (out[i, len(ref):] == -math.inf).all()
        torch.testing.assert_close(heads(x[i:i + 1], d)[0], out[i])
    assert count_parameters(heads) == (3 + 7 + 1) * 7


def test_masked_cross_entropy():
    torch.manual_seed(4)
    model = build_model(num_classes=[3, 5], **SMALL).eval()
    x = torch.randn(4, 3, 16, 16)
    domain = torch.tensor([0, 1, 1, 0])
    labels = torch.tensor([2, 4, 0, 1])
    logits = model(x, domain)
    loss = masked_cross_entropy(logits, labels, reduction="none")
    k = [3, 5]
    for i, d in enumerate(domain.tolist()):
        ref = F.cross_entropy(logits[i:i + 1, :k[d]], labels[i:i + 1])
        torch.testing.assert_close(loss[i], ref)
        ref_s = F.cross_entropy(logits[i:i + 1, :k[d]], labels[i:i + 1], label_smoothing=0.1)
        torch.testing.assert_close(masked_cross_entropy(logits[i:i + 1], labels[i:i + 1], label_smoothing=0.1), ref_s)
    torch.testing.assert_close(masked_cross_entropy(logits, labels), loss.mean())
    torch.testing.assert_close(masked_cross_entropy(logits, labels, reduction="sum"), loss.sum())
    leaf = logits.detach().requires_grad_()
    masked_cross_entropy(leaf, labels, label_smoothing=0.2).backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[0, 3:] == 0).all() and (leaf.grad[3, 3:] == 0).all()
    with pytest.raises(ValueError, match="class its domain does not have"):
        masked_cross_entropy(logits, torch.tensor([3, 4, 0, 1]))  # domain 0 has 3 classes
    with pytest.raises(ValueError, match="labels must lie"):
        masked_cross_entropy(logits, torch.tensor([0, 5, 0, 1]))


def test_class_mask():
    model = build_model(num_classes=[3, 5], **SMALL)
    assert model.class_mask(0).tolist() == [True] * 3 + [False] * 2
    assert model.class_mask(torch.tensor([1, 0])).tolist() == [[True] * 5, [True] * 3 + [False] * 2]


# --------------------------------------------------------------------------------------
# Errors


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown strategy"):
        build_model(num_classes=[2], strategy="bn-sometimes")
    with pytest.raises(ValueError, match="unknown sharing"):
        build_model(num_classes=[2], sharing="shallow")
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("resnet50", num_classes=[2])
    for width in (3, 0, 1.5, True):
        with pytest.raises(ValueError, match="width must be one of"):
            build_model(num_classes=[2], width=width)
    with pytest.raises(ValueError, match="same number of classes"):
        build_model(num_classes=[10, 5], sharing="full")
    with pytest.raises(ValueError, match="num_classes"):
        build_model()
    with pytest.raises(ValueError, match="num_classes"):
        build_model(num_classes=[3, 0])
    with pytest.raises(ValueError, match="widths"):
        build_model(num_classes=[2], widths=(8, 8, 8))
    model = build_model(num_classes=[3, 5], **SMALL)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"ResNet38: domain must lie in \[0, num_domains=2\), got 2"):
        model(x, 2)
    with pytest.raises(ValueError, match=r"ResNet38: domain must lie in \[0, num_domains=2\), got -1"):
        model(x, -1)
    with pytest.raises(ValueError, match="domain values must lie"):
        model(x, torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="int64"):
        model(x, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="domain must be an int"):
        model(x, "0")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(2, 1, 16, 16), 0)
    # sharing="none" remaps domains to 0 inside; the model still rejects a bad domain
    with pytest.raises(ValueError, match="domain must lie"):
        build_model(num_classes=[3, 5], sharing="none", **SMALL)(x, 5)


def test_unirep_reexports_build_model():
    import unirep

    from unirep import DomainBatchNorm2d as Exported
    assert Exported is DomainBatchNorm2d
    assert hasattr(unirep, "build_model"), "unirep/__init__.py must re-export build_model"
    assert unirep.build_model is build_model
