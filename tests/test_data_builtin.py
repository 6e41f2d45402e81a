"""The built-in benchmark: diversity, determinism, caching, whitening."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

from unirep.data import BUILTIN_DOMAINS, MultiDomainData, builtin_benchmark, builtin_domain
from unirep.data import builtin as builtin_mod

TRAIN, TEST = 120, 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("unirep-cache")


@pytest.fixture(scope="module")
def bench(cache):
    return builtin_benchmark(cache, seed=0, train_per_domain=TRAIN, test_per_domain=TEST, progress=False)


def test_domains_shapes_labels(bench):
    assert isinstance(bench, MultiDomainData)
    assert len(bench) >= 8 and bench.names == list(BUILTIN_DOMAINS)
    counts = bench.num_classes
    assert min(counts) == 2 and max(counts) >= 100 and len(set(counts)) >= 5
    for ds in bench:
        for split, n in (("train", TRAIN), ("test", TEST)):
            x, y = ds.split(split)
            assert x.dtype == torch.uint8 and x.shape == (n, 3, 64, 64)
            assert y.dtype == torch.int64 and y.shape == (n,)
            assert 0 <= int(y.min()) and int(y.max()) < ds.num_classes
        assert len(ds.classes) == ds.num_classes == len(set(ds.classes))
        assert ds.mean.shape == (3,) and ds.std.shape == (3,) and torch.all(ds.std > 0.05)
        # balanced labels: every class about equally often
        c = torch.bincount(ds.train[1], minlength=ds.num_classes)
        assert int(c.max()) - int(c.min()) <= max(2, TRAIN // ds.num_classes // 2)


def test_image_statistics_are_diverse(bench):
    grey = {ds.name for ds in bench if torch.equal(ds.train[0][:, 0], ds.train[0][:, 1])}
    colour = set(bench.names) - grey
    assert {"digits", "characters", "sketches", "plankton", "pedestrians"} <= grey
    assert {"traffic_signs", "house_numbers", "textures"} <= colour
    mean = {ds.name: float(ds.mean.mean()) for ds in bench}
    assert mean["digits"] < 0.3                    # white strokes on black
    assert mean["characters"] > 0.7 and mean["sketches"] > 0.8 and mean["plankton"] > 0.7
    std = {ds.name: float(ds.std.mean()) for ds in bench}
    assert max(std.values()) / min(std.values()) > 1.5     # contrast differs across domains
    # no domain is degenerate: images of one domain differ from each other
    for ds in bench:
        x = ds.train[0][:20].float()
        assert float((x[1:] - x[:-1]).abs().mean()) > 2.0, ds.name


def test_no_flip_kinds(bench):
    flips = dict(zip(bench.names, bench.flip_mask.tolist()))
    assert not flips["digits"] and not flips["characters"] and not flips["house_numbers"]
    assert flips["textures"] and flips["traffic_signs"] and flips["plankton"]


def test_whitening_on_train(bench):
    for ds in bench:
        w = ds.whiten(ds.train[0]).double()
        assert torch.allclose(w.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-3), ds.name
        assert torch.allclose(w.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-2), ds.name


def test_deterministic_across_generations(bench, tmp_path):
    names = ["digits", "traffic_signs", "characters"]
    again = builtin_benchmark(tmp_path, seed=0, train_per_domain=TRAIN, test_per_domain=TEST,
                              domains=names, progress=False)
    for n in names:
        assert torch.equal(again[n].train[0], bench[n].train[0])
        assert torch.equal(again[n].test[1], bench[n].test[1])
        assert torch.equal(again[n].mean, bench[n].mean)
    other = builtin_benchmark(tmp_path, seed=1, train_per_domain=TRAIN, test_per_domain=TEST,
                              domains=["digits"], progress=False)
    assert not torch.equal(other["digits"].train[0], bench["digits"].train[0])
    # train and test images are different draws
    assert not torch.equal(bench["digits"].train[0][:TEST], bench["digits"].test[0])


def test_cache_is_used_and_atomic(bench, cache, monkeypatch):
    files = sorted(p.name for p in (cache / f"builtin-v{builtin_mod.VERSION}").iterdir())
    assert len(files) == len(BUILTIN_DOMAINS) and all(f.endswith(".pt") for f in files)
    assert not any(".tmp" in f for f in files)

    def boom(*a, **k):
        raise AssertionError("regenerated although cached")
    monkeypatch.setattr(builtin_mod, "generate_domain", boom)
    again = builtin_benchmark(cache, seed=0, train_per_domain=TRAIN, test_per_domain=TEST, progress=False)
    assert torch.equal(again["plankton"].train[0], bench["plankton"].train[0])


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def failing_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(builtin_mod.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        builtin_benchmark(tmp_path, train_per_domain=10, test_per_domain=5, domains=["pedestrians"],
                          progress=False)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_corrupt_cache_is_regenerated_with_warning(tmp_path):
    ds = builtin_domain("sketches", tmp_path, train_per_domain=10, test_per_domain=5, progress=False)
    (path,) = list((tmp_path / f"builtin-v{builtin_mod.VERSION}").iterdir())
    path.write_bytes(b"this is not a torch file")
    with pytest.warns(RuntimeWarning, match=str(path.name)):
        again = builtin_domain("sketches", tmp_path, train_per_domain=10, test_per_domain=5, progress=False)
    assert torch.equal(again.train[0], ds.train[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # now the rewritten file is fine
        builtin_domain("sketches", tmp_path, train_per_domain=10, test_per_domain=5, progress=False)


def test_image_size_sizes_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIREP_CACHE_DIR", str(tmp_path / "env-cache"))
    d = builtin_benchmark(None, train_per_domain={"digits": 12, "pedestrians": 8}, test_per_domain=4,
                          image_size=32, domains=["digits", "pedestrians"], progress=False)
    assert d["digits"].train[0].shape == (12, 3, 32, 32) and d["pedestrians"].train[0].shape == (8, 3, 32, 32)
    assert (tmp_path / "env-cache").is_dir()
    with pytest.raises(ValueError, match="unknown built-in domain 'mnist'"):
        builtin_benchmark(tmp_path, domains=["mnist"])
    with pytest.raises(ValueError, match="positive"):
        builtin_benchmark(tmp_path, train_per_domain=0, domains=["digits"])


def test_cache_dir_expands_home_and_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("UNIREP_CACHE_DIR", "~/env-cache")
    builtin_domain("pedestrians", None, train_per_domain=4, test_per_domain=2, progress=False)
    builtin_domain("pedestrians", "$HOME/arg-cache", train_per_domain=4, test_per_domain=2, progress=False)
    assert (tmp_path / "env-cache").is_dir() and (tmp_path / "arg-cache").is_dir()


def test_progress_off_a_terminal_is_a_line_every_interval(monkeypatch, capsys):
    """A pipe or a log file gets plain lines (never the bar's carriage returns), at most one
    every INTERVAL seconds after the first `delay` seconds, and one when done."""
    from unirep import _progress

    now = [0.0]
    monkeypatch.setattr(_progress, "_now", lambda: now[0])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = _progress.progress_bar(total=100, desc="generating", unit="img")
    for step in range(100):  # one image a second
        now[0] = float(step + 1)
        bar.set_postfix_str("digits")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["generating: 2/100 img (digits)", "generating: 32/100 img (digits)",
                     "generating: 62/100 img (digits)", "generating: 92/100 img (digits)",
                     "generating: done, 100 img in 100 s (digits)"]
    quick = _progress.progress_bar(range(5), desc="decoding", unit="img")  # under `delay`: silent
    assert list(quick) == list(range(5)) and capsys.readouterr().err == ""
    assert list(_progress.progress_bar(range(3), desc="x", unit="img", enabled=False)) == [0, 1, 2]


def test_builtin_generation_writes_no_carriage_returns_to_a_pipe(tmp_path, monkeypatch, capfd):
    from unirep import _progress

    clock = iter(range(0, 10 ** 6, 7))  # every read of the clock: 7 s later
    monkeypatch.setattr(_progress, "_now", lambda: float(next(clock)))
    builtin_benchmark(tmp_path, train_per_domain=6, test_per_domain=2, domains=["digits", "pedestrians"])
    err = capfd.readouterr().err
    assert "\r" not in err and "generating built-in benchmark: " in err
