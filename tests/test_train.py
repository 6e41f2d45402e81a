"""python -m unirep.train / evaluate / predict: schedule, exact resume (also after SIGTERM),
domain-specific parameters untouched by other domains, outputs, CLIs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unirep import distributed as udist
from unirep import train as T

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--domains", "digits,pedestrians,textures", "--train-per-domain", "48", "--test-per-domain", "16",
        "--image-size", "16", "--widths", "4,4,8,8", "--stem-width", "4", "--units-per-stage", "1",
        "--batch-size", "8", "--warmup-steps", "2", "--no-progress", "--backend", "cpp", "--augment"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("unirep-cache")
    old = os.environ.get("UNIREP_CACHE_DIR")
    os.environ["UNIREP_CACHE_DIR"] = str(d)
    torch.set_num_threads(1)
    yield d
    if old is None:
        os.environ.pop("UNIREP_CACHE_DIR", None)
    else:
        os.environ["UNIREP_CACHE_DIR"] = old


def _env(cache):
    env = dict(os.environ, UNIREP_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _state(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lr_schedule():
    cfg = dict(T.DEFAULTS, **T.PRESETS["fast"])
    cfg.update(warmup_steps=10, lr=0.1, warmup_lr=0.01, final_lr=1e-4)
    total = 110
    for decay in ("exp", "step", "cosine"):
        cfg["decay"] = decay
        lrs = [T.lr_at(s, cfg, total) for s in range(total)]
        assert lrs[:10] == [0.01] * 10
        assert lrs[10] == pytest.approx(0.1)
        assert lrs[-1] == pytest.approx(1e-4)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "-m", "unirep.train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout
    for opt in ("--data", "--domains", "--arch", "--strategy", "--sharing", "--width", "--batching",
                "--batch-size", "--steps", "--epochs", "--lr", "--warmup-lr", "--warmup-steps", "--final-lr",
                "--momentum", "--weight-decay", "--seed", "--device", "--backend", "--out", "--resume",
                "--accumulate", "--stop-at", "--preset"):
        assert opt in out, opt
    cfg = T.parse_config([])
    assert (cfg["strategy"], cfg["sharing"], cfg["batching"], cfg["data"]) == ("bn-domain", "deep",
                                                                               "round-robin", "builtin")
    assert (cfg["momentum"], cfg["weight_decay"], cfg["warmup_lr"], cfg["lr"], cfg["final_lr"]) == (
        0.9, 5e-4, 0.01, 0.1, 1e-4)  # the fast preset's weight decay (the paper's 1e-4: --preset paper)
    cfg = T.parse_config(["--epochs", "2", "--preset", "paper", "--lr", "0.05"])
    assert cfg["steps"] is None and cfg["epochs"] == 2 and cfg["units_per_stage"] == 4 and cfg["lr"] == 0.05


def test_resume_is_exact_and_outputs(cache, tmp_path, capsys):
    straight, part = tmp_path / "straight", tmp_path / "part"
    args = TINY + ["--steps", "7", "--checkpoint-every", "3"]
    assert T.main(args + ["--out", str(straight)]) == 0
    table = capsys.readouterr().out
    assert "mean" in table and "pedestrians" in table
    # stop after step 4 (as a signal would), then continue
    assert T.main(args + ["--out", str(part), "--stop-at", "4"]) == 0
    assert _state(part)["step"] == 4 and not (part / "eval.json").exists()
    assert T.main(["--resume", str(part), "--no-progress"]) == 0
    a, b = _state(straight), _state(part)
    assert a["step"] == b["step"] == 7
    _assert_same(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # outputs
    for f in ("config.json", "metrics.csv", "eval.json", "curves.png", "errors.png"):
        assert (straight / f).stat().st_size > 0, f
    rows = list(csv.DictReader(open(part / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    ra = list(csv.DictReader(open(straight / "metrics.csv")))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ra]
    ev = json.loads((straight / "eval.json").read_text())
    assert set(ev["errors"]) == {"digits", "pedestrians", "textures"}
    assert ev["mean_error"] == pytest.approx(sum(ev["errors"].values()) / 3)
    assert not list(straight.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_sigterm_checkpoints_and_resumes_exactly(cache, tmp_path):
    run = tmp_path / "sig"
    args = TINY + ["--steps", "400", "--checkpoint-every", "1", "--seed", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "unirep.train", *args, "--out", str(run)], cwd=ROOT,
                            env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in err
    k = _state(run)["step"]
    assert 1 <= k < 400 and not (run / "eval.json").exists()
    stop = k + 3
    assert T.main(["--resume", str(run), "--stop-at", str(stop)]) == 0
    ref = tmp_path / "ref"
    assert T.main(args + ["--out", str(ref), "--stop-at", str(stop)]) == 0
    a, b = _state(run), _state(ref)
    assert a["step"] == b["step"] == stop
    _assert_same(a["model"], b["model"])


def _tiny_model(sharing="deep"):
    from unirep.models import build_model
    torch.manual_seed(0)
    return build_model(num_classes=[3, 5, 2], sharing=sharing, widths=(4, 4, 8, 8), stem_width=4,
                       units_per_stage=1, backend="cpp")


@pytest.mark.parametrize("sharing", ["deep", "partial-first"])
def test_domain_specific_parameters_change_only_from_their_domain(sharing):
    from unirep.models import masked_cross_entropy
    model = _tiny_model(sharing)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    masked = udist.DomainMaskedStep(model, opt, 3)
    layout = udist.domain_layout(model, 3)
    assert any(l.kind == "rows" for l in layout.values())
    if sharing == "partial-first":
        assert any(l.kind == "owned" for l in layout.values())
    g = torch.Generator().manual_seed(0)

    def step(d):
        x = torch.randn(6, 3, 8, 8, generator=g)
        y = torch.randint(0, model.num_classes[d], (6,), generator=g)
        opt.zero_grad(set_to_none=True)
        masked_cross_entropy(model(x, d), y).backward()
        present = torch.zeros(3, dtype=torch.bool)
        present[d] = True
        masked.step(present)

    def rows_of(d):
        out = {}
        for name, p in model.named_parameters():
            lay = layout[name]
            if lay.kind == "owned" and lay.owner == d:
                out[name] = p.detach().clone()
            elif lay.kind == "rows":
                out[name] = p.detach()[lay.row_domain == d].clone()
        return out

    def shared():
        return {n: p.detach().clone() for n, p in model.named_parameters() if layout[n].kind == "shared"}

    step(1)  # momentum buffers now exist, with rows of domain 1 only
    for d_train in (0, 1, 0):
        before = {d: rows_of(d) for d in range(3)}
        sh = shared()
        step(d_train)
        after = {d: rows_of(d) for d in range(3)}
        for d in range(3):
            for name in before[d]:
                same = torch.equal(before[d][name], after[d][name])
                assert same == (d != d_train) or (d == d_train and "running" in name), (d, d_train, name)
        assert all(not torch.equal(sh[n], p) for n, p in shared().items())
    # momentum rows of the never-visited domain 2 are zero, as if never stepped
    for name, p in model.named_parameters():
        lay = layout[name]
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if lay.kind == "rows":
            assert torch.count_nonzero(buf[lay.row_domain == 2]) == 0, name
        if lay.kind == "owned" and lay.owner == 2:
            assert buf is None, name


def test_accumulate_merges_statistics_like_sequential_pure_batches(cache, tmp_path):
    """With pure batches (<= one sub-batch per domain and step), --accumulate 2 leaves every
    domain's moments exactly where a plain forward of its sub-batch puts them."""
    cfg = T.parse_config(TINY + ["--steps", "1", "--accumulate", "2", "--out", str(tmp_path / "acc")])
    tr = T.Trainer(cfg)
    from unirep.models import masked_cross_entropy
    ref = T.build_model_from_config(cfg, tr.data.num_classes)
    ref.load_state_dict(tr.model.state_dict())
    tr._stop = T._Stop()
    tr.train_step(0)
    ref.train()
    for loader in tr.loaders:
        x, y, d = loader.get(0)
        masked_cross_entropy(ref(x, d), y)
    rs, ts = dict(ref.named_buffers()), dict(tr.model.named_buffers())
    n = 0
    for name, b in rs.items():
        if name.endswith(("running_mean", "running_var")):
            assert torch.equal(b, ts[name]), name
            n += 1
    assert n > 0


