"""The tables: the paper's numbers (section 4.1), our tables' configurations (one
trainer run each), our own checks (convergence, the instance-normalization ablation), and
the regimes' settings, turned into trainer configurations (dicts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["TABLES", "TABLE_NAMES", "CHECKS", "CHECK_NAMES", "REGIMES", "REGIME_NAMES", "QUICK_SETTINGS",
           "CONVERGED_SETTINGS", "FULL_SETTINGS", "COMMON_SETTINGS", "PAPER_TABLE2", "PAPER_TABLE3", "PAPER_TABLE4",
           "ANALOGUES", "ALL_DOMAINS", "Config", "TableSpec", "table_settings", "trainer_config", "trainer_argv",
           "check_seeds", "spec_of", "regime_of", "num_classes_of", "chance_error"]


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
        steps_factor: train this many times the table's steps (the convergence check).
        options: further trainer options of this row only, as ``(name, value)`` pairs
            (e.g. ``(("final_norm", "same"),)``); they override the table's settings.
    """

    key: str
    label: str
    paper_row: str
    strategy: str = "bn-domain"
    sharing: str = "deep"
    width: int = 1
    permute_labels: bool = False
    steps_factor: int = 1
    options: Tuple[Tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class TableSpec:
    """A table of the paper: its domains, configurations and the paper's numbers.

    ``comparisons`` are the paper's questions as ``(question, config a, config b)``: the
    table reports mean error of a minus mean error of b (negative: a is better)."""

    name: str
    title: str
    domains: Tuple[str, ...]
    configs: Tuple[Config, ...]
    paper: Optional[Mapping[str, Any]]  # None: not a table of the paper (our own checks)
    baseline: Optional[str]  # config key the parameter ratio column is taken against (None: no column)
    comparisons: Tuple[Tuple[str, str, str], ...] = field(default=())
    settings_of: Optional[str] = None  # take the settings of this table (default: its own)

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

#: Table 3 trained twice as long) and the instance-normalization ablation (Table 4's IN row
#: with the layer before pooling changed, or another learning rate). They run in the
#: settings of the table named by ``settings_of``, and reuse its finished runs where a
#: configuration is the same (same key, same options).
CHECKS: Dict[str, TableSpec] = {
    "convergence": TableSpec(
        name="convergence",
        title="Convergence: the deep configuration trained for twice the steps",
        domains=ALL_DOMAINS,
        configs=(
            Config("deep", "deep (the table's steps)", "-", sharing="deep"),
            Config("deep-2x-steps", "deep, twice the steps", "-", sharing="deep", steps_factor=2),
        ),
        paper=None,
        baseline=None,
        comparisons=(("twice the steps vs the table's steps", "deep-2x-steps", "deep"),),
        settings_of="table3",
    ),
    "in-ablation": TableSpec(
        name="in-ablation",
        title="Instance normalization ablation: the layer before global pooling, and the learning rate",
        domains=ALL_DOMAINS,
        configs=(  # in order of importance: an interrupted ablation still answers the main question
            Config("bn-domain", "BN, domain (s,b), domain moments", "-", strategy="bn-domain"),
            Config("in-universal-final-in", "IN everywhere, the final norm too (IN before pooling)", "-",
                   strategy="in-universal", options=(("final_norm", "same"),)),
            Config("in-universal", "IN, final universal (s,b) without norm (our default)", "-",
                   strategy="in-universal"),
            Config("in-universal-final-bn-domain", "IN, final norm BN with domain (s,b) and moments", "-",
                   strategy="in-universal", options=(("final_norm", "bn-domain"),)),
            Config("in-universal-final-in-domain", "IN everywhere, domain (s,b) on the final IN", "-",
                   strategy="in-universal", options=(("final_norm", "in-domain"),)),
            Config("in-universal-final-in-lr0.02", "IN before pooling, lr 0.02", "-",
                   strategy="in-universal", options=(("final_norm", "same"), ("lr", 0.02))),
            Config("in-universal-final-in-warmup", "IN before pooling, 4x longer warm-up", "-",
                   strategy="in-universal", options=(("final_norm", "same"), ("warmup_steps", 160))),
            Config("in-universal-final-relu", "IN, no final norm (ReLU only)", "-",
                   strategy="in-universal", options=(("final_norm", "relu"),)),
        ),
        paper=None,
        baseline=None,
        comparisons=(
            ("IN before pooling vs BN domain/domain (the gap of the old model)", "in-universal-final-in", "bn-domain"),
            ("no norm before pooling vs IN before pooling", "in-universal", "in-universal-final-in"),
            ("BN domain before pooling vs IN before pooling", "in-universal-final-bn-domain",
             "in-universal-final-in"),
            ("domain (s,b) on the final IN vs universal", "in-universal-final-in-domain", "in-universal-final-in"),
            ("ReLU only vs universal (s,b) before pooling", "in-universal-final-relu", "in-universal"),
            ("lr 0.02 vs 0.1 (IN before pooling)", "in-universal-final-in-lr0.02", "in-universal-final-in"),
            ("4x warm-up vs 1x (IN before pooling)", "in-universal-final-in-warmup", "in-universal-final-in"),
            ("IN (our default) vs BN domain/domain (the cost of IN now)", "in-universal", "bn-domain"),
        ),
        settings_of="table4",
    ),
}
CHECK_NAMES = tuple(CHECKS)

# ----------------------------------------------------------------------------- settings

#: ``--regime quick`` (also ``--quick``): sized so that each table finishes in under 20
#: minutes on the 2-core development CPU.  A reduced ResNet (one unit per stage, widths
#: 16-32-64-128) on 24x24 images, no augmentation, cosine decay; ``batches_per_domain``
#: pure batches of every domain (steps = that x D).  Far from converged, and its last stage
#: has 3x3 maps: a smoke test of the machinery, not a place to draw conclusions.
QUICK_SETTINGS: Dict[str, Any] = dict(
    preset="fast", image_size=24, widths=[16, 32, 64, 128], stem_width=16, units_per_stage=1, batch_size=64,
    augment=False, decay="cosine", warmup_steps=40, train_per_domain=2000, test_per_domain=500,
    batches_per_domain=75, checkpoint_every=200, label_smoothing=0.0, final_norm="auto",
)
#: Per-table changes to the quick settings (Tables 2 and 4 have no wide models and can
#: afford longer training within the same 20 minutes).
QUICK_TABLE_SETTINGS: Dict[str, Dict[str, Any]] = {"table2": dict(batches_per_domain=200),
                                                   "table3": {}, "table4": dict(batches_per_domain=150)}

#: ``--regime converged``: every configuration trained to convergence on the 2-core CPU,
#: the regime the README's conclusions are drawn from.  The trainer's fast network (one unit
#: per stage, widths 16-32-64-128, 32x32 images: a 4x4 last stage), 1000 pure batches of
#: every domain (32 passes over its 2000 training images), weight decay 5e-4, no
#: augmentation.  Checked with ``python -m unirep.experiments convergence --regime
#: converged``: on the deep configuration (seed 0, 2026-12-01) doubling the steps to 2000
#: batches per domain moved the mean test error by -0.9 points (14.07 -> 13.18), while
#: 500 -> 1000 had moved it by -2.8 (16.88 -> 14.07) although the training error was
#: already 0.4%.  (With crop-and-flip the same network keeps improving much longer: not
#: convergeable within a CPU budget.)
CONVERGED_SETTINGS: Dict[str, Any] = dict(
    preset="fast", image_size=32, widths=[16, 32, 64, 128], stem_width=16, units_per_stage=1, batch_size=64,
    augment=False, decay="cosine", warmup_steps=40, train_per_domain=2000, test_per_domain=500,
    batches_per_domain=1000, checkpoint_every=1000, label_smoothing=0.0, final_norm="auto",
    weight_decay=5e-4,
)
CONVERGED_TABLE_SETTINGS: Dict[str, Dict[str, Any]] = {"table2": {}, "table3": {}, "table4": {}}

#: ``--regime full`` (the default): section 4.1 of the paper (ResNet-38: four units per
#: stage, widths 32-64-128-256; 64x64 images, pad-8 crop and flip, batch 128, warm-up then
#: log-linear decay), on a larger draw of the built-in benchmark.  A GPU job (hours per
#: table).
FULL_SETTINGS: Dict[str, Any] = dict(
    preset="paper", image_size=64, widths=[32, 64, 128, 256], stem_width=16, units_per_stage=4, batch_size=128,
    augment=True, decay="exp", warmup_steps=500, train_per_domain=10000, test_per_domain=2000,
    batches_per_domain=5000, checkpoint_every=1000, label_smoothing=0.0, final_norm="auto",
)

#: Regime name -> (settings, per-table changes).
REGIMES: Dict[str, Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]] = {
    "quick": (QUICK_SETTINGS, QUICK_TABLE_SETTINGS),
    "converged": (CONVERGED_SETTINGS, CONVERGED_TABLE_SETTINGS),
    "full": (FULL_SETTINGS, {}),
}
REGIME_NAMES = tuple(REGIMES)

