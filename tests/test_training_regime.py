"""Issue 14: what a run reports (training error and chance level beside the test error),
the presets and regimes (a 4x4 last stage wherever conclusions are drawn), the model's
layer before pooling (no instance normalization there by default), the Visual Decathlon
score, and the trainer configuration passed as a dict (the dry-run command line says the
same thing, and a resumed configuration loads its checkpoint once)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from unirep import experiments as E
from unirep import train as T
from unirep.data.loader import default_pad
from unirep.models import build_model
from unirep.models.common import ChannelAffine, GlobalPool, resolve_final_norm
from unirep_kernels import DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d

TINY = dict(domains=["digits", "pedestrians", "textures"], train_per_domain=48, test_per_domain=16, image_size=16,
            widths=[4, 4, 8, 8], stem_width=4, units_per_stage=1, batch_size=8, warmup_steps=2, progress=False,
            backend="cpp", augment=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("unirep-cache")
    old = os.environ.get("UNIREP_CACHE_DIR")
    os.environ["UNIREP_CACHE_DIR"] = str(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield d
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("UNIREP_CACHE_DIR", None)
    else:
        os.environ["UNIREP_CACHE_DIR"] = old


# ----------------------------------------------------------------------------- what a run reports


def test_eval_json_has_train_error_and_chance(cache, tmp_path):
    cfg = T.resolve_config(dict(TINY, steps=4, out=str(tmp_path / "run")))
    trainer = T.Trainer(cfg)
    errors = trainer.run()
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    names = ["digits", "pedestrians", "textures"]
    assert list(ev["errors"]) == list(ev["train_errors"]) == list(ev["chance_errors"]) == names
    assert ev["errors"] == errors
    # chance: 1 - 1/K for 10, 2 and 10 classes
    assert ev["chance_errors"] == pytest.approx({"digits": 90.0, "pedestrians": 50.0, "textures": 90.0})
    assert ev["mean_chance_error"] == pytest.approx(230 / 3)
    # the training error is measured on the training split: recompute it independently
    model = trainer.model.eval()
    data = trainer.data
    for d, name in enumerate(names):
        x, y = data[d].split("train")
        with torch.no_grad():
            pred = model(data[d].whiten(x), d).argmax(1)
        assert ev["train_errors"][name] == pytest.approx(100.0 * float((pred != y).float().mean()))
    assert ev["mean_train_error"] == pytest.approx(sum(ev["train_errors"].values()) / 3)
    for f in ("curves.png", "errors.png"):
        assert (tmp_path / "run" / f).stat().st_size > 0


def test_train_error_subset_is_fixed_and_bounded(cache):
    cfg = T.resolve_config(dict(TINY, steps=1))
    data = T.build_data(cfg)
    a = [y for _, y, _ in data.eval_batches(0, 7, split="train", limit=20)]
    b = [y for _, y, _ in data.eval_batches(0, 7, split="train", limit=20)]
    assert sum(t.numel() for t in a) == 20 and all(torch.equal(p, q) for p, q in zip(a, b))
    assert sum(y.numel() for _, y, _ in data.eval_batches(0, 100, split="train", limit=1000)) == 48
    full = torch.cat([y for _, y, _ in data.eval_batches(0, 100, split="train")])
    assert torch.equal(full, data[0].split("train")[1])  # no limit: every image, in order


def test_format_table_shows_train_and_chance_columns():
    text = T.format_table({"a": 10.0, "b": 30.0}, {"a": 1.0, "b": 3.0}, {"a": 50.0, "b": 90.0})
    assert "train error" in text and "chance" in text
    assert text.splitlines()[-1].split() == ["mean", "20.00", "2.00", "70.00"]


# ----------------------------------------------------------------------------- presets and regimes


def _last_stage_side(image_size: int) -> int:
    return image_size // 8  # three stride-2 stages


def test_fast_preset_learns_by_design():
    fast = T.PRESETS["fast"]
    assert _last_stage_side(fast["image_size"]) >= 4
    assert fast["augment"] is True and fast["weight_decay"] > T.DEFAULTS["weight_decay"]
    assert fast["warmup_steps"] < fast["steps"]
    paper = T.PRESETS["paper"]  # section 4.1, unchanged
    assert (paper["image_size"], paper["units_per_stage"], paper["widths"], paper["batch_size"],
            paper["augment"]) == (64, 4, [32, 64, 128, 256], 128, True)
    cfg = T.parse_config(["--preset", "paper"])
    assert (cfg["weight_decay"], cfg["momentum"], cfg["label_smoothing"]) == (1e-4, 0.9, 0.0)
    cfg = T.parse_config([])
    assert cfg["steps"] == fast["steps"] and cfg["final_norm"] == "auto"


@pytest.mark.parametrize("table", E.TABLE_NAMES + E.CHECK_NAMES)
def test_regimes_that_draw_conclusions_keep_a_4x4_last_stage(table):
    for regime in ("converged", "full"):
        s = E.table_settings(table, regime=regime)
        assert _last_stage_side(s["image_size"]) >= 4, (table, regime)
    assert _last_stage_side(E.table_settings(table, regime="quick")["image_size"]) == 3  # a smoke test only


def test_crop_padding_scales_with_the_image():
    assert default_pad(64) == 8 and default_pad(32) == 4 and default_pad(16) == 2


# ----------------------------------------------------------------------------- the layer before pooling


def test_instance_norm_is_not_the_last_layer_by_default():
    assert resolve_final_norm("in-universal") == "affine" and resolve_final_norm("in-domain") == "affine"
    assert resolve_final_norm("bn-domain") == "bn-domain" and resolve_final_norm("none") == "relu"
    assert resolve_final_norm("in-universal", "same") == "in-universal"
    kw = dict(widths=(4, 4, 8, 8), units_per_stage=1)
    final = build_model("resnet38", [3, 5], strategy="in-universal", **kw).body[-1]
    assert isinstance(final, GlobalPool) and isinstance(final.affine, ChannelAffine) and final.norm is None
    final = build_model("resnet38", [3, 5], strategy="in-domain", **kw).body[-1]
    assert isinstance(final.affine, DomainScale2d)
    final = build_model("resnet38", [3, 5], strategy="in-universal", final_norm="same", **kw).body[-1]
    assert isinstance(final.norm, DomainInstanceNorm2d)
    final = build_model("resnet38", [3, 5], strategy="in-universal", final_norm="bn-domain", **kw).body[-1]
    assert isinstance(final.norm, DomainBatchNorm2d)
    with pytest.raises(ValueError, match="final_norm"):
        build_model("resnet38", [3, 5], final_norm="bogus", **kw)


def test_instance_norm_before_pooling_erases_each_channels_mean():
    """Why the default leaves IN out of the last layer: with IN there, the pooled feature of
    a channel does not change when that channel's activations are shifted or scaled, so the
    global average pool cannot read how strongly an image activated it."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    shifted = x * torch.rand(1, 6, 1, 1).add(0.5) + torch.randn(1, 6, 1, 1) * 3
    pool_in = GlobalPool(6, strategy="in-universal", num_domains=2, final_norm="same").eval()
    torch.testing.assert_close(pool_in(x, 0), pool_in(shifted, 0), atol=1e-4, rtol=1e-4)
    pool_affine = GlobalPool(6, strategy="in-universal", num_domains=2).eval()
    assert not torch.allclose(pool_affine(x, 0), pool_affine(shifted, 0), atol=1e-2)


