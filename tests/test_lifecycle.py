"""The domain lifecycle (issue 17): add_domain keeps the old domains bit for bit,
recalibrate re-estimates one domain's moments and nothing else, export_domain gives a plain
PyTorch module equal to the universal model, and python -m unirep.adapt end to end."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import unirep
from unirep import add_domain, export_domain, recalibrate
from unirep import adapt as AD
from unirep import evaluate as EV
from unirep import predict as PR
from unirep import train as T
from unirep.lifecycle import count_domain_parameters, domain_parameters, shared_moment_layers
from unirep.models import build_model
from unirep_kernels import DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d

SMALL = dict(widths=(4, 8, 8, 8), stem_width=4, units_per_stage=1)
# (strategy, sharing): every domain-muxed part (BN, IN, DomainScale2d, heads, per-domain copies)
CONFIGS = [("bn-domain", "deep"), ("bn-domain-moments", "partial-first"), ("in-domain", "partial-last"),
           ("none", "none"), ("bn-universal", "full"), ("in-universal", "deep"), ("bn+", "partial-last"),
           ("bn-domain", "none")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second thread only adds contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomized(strategy, sharing, num_classes=(3, 5, 4), seed=0, **kw):
    """A small ResNet38 whose every parameter and moment is random (no 0/1 left)."""
    torch.manual_seed(seed)
    if sharing == "full":
        num_classes = (4,) * len(num_classes)
    model = build_model("resnet38", num_classes=list(num_classes), strategy=strategy, sharing=sharing,
                        **dict(SMALL, **kw))
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.5)
    return model.eval()


def mixed_domain(n, D):
    return torch.arange(n) % D


@pytest.mark.parametrize("strategy,sharing", CONFIGS)
def test_add_domain_keeps_old_domains_bitwise(strategy, sharing):
    model = randomized(strategy, sharing)
    x = torch.randn(6, 3, 16, 16)
    D = model.num_domains
    before = [model(x, d) for d in range(D)] + [model(x, mixed_domain(6, D))]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    k_new = 4 if sharing == "full" else 7
    assert add_domain(model, k_new) == D
    assert model.num_domains == D + 1 and model.num_classes[-1] == k_new
    assert model.max_classes == max(model.num_classes)
    for m in model.modules():
        if isinstance(m, unirep.models.PerDomain):
            assert len(m.copies) == D + 1
    shared = [m for m in model.modules() if isinstance(m, (DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d))
              and m.num_domains != 1]
    assert all(m.num_domains == D + 1 for m in shared)
    after = [model(x, d) for d in range(D)] + [model(x, mixed_domain(6, D))]
    for b, a in zip(before, after):
        assert torch.equal(a[:, :b.shape[1]], b)  # bitwise; wider logits only if K grew
        assert torch.isinf(a[:, b.shape[1]:]).all()
    new_state = model.state_dict()
    for key, old in state.items():  # every old entry is kept: whole, or as the first rows
        new = new_state[key]
        assert torch.equal(new if new.shape == old.shape else new[:old.shape[0]], old), key
    # a mixed batch with the new domain in it runs, and its samples get the new domain's logits
    dom = mixed_domain(8, D + 1)
    out = model(torch.randn(8, 3, 16, 16), dom)
    assert torch.isfinite(out[dom == D][:, :k_new]).all()


def test_add_domain_initialization():
    model = randomized("bn-domain", "partial-last")
    bn = next(m for m in model.modules() if isinstance(m, DomainBatchNorm2d) and m.num_domains == 3)
    old = {n: getattr(bn, n).detach().clone() for n in ("weight", "bias", "running_mean", "running_var")}
    add_domain(model, 5, init="mean")
    for n, t in old.items():
        torch.testing.assert_close(getattr(bn, n)[3], t.mean(0), rtol=0, atol=1e-6)
    # the mean of the per-domain copies' weights, too
    copies = next(m for m in model.modules() if isinstance(m, unirep.models.PerDomain)).copies
    w = [dict(c.named_parameters())["0.0.conv1.weight"] for c in copies]
    torch.testing.assert_close(w[3], torch.stack(w[:3]).mean(0), rtol=0, atol=1e-6)
    # init=d with as many classes: the new domain computes exactly what domain d does
    d = add_domain(model, 5, init=1)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(model(x, d), model(x, 1))


@pytest.mark.parametrize("strategy,sharing", [("bn-domain", "partial-first"), ("none", "deep")])
def test_checkpoint_after_add_domain_loads_back(strategy, sharing, tmp_path):
    model = randomized(strategy, sharing)
    add_domain(model, 6, init=0)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = build_model("resnet38", num_classes=[3, 5, 4, 6], strategy=strategy, sharing=sharing, **SMALL)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))  # strict
    fresh.eval()
    x = torch.randn(4, 3, 16, 16)
    for d in range(4):
        assert torch.equal(fresh(x, d), model(x, d))
    assert torch.equal(fresh(x, torch.tensor([3, 0, 3, 2])), model(x, torch.tensor([3, 0, 3, 2])))


def test_add_domain_bad_input():
    model = randomized("bn-domain", "deep")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        add_domain(model, 0)
    with pytest.raises(ValueError, match="init must be 'mean' or the index"):
        add_domain(model, 3, init="median")
    with pytest.raises(ValueError, match="add_domain"):
        add_domain(model, 3, init=3)
    with pytest.raises(ValueError, match="sharing='full'"):
        add_domain(randomized("bn-domain", "full"), 7)
    with pytest.raises(TypeError, match="ResNet38"):
        add_domain(nn.Linear(2, 2), 3)
    assert model.num_domains == 3  # nothing grew
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_domain_parameters_are_the_domains_own():
    model = randomized("bn-domain", "partial-first")
    d = add_domain(model, 6)
    own = domain_parameters(model, d)
    names = {n for n, _, _ in own}
    assert any(n.startswith("body.1.copies.3.") for n in names)  # its copy of stage 1
    assert "head.weight" in names and not any(n.startswith("body.1.copies.0.") for n in names)
    head_rows = next(rows for n, _, rows in own if n == "head.weight")
    assert int(head_rows.sum()) == 6
    assert count_domain_parameters(model, d) < sum(p.numel() for p in model.parameters()) * 0.5
    assert shared_moment_layers(randomized("bn-universal", "deep"))  # universal moments are shared
    assert not shared_moment_layers(model)


# ----------------------------------------------------------------------------- recalibrate

def _inputs_of(model, layers, fn):
    """The inputs each layer receives while ``fn`` runs."""
    seen = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen[id(m)].append(a[0].detach().double()))
             for m in layers]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("sharing", ["deep", "partial-last"])
def test_recalibrate_matches_a_reference_and_leaves_the_rest(sharing):
    model = randomized("bn-domain", sharing)
    d = 1
    images = torch.randn(40, 3, 16, 16) * 1.5 + 0.7  # a "shifted" domain
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Reference: the layers of domain d run on all the images at once with batch statistics,
    # every other layer at eval; the new moments are the mean and unbiased variance of what
    # each of those layers receives (computed here with plain torch).
    ref_model = copy.deepcopy(model)
    layers = [m for m in ref_model.modules() if isinstance(m, DomainBatchNorm2d)]
    own = [m for m in layers if (m.running_mean.dim() == 2 and m.num_domains > 1)] if sharing == "deep" else None
    if sharing == "partial-last":
        copy_d = next(m for m in ref_model.modules() if isinstance(m, unirep.models.PerDomain)).copies[d]
        in_copy = {id(m) for m in copy_d.modules()}
        own = [m for m in layers if m.num_domains > 1 or id(m) in in_copy]
    for m in own:
        m.train()
    seen = _inputs_of(ref_model, own, lambda: ref_model(images, d))
    recalibrate(model, images, d, batch_size=64)
    new = model.state_dict()
    names = {id(m): n for n, m in ref_model.named_modules()}
    for m in own:
        x = torch.cat(seen[id(m)])
        row = d if m.num_domains > 1 else 0
        name = names[id(m)]
        torch.testing.assert_close(new[name + ".running_mean"][row].double(), x.mean(dim=(0, 2, 3)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new[name + ".running_var"][row].double(), x.var(dim=(0, 2, 3)),
                                   rtol=1e-4, atol=1e-5)
    # nothing else moved: parameters, other domains' rows, other copies, batch counters
    for key, old in state.items():
        t = new[key]
        if key.endswith(("running_mean", "running_var")) and t.dim() == 2 and t.shape[0] == 3:
            keep = [r for r in range(3) if r != d]
            assert torch.equal(t[keep], old[keep]), key
        elif f"copies.{d}." in key and key.endswith(("running_mean", "running_var")):
            continue
        else:
            assert torch.equal(t, old), key
    assert not model.training


def test_recalibrate_batches_weighted_and_uint8():
    model = randomized("bn-domain", "deep")
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (50, 3, 16, 16), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate(a, raw, 2, batch_size=16, mean=mean, std=std)  # 16+16+16+2: weighted by size
    from unirep.data import whiten
    loader = [(whiten(raw[i:i + 16], mean, std), torch.zeros(16)) for i in range(0, 50, 16)]
    recalibrate(b, loader, 2)  # a loader of (images, labels) batches: same result
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-6, msg=k)
    # the first norm's new mean is the exact mean of its input over the 50 images
    first = a.body[1][0].norm1
    x = a.body[0](whiten(raw, mean, std), 2)
    torch.testing.assert_close(first.running_mean[2], x.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_recalibrate_bad_input():
    model = randomized("bn-domain", "deep")
    x = torch.randn(8, 3, 16, 16)
    with pytest.raises(ValueError, match="recalibrate"):
        recalibrate(model, x, 3)
    with pytest.raises(ValueError, match="no running moments of its own"):
        recalibrate(randomized("in-domain", "deep"), x, 0)
    with pytest.raises(ValueError, match="uint8 images need"):
        recalibrate(model, torch.zeros(4, 3, 16, 16, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="batch_size"):
        recalibrate(model, x, 0, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        recalibrate(model, torch.randn(3, 16, 16), 0)


# ----------------------------------------------------------------------------- export

# The layers of an exported model; torch.fx holds them in bare torch.nn.Module containers.
STANDARD = (nn.Conv2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear,
            nn.Module)


@pytest.mark.parametrize("strategy,sharing,stem", [c + (8 if i % 2 == 0 else 4,) for i, c in enumerate(CONFIGS)])
def test_export_matches_the_universal_model(strategy, sharing, stem):
    # stem 8 -> stage 1 width 4: a projection after the stem (its norm folds into the stem conv)
    model = randomized(strategy, sharing, num_classes=(3, 5, 4), stem_width=stem)
    x = torch.randn(6, 3, 16, 16)
    for d in range(3):
        plain = export_domain(model, d)
        assert not plain.training
        k = model.num_classes[d]
        y = plain(x)
        assert y.shape == (6, k)
        ref = model(x, d)[:, :k].detach()
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))
        for name, m in plain.named_modules():
            if name:
                assert type(m) in STANDARD and type(m).__module__.startswith("torch.nn."), (name, type(m))


def test_export_folds_norms_into_convs():
    # bn-domain with a projection after the stem (stem 8, stage 1 width 4): every norm that
    # follows a conv is folded; only the norms after a residual sum remain, as affines
    model = randomized("bn-domain", "deep", stem_width=8)
    plain = export_domain(model, 1)
    bns = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 + 1  # units 2..4 (input: a residual sum) and the final norm
    assert all(m.eps == 0 and torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bns)
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.bias is not None for m in convs) == 1 + 4  # the stem and every unit's first conv


def test_export_runs_without_unirep_and_traces(tmp_path):
    model = randomized("bn-domain", "partial-first")
    plain = export_domain(model, 2)
    assert isinstance(plain, torch.fx.GraphModule)
    x = torch.randn(4, 3, 16, 16)
    torch.save({"model": plain, "x": x, "y": model(x, 2)[:, :4].detach()}, tmp_path / "plain.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["unirep_kernels"] = None  # any import of it fails
        sys.modules["unirep"] = None
        import torch
        obj = torch.load({str(tmp_path / "plain.pt")!r}, weights_only=False)
        y = obj["model"](obj["x"])
        assert "unirep_kernels" not in [m for m in sys.modules if sys.modules[m] is not None]
        assert torch.allclose(y, obj["y"], rtol=0, atol=1e-5), (y - obj["y"]).abs().max()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    exported = torch.export.export(plain, (x,))
    torch.testing.assert_close(exported.module()(x), plain(x), rtol=0, atol=1e-6)


def test_export_bad_input():
    model = randomized("bn-domain", "deep")
    with pytest.raises(ValueError, match="export_domain"):
        export_domain(model, 5)
    with pytest.raises(TypeError, match="ResNet38"):
        export_domain(nn.Linear(2, 2), 0)


# ----------------------------------------------------------------------------- adapt CLI

TINY = ["--domains", "digits,pedestrians", "--train-per-domain", "48", "--test-per-domain", "16",
        "--image-size", "16", "--widths", "4,4,8,8", "--stem-width", "4", "--units-per-stage", "1",
        "--batch-size", "8", "--no-progress", "--backend", "cpp"]


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("unirep-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIREP_CACHE_DIR", str(d))
        mp.delenv("UNIREP_DEBUG", raising=False)
        run = tmp_path_factory.mktemp("lifecycle") / "parent"
        assert T.main(TINY + ["--steps", "4", "--warmup-steps", "1", "--out", str(run)]) == 0
        yield run


def _one_line_error(capsys, status, *expected):
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for text in expected:
        assert text in err[0], err


def test_adapt_end_to_end(parent_run, tmp_path, capsys):
    from PIL import Image
    out = tmp_path / "adapted"
    assert AD.main([str(parent_run), "--data", "textures", "--domain-name", "tex", "--steps", "3",
                    "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "adapt.json").read_text())
    assert report["domain"] == "tex" and report["domain_index"] == 2 and report["train"] == "domain"
    assert f"{report['trained_parameters']:,} of {report['total_parameters']:,} parameters" in err
    assert report["max_old_error_change"] == 0.0
    # an ordinary run directory: evaluate and predict take it
    assert EV.main([str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["errors"]) == ["digits", "pedestrians", "tex"]
    img = tmp_path / "a.png"
    Image.fromarray((torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()).save(img)
    assert PR.main([str(out), str(img), "--domain", "tex", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["domain"] == "tex"
    # the old domains compute bit for bit what they did; only the new domain's own values changed
    _, parent, _ = T.load_run(parent_run)
    _, child, _ = T.load_run(out)
    x = torch.randn(5, 3, 16, 16)
    for d in range(2):
        assert torch.equal(child(x, d)[:, :parent.max_classes], parent(x, d))
    grown = copy.deepcopy(parent)
    add_domain(grown, child.num_classes[2])
    own = {n: rows for n, _, rows in domain_parameters(grown, 2)}
    changed = 0
    for (name, p), q in zip(grown.named_parameters(), child.parameters()):
        if name not in own:
            assert torch.equal(p, q), name
        else:
            rows = own[name]
            assert torch.equal(p[~rows], q[~rows]), name
            changed += int((p[rows] != q[rows]).sum())
    assert 0 < changed <= report["trained_parameters"]
    # fine-tune everything: the shared trunk moves too
    assert AD.main([str(parent_run), "--data", "textures", "--train", "all", "--steps", "2",
                    "--out", str(tmp_path / "all"), "--no-progress"]) == 0
    everything = json.loads((tmp_path / "all" / "adapt.json").read_text())
    assert everything["trained_parameters"] == everything["total_parameters"]
    _, tuned, _ = T.load_run(tmp_path / "all")
    assert not torch.equal(tuned.body[0].conv.weight, parent.body[0].conv.weight)


def test_adapt_one_line_errors(parent_run, tmp_path, capsys):
    cases = [
        ([str(parent_run), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
         ["--data", "neither an existing dataset path", "textures"]),
        ([str(parent_run), "--data", "digits", "--out", str(tmp_path / "o")],
         ["--domain-name", "already has a domain 'digits'"]),
        ([str(tmp_path / "norun"), "--data", "textures", "--out", str(tmp_path / "o")], ["no such run directory"]),
        ([str(parent_run), "--data", "textures", "--train", "some", "--out", str(tmp_path / "o")],
         ["argument --train: invalid choice"]),
        ([str(parent_run), "--data", "textures", "--steps", "0", "--out", str(tmp_path / "o")],
         ["argument --steps: must be an integer >= 1"]),
        ([str(parent_run), "--data", "textures"], ["--out"]),
    ]
    for argv, expected in cases:
        _one_line_error(capsys, unirep._cli.run(AD.main, argv), *expected)
    assert not (tmp_path / "o").exists()


def test_predict_unknown_and_unseen_domains(parent_run, tmp_path, capsys):
    from PIL import Image
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(paths[-1])
    _one_line_error(capsys, unirep._cli.run(PR.main, [str(parent_run), *paths, "--domain", "faces"]),
                    "--domain", "unknown domain 'faces'", "digits, pedestrians", "auto-bn+")
    assert PR.main([str(parent_run), *paths, "--domain", "auto-bn+", "--json"]) == 0
    captured = capsys.readouterr()
    assert "auto-bn+: nearest domain" in captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 6 and len({line["domain"] for line in lines}) == 1
    assert lines[0]["domain"] in ("digits", "pedestrians")
