"""python -m unirep.experiments: the tables' configurations against the paper, the seeded
label permutation of full sharing, a tiny end-to-end table, reuse of finished runs, resume
of interrupted ones, and clear errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from unirep import experiments as E
from unirep import train as T
from unirep.data import BUILTIN_DOMAINS, label_permutation


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("unirep-cache")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield d
    torch.set_num_threads(old_threads)


def tiny(cache) -> dict:
    """Overrides that make a table run in a few seconds."""
    return dict(image_size=16, widths=[4, 4, 8, 8], stem_width=4, train_per_domain=48, test_per_domain=16,
                batch_size=8, batches_per_domain=3, warmup_steps=2, progress=False, backend="cpp",
                cache_dir=str(cache), checkpoint_every=0)


@pytest.fixture(scope="module")
def tiny_table2(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    result = E.run_table("table2", quick=True, out=out, overrides=tiny(cache))
    return out, result


def _forbid_training(monkeypatch, why: str) -> None:
    """Makes any attempt to train fail the test with ``why``."""
    def no_trainer(*a, **k):
        raise AssertionError(why)

    monkeypatch.setattr(T, "Trainer", no_trainer)


# ----------------------------------------------------------------------------- configurations


def test_configurations_match_the_papers_tables():
    assert E.TABLE_NAMES == ("table2", "table3", "table4")
    t2, t3, t4 = (E.TABLES[n] for n in E.TABLE_NAMES)
    # Table 2: three 10-class domains, the analogues of the paper's CIFAR10, MNIST, SVHN in its column order
    assert [len(BUILTIN_DOMAINS[d].classes()) for d in t2.domains] == [10, 10, 10]
    assert [E.ANALOGUES[d] for d in t2.domains] == list(E.PAPER_TABLE2["columns"])
    assert [(c.sharing, c.strategy, c.permute_labels) for c in t2.configs] == [
        ("none", "bn-domain", False), ("deep", "bn-domain", False), ("full", "bn-domain", True)]
    # Table 3: every sharing scheme and width of the paper's rows, in its order
    assert [(c.sharing, c.width) for c in t3.configs] == [
        ("none", 1), ("deep", 1), ("partial-first", 1), ("partial-last", 1), ("deep", 2), ("deep", 4)]
    assert all(c.strategy == "bn-domain" for c in t3.configs)
    assert set(t3.domains) == set(BUILTIN_DOMAINS)
    # Table 4: the six normalization strategies with deep sharing
    assert [c.strategy for c in t4.configs] == ["bn-universal", "bn+", "bn-domain-moments", "bn-domain",
                                                "in-universal", "in-domain"]
    assert all(c.sharing == "deep" and c.width == 1 for c in t4.configs)
    # every row names a row of the paper's table, each paper row is used once
    for spec in (t2, t3, t4):
        rows = list(spec.paper["rows"] or spec.paper["mean"])
        assert [c.paper_row for c in spec.configs] == rows, spec.name
        for _, a, b in spec.comparisons:
            spec.config(a), spec.config(b)


def test_paper_numbers_are_consistent_with_the_papers_means():
    # Table 3's mean column is the mean of its ten columns (to the paper's rounding)
    for row, values in E.PAPER_TABLE3["rows"].items():
        assert len(values) == 10
        assert sum(values) / 10 == pytest.approx(E.PAPER_TABLE3["mean"][row], abs=0.07), row
    assert E.PAPER_TABLE2["rows"]["No sharing"] == (9.4, 0.34, 3.7)
    assert E.PAPER_TABLE4["mean"]["BN domain/domain"] == 25.0
    assert E.PAPER_TABLE4["mean"]["BN universal/universal"] is None  # "-" in the paper


def test_trainer_options_of_a_configuration():
    spec = E.TABLES["table3"]
    settings = E.table_settings("table3", quick=True)
    argv = E.trainer_argv(spec, spec.config("deep-x4"), settings, Path("/tmp/x"))
    cfg = T.parse_config(argv)
    assert (cfg["sharing"], cfg["width"], cfg["strategy"]) == ("deep", 4, "bn-domain")
    assert cfg["steps"] == settings["batches_per_domain"] * 8
    assert cfg["domains"] == list(spec.domains)
    assert (cfg["image_size"], cfg["widths"], cfg["units_per_stage"], cfg["augment"]) == (24, [16, 32, 64, 128], 1,
                                                                                          False)
    assert cfg["permute_labels"] is None
    full = E.TABLES["table2"].config("full")
    cfg = T.parse_config(E.trainer_argv(E.TABLES["table2"], full, E.table_settings("table2", True), Path("/tmp/y")))
    assert cfg["permute_labels"] == 0 and cfg["sharing"] == "full"
    paper = T.parse_config(E.trainer_argv(spec, spec.config("deep"), E.table_settings("table3", False), Path("/x")))
    assert (paper["image_size"], paper["units_per_stage"], paper["widths"], paper["augment"], paper["batch_size"]) == (
        64, 4, [32, 64, 128, 256], True, 128)


# ----------------------------------------------------------------------------- label permutation


def test_label_permutation_is_a_seeded_bijection():
    p = label_permutation(10, 0, "digits")
    assert sorted(p.tolist()) == list(range(10))
    assert torch.equal(p, label_permutation(10, 0, "digits"))  # seeded: same every call
    assert not torch.equal(p, label_permutation(10, 1, "digits"))  # another seed, another pairing
    assert not torch.equal(p, label_permutation(10, 0, "textures"))  # another domain, another permutation
    with pytest.raises(ValueError, match="num_classes"):
        label_permutation(0, 0, "digits")


def test_permutation_is_applied_to_train_and_test_alike(cache):
    cfg = dict(T.DEFAULTS, **T.PRESETS["fast"])
    cfg.update(domains=["textures", "digits"], image_size=16, train_per_domain=48, test_per_domain=16,
               cache_dir=str(cache))
    plain = T.build_data(cfg)
    permuted = T.build_data(dict(cfg, permute_labels=0))
    for d_plain, d_perm in zip(plain, permuted):
        perm = label_permutation(d_plain.num_classes, 0, d_plain.name)
        for split in ("train", "test"):
            assert torch.equal(d_perm.split(split)[1], perm[d_plain.split(split)[1]])
            assert torch.equal(d_perm.split(split)[0], d_plain.split(split)[0])  # same images, same order
        # class names follow their images: new class perm[k] is the old class k
        assert [d_perm.classes[int(perm[k])] for k in range(d_plain.num_classes)] == d_plain.classes
        assert torch.equal(d_perm.mean, d_plain.mean)
    # the training batches carry the permuted labels of the same images
    a = plain.loader(8, seed=0).get(1)
    b = permuted.loader(8, seed=0).get(1)
    assert a[2] == b[2] and torch.equal(a[0], b[0])
    assert torch.equal(b[1], label_permutation(plain[a[2]].num_classes, 0, plain[a[2]].name)[a[1]])
    with pytest.raises(ValueError, match="permutation"):
        plain[0].relabeled(torch.zeros(10, dtype=torch.int64))


# ----------------------------------------------------------------------------- end to end


def test_tiny_table_writes_markdown_csv_and_png(tiny_table2):
    out, result = tiny_table2
    folder = out / "table2"
    md, csv_path, png = (folder / f"table2.{ext}" for ext in ("md", "csv", "png"))
    assert [f.name for f in result["files"]] == ["table2.md", "table2.csv", "table2.png"]
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["config"] for r in rows] == ["none", "deep", "full"]
    assert [float(r["paper_mean_error"]) for r in rows] == pytest.approx(
        [sum(v) / 3 for v in E.PAPER_TABLE2["rows"].values()], abs=1e-3)  # the paper has no mean: its 3 columns
    for r, rec in zip(rows, result["records"]):
        errors = [float(r[f"error_{d}"]) for d in E.TABLES["table2"].domains]
        assert all(0 <= e <= 100 for e in errors)
        assert float(r["mean_error"]) == pytest.approx(sum(errors) / 3, abs=0.01)
        assert int(r["parameters"]) == rec["parameters"] > 0
        assert int(r["steps"]) == 9  # 3 batches per domain x 3 domains
    # full sharing has fewer parameters than deep, deep far fewer than no sharing
    params = [int(r["parameters"]) for r in rows]
    assert params[2] < params[1] < params[0]
    assert [r["permute_labels"] for r in rows] == ["", "", "0"]
    text = md.read_text()
    for label in ("No sharing", "Deep sharing", "Full sharing (classes paired at random)", "mean (paper, of its 3 columns)",
                  "deep sharing vs no sharing", "perm[k]"):
        assert label in text, label
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for key in ("none", "deep", "full"):
        record = json.loads((folder / key / "experiment.json").read_text())
        assert record["config"] == key and record["device"].startswith("cpu")


def test_finished_configurations_are_reused(tiny_table2, cache, monkeypatch, tmp_path):
    out, first = tiny_table2

    _forbid_training(monkeypatch, "a finished configuration was trained again")
    again = E.run_table("table2", quick=True, out=out, overrides=tiny(cache), results_dir=tmp_path / "res")
    assert [r["mean_error"] for r in again["records"]] == [r["mean_error"] for r in first["records"]]
    assert all(r["reused"] for r in again["records"])
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        f"table2-quick-cpu-{again['records'][0]['date']}.{ext}" for ext in ("csv", "md", "png")]
    # a finished run made with other settings is not silently reused
    with pytest.raises(E.ExperimentError, match="other settings.*warmup_steps"):
        E.run_table("table2", quick=True, out=out, overrides=dict(tiny(cache), warmup_steps=3))


def test_several_seeds_are_averaged(tiny_table2, cache, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_table2[0], out)  # the seed-0 runs, left untouched for the other tests
    result = E.run_table("table2", quick=True, out=out, overrides=tiny(cache), seeds=[0, 1])
    assert [(r["config"], r["seed"]) for r in result["records"]] == [
        (k, s) for s in (0, 1) for k in ("none", "deep", "full")]
    assert [r.get("reused", False) for r in result["records"]] == [True] * 3 + [False] * 3  # seed 0 reused
    assert all((out / "table2" / f"{k}-seed1" / "eval.json").exists() for k in ("none", "deep", "full"))
    # the second seed draws another pairing of the classes for full sharing
    cfg = json.loads((out / "table2" / "full-seed1" / "eval.json").read_text())["config"]
    assert cfg["permute_labels"] == 1 and cfg["seed"] == 1
    for row in result["rows"]:
        mine = [r for r in result["records"] if r["config"] == row["config"]]
        assert row["mean_error"] == pytest.approx(sum(r["mean_error"] for r in mine) / 2)
        assert row["seed_means"] == {r["seed"]: r["mean_error"] for r in mine}
    with open(out / "table2" / "table2.csv", newline="") as fh:
        seeds = [r["seed"] for r in csv.DictReader(fh)]
    assert seeds == ["0", "1"] * 3 + ["mean"] * 3
    md = (out / "table2" / "table2.md").read_text()
    assert "mean per seed" in md and "seeds 0, 1 (mean over seeds)" in md and "Seed 1:" in md


def test_finished_only_writes_the_table_from_finished_runs(tiny_table2, cache, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(tiny_table2[0], out)
    shutil.rmtree(out / "table2" / "full")  # as if full sharing were still training

    _forbid_training(monkeypatch, "--finished-only trained a configuration")
    result = E.run_table("table2", quick=True, out=out, overrides=tiny(cache), seeds=[0, 1], finished_only=True)
    assert [(r["config"], r["seed"]) for r in result["records"]] == [("none", 0), ("deep", 0)]
    assert [r["config"] for r in result["rows"]] == ["none", "deep"]
    md = (out / "table2" / "table2.md").read_text()
    assert ("**Partial table**: 4 of 6 runs had not finished and are left out "
            "(full seed 0, none seed 1, deep seed 1, full seed 1)") in md
    with pytest.raises(E.ExperimentError, match="--finished-only: no finished run of table2"):
        E.run_table("table2", quick=True, out=tmp_path / "empty", overrides=tiny(cache), finished_only=True)


def test_records_of_an_earlier_command_complete_a_table(tiny_table2, cache, tmp_path):
    """--records: runs recorded in a table CSV (another machine's, a session ago) join the
    new runs untrained, and a table made from records alone is the table made from runs."""
    out, first = tiny_table2
    earlier = out / "table2" / "table2.csv"
    again = E.run_table("table2", quick=True, out=tmp_path / "fresh", overrides=tiny(cache), finished_only=True,
                        records_from=[earlier])
    assert [r["errors"] for r in again["records"]] == [r["errors"] for r in first["records"]]
    assert [r["mean_error"] for r in again["records"]] == [r["mean_error"] for r in first["records"]]
    assert [r["permute_labels"] for r in again["records"]] == [r.get("permute_labels") for r in first["records"]]
    assert [r["parameters"] for r in again["records"]] == [r["parameters"] for r in first["records"]]
    assert all(r["source"] == str(earlier) for r in again["records"])
    assert not (tmp_path / "fresh" / "table2" / "none").exists()  # nothing trained
    # seed 0 from the file, seed 1 trained
    both = E.run_table("table2", quick=True, out=tmp_path / "fresh", overrides=tiny(cache), seeds=[0, 1],
                       records_from=[earlier])
    assert [(r["config"], r["seed"], "source" in r) for r in both["records"]] == [
        (k, s, s == 0) for s in (0, 1) for k in ("none", "deep", "full")]
    assert (tmp_path / "fresh" / "table2" / "full-seed1" / "eval.json").exists()
    assert not (tmp_path / "fresh" / "table2" / "full").exists()
    md = (tmp_path / "fresh" / "table2" / "table2.md").read_text()
    assert (f"3 of the 6 runs are taken from the records of an earlier command (`{earlier}`: deep seed 0, "
            f"full seed 0, none seed 0), not trained again.") in md
    # records made with other settings, or of another table, are refused
    with pytest.raises(E.ExperimentError, match="none seed 0 was made with other settings .9 steps"):
        E.run_table("table2", quick=True, out=tmp_path / "x", overrides=dict(tiny(cache), batches_per_domain=4),
                    finished_only=True, records_from=[earlier])
    with pytest.raises(E.ExperimentError, match="holds no run of table3"):
        E.run_table("table3", quick=True, out=tmp_path / "x", overrides=tiny(cache), finished_only=True,
                    records_from=[earlier])
    with pytest.raises(E.ExperimentError, match="cannot read"):
        E.run_table("table2", quick=True, out=tmp_path / "x", overrides=tiny(cache), records_from=[tmp_path / "no.csv"])


def test_configs_runs_only_the_named_rows(tiny_table2, cache, tmp_path, monkeypatch):
    out, first = tiny_table2

    _forbid_training(monkeypatch, "a configuration outside --configs was trained")
    result = E.run_table("table2", quick=True, out=out, overrides=tiny(cache), configs=["deep", "none"])
    assert [r["config"] for r in result["rows"]] == ["none", "deep"]  # the table's order
    md = (out / "table2" / "table2.md").read_text()
    assert "deep sharing vs no sharing" in md and "Full sharing" not in md
    with pytest.raises(E.ExperimentError, match="table2 has no configuration 'dep'; have none, deep, full"):
        E.run_table("table2", quick=True, out=out, overrides=tiny(cache), configs=["dep"])
    with pytest.raises(SystemExit):
        E.main(["table2", "--quick", "--configs", ","])
    # leave the full table in place for the other tests
    E.run_table("table2", quick=True, out=out, overrides=tiny(cache))


def test_interrupted_configuration_resumes_exactly(tiny_table2, cache, tmp_path, capsys):
    _, first = tiny_table2
    spec = E.TABLES["table2"]
    settings = E.table_settings("table2", True, tiny(cache))
    run_dir = tmp_path / "table2" / "full"
    # stop the full-sharing run after 4 of its 9 steps, as Ctrl-C would
    assert T.main(E.trainer_argv(spec, spec.config("full"), settings, run_dir) + ["--stop-at", "4"]) == 0
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "eval.json").exists()
    result = E.run_table("table2", quick=True, out=tmp_path, overrides=tiny(cache))
    assert "resuming from step 4" in capsys.readouterr().err
    resumed = {r["config"]: r for r in result["records"]}["full"]
    fresh = {r["config"]: r for r in first["records"]}["full"]
    assert resumed["errors"] == fresh["errors"] and resumed["steps"] == 9


def test_bad_input_gives_clear_errors(capsys):
    with pytest.raises(ValueError, match="unknown table 'table5'"):
        E.run_table("table5", quick=True)
    with pytest.raises(SystemExit) as e:
        E.main(["table5", "--quick"])
    assert e.value.code == 2 and "invalid choice: 'table5'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown setting 'stepz'"):
        E.main(["table2", "--quick", "--set", "stepz=3"])
    with pytest.raises(SystemExit):
        E.main(["table2", "--set", "no-equals-sign"])
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batches_per_domain"):
        E.table_settings("table2", True, dict(batches_per_domain=0))
    with pytest.raises(SystemExit, match="distinct"):
        E.main(["table2", "--quick", "--seeds", "1,1"])
    with pytest.raises(ValueError, match="distinct"):
        E.run_table("table2", quick=True, seeds=[])


def test_dry_run_lists_configurations_and_parameters(capsys, tmp_path):
    E.main(["table3", "--quick", "--dry-run", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("python -m unirep.train") == 6 and "[6/6] deep-x4" in out
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
    # the dry run names the directory the real run of that seed would use
    E.main(["table2", "--quick", "--dry-run", "--seeds", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"--out {tmp_path / 'table2' / 'none-seed1'} " in out and "--seed 1 " in out


def test_comparisons_report_sign_noise_and_the_papers_difference():
    spec = E.TABLES["table4"]
    rec = lambda key, mean, params: {"config": key, "mean_error": mean, "parameters": params,  # noqa: E731
                                     "errors": {d: mean for d in spec.domains}, "seed_means": {0: mean}}
    records = [rec("bn-universal", 85.0, 100), rec("bn-domain-moments", 40.0, 100), rec("bn+", 50.0, 100),
               rec("bn-domain", 39.5, 110), rec("in-universal", 45.0, 100), rec("in-domain", 45.5, 110)]
    sizes = {d: 500 for d in spec.domains}
    lines = E.comparisons(spec, records, sizes)
    assert len(lines) == len(spec.comparisons)
    assert lines[0].startswith("- universal vs domain moments") and "+45.00 points" in lines[0]
    assert "bn-universal worse" in lines[0] and "paper: not reported" in lines[0]
    assert "test sampling only" in lines[0] and E.seed_spread(records) is None
    assert "within noise" in lines[2] and "paper -2.3" in lines[2]
    assert "in-universal worse" in lines[3] and "paper +5.2" in lines[3]
    # two seeds: the seed-to-seed spread joins the noise, and a verdict needs every seed to agree
    two = [dict(r, seed_means={0: r["mean_error"] - 0.5, 1: r["mean_error"] + 0.5}) for r in records]
    two[4]["seed_means"] = {0: 44.0, 1: 46.0}  # in-universal vs bn-domain (39.5): +5.5 on average
    two[3]["seed_means"] = {0: 38.0, 1: 41.0}
    assert E.seed_spread(two) == pytest.approx(((4 * 0.5 + 2 + 4.5) / 6) ** 0.5)  # pooled sample variances
    lines = E.comparisons(spec, two, sizes)
    assert "per seed +6.0, +5.0" in lines[3] and "in-universal worse in every seed" in lines[3]
    assert "test sampling and seed spread" in lines[3]
    two[4]["seed_means"] = {0: 38.0, 1: 52.0}  # the same mean, but one seed better than bn-domain
    lines = E.comparisons(spec, two, sizes)
    assert "per seed +0.0, +11.0" in lines[3]
    assert "within noise" in lines[3] or "mixed across seeds" in lines[3]
    spread = E.seed_spread(two)
    assert spread > 3
    # a partial table (bn-domain has seed 0 only): the difference is over the seeds both rows have
    two[3]["seed_means"], two[3]["mean_error"] = {0: 38.0}, 38.0
    two[4]["seed_means"], two[4]["mean_error"] = {0: 44.0, 1: 50.0}, 47.0
    lines = E.comparisons(spec, two, sizes)
    assert "+6.00 points" in lines[3] and "seed 0 only, the ones both rows have" in lines[3]


def test_header_names_each_device_and_date_whole():
    # a device's description has commas of its own ("cpu (x86_64, 2 threads)"): the header
    # must list it whole, once, not split at them
    spec = E.TABLES["table2"]
    settings = E.table_settings("table2", quick=True)

    def record(key, seed, device, date):
        return {"config": key, "seed": seed, "errors": {d: 50.0 + seed for d in spec.domains},
                "mean_error": 50.0 + seed, "parameters": 1000, "domain_specific_parameters": 10,
                "permute_labels": None, "steps": 600, "train_seconds": 1.0, "wall_seconds": 2.0,
                "device": device, "date": date}

    cpu, gpu = "cpu (x86_64, 2 threads)", "cuda (NVIDIA H100 80GB HBM3)"
    records = [record(c.key, s, cpu if s == 0 else gpu, f"2026-11-2{8 + s}") for c in spec.configs for s in (0, 1)]
    rows = E.aggregate(spec, records)
    text = E.render_markdown(spec, settings, rows, "quick", "python -m unirep.experiments table2 --quick", 4.0,
                             seeds=[0, 1])
    header = next(line for line in text.splitlines() if line.startswith("Command:"))
    assert f"device: {cpu}; {gpu};" in header
    assert "date: 2026-11-28; 2026-11-29;" in header