def test_runs_saved_before_final_norm_rebuild_their_model():
    cfg = T.resolve_config(dict(TINY, steps=1, strategy="in-universal"))
    new = T.build_model_from_config(cfg, [10, 2, 10])
    old_cfg = {k: v for k, v in cfg.items() if k != "final_norm"}  # a checkpoint from before the option
    old = T.build_model_from_config(old_cfg, [10, 2, 10])
    assert isinstance(old.body[-1].norm, DomainInstanceNorm2d) and new.body[-1].norm is None


# ----------------------------------------------------------------------------- Visual Decathlon score


def test_decathlon_score():
    ref = {"a": 10.0, "b": 40.0}
    assert E.decathlon_score(ref, ref) == pytest.approx(500.0)  # as good as the baseline: 250 each
    assert E.decathlon_score({"a": 0.0, "b": 0.0}, ref) == pytest.approx(2000.0)
    assert E.decathlon_score({"a": 20.0, "b": 95.0}, ref) == pytest.approx(0.0)  # >= 2x the baseline: 0
    assert E.decathlon_score({"a": 5.0, "b": 40.0}, ref) == pytest.approx(1000 * 0.75 ** 2 + 250)
    assert E.decathlon_score({"a": 0.0}, {"a": 0.0}) == 1000.0 and E.decathlon_score({"a": 1.0}, {"a": 0.0}) == 0.0