#: Settings every table shares (the paper's optimizer, section 3.3).
COMMON_SETTINGS: Dict[str, Any] = dict(seed=0, lr=0.1, warmup_lr=0.01, final_lr=1e-4, momentum=0.9,
                                       weight_decay=1e-4, device="auto", backend="auto", progress=None,
                                       cache_dir=None)

# settings that are not trainer options
_NOT_TRAINER = {"batches_per_domain"}
# trainer config keys that do not change what is computed: a finished run made with other
# values of these is still the same experiment
_IRRELEVANT = {"out", "resume", "stop_at", "progress", "device", "backend", "checkpoint_every", "eval_batch_size",
               "cache_dir", "epochs"}


def regime_of(quick: bool = False, regime: Optional[str] = None) -> str:
    """The regime name of the (``quick``, ``regime``) arguments: ``regime`` if given, else
    "quick" or "full"."""
    if regime is None:
        return "quick" if quick else "full"
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {list(REGIME_NAMES)}")
    if quick and regime != "quick":
        raise ValueError(f"--quick is --regime quick; it contradicts --regime {regime}")
    return regime


def table_settings(table: str, quick: bool = False, overrides: Optional[Mapping[str, Any]] = None,
                   regime: Optional[str] = None) -> Dict[str, Any]:
    """The settings of ``table`` in a regime (``regime``: "quick", "converged" or "full";
    ``quick=True`` is "quick"; default "full"), with ``overrides`` applied last.

    Raises ``ValueError`` for an unknown table, regime or setting name."""
    spec = spec_of(table)
    base, per_table = REGIMES[regime_of(quick, regime)]
    settings = dict(COMMON_SETTINGS)
    settings.update(base)
    settings.update(per_table.get(spec.settings_of or spec.name, {}))
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


