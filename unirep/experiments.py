"""``python -m unirep.experiments {table2,table3,table4}``: the paper's Tables 2, 3 and 4
reproduced on the built-in benchmark.

Every configuration (row) of a table is one seeded run of the trainer (:mod:`unirep.train`)
in its own directory ``OUT/<table>/<config>``; the table is then printed beside the paper's
numbers and written as ``OUT/<table>/<table>.md``, ``.csv`` and ``.png`` (a bar chart).

* **Table 2** (full sharing): the three 10-class domains of the built-in benchmark
  (``textures``, ``digits``, ``house_numbers``: the analogues of CIFAR-10, MNIST and SVHN),
  ``bn-domain`` normalization; no sharing, deep sharing, and full sharing where the
  classifier is shared too and every domain's classes are renamed by a seeded random
  permutation (``--permute-labels``, :meth:`unirep.data.MultiDomainData.permute_labels`),
  so that class ``k`` of one domain meets an unrelated class of the others on the same
  output, as the paper pairs digits with objects at random.
* **Table 3** (sharing and width): all eight built-in domains, ``bn-domain``; no sharing,
  deep, partial-first, partial-last, deep x2 and deep x4 filters.
* **Table 4** (normalization): all eight domains, deep sharing; the six strategies.

Resumable: a configuration whose run directory holds ``eval.json`` is not run again (its
result is reused, after checking that it was made with the same settings); one with only a
checkpoint continues through the trainer's ``--resume``.  Ctrl-C checkpoints the running
configuration and stops; run the same command again to go on.

``--quick`` sizes every table to finish in under 20 minutes on a 2-core CPU; without it the
settings are those of the paper's section 4.1 (ResNet-38 at 64x64 with augmentation), a job
for a GPU.  See docs/experiments.md for the settings, the measured tables and what they say.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import _cli
from ._checkpoint import read_checkpoint

__all__ = ["ExperimentError", "TABLES", "TABLE_NAMES", "QUICK_SETTINGS", "FULL_SETTINGS", "PAPER_TABLE2",
           "PAPER_TABLE3", "PAPER_TABLE4", "ANALOGUES", "Config", "TableSpec", "table_settings", "trainer_argv",
           "run_table", "run_dir_name", "aggregate", "comparisons", "seed_spread", "render_markdown", "write_csv", "plot_table",
           "count_model_parameters", "chance_error", "describe_device", "main"]

class ExperimentError(RuntimeError):
    """A run directory holds a run made with other settings, or a run was interrupted."""


# ----------------------------------------------------------------------------- the paper's numbers
# Transcribed from the paper (paper.md, section 4.1); top-1 error (%), None where the paper
# prints "-".

#: Table 2 of the paper: CIFAR-10, MNIST, SVHN (no mean column in the paper).
PAPER_TABLE2: Dict[str, Any] = {
    "columns": ("CIFAR10", "MNIST", "SVHN"),
    "rows": {
        "No sharing": (9.4, 0.34, 3.7),
        "Deep sharing": (10.2, 0.37, 3.7),
        "Full sharing": (10.2, 0.38, 3.7),
    },
    "mean": {},
}

#: Table 3 of the paper: ten datasets and the mean.
PAPER_TABLE3: Dict[str, Any] = {
    "columns": ("AwA", "Caltech", "CIFAR10", "Daimler", "GTSR", "MNIST", "Omniglot", "Plankton", "Sketches", "SVHN"),
    "rows": {
        "no sharing": (77.9, 85.1, 9.4, 10.4, 4.2, 0.34, 13, 25.7, 31.1, 3.7),
        "deep": (73.7, 82.6, 11.7, 5.2, 3.5, 0.38, 13.1, 24.9, 30.8, 4.1),
        "partial (block 1-3)": (76.6, 84.0, 12.4, 7.0, 4.0, 0.29, 13.8, 26.2, 33.1, 4.4),
        "partial (block 2-4)": (76.6, 84.0, 9.9, 7.7, 3.3, 0.49, 12.1, 25.3, 30.7, 3.5),
        "deep (x2 params)": (74.0, 81.7, 9.1, 4.2, 4.1, 0.43, 12.3, 25.8, 29.1, 3.5),
        "deep (x4 params)": (73.1, 81.5, 7.2, 4.1, 3.5, 0.35, 11.8, 25, 27.6, 3.5),
    },
    "mean": {"no sharing": 26.1, "deep": 25.0, "partial (block 1-3)": 26.2, "partial (block 2-4)": 25.3,
             "deep (x2 params)": 24.4, "deep (x4 params)": 23.8},
}

#: Table 4 of the paper: mean error over the ten datasets (BN with universal scale and
#: moments is "-": the text says it is "comparable to random chance").
PAPER_TABLE4: Dict[str, Any] = {
    "columns": (),
    "rows": {},
    "mean": {"BN universal/universal": None, "BN+ universal": 46.3, "BN universal/domain": 27.3,
             "BN domain/domain": 25.0, "IN universal": 30.2, "IN domain": 30.4},
}

#: The paper's dataset that each built-in domain stands in for (unirep.data.builtin).
ANALOGUES: Dict[str, str] = {
    "digits": "MNIST", "characters": "Omniglot", "sketches": "Sketches", "plankton": "Plankton",
    "traffic_signs": "GTSR", "house_numbers": "SVHN", "pedestrians": "Daimler", "textures": "CIFAR10",
}

# ----------------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class Config:
    """One row of a table: a training run of :mod:`unirep.train`.

    Attributes:
        key: run directory name (under ``OUT/<table>/``).
        label: row label in our table.
        paper_row: the paper's row it reproduces (a key of the paper table).
        strategy, sharing, width: the model (``--strategy``, ``--sharing``, ``--width``).
        permute_labels: rename every domain's classes by a seeded random permutation
            (``--permute-labels SEED``, the experiment's seed).
    """

    key: str
    label: str
    paper_row: str
    strategy: str = "bn-domain"
    sharing: str = "deep"
    width: int = 1
    permute_labels: bool = False


@dataclass(frozen=True)
class TableSpec:
    """A table of the paper: its domains, configurations and the paper's numbers.

    ``comparisons`` are the paper's questions as ``(question, config a, config b)``: the
    table reports mean error of a minus mean error of b (negative: a is better)."""

    name: str
    title: str
    domains: Tuple[str, ...]
    configs: Tuple[Config, ...]
    paper: Mapping[str, Any]
    baseline: Optional[str]  # config key the parameter ratio column is taken against (None: no column)
    comparisons: Tuple[Tuple[str, str, str], ...] = field(default=())

    def config(self, key: str) -> Config:
        for c in self.configs:
            if c.key == key:
                return c
        raise KeyError(f"{self.name} has no configuration {key!r}; have {[c.key for c in self.configs]}")


ALL_DOMAINS = ("digits", "characters", "sketches", "plankton", "traffic_signs", "house_numbers", "pedestrians",
               "textures")

TABLES: Dict[str, TableSpec] = {
    "table2": TableSpec(
        name="table2",
        title="Table 2: full sharing on three 10-class domains",
        # the order of the paper's columns: CIFAR10, MNIST, SVHN
        domains=("textures", "digits", "house_numbers"),
        configs=(
            Config("none", "No sharing", "No sharing", sharing="none"),
            Config("deep", "Deep sharing", "Deep sharing", sharing="deep"),
            Config("full", "Full sharing (classes paired at random)", "Full sharing", sharing="full",
                   permute_labels=True),
        ),
        paper=PAPER_TABLE2,
        baseline="none",
        comparisons=(("deep sharing vs no sharing", "deep", "none"),
                     ("full sharing vs no sharing", "full", "none"),
                     ("full sharing vs deep sharing", "full", "deep")),
    ),
    "table3": TableSpec(
        name="table3",
        title="Table 3: sharing schemes and width",
        domains=ALL_DOMAINS,
        configs=(
            Config("none", "no sharing", "no sharing", sharing="none"),
            Config("deep", "deep", "deep", sharing="deep"),
            Config("partial-first", "partial (first stage domain-specific)", "partial (block 1-3)",
                   sharing="partial-first"),
            Config("partial-last", "partial (last stage domain-specific)", "partial (block 2-4)",
                   sharing="partial-last"),
            Config("deep-x2", "deep (x2 filters)", "deep (x2 params)", sharing="deep", width=2),
            Config("deep-x4", "deep (x4 filters)", "deep (x4 params)", sharing="deep", width=4),
        ),
        paper=PAPER_TABLE3,
        baseline="none",
        comparisons=(("deep sharing vs no sharing", "deep", "none"),
                     ("first stage domain-specific vs deep", "partial-first", "deep"),
                     ("last stage domain-specific vs deep", "partial-last", "deep"),
                     ("last vs first stage domain-specific", "partial-last", "partial-first"),
                     ("deep x2 filters vs x1", "deep-x2", "deep"),
                     ("deep x4 filters vs x1", "deep-x4", "deep")),
    ),
    "table4": TableSpec(
        name="table4",
        title="Table 4: normalization strategies (deep sharing)",
        domains=ALL_DOMAINS,
        configs=(
            Config("bn-universal", "BN, universal (s,b), universal moments", "BN universal/universal",
                   strategy="bn-universal"),
            Config("bn+", "BN+ (batch statistics at test), universal (s,b)", "BN+ universal", strategy="bn+"),
            Config("bn-domain-moments", "BN, universal (s,b), domain moments", "BN universal/domain",
                   strategy="bn-domain-moments"),
            Config("bn-domain", "BN, domain (s,b), domain moments", "BN domain/domain", strategy="bn-domain"),
            Config("in-universal", "IN, universal (s,b)", "IN universal", strategy="in-universal"),
            Config("in-domain", "IN, domain (s,b)", "IN domain", strategy="in-domain"),
        ),
        paper=PAPER_TABLE4,
        baseline=None,
        comparisons=(("universal vs domain moments (both universal s,b)", "bn-universal", "bn-domain-moments"),
                     ("BN+ (test-batch moments) vs universal moments", "bn+", "bn-universal"),
                     ("domain vs universal (s,b) (both domain moments)", "bn-domain", "bn-domain-moments"),
                     ("IN universal vs BN domain/domain (the cost of IN)", "in-universal", "bn-domain"),
                     ("IN domain vs IN universal (s,b)", "in-domain", "in-universal")),
    ),
}
TABLE_NAMES = tuple(TABLES)

# ----------------------------------------------------------------------------- settings

#: ``--quick``: sized so that each table finishes in under 20 minutes on the 2-core
#: development CPU (measured: see docs/experiments.md).  A reduced ResNet (the trainer's
#: fast preset: one unit per stage, widths 16-32-64-128) on 24x24 images, no augmentation,
#: cosine decay; ``batches_per_domain`` pure batches of every domain (steps = that x D).
QUICK_SETTINGS: Dict[str, Any] = dict(
    preset="fast", image_size=24, widths=[16, 32, 64, 128], stem_width=16, units_per_stage=1, batch_size=64,
    augment=False, decay="cosine", warmup_steps=40, train_per_domain=2000, test_per_domain=500,
    batches_per_domain=75, checkpoint_every=200,
)
#: Per-table changes to the quick settings (Tables 2 and 4 have no wide models and can
#: afford longer training within the same 20 minutes).
QUICK_TABLE_SETTINGS: Dict[str, Dict[str, Any]] = {"table2": dict(batches_per_domain=200),
                                                   "table3": {}, "table4": dict(batches_per_domain=150)}

#: Without ``--quick``: section 4.1 of the paper (ResNet-38: four units per stage, widths
#: 32-64-128-256; 64x64 images, pad-8 crop and flip, batch 128, warm-up then log-linear
#: decay), on a larger draw of the built-in benchmark.  A GPU job (hours per table).
FULL_SETTINGS: Dict[str, Any] = dict(
    preset="paper", image_size=64, widths=[32, 64, 128, 256], stem_width=16, units_per_stage=4, batch_size=128,
    augment=True, decay="exp", warmup_steps=500, train_per_domain=10000, test_per_domain=2000,
    batches_per_domain=5000, checkpoint_every=1000,
)

#: Settings every table shares (the paper's optimizer, section 3.3).
COMMON_SETTINGS: Dict[str, Any] = dict(seed=0, lr=0.1, warmup_lr=0.01, final_lr=1e-4, momentum=0.9,
                                       weight_decay=1e-4, device="auto", backend="auto", progress=None,
                                       cache_dir=None)

# settings -> trainer options (the rest are named like the trainer's options)
_FLAG_OPTIONS = {"augment": ("--augment", "--no-augment"), "progress": ("--progress", "--no-progress")}
_NOT_TRAINER = {"batches_per_domain"}
# trainer config keys that do not change what is computed: a finished run made with other
# values of these is still the same experiment
_IRRELEVANT = {"out", "resume", "stop_at", "progress", "device", "backend", "checkpoint_every", "eval_batch_size",
               "cache_dir", "epochs"}


def table_settings(table: str, quick: bool, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The settings of ``table`` (quick or full), with ``overrides`` applied last.

    Raises ``ValueError`` for an unknown table or an unknown setting name."""
    spec = _spec(table)
    settings = dict(COMMON_SETTINGS)
    settings.update(QUICK_SETTINGS if quick else FULL_SETTINGS)
    if quick:
        settings.update(QUICK_TABLE_SETTINGS.get(spec.name, {}))
    for k, v in (overrides or {}).items():
        if k not in settings:
            raise ValueError(f"unknown setting {k!r}; known: {sorted(settings)}")
        settings[k] = v
    if int(settings["batches_per_domain"]) < 1:
        raise ValueError(f"batches_per_domain must be positive, got {settings['batches_per_domain']}")
    return settings


def check_seeds(seeds: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``seeds`` is a non-empty list of distinct non-negative ints."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative ints, got {list(seeds)}")


def _spec(table: str) -> TableSpec:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {list(TABLE_NAMES)}")
    return TABLES[table]


def trainer_argv(spec: TableSpec, config: Config, settings: Mapping[str, Any], run_dir: Path) -> List[str]:
    """The ``python -m unirep.train`` options of one configuration."""
    argv = ["--domains", ",".join(spec.domains), "--strategy", config.strategy, "--sharing", config.sharing,
            "--width", str(config.width), "--out", str(run_dir),
            "--steps", str(int(settings["batches_per_domain"]) * len(spec.domains))]
    if config.permute_labels:
        argv += ["--permute-labels", str(int(settings["seed"]))]
    for k, v in settings.items():
        if k in _NOT_TRAINER or v is None:
            continue
        if k in _FLAG_OPTIONS:
            argv.append(_FLAG_OPTIONS[k][0 if v else 1])
        elif isinstance(v, (list, tuple)):
            argv += [f"--{k.replace('_', '-')}", ",".join(str(x) for x in v)]
        else:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


# ----------------------------------------------------------------------------- running


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _config_differences(intended: Mapping[str, Any], saved: Mapping[str, Any]) -> List[str]:
    out = []
    for k, v in intended.items():
        if k in _IRRELEVANT or (k == "steps" and v is None):
            continue
        a, b = _jsonable(v), _jsonable(saved.get(k))
        if a != b:
            out.append(f"{k}: {b!r} there, {a!r} now")
    return out


def describe_device(device: torch.device) -> str:
    """A short description of the device a run used, for the results' headers."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def count_model_parameters(cfg: Mapping[str, Any], num_classes: Sequence[int]) -> Tuple[int, int]:
    """``(all parameters, domain-specific parameters)`` of the model of a trainer
    configuration, built on the ``meta`` device.  Domain-specific: those of per-domain
    copies (``sharing="none"``/``"partial-*"``), the per-domain classifier rows and the
    (D, C) scale/bias rows of the normalization layers."""
    from unirep.distributed import domain_layout
    from unirep.models import count_parameters
    from unirep.train import build_model_from_config
    with torch.device("meta"):
        model = build_model_from_config(dict(cfg), list(num_classes))
    layout = domain_layout(model, len(num_classes))
    specific = sum(p.numel() for name, p in model.named_parameters()
                   if name in layout and layout[name].kind in ("owned", "rows"))
    return count_parameters(model), specific


def _num_classes(domains: Sequence[str]) -> List[int]:
    from unirep.data import BUILTIN_DOMAINS
    return [len(BUILTIN_DOMAINS[d].classes()) for d in domains]


def _run_config(spec: TableSpec, config: Config, settings: Mapping[str, Any], run_dir: Path,
                index: int, total: int) -> Dict[str, Any]:
    """Run (or reuse, or resume) one configuration; returns its result record."""
    from unirep import train as T
    argv = trainer_argv(spec, config, settings, run_dir)
    intended = T.parse_config(argv)
    head = f"[{index}/{total}] {spec.name} {config.key} seed {settings['seed']}"
    result_path, eval_path, ckpt_path = run_dir / "experiment.json", run_dir / "eval.json", run_dir / T.CHECKPOINT
    if eval_path.exists():
        report = json.loads(eval_path.read_text())
        diff = _config_differences(intended, report.get("config", {}))
        if diff:
            raise ExperimentError(f"{run_dir} holds a finished run made with other settings "
                                  f"({'; '.join(diff)}); delete it or choose another --out")
        print(f"{head}: finished earlier, reusing {eval_path}", file=sys.stderr, flush=True)
        if result_path.exists():
            record = json.loads(result_path.read_text())
            record.setdefault("seed", report["config"]["seed"])
        else:  # trained outside this command: record it now (its wall time is unknown)
            record = _record(spec, config, report, device="unknown", wall=None)
            result_path.write_text(json.dumps(record, indent=2) + "\n")
        return dict(record, reused=True)
    if ckpt_path.exists():
        saved = read_checkpoint(ckpt_path)
        diff = _config_differences(intended, saved["config"])
        if diff:
            raise ExperimentError(f"{run_dir} holds a checkpoint made with other settings "
                                  f"({'; '.join(diff)}); delete it or choose another --out")
        print(f"{head}: resuming from step {saved['step']} ({ckpt_path})", file=sys.stderr, flush=True)
        del saved
        intended = T.parse_config(argv + ["--resume", str(run_dir)])
    else:
        print(f"{head}: {config.label} -> {run_dir}", file=sys.stderr, flush=True)
    import unirep_kernels
    t0 = time.perf_counter()
    with unirep_kernels.use_backend(intended["backend"]):
        trainer = T.Trainer(intended)
        errors = trainer.run()
    wall = time.perf_counter() - t0
    if errors is None:  # stopped by a signal: the checkpoint is written
        raise ExperimentError(f"{head} stopped at step {trainer.step}; its checkpoint is in {run_dir}: run the "
                              f"same command again to continue")
    report = json.loads(eval_path.read_text())
    record = _record(spec, config, report, device=describe_device(trainer.device), wall=wall)
    result_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{head}: mean top-1 error {record['mean_error']:.2f}% ({wall:.0f} s)", file=sys.stderr, flush=True)
    return record


def _record(spec: TableSpec, config: Config, report: Mapping[str, Any], device: str,
            wall: Optional[float]) -> Dict[str, Any]:
    cfg = report["config"]
    params, specific = count_model_parameters(cfg, _num_classes(spec.domains))
    return {"table": spec.name, "config": config.key, "label": config.label, "strategy": config.strategy,
            "sharing": config.sharing, "width": config.width, "seed": cfg["seed"],
            "permute_labels": cfg.get("permute_labels"),
            "errors": report["errors"], "mean_error": report["mean_error"], "parameters": params,
            "domain_specific_parameters": specific, "steps": report["step"],
            "train_seconds": report.get("train_seconds"), "wall_seconds": wall, "device": device,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}


def run_dir_name(config: Config, seed: int) -> str:
    """Run directory of a configuration and seed: ``<config>`` for seed 0, else
    ``<config>-seed<seed>``."""
    return config.key if int(seed) == 0 else f"{config.key}-seed{int(seed)}"


def run_table(table: str, quick: bool = False, out: str | Path = "runs/experiments",
              overrides: Optional[Mapping[str, Any]] = None, results_dir: Optional[str | Path] = None,
              command: Optional[str] = None, dry_run: bool = False,
              seeds: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Run every configuration of ``table`` ("table2", "table3" or "table4") and write the
    comparison with the paper as ``OUT/<table>/<table>.{md,csv,png}``.

    Args:
        table: which table.
        quick: the CPU-sized settings (:data:`QUICK_SETTINGS`) instead of the paper's
            (:data:`FULL_SETTINGS`).
        out: parent of the table's folder; every configuration runs in
            ``OUT/<table>/<config>`` (``<config>-seed<k>`` for seed k > 0; finished ones are
            reused, interrupted ones resumed).
        overrides: settings to change (e.g. ``{"batches_per_domain": 10}``).
        results_dir: also copy the three files to
            ``RESULTS_DIR/<table>-<quick|full>-<device>-<date>.{md,csv,png}``.
        command: the command line to print in the files' header.
        dry_run: print the configurations, their options and parameter counts; train nothing.
        seeds: train every configuration once per seed (model initialization, batches and
            the label permutation of full sharing); the table reports the mean over seeds
            and each seed's mean.  Default: the ``seed`` setting (0).  All configurations
            of the first seed run before those of the next.

    Returns:
        ``{"spec", "settings", "seeds", "records" (one per configuration and seed), "rows"
        (one per configuration, averaged over seeds), "files", "wall_seconds"}``.
    """
    spec = _spec(table)
    settings = table_settings(table, quick, overrides)
    seeds = [int(settings["seed"])] if seeds is None else [int(s) for s in seeds]
    check_seeds(seeds)
    settings["seed"] = seeds[0]
    folder = Path(out) / spec.name
    t0 = time.perf_counter()
    if dry_run:
        from unirep import train as T
        for i, c in enumerate(spec.configs, 1):
            argv = trainer_argv(spec, c, settings, folder / run_dir_name(c, seeds[0]))
            params, specific = count_model_parameters(T.parse_config(argv), _num_classes(spec.domains))
            print(f"[{i}/{len(spec.configs)}] {c.key}: {c.label}; {params:,} parameters "
                  f"({specific:,} domain-specific)\n    python -m unirep.train {' '.join(argv)}")
        return {"spec": spec, "settings": settings, "seeds": seeds, "records": [], "rows": [], "files": [],
                "wall_seconds": 0.0}
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(s, c) for s in seeds for c in spec.configs]
    records = [_run_config(spec, c, dict(settings, seed=s), folder / run_dir_name(c, s), i, len(jobs))
               for i, (s, c) in enumerate(jobs, 1)]
    wall = time.perf_counter() - t0
    mode = "quick" if quick else "full"
    command = command or f"python -m unirep.experiments {spec.name}" + (" --quick" if quick else "")
    rows = aggregate(spec, records)
    md = render_markdown(spec, settings, rows, mode, command, wall, seeds)
    files = [folder / f"{spec.name}.md", folder / f"{spec.name}.csv", folder / f"{spec.name}.png"]
    files[0].write_text(md)
    write_csv(spec, records, rows, files[1])
    plot_table(spec, rows, files[2])
    print(md)
    if results_dir is not None:
        dest = Path(results_dir)
        dest.mkdir(parents=True, exist_ok=True)
        device = _device_slug(records)
        date = time.strftime("%Y-%m-%d")
        for f in files:
            shutil.copyfile(f, dest / f"{spec.name}-{mode}-{device}-{date}{f.suffix}")
    print(f"{spec.name}: {wall:.0f} s in all; files: {', '.join(str(f) for f in files)}", file=sys.stderr)
    return {"spec": spec, "settings": settings, "seeds": seeds, "records": records, "rows": rows, "files": files,
            "wall_seconds": wall}


