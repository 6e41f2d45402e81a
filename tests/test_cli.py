"""The command-line tools' edges: one-line errors (`error: <what>: <why>`, exit status 2, no
traceback unless --debug or UNIREP_DEBUG=1), validated numbers, the warm-up of a short run,
the resumed step, predict with bad image files."""

from __future__ import annotations

import runpy
import sys
import warnings

import pytest
import torch

from unirep import _cli
from unirep import evaluate as EV
from unirep import experiments as EX
from unirep import predict as PR
from unirep import train as T
from unirep._checkpoint import CheckpointError
from unirep.models import __main__ as MODELS

TINY = ["--domains", "digits,pedestrians,textures", "--train-per-domain", "48", "--test-per-domain", "16",
        "--image-size", "16", "--widths", "4,4,8,8", "--stem-width", "4", "--units-per-stage", "1",
        "--batch-size", "8", "--no-progress", "--backend", "cpp"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("unirep-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIREP_CACHE_DIR", str(d))
        mp.delenv("UNIREP_DEBUG", raising=False)
        yield d


@pytest.fixture(scope="module")
def run_dir(cache, tmp_path_factory):
    """A tiny finished run of 3 steps."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert T.main(TINY + ["--steps", "3", "--warmup-steps", "2", "--out", str(run)]) == 0
    return run


@pytest.fixture
def bad_checkpoints(run_dir, tmp_path):
    """Run directories with an empty, a truncated and a foreign checkpoint, and none."""
    dirs = {kind: tmp_path / kind for kind in ("empty", "truncated", "foreign", "missing")}
    for kind, d in dirs.items():
        if kind != "missing":
            d.mkdir()
    (dirs["empty"] / "checkpoint.pt").write_bytes(b"")
    (dirs["truncated"] / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:4000])
    torch.save({"weights": torch.zeros(2)}, dirs["foreign"] / "checkpoint.pt")
    return dirs


def _one_line_error(capsys, status, *expected):
    """The tool exited with status 2 after exactly one stderr line `error: ...` naming
    everything in ``expected``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for text in expected:
        assert text in err[0], err
    return err[0]


@pytest.mark.parametrize("args,expected", [
    (["--strategy", "bn-foo"], ["argument --strategy: invalid choice: 'bn-foo'", "bn-domain"]),
    (["--sharing", "fulll"], ["argument --sharing: invalid choice: 'fulll'", "partial-first"]),
    (["--backend", "fast"], ["argument --backend: invalid choice: 'fast'"]),
    (["--batch-size", "0"], ["argument --batch-size: must be an integer >= 1, got 0"]),
    (["--steps", "-1"], ["argument --steps: must be an integer >= 1, got -1"]),
    (["--steps", "0"], ["argument --steps: must be an integer >= 1, got 0"]),
    (["--steps", "ten"], ["argument --steps: must be an integer >= 1, got 'ten'"]),
    (["--epochs", "0"], ["argument --epochs: must be a number > 0, got 0"]),
    (["--accumulate", "0"], ["argument --accumulate: must be an integer >= 1"]),
    (["--warmup-steps", "-5"], ["argument --warmup-steps: must be an integer >= 0"]),
    (["--device", "gpu7"], ["--device: expected auto, cpu, cuda or cuda:N, got 'gpu7'"]),
])
def test_train_rejects_bad_arguments_in_one_line(cache, tmp_path, capsys, args, expected):
    out = tmp_path / "run"
    status = _cli.run(T.main, TINY + ["--steps", "2", "--out", str(out)] + args)
    _one_line_error(capsys, status, *expected)
    assert not out.exists()  # nothing trained, nothing written


def test_train_missing_data_folder(cache, tmp_path, capsys):
    status = _cli.run(T.main, ["--data", str(tmp_path / "nonexistent"), "--steps", "2", "--out", str(tmp_path / "r")])
    _one_line_error(capsys, status, f"error: {tmp_path / 'nonexistent'}: dataset path not found")


@pytest.mark.parametrize("kind,why", [("empty", "the file is empty"), ("truncated", "not a readable checkpoint"),
                                      ("foreign", "not a checkpoint of python -m unirep.train"),
                                      ("missing", "no such run directory or file")])
def test_unreadable_checkpoints_are_named(bad_checkpoints, capsys, kind, why):
    path = str(bad_checkpoints[kind] if kind == "missing" else bad_checkpoints[kind] / "checkpoint.pt")
    for main, argv in ((T.main, ["--resume", str(bad_checkpoints[kind])]),
                       (EV.main, [str(bad_checkpoints[kind])]),
                       (PR.main, [str(bad_checkpoints[kind]), "img.png", "--domain", "digits"])):
        line = _one_line_error(capsys, _cli.run(main, argv), path, why)
        assert "Traceback" not in line


def test_debug_shows_the_traceback(bad_checkpoints, monkeypatch):
    with pytest.raises(CheckpointError, match="the file is empty"):
        _cli.run(EV.main, [str(bad_checkpoints["empty"]), "--debug"])
    monkeypatch.setenv("UNIREP_DEBUG", "1")
    with pytest.raises(CheckpointError, match="the file is empty"):
        _cli.run(EV.main, [str(bad_checkpoints["empty"])])


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the errors a user can cause become one line; anything else is raised as is."""
    def broken(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        _cli.run(broken, [])


def test_predict_reports_each_bad_image_and_classifies_the_good_ones(run_dir, tmp_path, capsys):
    from PIL import Image

    good = []
    for i in range(2):
        good.append(tmp_path / f"good{i}.png")
        Image.fromarray((torch.rand(20, 20, 3) * 255).to(torch.uint8).numpy()).save(good[-1])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    missing = tmp_path / "missing.png"
    paths = [good[0], not_image, missing, good[1], tmp_path]
    status = _cli.run(PR.main, [str(run_dir), *map(str, paths), "--domain", "digits"])
    captured = capsys.readouterr()
    assert status == 2
    printed = [line.split("\t")[0] for line in captured.out.strip().splitlines()]
    assert printed == [str(good[0]), str(good[1])]
    errors = captured.err.strip().splitlines()
    assert errors == [f"error: {not_image}: cannot read it as an image (cannot identify image file '{not_image}')",
                      f"error: {missing}: No such file or directory", f"error: {tmp_path}: Is a directory"]
    # all good: status 0
    assert _cli.run(PR.main, [str(run_dir), str(good[0]), "--domain", "1"]) == 0
    _one_line_error(capsys, _cli.run(PR.main, [str(run_dir), str(good[0]), "--domain", "mnist"]),
                    "error: --domain: unknown domain 'mnist'")
    _one_line_error(capsys, _cli.run(PR.main, [str(run_dir), str(good[0]), "--domain", "0", "--top", "0"]),
                    "argument --top: must be an integer >= 1")


def test_evaluate_experiments_and_models_reject_bad_arguments(run_dir, capsys):
    _one_line_error(capsys, _cli.run(EV.main, [str(run_dir), "--batch-size", "0"]),
                    "error: argument --batch-size: must be an integer >= 1, got 0")
    _one_line_error(capsys, _cli.run(EV.main, [str(run_dir), "--backend", "gpu"]), "argument --backend")
    _one_line_error(capsys, _cli.run(EX.main, ["table5"], prog="python -m unirep.experiments"),
                    "error: argument table: invalid choice: 'table5'")
    _one_line_error(capsys, _cli.run(EX.main, ["table2", "--quick", "--set", "stepz=3"],
                                     prog="python -m unirep.experiments"),
                    "error: unknown setting 'stepz'")
    _one_line_error(capsys, _cli.run(MODELS.main, ["--bogus"]), "error: unrecognized arguments: --bogus")


@pytest.mark.parametrize("module,args", [
    ("unirep.train", ["--steps", "0"]),
    ("unirep.evaluate", ["/nonexistent/run"]),
    ("unirep.predict", ["/nonexistent/run", "x.png", "--domain", "0"]),
    ("unirep.experiments", ["table5"]),
    ("unirep.models", ["--bogus"]),
])
def test_every_cli_module_prints_one_line(module, args, monkeypatch, capsys):
    """`python -m <module>` (its __main__ block, run in this process)."""
    monkeypatch.delenv("UNIREP_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", [module, *args])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    _one_line_error(capsys, exit_.value.code)


def test_a_run_shorter_than_its_warmup_scales_it_down_and_says_so(cache, tmp_path, capsys):
    cfg = T.parse_config(["--steps", "40"])  # the fast preset warms up for 40 steps
    lrs = [T.lr_at(s, cfg, 40) for s in range(40)]
    assert T.warmup_steps(cfg, 40) == 2 and lrs[:2] == [cfg["warmup_lr"]] * 2
    assert lrs[2] == pytest.approx(cfg["lr"]) and lrs[-1] == pytest.approx(cfg["final_lr"])
    assert T.warmup_steps(cfg, 41) == 40  # a longer run keeps its warm-up
    assert T.main(TINY + ["--steps", "3", "--warmup-steps", "5", "--out", str(tmp_path / "run")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warm-up" in line]
    assert warnings == ["warning: the run (3 steps) is no longer than its warm-up (5 steps): "
                        "warming up for 0 steps instead"]


def test_resume_prints_the_step_it_resumes_from(run_dir, capsys):
    assert T.main(["--resume", str(run_dir), "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from {run_dir / 'checkpoint.pt'} at step 3 of 4" in err