def spec_of(name: str) -> TableSpec:
    """The :class:`TableSpec` of a table of the paper or of one of our checks."""
    if name in TABLES:
        return TABLES[name]
    if name in CHECKS:
        return CHECKS[name]
    raise ValueError(f"unknown table {name!r}; expected one of {list(TABLE_NAMES + CHECK_NAMES)}")


def trainer_config(spec: TableSpec, config: Config, settings: Mapping[str, Any], run_dir: Path) -> Dict[str, Any]:
    """The trainer options of one configuration, as a dict of :data:`unirep.train.DEFAULTS`
    names (the options a command line would give; resolve with
    :func:`unirep.train.resolve_config`)."""
    given: Dict[str, Any] = {k: v for k, v in settings.items() if k not in _NOT_TRAINER and v is not None}
    given.update(domains=list(spec.domains), strategy=config.strategy, sharing=config.sharing, width=config.width,
                 out=str(run_dir), steps=int(settings["batches_per_domain"]) * len(spec.domains) * config.steps_factor)
    if config.permute_labels:
        given["permute_labels"] = int(settings["seed"])
    given.update(dict(config.options))
    return given


# how booleans and lists are spelled on the trainer's command line
_FLAG_OPTIONS = {"augment": ("--augment", "--no-augment"), "progress": ("--progress", "--no-progress")}


def trainer_argv(spec: TableSpec, config: Config, settings: Mapping[str, Any], run_dir: Path) -> List[str]:
    """The ``python -m unirep.train`` command line of one configuration (what ``--dry-run``
    prints; runs themselves pass :func:`trainer_config` as a dict)."""
    argv: List[str] = []
    for k, v in trainer_config(spec, config, settings, run_dir).items():
        if k in _FLAG_OPTIONS:
            argv.append(_FLAG_OPTIONS[k][0 if v else 1])
        elif isinstance(v, (list, tuple)):
            argv += [f"--{k.replace('_', '-')}", ",".join(str(x) for x in v)]
        else:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def num_classes_of(domains: Sequence[str]) -> List[int]:
    """Class counts of built-in domains."""
    from unirep.data import BUILTIN_DOMAINS
    return [len(BUILTIN_DOMAINS[d].classes()) for d in domains]


def chance_error(domains: Sequence[str]) -> float:
    """Mean top-1 error (%) of guessing, over ``domains``."""
    k = num_classes_of(domains)
    return 100 * sum(1 - 1 / n for n in k) / len(k)