# ----------------------------------------------------------------------------- configurations as dicts


@pytest.mark.parametrize("regime", E.REGIME_NAMES)
def test_dry_run_command_line_is_the_configuration_that_runs(regime):
    for name in E.TABLE_NAMES + E.CHECK_NAMES:
        spec = E.spec_of(name)
        settings = E.table_settings(name, regime=regime)
        for c in spec.configs:
            given = E.trainer_config(spec, c, settings, Path("/tmp/x") / c.key)
            via_argv = T.parse_config(E.trainer_argv(spec, c, settings, Path("/tmp/x") / c.key))
            assert T.resolve_config(given) == via_argv, (name, c.key)


def test_checks_take_their_tables_settings_and_runs():
    conv = E.spec_of("convergence")
    s = E.table_settings("convergence", regime="converged")
    assert s == E.table_settings("table3", regime="converged")
    one, two = (E.trainer_config(conv, c, s, Path("x"))["steps"] for c in conv.configs)
    assert two == 2 * one == 2 * s["batches_per_domain"] * 8
    # the deep row of the check is the deep row of Table 3: the same configuration, trained once
    t3 = E.TABLES["table3"]
    assert E.trainer_config(conv, conv.config("deep"), s, Path("x")) == E.trainer_config(t3, t3.config("deep"), s,
                                                                                          Path("x"))
    abl = E.spec_of("in-ablation")
    s4 = E.table_settings("table4", regime="converged")
    t4 = E.TABLES["table4"]
    for key in ("bn-domain", "in-universal"):
        assert E.trainer_config(abl, abl.config(key), s4, Path("x")) == E.trainer_config(t4, t4.config(key), s4,
                                                                                         Path("x"))


def test_resume_loads_the_checkpoint_once(cache, tmp_path, monkeypatch):
    spec = E.TABLES["table2"]
    overrides = dict(image_size=16, widths=[4, 4, 8, 8], stem_width=4, train_per_domain=48, test_per_domain=16,
                     batch_size=8, batches_per_domain=2, warmup_steps=1, progress=False, backend="cpp",
                     cache_dir=str(cache), checkpoint_every=0)
    settings = E.table_settings("table2", regime="quick", overrides=overrides)
    run_dir = tmp_path / "table2" / "deep"
    # an interrupted run: a checkpoint, no eval.json
    cfg = T.resolve_config(dict(E.trainer_config(spec, spec.config("deep"), settings, run_dir), stop_at=3))
    assert T.Trainer(cfg).run() is None
    calls = []
    real = T.torch.load

    def counting_load(f, *a, **k):
        if Path(str(f)).name == T.CHECKPOINT:  # the data cache is read with torch.load too
            calls.append(f)
        return real(f, *a, **k)

    monkeypatch.setattr(T.torch, "load", counting_load)
    from unirep.experiments.runner import _run_config
    record = _run_config(spec, spec.config("deep"), settings, run_dir, 1, 1)
    assert record["steps"] == 6 and len(calls) == 1