def aggregate(spec: TableSpec, records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per configuration (in the table's order) from the records of every seed:
    per-domain and mean error averaged over the seeds, each seed's mean error
    (``seed_means``, by seed), parameter counts, summed times."""
    rows = []
    for c in spec.configs:
        mine = sorted((r for r in records if r["config"] == c.key), key=lambda r: r["seed"])
        if not mine:
            continue
        n = len(mine)
        walls = [r.get("wall_seconds") for r in mine]
        rows.append({
            "config": c.key, "label": c.label, "seeds": [r["seed"] for r in mine],
            "errors": {d: sum(r["errors"][d] for r in mine) / n for d in mine[0]["errors"]},
            "mean_error": sum(r["mean_error"] for r in mine) / n,
            "seed_means": {r["seed"]: r["mean_error"] for r in mine},
            "parameters": mine[0]["parameters"], "domain_specific_parameters": mine[0]["domain_specific_parameters"],
            "permute_labels": mine[0].get("permute_labels"), "steps": mine[0]["steps"],
            "train_seconds": sum(r.get("train_seconds") or 0.0 for r in mine),
            "wall_seconds": None if any(w is None for w in walls) else sum(walls),
            # "; ": a device's own description contains commas
            "device": "; ".join(sorted({str(r["device"]) for r in mine})),
            "date": "; ".join(sorted({str(r["date"]) for r in mine})),
            "reused": all(r.get("reused") for r in mine)})
    return rows


def _total_wall(records: Sequence[Mapping[str, Any]]) -> str:
    walls = [r.get("wall_seconds") for r in records]
    known = [w for w in walls if w is not None]
    text = f"{sum(known):.0f} s ({sum(known) / 60:.1f} min)"
    return text if len(known) == len(walls) else text + f", {len(walls) - len(known)} unknown"


def _device_slug(records: Sequence[Mapping[str, Any]]) -> str:
    kinds = {str(r["device"]).split(" ")[0] for r in records if r.get("device") != "unknown"}
    return "-".join(sorted(kinds)) or "unknown"


# ----------------------------------------------------------------------------- reporting


def _paper_values(spec: TableSpec, config: Config) -> Tuple[Optional[float], Optional[float], Dict[str, float]]:
    """``(paper mean, paper mean over the analogues of our domains, per our domain)``."""
    paper = spec.paper
    mean = paper["mean"].get(config.paper_row)
    row = paper["rows"].get(config.paper_row)
    per: Dict[str, float] = {}
    if row is not None:
        by_column = dict(zip(paper["columns"], row))
        per = {d: by_column[ANALOGUES[d]] for d in spec.domains if ANALOGUES.get(d) in by_column}
        if mean is None and len(by_column) == len(row) and all(v is not None for v in row):
            mean = sum(row) / len(row)
    analogue_mean = sum(per.values()) / len(per) if per and len(per) == len(spec.domains) else None
    return mean, analogue_mean, per


def _standard_error(record: Mapping[str, Any], test_sizes: Mapping[str, int]) -> float:
    """Standard error (points) of the mean error from test sampling alone (binomial per
    domain)."""
    errs = record["errors"]
    var = sum((e / 100) * (1 - e / 100) / max(test_sizes[d], 1) for d, e in errs.items())
    return 100 * math.sqrt(var) / len(errs)


def chance_error(domains: Sequence[str]) -> float:
    """Mean top-1 error (%) of guessing, over ``domains``."""
    k = _num_classes(domains)
    return 100 * sum(1 - 1 / n for n in k) / len(k)


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _short(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def seed_spread(rows: Sequence[Mapping[str, Any]]) -> Optional[float]:
    """Standard deviation (points) of one run's mean error from seed to seed, pooled over the
    configurations trained with several seeds (the mean of their sample variances); None
    when no configuration has two seeds."""
    variances = []
    for r in rows:
        means = list(r["seed_means"].values())
        if len(means) > 1:
            m = sum(means) / len(means)
            variances.append(sum((v - m) ** 2 for v in means) / (len(means) - 1))
    return math.sqrt(sum(variances) / len(variances)) if variances else None


def comparisons(spec: TableSpec, rows: Sequence[Mapping[str, Any]], test_sizes: Mapping[str, int]) -> List[str]:
    """The paper's questions for this table answered with our numbers, one line each: the
    difference of mean error (averaged over seeds), twice its standard error, each seed's
    difference when there are several, a verdict, and the paper's difference.

    The standard error combines test sampling (binomial, per domain) and, with several
    seeds, the seed-to-seed spread of a run (:func:`seed_spread`, pooled over the table).
    Verdict: "within noise" when the difference is within 2 standard errors; otherwise
    "<a> better/worse" (with several seeds, "mixed across seeds" unless every seed agrees)."""
    by_key = {r["config"]: r for r in rows}
    spread = seed_spread(rows)
    lines = []
    for question, a, b in spec.comparisons:
        if a not in by_key or b not in by_key:
            continue
        ra, rb = by_key[a], by_key[b]
        diff = ra["mean_error"] - rb["mean_error"]
        se = math.hypot(_standard_error(ra, test_sizes), _standard_error(rb, test_sizes))
        if spread is not None:
            se = math.sqrt(se ** 2 + spread ** 2 * (1 / len(ra["seed_means"]) + 1 / len(rb["seed_means"])))
        seeds = [s for s in ra["seed_means"] if s in rb["seed_means"]]
        per_seed = [ra["seed_means"][s] - rb["seed_means"][s] for s in seeds]
        word = "better" if diff < 0 else "worse"
        if abs(diff) <= 2 * se:
            verdict = "within noise"
        elif len(per_seed) > 1 and not all((d < 0) == (diff < 0) and d != 0 for d in per_seed):
            verdict = "mixed across seeds"
        else:
            verdict = f"{a} {word}" + (" in every seed" if len(per_seed) > 1 else "")
        noise = "test sampling" + (" and seed spread" if spread is not None else " only")
        seed_text = ("; per seed " + ", ".join(f"{d:+.1f}" for d in per_seed)) if len(per_seed) > 1 else ""
        pa, pb = _paper_values(spec, spec.config(a))[0], _paper_values(spec, spec.config(b))[0]
        paper = f"paper {pa - pb:+.1f}" if pa is not None and pb is not None else "paper: not reported"
        ratio = ra["parameters"] / rb["parameters"]
        lines.append(f"- {question}: {diff:+.2f} points (+-{2 * se:.2f}: 2 SE, {noise}{seed_text}): "
                     f"{verdict}; {paper}; parameters {ratio:.3g}x")
    return lines


def render_markdown(spec: TableSpec, settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], mode: str,
                    command: str, wall: float, seeds: Sequence[int] = (0,)) -> str:
    """The table (ours beside the paper's) as markdown, with the settings and the answers.
    ``rows``: :func:`aggregate` of the records."""
    domains = list(spec.domains)
    seeds = list(seeds)
    base = next((r for r in rows if r["config"] == spec.baseline), None)
    test_sizes = {d: int(settings["test_per_domain"]) for d in domains}
    devices = sorted({d for r in rows for d in str(r["device"]).split("; ")})
    dates = sorted({d for r in rows for d in str(r["date"]).split("; ")})
    steps = int(settings["batches_per_domain"]) * len(domains)
    runs = sum(len(r["seeds"]) for r in rows)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean over seeds)"
    lines = [f"# {spec.title}: ours on the built-in benchmark vs the paper", "",
             f"Command: `{command}` ({mode} settings); device: {'; '.join(devices)}; torch {torch.__version__}; "
             f"date: {'; '.join(dates)}; wall time of the {runs} runs (each measured when it ran: data loading, "
             f"training, evaluation): {_total_wall(rows)}; this command: {wall:.0f} s "
             f"({sum(1 for r in rows if r.get('reused'))} of {len(rows)} configurations entirely reused from "
             f"earlier runs).", "",
             f"Settings: {len(domains)} built-in domains ({', '.join(domains)}; {settings['train_per_domain']} "
             f"train / {settings['test_per_domain']} test images each), {settings['image_size']}x"
             f"{settings['image_size']} images, ResNet with {settings['units_per_stage']} unit(s) per stage, widths "
             f"{'-'.join(str(w) for w in settings['widths'])} (stem {settings['stem_width']}) at x1, "
             f"augmentation {'on' if settings['augment'] else 'off'}; round-robin pure batches of "
             f"{settings['batch_size']}, {settings['batches_per_domain']} per domain ({steps} steps), SGD momentum "
             f"{settings['momentum']}, weight decay {settings['weight_decay']}, lr {settings['warmup_lr']} for "
             f"{settings['warmup_steps']} steps then {settings['lr']} -> {settings['final_lr']} "
             f"({settings['decay']}); {seed_text}. Top-1 error (%) on the test split; chance: "
             f"{chance_error(domains):.1f} mean.", ""]
    head = ["configuration", "params", "domain-specific"]
    if base is not None:
        head.append(f"params / {spec.baseline}")
    head += domains + ["**mean (ours)**"]
    if len(seeds) > 1:
        head.append("mean per seed")
    head.append("mean (paper)" if spec.paper["mean"] else "mean (paper, of its 3 columns)")
    show_analogue = spec.name == "table3"
    if show_analogue:
        head.append("paper, mean of our 8 analogues")
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        c = spec.config(r["config"])
        pmean, panalogue, _ = _paper_values(spec, c)
        row = [c.label, _short(r["parameters"]), _short(r["domain_specific_parameters"])]
        if base is not None:
            row.append(f"{r['parameters'] / base['parameters']:.3f}")
        row += [_fmt(r["errors"][d]) for d in domains] + [f"**{r['mean_error']:.2f}**"]
        if len(seeds) > 1:
            row.append(" / ".join(f"{r['seed_means'][s]:.1f}" if s in r["seed_means"] else "-" for s in seeds))
        row.append(_fmt(pmean, 1))
        if show_analogue:
            row.append(_fmt(panalogue, 2))
        lines.append("| " + " | ".join(row) + " |")
    if spec.paper["rows"]:
        lines += ["", "The paper's numbers for the datasets our domains stand in for "
                      f"({', '.join(f'{d} ~ {ANALOGUES[d]}' for d in domains)}):", ""]
        head = ["configuration (paper's row)"] + [f"{d} ({ANALOGUES[d]})" for d in domains]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(domains)) + "|"]
        for r in rows:
            c = spec.config(r["config"])
            per = _paper_values(spec, c)[2]
            lines.append("| " + " | ".join([f"{c.label} ({c.paper_row})"] + [_fmt(per.get(d), 2) for d in domains])
                         + " |")
    if any(r.get("permute_labels") is not None for r in rows):
        from unirep.data import label_permutation
        perms = " ".join(f"Seed {s}: " + "; ".join(f"{d} {label_permutation(n, s, d).tolist()}"
                                                   for d, n in zip(domains, _num_classes(domains))) + "."
                         for s in seeds)
        lines += ["", "Full sharing: class k of each domain is trained and tested as output perm[k] of the shared "
                      f"classifier (the permutation is seeded by the run's seed). {perms}"]
    lines += ["", "The paper's questions, our answers (difference of mean top-1 error; negative: the first is "
                  "better):", ""]
    lines += comparisons(spec, rows, test_sizes)
    spread = seed_spread(rows)
    if spread is None:
        lines += ["", "One seed: the noise of training (initialization, batch order) is not measured here and "
                      "not in the +- above; run with `--seeds 0,1` to see it."]
    else:
        lines += ["", f"Seed-to-seed spread of one run's mean error (pooled over the {len(rows)} configurations): "
                      f"{spread:.2f} points (standard deviation); it is part of the +- above."]
    lines += ["", "Per configuration: steps, training seconds (summed over resumed sessions and seeds), wall seconds "
                  "when it ran (data loading, training, evaluation; summed over seeds):", ""]
    lines += [f"- {r['config']}: {r['steps']} steps, {_fmt(r.get('train_seconds'), 0)} s training, "
              f"{_fmt(r.get('wall_seconds'), 0)} s wall" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(spec: TableSpec, records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
              path: Path) -> None:
    """One row per configuration and seed (the model, parameter counts, per-domain and mean
    error, the paper's mean, steps and times), then, with several seeds, one row per
    configuration with ``seed`` = ``mean`` (averages over the seeds)."""
    domains = list(spec.domains)
    cols = (["table", "config", "label", "seed", "strategy", "sharing", "width", "permute_labels", "parameters",
             "domain_specific_parameters"] + [f"error_{d}" for d in domains]
            + ["mean_error", "paper_row", "paper_mean_error", "paper_analogue_mean_error", "steps", "train_seconds",
               "wall_seconds", "device", "date", "torch"])
    ordered = sorted(records, key=lambda r: ([c.key for c in spec.configs].index(r["config"]), r["seed"]))
    if len({r["seed"] for r in records}) > 1:
        ordered += [dict(r, seed="mean", torch=torch.__version__) for r in rows]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in ordered:
            c = spec.config(r["config"])
            pmean, panalogue, _ = _paper_values(spec, c)
            w.writerow([spec.name, c.key, c.label, r["seed"], c.strategy, c.sharing, c.width, r.get("permute_labels"),
                        r["parameters"], r["domain_specific_parameters"]]
                       + [f"{r['errors'][d]:.2f}" for d in domains]
                       + [f"{r['mean_error']:.3f}", c.paper_row, "" if pmean is None else round(pmean, 3),
                          "" if panalogue is None else f"{panalogue:.3f}", r["steps"],
                          _fmt(r.get("train_seconds"), 1), _fmt(r.get("wall_seconds"), 1), r["device"], r["date"],
                          r["torch"]])


def plot_table(spec: TableSpec, rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Bar chart: mean error per configuration, ours (averaged over seeds; the whiskers
    span the seeds' means) beside the paper's (left), and our per-domain errors (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    domains = list(spec.domains)
    keys = [r["config"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(6 + 1.4 * len(domains), 4.2),
                           gridspec_kw={"width_ratios": [len(keys) + 1, len(domains) + 1]})
    x = np.arange(len(keys))
    ours = [r["mean_error"] for r in rows]
    spread = np.array([[o - min(r["seed_means"].values()), max(r["seed_means"].values()) - o]
                       for o, r in zip(ours, rows)]).T
    paper = [_paper_values(spec, spec.config(k))[0] for k in keys]
    several = any(len(r["seed_means"]) > 1 for r in rows)
    ax[0].bar(x - 0.2, ours, 0.4, yerr=spread if several else None, capsize=3,
              label="ours (built-in benchmark)" + (", range over seeds" if several else ""), color="C0")
    ax[0].bar(x + 0.2, [p if p is not None else 0 for p in paper], 0.4, label="paper", color="C1")
    for i, (o, p) in enumerate(zip(ours, paper)):
        ax[0].text(i - 0.2, o, f"{o:.1f}", ha="center", va="bottom", fontsize=7)
        ax[0].text(i + 0.2, p or 0, "n/a" if p is None else f"{p:.1f}", ha="center", va="bottom", fontsize=7)
    ax[0].axhline(chance_error(domains), color="grey", ls="--", lw=1, label="chance (ours)")
    ax[0].set_xticks(x, keys, rotation=30, ha="right")
    ax[0].set_ylabel("mean top-1 error (%)")
    ax[0].set_title(f"{spec.name}: mean error")
    ax[0].legend(fontsize=7)
    xd = np.arange(len(domains))
    wbar = 0.8 / len(keys)
    for i, r in enumerate(rows):
        ax[1].bar(xd - 0.4 + wbar * (i + 0.5), [r["errors"][d] for d in domains], wbar, label=r["config"])
    ax[1].set_xticks(xd, domains, rotation=30, ha="right")
    ax[1].set_ylabel("top-1 error (%)")
    ax[1].set_title("ours, per domain" + (" (mean over seeds)" if several else ""))
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def _parse_override(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip().replace("-", "_"), parsed


def _seed_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes integers such as 0,1, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m unirep.experiments``."""
    p = _cli.ArgumentParser(
        prog="python -m unirep.experiments",
        description="Reproduce the paper's Table 2 (full sharing), Table 3 (sharing, width) or Table 4 "
                    "(normalization) on the built-in benchmark: every configuration is a seeded run of "
                    "unirep.train in OUT/<table>/<config> (finished runs are reused, interrupted ones resumed); "
                    "the table is printed beside the paper's and written as OUT/<table>/<table>.{md,csv,png}.")
    p.add_argument("table", choices=TABLE_NAMES, help="which table")
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized settings (under 20 minutes per table on 2 cores) instead of the paper's "
                        "(section 4.1: ResNet-38 at 64x64, a GPU job)")
    p.add_argument("--out", default="runs/experiments", help="output folder (default runs/experiments)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="also copy the table to DIR/<table>-<quick|full>-<device>-<date>.{md,csv,png}")
    p.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                   metavar="KEY=VALUE",
                   help="change one setting, e.g. --set device=cuda, --set batches_per_domain=300, "
                        "--set seed=1 (see --dry-run and docs/experiments.md for the names)")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="LIST",
                   help="train every configuration once per seed, e.g. --seeds 0,1 (default: one seed, 0); the "
                        "table reports the mean over seeds and each seed's mean")
    p.add_argument("--dry-run", action="store_true",
                   help="print every configuration's trainer options and parameter count; train nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m unirep.experiments``)."""
    args = build_parser().parse_args(argv)
    overrides = dict(args.overrides)
    try:
        table_settings(args.table, args.quick, overrides)
        if args.seeds is not None:
            check_seeds(args.seeds)
    except ValueError as e:
        raise SystemExit(f"python -m unirep.experiments: {e}") from None
    command = "python -m unirep.experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        run_table(args.table, quick=args.quick, out=args.out, overrides=overrides, results_dir=args.results,
                  command=command, dry_run=args.dry_run, seeds=args.seeds)
    except ExperimentError as e:
        print(f"python -m unirep.experiments: {e}", file=sys.stderr)
        return 130 if "stopped at step" in str(e) else 1
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main, prog="python -m unirep.experiments"))