def test_evaluate_and_predict_cli(cache, tmp_path):
    run = tmp_path / "run"
    assert T.main(TINY + ["--steps", "3", "--out", str(run)]) == 0
    env = _env(cache)
    out = subprocess.run([sys.executable, "-m", "unirep.evaluate", str(run), "--json"], capture_output=True,
                         text=True, cwd=ROOT, env=env, check=True).stdout
    ev = json.loads(out)
    saved = json.loads((run / "eval.json").read_text())
    assert ev["errors"] == saved["errors"] and ev["step"] == 3
    # predict: two test images of 'digits' written as PNG files
    from PIL import Image
    from unirep.data import builtin_benchmark
    data = builtin_benchmark(train_per_domain=48, test_per_domain=16, image_size=16,
                             domains=["digits", "pedestrians", "textures"], progress=False)
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(data[0].test[0][i].permute(1, 2, 0).numpy()).save(p)
        paths.append(str(p))
    out = subprocess.run([sys.executable, "-m", "unirep.predict", str(run), *paths, "--domain", "digits",
                          "--json", "--top", "2"], capture_output=True, text=True, cwd=ROOT, env=env,
                         check=True).stdout
    lines = [json.loads(l) for l in out.strip().splitlines()]
    assert len(lines) == 2
    # the same prediction as the model applied to the whitened test images
    _, model, _ = T.load_run(run)
    with torch.no_grad():
        logits = model(data[0].whiten(data[0].test[0][:2]), 0)
    for line, k in zip(lines, logits.argmax(1)):
        assert line["top"][0]["class"] == data[0].classes[int(k)]
        assert len(line["top"]) == 2 and line["domain"] == "digits"


def test_trains_on_dataset_folders(cache, tmp_path):
    """--data with image folders (unirep.data.load_dataset's 'folder' format), two domains."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    roots = []
    for name, classes in (("shapes", ["a", "b"]), ("blobs", ["x", "y", "z"])):
        root = tmp_path / name
        for split, n in (("train", 4), ("test", 2)):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                for i in range(n):
                    arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
                    Image.fromarray(arr).save(root / split / c / f"{i}.png")
        roots.append(str(root))
    run = tmp_path / "run"
    args = ["--data", *roots, "--image-size", "16", "--widths", "4,4,8,8", "--stem-width", "4",
            "--batch-size", "4", "--steps", "3", "--no-progress", "--out", str(run), "--batching", "mixed"]
    assert T.main(args) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert list(ev["errors"]) == ["shapes", "blobs"]
    ck = _state(run)
    assert ck["data"]["classes"] == [["a", "b"], ["x", "y", "z"]]