def test_an_interrupted_run_exits_130(monkeypatch, tmp_path):
    from unirep.experiments import cli

    def interrupted(*a, **k):
        raise E.RunInterrupted("table2 deep seed 0 stopped at step 3")

    monkeypatch.setattr(cli, "run_table", interrupted)
    assert cli.main(["table2", "--quick", "--out", str(tmp_path)]) == 130

    def other(*a, **k):
        raise E.ExperimentError("holds a finished run made with other settings (stopped at step 3)")

    monkeypatch.setattr(cli, "run_table", other)
    assert cli.main(["table2", "--quick", "--out", str(tmp_path)]) == 1


def test_parallel_runs_give_every_record_in_order(cache, tmp_path):
    overrides = dict(image_size=16, widths=[4, 4, 8, 8], stem_width=4, train_per_domain=48, test_per_domain=16,
                     batch_size=8, batches_per_domain=2, warmup_steps=1, progress=False, backend="cpp",
                     cache_dir=str(cache), checkpoint_every=0)
    result = E.run_table("table2", regime="quick", out=tmp_path, overrides=overrides, seeds=[0, 1], parallel=2)
    assert [(r["seed"], r["config"]) for r in result["records"]] == [
        (s, c.key) for s in (0, 1) for c in E.TABLES["table2"].configs]
    for r in result["records"]:
        assert (Path(r["run_dir"]) / "eval.json").exists() and r["steps"] == 6
    again = E.run_table("table2", regime="quick", out=tmp_path, overrides=overrides, seeds=[0, 1], parallel=2)
    assert all(r["reused"] for r in again["records"])  # finished runs are reused, not run again
    assert [r["mean_error"] for r in again["records"]] == [r["mean_error"] for r in result["records"]]


def test_a_configuration_another_process_trains_is_left_for_last_and_waited_for(cache, tmp_path, monkeypatch):
    """Two experiments commands sharing --out (a table and a check reusing its runs) never
    train one configuration at once: a run directory locked by a live process is skipped,
    the others are trained, then it is waited for and its result reused."""
    import subprocess
    import sys
    from unirep.experiments import runner
    overrides = dict(image_size=16, widths=[4, 4, 8, 8], stem_width=4, train_per_domain=48, test_per_domain=16,
                     batch_size=8, batches_per_domain=2, warmup_steps=1, progress=False, backend="cpp",
                     cache_dir=str(cache), checkpoint_every=0)
    spec = E.TABLES["table2"]
    settings = E.table_settings("table2", regime="quick", overrides=overrides)
    busy_dir = tmp_path / "table2" / "deep"
    busy_dir.mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (busy_dir / runner.LOCK_FILE).write_text(f"{owner.pid}\n")
        with pytest.raises(runner.RunBusy, match="being trained by process"):
            runner._run_config(spec, spec.config("deep"), settings, busy_dir, 1, 1, wait=False)
        order = []
        real_train = runner._train_config

        def train(spec_, config, run_dir, *a):
            order.append(config.key)
            record = real_train(spec_, config, run_dir, *a)
            if config.key == "full":  # meanwhile the other process finishes "deep" and exits
                cfg = T.resolve_config(E.trainer_config(spec, spec.config("deep"), settings, busy_dir))
                T.Trainer(cfg).run()
                owner.kill()
                owner.wait()
            return record

        monkeypatch.setattr(runner, "_train_config", train)
        monkeypatch.setattr(runner, "LOCK_POLL_SECONDS", 0.05)
        result = E.run_table("table2", regime="quick", out=tmp_path, overrides=overrides)
    finally:
        owner.kill()
        owner.wait()
    assert order == ["none", "full"]  # "deep" was never trained by this command
    deep = result["records"][1]
    assert deep["config"] == "deep" and deep["reused"] and deep["steps"] == 6
    assert runner._lock_owner(busy_dir) is None  # the other process's lock is stale now
    assert not any((tmp_path / "table2" / k / runner.LOCK_FILE).exists() for k in ("none", "full"))
