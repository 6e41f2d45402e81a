"""``python -m unirep.train``: the paper's training regime (section 3.3) on one device or many.

Pure batches visiting the domains round-robin (or mixed batches), SGD with momentum 0.9 and
weight decay (1e-4; 5e-4 in the fast preset), a short warm-up at lr 0.01 then 0.1 decayed to 1e-4, per-domain top-1
error at the end.  Run ``python -m unirep.train --help`` for every option; see
docs/training.md for outputs, resuming and ``torchrun``.

Outputs in ``--out`` (default ``runs/<strategy>-<sharing>-<time>``): ``config.json``,
``checkpoint.pt`` (written atomically, periodically and on SIGINT/SIGTERM), ``metrics.csv``,
``eval.json``, ``curves.png`` and ``errors.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from . import _cli
from . import distributed as udist
from ._checkpoint import CHECKPOINT, checkpoint_path, read_checkpoint

__all__ = ["DEFAULTS", "PRESETS", "main", "parse_config", "resolve_config", "load_checkpoint", "lr_at",
           "warmup_steps", "build_data", "build_model_from_config", "evaluate_model", "load_run", "Trainer"]

#: Options and their defaults (``None``: decided by the preset).
DEFAULTS: Dict[str, Any] = dict(
    data="builtin", domains=None, image_size=None, train_per_domain=None, test_per_domain=None,
    permute_labels=None, arch="resnet38", strategy="bn-domain", sharing="deep", width=1, widths=None, stem_width=16,
    final_norm="auto",
    units_per_stage=None, augment=None, batching="round-robin", batch_size=None, steps=None, epochs=None,
    accumulate=1, lr=0.1, warmup_lr=0.01, warmup_steps=None, final_lr=1e-4, decay=None,
    momentum=0.9, weight_decay=1e-4, label_smoothing=0.0, seed=0, device="auto", backend="auto", out=None, resume=None,
    checkpoint_every=None, stop_at=None, eval_batch_size=256, progress=None, preset="fast", cache_dir=None,
    added_domains=None, init_from=None, train_domains=None, trainable="all",
)

#: What the options of the domain lifecycle (``python -m unirep.adapt``) mean; they are
#: configuration keys like the others, so an adapted run is an ordinary run directory:
#:
#: - ``added_domains``: domains appended after those of ``data``, a list of dicts
#:   ``{"builtin": NAME}`` or ``{"path": PATH, "format": FORMAT}``, each with an optional
#:   ``"name"`` (the domain's name in the run; default its own).
#: - ``init_from``: a checkpoint whose model the run starts from (at step 0), grown with
#:   :func:`unirep.add_domain` by the domains it does not have (their names must follow its
#:   own, in order).
#: - ``train_domains``: the names of the domains the training batches visit (default all).
#: - ``trainable``: ``"all"`` (default) or ``"domain"``: only the parameters of the
#:   ``train_domains`` alone (:func:`unirep.lifecycle.domain_parameters`) are trained, and
#:   moments shared by every domain stay frozen (their layers run in eval mode).
LIFECYCLE_OPTIONS = ("added_domains", "init_from", "train_domains", "trainable")

#: ``fast`` (default): a reduced ResNet (one unit per stage, half the filters) on 32x32
#: images (a 4x4 last stage), with the crop-and-flip augmentation and a weight decay of
#: 5e-4 that let it train 6000 steps (24 passes over each domain's 2000 images) without
#: memorizing them, cosine decay; sized to learn the built-in benchmark (under 17% mean
#: error, beating one specialist network per domain) in under 5 minutes on 2 CPU cores.
#: ``paper``: section 4.1 (ResNet-38, 64x64, four units per stage, pad-8 crop and flip,
#: weight decay 1e-4).
PRESETS: Dict[str, Dict[str, Any]] = {
    "fast": dict(image_size=32, widths=[16, 32, 64, 128], units_per_stage=1, batch_size=64, steps=6000,
                 warmup_steps=40, checkpoint_every=1000, augment=True, decay="cosine", weight_decay=5e-4),
    "paper": dict(image_size=64, widths=[32, 64, 128, 256], units_per_stage=4, batch_size=128, steps=40000,
                  warmup_steps=500, checkpoint_every=1000, augment=True, decay="exp"),
}


def _int_list(s: str) -> List[int]:
    return [int(v) for v in s.replace(",", " ").split()]


def _str_list(s: str) -> List[str]:
    return [v for v in s.replace(",", " ").split() if v]


def build_parser() -> argparse.ArgumentParser:
    from unirep.models import SHARINGS, STRATEGIES
    from unirep_kernels.backends import NAMES as BACKENDS
    p = _cli.ArgumentParser(
        prog="python -m unirep.train",
        description="Train a multi-domain network (Bilen & Vedaldi 2017, section 3.3): pure batches "
                    "visiting the domains round-robin, SGD momentum 0.9, weight decay (the paper's 1e-4; 5e-4 in "
                    "the fast preset), warm-up at "
                    "lr 0.01 then 0.1 decayed to 1e-4; ends with the per-domain top-1 error table. "
                    "With no arguments: bn-domain, deep sharing, the built-in benchmark, the 'fast' preset. "
                    "Many processes: torchrun --nproc_per_node N -m unirep.train ...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=S, metavar="PATH",
                   help="'builtin' (default: the built-in 8-domain benchmark) or dataset folders, one "
                        "domain each, read by unirep.data.load_dataset (format auto-detected; "
                        "PATH:FORMAT to force one)")
    g.add_argument("--domains", type=_str_list, default=S,
                   help="comma-separated domain names to use, in this order (default: all)")
    g.add_argument("--image-size", type=_cli.positive_int, default=S, help="image side (fast: 32, paper: 64)")
    g.add_argument("--train-per-domain", type=int, default=S,
                   help="built-in benchmark: training images per domain (default 2000)")
    g.add_argument("--test-per-domain", type=int, default=S,
                   help="built-in benchmark: test images per domain (default 500)")
    g.add_argument("--cache-dir", default=S, help="built-in benchmark cache (default: unirep.data's)")
    g.add_argument("--permute-labels", type=int, default=S, metavar="SEED",
                   help="rename every domain's classes by its own seeded random permutation (train and "
                        "test alike); with --sharing full this pairs the domains' classes at random on the "
                        "shared classifier, as for the paper's Table 2")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["resnet38", "alexnet", "vggm128"], default=S, help="default resnet38")
    g.add_argument("--strategy", choices=list(STRATEGIES), default=S,
                   help="normalization (Table 4): bn-universal, bn+, bn-domain-moments, bn-domain (default), "
                        "in-universal, in-domain, none")
    g.add_argument("--sharing", choices=list(SHARINGS), default=S,
                   help="none, deep (default), full, partial-first, partial-last (Table 3)")
    g.add_argument("--width", type=int, choices=[1, 2, 4], default=S, help="filter multiplier (default 1)")
    g.add_argument("--widths", type=_int_list, default=S,
                   help="resnet38 stage widths at x1, e.g. 32,64,128,256 (fast: 16,32,64,128; paper: 32,64,128,256)")
    g.add_argument("--stem-width", type=int, default=S, help="resnet38 stem filters at x1 (default 16)")
    g.add_argument("--final-norm", default=S,
                   help="resnet38: the layer before global pooling: auto (default: the strategy's norm for BN, "
                        "scale and bias without normalization for IN; see docs/models.md), same (the strategy's "
                        "norm), affine, relu, or a strategy name such as bn-domain")
    g.add_argument("--units-per-stage", type=int, default=S,
                   help="resnet38 residual units per stage (fast: 1, paper: 4 = ResNet-38)")
    g = p.add_argument_group("training")
    g.add_argument("--preset", choices=sorted(PRESETS), default=S,
                   help="defaults for size and budget: fast (default; <5 min on a 2-core CPU) or paper "
                        "(section 4.1); explicit options override it")
    g.add_argument("--augment", dest="augment", action="store_true", default=S,
                   help="the paper's random crop (padding: an eighth of the image side, 8 pixels at 64x64) "
                        "and flip (no flip for digits/characters); on in both presets")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=S,
                   help="no augmentation (whitening only)")
    g.add_argument("--batching", choices=["round-robin", "mixed"], default=S,
                   help="round-robin pure batches (default, the paper) or mixed batches (every domain in "
                        "every batch)")
    g.add_argument("--batch-size", type=_cli.positive_int, default=S, help="images per batch per process (fast: 64, paper: 128)")
    g.add_argument("--steps", type=_cli.positive_int, default=S, help="optimizer steps (fast: 6000, paper: 40000)")
    g.add_argument("--epochs", type=_cli.positive_float, default=S,
                   help="instead of --steps: passes over the largest domain (round-robin) or every domain (mixed)")
    g.add_argument("--accumulate", type=_cli.positive_int, default=S,
                   help="sub-batches per step on one process, gradients accumulated (simulates that many "
                        "ranks, the paper's domain-per-GPU regime); default 1")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate after warm-up (default 0.1)")
    g.add_argument("--warmup-lr", type=float, default=S, help="warm-up learning rate (default 0.01)")
    g.add_argument("--warmup-steps", type=_cli.non_negative_int, default=S,
                   help="warm-up steps (fast: 40, paper: 500); a run no longer than its warm-up gets a "
                        "twentieth of its steps instead, and says so")
    g.add_argument("--final-lr", type=float, default=S, help="learning rate at the last step (default 1e-4)")
    g.add_argument("--decay", choices=["exp", "step", "cosine"], default=S,
                   help="decay from --lr to --final-lr: exp (log-linear; paper preset), step (x0.1 at "
                        "equal intervals) or cosine (fast preset)")
    g.add_argument("--momentum", type=float, default=S, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=S, help="SGD weight decay (fast: 5e-4, paper: 1e-4)")
    g.add_argument("--label-smoothing", type=float, default=S,
                   help="label smoothing of the cross-entropy, over each domain's own classes (default 0)")
    g.add_argument("--seed", type=int, default=S, help="seeds the model and the batches (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default=S, help="auto (default: cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--backend", choices=("auto",) + BACKENDS, default=S,
                   help="normalization kernels' backend: auto (default), reference, cpp, cuda, triton")
    g.add_argument("--out", default=S, help="run directory (default runs/<strategy>-<sharing>-<date-time>)")
    g.add_argument("--resume", nargs="?", const="__out__", default=S, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (default: --out) from its checkpoint, exactly; its "
                        "saved options apply unless given again (e.g. a larger --steps)")
    g.add_argument("--checkpoint-every", type=_cli.non_negative_int, default=S, help="steps between checkpoints (1000)")
    g.add_argument("--stop-at", type=_cli.positive_int, default=S,
                   help="checkpoint and stop after this step, as SIGTERM would (the schedule still spans "
                        "--steps); continue later with --resume, e.g. to fit a job time limit")
    g.add_argument("--eval-batch-size", type=_cli.positive_int, default=S, help="evaluation batch size (default 256)")
    g.add_argument("--progress", dest="progress", action="store_true", default=S,
                   help="force the tqdm progress bar (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")
    return p


def load_checkpoint(path) -> Dict[str, Any]:
    """The checkpoint of a run directory (or checkpoint file), on the CPU; a
    :class:`~unirep._checkpoint.CheckpointError` naming the file when it cannot be read."""
    return read_checkpoint(path)


def resolve_config(given: Mapping[str, Any], saved: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Effective configuration: defaults < preset < ``saved`` (the configuration of the run
    being resumed) < ``given`` (options named by the caller, as a dict of trainer option
    names, e.g. ``{"steps": 400, "strategy": "in-universal"}``).

    Raises ``ValueError`` for an unknown option name or preset."""
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown trainer options {sorted(unknown)}")
    saved = dict(saved or {})
    preset = given.get("preset", saved.get("preset", DEFAULTS["preset"]))
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    cfg = dict(DEFAULTS)
    cfg.update(PRESETS[preset])
    cfg.update({k: v for k, v in saved.items() if k not in ("resume", "stop_at")})
    cfg.update(given)
    cfg["preset"] = preset
    if "data" in cfg and isinstance(cfg["data"], list) and cfg["data"] == ["builtin"]:
        cfg["data"] = "builtin"
    if cfg["steps"] is None and cfg["epochs"] is None:
        raise ValueError("need steps or epochs")
    if "epochs" in given and "steps" not in given:
        cfg["steps"] = None
    return cfg


def read_command_line(argv: Optional[Sequence[str]] = None) -> tuple[Dict[str, Any], Optional[Path]]:
    """``(options given on the command line, checkpoint to resume or None)``."""
    given = vars(build_parser().parse_args(argv))
    given.pop("debug", None)  # how errors are shown, not part of the run
    resume = None
    if "resume" in given:
        run = given["resume"] if given["resume"] != "__out__" else given.get("out")
        if run is None:
            raise SystemExit("--resume needs a run directory (or --out)")
        resume = checkpoint_path(run)
        given["resume"] = str(resume)
    return given, resume


def parse_config(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Effective configuration of a command line: defaults < preset < saved run
    (``--resume``) < command line."""
    given, resume = read_command_line(argv)
    return _config_of(given, load_checkpoint(resume) if resume else None)


def _config_of(given: Dict[str, Any], checkpoint: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    saved = None
    if checkpoint is not None:
        saved = dict(checkpoint["config"], out=str(Path(given["resume"]).parent))
    try:
        return resolve_config(given, saved)
    except ValueError as e:
        raise SystemExit(str(e)) from None


# ----------------------------------------------------------------------------- pieces

def lr_at(step: int, cfg: Dict[str, Any], total: int) -> float:
    """Learning rate of ``step``: ``warmup_lr`` for ``warmup_steps`` steps, then ``lr``
    decayed to ``final_lr`` at the last step (a pure function of the step: nothing to save)."""
    w = warmup_steps(cfg, total)
    if step < w:
        return float(cfg["warmup_lr"])
    span = max(total - 1 - w, 1)
    t = min(max((step - w) / span, 0.0), 1.0)
    hi, lo = float(cfg["lr"]), float(cfg["final_lr"])
    if cfg["decay"] == "exp":
        return hi * (lo / hi) ** t
    if cfg["decay"] == "cosine":
        return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t))
    n = max(round(math.log10(hi / lo)), 1)  # step: x0.1 at n equal intervals, ending at final_lr
    k = min(int(t * (n + 1)), n)
    return hi * 0.1 ** k


def warmup_steps(cfg: Dict[str, Any], total: int) -> int:
    """The warm-up of a run of ``total`` steps: ``cfg["warmup_steps"]``, or a twentieth of
    the run (the fast preset's share) when the run is no longer than that, which would
    otherwise never leave the warm-up learning rate."""
    w = int(cfg["warmup_steps"])
    return w if w < total else total // 20


def build_data(cfg: Dict[str, Any]):
    """The ``MultiDomainData`` of a configuration."""
    from unirep.data import MultiDomainData, builtin_benchmark, load_dataset
    data = cfg["data"]
    if data in ("builtin", None):
        kw = {}
        if cfg.get("train_per_domain"):
            kw["train_per_domain"] = int(cfg["train_per_domain"])
        if cfg.get("test_per_domain"):
            kw["test_per_domain"] = int(cfg["test_per_domain"])
        md = builtin_benchmark(cfg.get("cache_dir"), seed=0, image_size=int(cfg["image_size"]),
                               domains=cfg.get("domains"), progress=False, **kw)
    else:
        paths = [data] if isinstance(data, str) else list(data)
        sets = []
        for spec in paths:
            path, fmt = spec, "auto"
            if ":" in spec and not Path(spec).exists():
                path, fmt = spec.rsplit(":", 1)
            sets.append(load_dataset(path, format=fmt, image_size=int(cfg["image_size"])))
        md = MultiDomainData(sets)
        if cfg.get("domains"):
            md = md.subset(cfg["domains"])
    if cfg.get("added_domains"):
        md = MultiDomainData(list(md) + [added_domain(spec, cfg) for spec in cfg["added_domains"]])
    if cfg.get("permute_labels") is not None:
        md = md.permute_labels(int(cfg["permute_labels"]))
    return md


def added_domain(spec: Mapping[str, Any], cfg: Mapping[str, Any]):
    """The ``DomainDataset`` of one entry of ``cfg["added_domains"]`` (see
    :data:`LIFECYCLE_OPTIONS`), at the run's image size."""
    from unirep.data import DomainDataset, builtin_benchmark, load_dataset
    if "builtin" in spec:
        kw = {}
        if cfg.get("train_per_domain"):
            kw["train_per_domain"] = int(cfg["train_per_domain"])
        if cfg.get("test_per_domain"):
            kw["test_per_domain"] = int(cfg["test_per_domain"])
        ds = builtin_benchmark(cfg.get("cache_dir"), seed=0, image_size=int(cfg["image_size"]),
                               domains=[spec["builtin"]], progress=False, **kw)[0]
    elif "path" in spec:
        ds = load_dataset(spec["path"], format=spec.get("format", "auto"), image_size=int(cfg["image_size"]))
    else:
        raise ValueError(f"added_domains: an entry needs 'builtin' or 'path', got {dict(spec)}")
    name = spec.get("name")
    if name and name != ds.name:
        ds = DomainDataset(name, ds.classes, ds.train, ds.test, kind=ds.kind, mean=ds.mean, std=ds.std,
                           source=ds.source)
    return ds


def build_model_from_config(cfg: Dict[str, Any], num_classes: Sequence[int]):
    from unirep.models import build_model
    kw: Dict[str, Any] = {}
    if cfg["arch"] == "resnet38":
        # Runs saved before final_norm existed had the strategy's own norm there ("same").
        kw = dict(widths=tuple(cfg["widths"]), stem_width=int(cfg["stem_width"]),
                  units_per_stage=int(cfg["units_per_stage"]), final_norm=cfg.get("final_norm", "same"))
    else:
        size = int(cfg["image_size"])
        kw = dict(input_sizes=[(size, size)] * len(num_classes))
    return build_model(cfg["arch"], num_classes=list(num_classes), strategy=cfg["strategy"],
                       sharing=cfg["sharing"], width=int(cfg["width"]), **kw)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise _cli.CLIError("--device", f"expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _cli.CLIError("--device", f"{name} asked for, but torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


#: Training error is measured on this many training images per domain (a fixed random
#: subset), enough to tell a fitted domain from an under-trained one at a fraction of a
#: pass over the training split.
TRAIN_EVAL_IMAGES = 1000


@torch.no_grad()
def evaluate_model(model, data, device, batch_size: int = 256, split: str = "test",
                   limit: Optional[int] = None) -> Dict[str, float]:
    """Top-1 error (%) of every domain on ``split`` (whitened, no augmentation: the
    central crop), in eval mode with each domain's own moments; at most ``limit`` images
    per domain (a fixed random subset)."""
    was = model.training
    model.eval()
    errors: Dict[str, float] = {}
    for d, name in enumerate(data.names):
        wrong = total = 0
        for x, y, dom in data.eval_batches(d, batch_size, split=split, device=device, limit=limit):
            pred = model(x, dom).argmax(1)
            wrong += int((pred != y).sum())
            total += int(y.numel())
        errors[name] = 100.0 * wrong / max(total, 1)
    model.train(was)
    return errors


def chance_errors(data) -> Dict[str, float]:
    """Top-1 error (%) of guessing uniformly at random, per domain: 100 (1 - 1/K)."""
    return {name: 100.0 * (1.0 - 1.0 / k) for name, k in zip(data.names, data.num_classes)}


def format_table(errors: Mapping[str, float], train_errors: Optional[Mapping[str, float]] = None,
                 chance: Optional[Mapping[str, float]] = None) -> str:
    """The per-domain top-1 error table (test; training error and chance level as further
    columns when given) with the mean over domains as the last row."""
    cols = [("test error (%)", errors)]
    if train_errors:
        cols.append(("train error (%)", train_errors))
    if chance:
        cols.append(("chance (%)", chance))
    w = max(len("domain"), max(len(n) for n in errors))
    widths = [len(h) for h, _ in cols]
    rule = f"{'-' * w}  " + "  ".join("-" * cw for cw in widths)
    lines = [f"{'domain':<{w}}  " + "  ".join(h for h, _ in cols), rule]
    for n in errors:
        lines.append(f"{n:<{w}}  " + "  ".join(f"{v[n]:{cw}.2f}" for (_, v), cw in zip(cols, widths)))
    means = [sum(v[n] for n in errors) / len(errors) for _, v in cols]
    lines += [rule, f"{'mean':<{w}}  " + "  ".join(f"{m:{cw}.2f}" for m, cw in zip(means, widths))]
    return "\n".join(lines)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_run(run_dir, device="cpu"):
    """``(cfg, model, checkpoint)`` of a run directory (model in eval mode)."""
    ckpt = load_checkpoint(run_dir)
    cfg = ckpt["config"]
    model = build_model_from_config(cfg, ckpt["data"]["num_classes"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return cfg, model, ckpt


# ----------------------------------------------------------------------------- trainer

class _Stop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits after the current step."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signum:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum

    def uninstall(self):
        for s, h in self._old.items():
            signal.signal(s, h)


class Trainer:
    """One training run of a resolved configuration (:func:`resolve_config`).

    ``checkpoint``: the already loaded checkpoint to continue from (else the one named by
    ``cfg["resume"]``, if any, is loaded)."""

    def __init__(self, cfg: Dict[str, Any], checkpoint: Optional[Mapping[str, Any]] = None):
        self.cfg = cfg
        self.rank, self.world, local = udist.init_distributed(
            "cuda" if resolve_device(cfg["device"]).type == "cuda" else "cpu")
        self.device = resolve_device(cfg["device"], local)
        self.accumulate = int(cfg["accumulate"])
        if self.world > 1 and self.accumulate != 1:
            raise SystemExit("--accumulate is for a single process; with torchrun each rank is one sub-batch")
        self.data = build_data(cfg)
        self.D = len(self.data)
        self.slots = self.world * self.accumulate  # sub-batches per step, globally
        mode = "pure" if cfg["batching"] == "round-robin" else "mixed"
        # The domains the batches visit (all, or cfg["train_domains"]) and their indices in the run.
        visited = self.data
        if cfg.get("train_domains"):
            unknown = [n for n in cfg["train_domains"] if n not in self.data.names]
            if unknown:
                raise ValueError(f"train_domains: no domain {unknown} in the run's {self.data.names}")
            visited = self.data.subset(list(cfg["train_domains"]))
        self.visited = [self.data.index(n) for n in visited.names]
        self._visited_map = torch.tensor(self.visited, device=self.device)
        if mode == "mixed" and int(cfg["batch_size"]) < len(visited):
            raise SystemExit(f"a mixed batch of {cfg['batch_size']} cannot hold all {len(visited)} domains")
        my_slots = range(self.rank, self.slots, self.world) if self.world > 1 else range(self.slots)
        self.loaders = [visited.loader(int(cfg["batch_size"]), mode=mode, device=self.device,
                                         augment=bool(cfg["augment"]),
                                         seed=int(cfg["seed"]), rank=r, world_size=self.slots)
                        for r in my_slots]
        if cfg["steps"] is None:
            cfg["steps"] = int(math.ceil(float(cfg["epochs"]) * self.loaders[0].sampler.steps_per_epoch()))
        self.total = int(cfg["steps"])
        torch.manual_seed(int(cfg["seed"]))
        self.model = build_model_from_config(cfg, self.data.num_classes).to(self.device)
        if checkpoint is None and not cfg.get("resume") and cfg.get("init_from"):
            self._start_from(cfg["init_from"])
        self.trainable = cfg.get("trainable") or "all"
        if self.trainable not in ("all", "domain"):
            raise ValueError(f"trainable must be 'all' or 'domain', got {self.trainable!r}")
        params = list(self.model.parameters())
        if self.trainable == "domain":
            from .lifecycle import domain_parameters
            own = {id(p) for d in self.visited for _, p, _ in domain_parameters(self.model, d)}
            if not own:
                raise ValueError(f"trainable='domain': the domains {visited.names} have no parameters of their "
                                 f"own under strategy {cfg['strategy']!r} and sharing {cfg['sharing']!r} "
                                 f"(everything is shared): train all parameters instead")
            for p in params:
                p.requires_grad_(id(p) in own)
            params = [p for p in params if id(p) in own]
        self.optimizer = torch.optim.SGD(params, lr=float(cfg["warmup_lr"]),
                                         momentum=float(cfg["momentum"]),
                                         weight_decay=float(cfg["weight_decay"]))
        self.masked = udist.DomainMaskedStep(self.model, self.optimizer, self.D)
        self.merger = udist.StatsMerger(self.model, self.D)
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            import inspect
            # No buffer broadcast in forward (it would overwrite the per-domain moments of the
            # domains rank 0 did not see): the statistics are merged after every step instead.
            sync = ({"forward_sync_buffers": False}
                    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                    else {"broadcast_buffers": False})
            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=udist.has_per_domain_copies(self.model), **sync)
        self.out = Path(cfg["out"])
        self.step = 0
        self.elapsed = 0.0
        if checkpoint is None and cfg.get("resume"):
            checkpoint = load_checkpoint(cfg["resume"])
        if checkpoint is not None:
            self._restore(checkpoint)

    def _start_from(self, path) -> None:
        """Initialize the model from the checkpoint ``path`` (``cfg["init_from"]``), grown with
        :func:`unirep.add_domain` by the run's domains that follow the checkpoint's own."""
        from .lifecycle import add_domain
        ck = load_checkpoint(path)
        names, counts = list(ck["data"]["names"]), list(ck["data"]["num_classes"])
        if self.data.names[:len(names)] != names or self.data.num_classes[:len(names)] != counts:
            raise ValueError(f"init_from {path}: its domains {names} ({counts} classes) are not the first "
                             f"domains of this run, {self.data.names} ({self.data.num_classes} classes)")
        start = build_model_from_config(ck["config"], counts)
        start.load_state_dict(ck["model"])
        for k in self.data.num_classes[len(names):]:
            add_domain(start, k, init="mean")
        self.model.load_state_dict(start.state_dict())

    def _freeze_shared_moments(self) -> None:
        """With ``trainable="domain"``: the batch norms whose running moments every domain
        shares run in eval mode (their moments stay as they are; the visited domains'
        batches are normalized by them, as at test time)."""
        if self.trainable != "domain":
            return
        from .lifecycle import shared_moment_layers
        for m in shared_moment_layers(self.model):
            m.eval()

    # -- checkpoints
    def state(self) -> Dict[str, Any]:
        cfg = {k: v for k, v in self.cfg.items() if k != "resume"}
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": _rng_state(), "config": cfg, "elapsed": self.elapsed,
                "data": {"names": self.data.names, "num_classes": self.data.num_classes,
                         "classes": [d.classes for d in self.data], "mean": self.data.mean_table,
                         "std": self.data.std_table, "image_size": self.data.image_size}}

    def save(self) -> None:
        if self.rank == 0:
            save_atomic(self.state(), self.out / CHECKPOINT)

    def _restore(self, ck: Mapping[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"])
        self.step = int(ck["step"])
        self.elapsed = float(ck.get("elapsed", 0.0))

    # -- one step
    def train_step(self, step: int) -> tuple[float, int]:
        lr = lr_at(step, self.cfg, self.total)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        counts_local = torch.zeros(self.D, dtype=torch.float64)
        loss_sum = 0.0
        n_local = 0
        multi = len(self.loaders) > 1 and bool(self.merger)
        start = self.merger.snapshot() if multi else None
        results, sub_counts = [], []
        self.merger.start_step()
        for loader in self.loaders:
            x, y, dom = loader.get(step)
            if self.visited != list(range(self.D)):  # a subset of the domains: their run indices
                dom = self.visited[dom] if isinstance(dom, int) else self._visited_map[dom]
            if multi:
                self.merger.restore(start)
            from unirep.models import masked_cross_entropy
            loss = masked_cross_entropy(self.net(x, dom), y,
                                        label_smoothing=float(self.cfg.get("label_smoothing") or 0.0))
            (loss / len(self.loaders)).backward()
            c = torch.zeros(self.D, dtype=torch.float64)
            if isinstance(dom, int):
                c[dom] = y.numel()
            else:
                c += torch.bincount(dom.cpu(), minlength=self.D).double()
            counts_local += c
            if multi:
                results.append(self.merger.snapshot())
                sub_counts.append(c)
            loss_sum += float(loss.detach()) * y.numel()
            n_local += y.numel()
        if multi:
            self.merger.merge_local(start, results, sub_counts)
        info = torch.cat([counts_local, torch.tensor([float(self._stop.signum != 0), loss_sum, n_local],
                                                     dtype=torch.float64)])
        if self.world > 1:  # NCCL reduces device tensors only
            info = udist.all_reduce_sum(info.to(self.device)).cpu()
        counts_global = info[:self.D]
        self.stop_requested = bool(info[self.D] > 0)
        if self.world > 1:
            self.merger.merge_ranks(counts_local, counts_global)
        self.masked.step(counts_global > 0)
        return float(info[self.D + 1] / info[self.D + 2]), int(info[self.D + 2])

    # -- the loop
    def run(self) -> Optional[Dict[str, float]]:
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(
                {k: v for k, v in cfg.items() if k != "resume"}, indent=2, default=str) + "\n")
            self._open_metrics()
        self._stop = _Stop()
        self._stop.install()
        self.stop_requested = False
        show = cfg["progress"] if cfg["progress"] is not None else sys.stderr.isatty()
        bar = None
        if self.rank == 0 and show:
            from tqdm import tqdm
            bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        every = int(cfg["checkpoint_every"] or 0)
        self.model.train()
        self._freeze_shared_moments()
        t_last = time.perf_counter()
        ema_ips = None
        try:
            while self.step < self.total:
                t0 = time.perf_counter()
                loss, n = self.train_step(self.step)
                self.step += 1
                t1 = time.perf_counter()
                self.elapsed += t1 - t0
                ips = n / max(t1 - t0, 1e-9)
                ema_ips = ips if ema_ips is None else 0.9 * ema_ips + 0.1 * ips
                if self.rank == 0:
                    self._metrics.writerow([self.step, f"{lr_at(self.step - 1, cfg, self.total):.6g}",
                                            f"{loss:.6f}", n, f"{ips:.1f}", f"{self.elapsed:.3f}"])
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{ema_ips:.0f}", refresh=False)
                        bar.update(1)
                    elif time.perf_counter() - t_last > 30 or self.step == self.total:
                        t_last = time.perf_counter()
                        eta = (self.total - self.step) * (self.elapsed / max(self.step, 1))
                        print(f"step {self.step}/{self.total} loss {loss:.3f} {ema_ips:.0f} img/s "
                              f"ETA {eta:.0f}s", file=sys.stderr, flush=True)
                stop_at = self.cfg.get("stop_at")
                if stop_at is not None and self.step >= int(stop_at) and self.step < self.total:
                    self._metrics_file_flush()
                    self.save()
                    if self.rank == 0:
                        print(f"stopped at step {self.step} (--stop-at); continue with --resume {self.out}",
                              file=sys.stderr, flush=True)
                    return None
                if self.stop_requested:
                    self._metrics_file_flush()
                    self.save()
                    if self.rank == 0:
                        print(f"\nstopped by signal {self._stop.signum} at step {self.step}; checkpoint in "
                              f"{self.out / CHECKPOINT}; continue with --resume {self.out}",
                              file=sys.stderr, flush=True)
                    return None
                if every and self.step % every == 0 and self.step < self.total:
                    self._metrics_file_flush()
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            self._stop.uninstall()
            if self.rank == 0:
                self._metrics_fh.close()
        self.save()
        errors = None
        if self.rank == 0:
            errors = self.finish()
        if self.world > 1:
            torch.distributed.barrier()
        return errors

    def finish(self) -> Dict[str, float]:
        bs = int(self.cfg["eval_batch_size"])
        errors = evaluate_model(self.model, self.data, self.device, bs)
        train_errors = evaluate_model(self.model, self.data, self.device, bs, split="train",
                                      limit=TRAIN_EVAL_IMAGES)
        chance = chance_errors(self.data)
        mean = sum(errors.values()) / len(errors)
        report = {"step": self.step, "errors": errors, "mean_error": mean,
                  "train_errors": train_errors, "mean_train_error": sum(train_errors.values()) / len(train_errors),
                  "train_eval_images": TRAIN_EVAL_IMAGES,
                  "chance_errors": chance, "mean_chance_error": sum(chance.values()) / len(chance),
                  "train_seconds": self.elapsed,
                  "config": {k: v for k, v in self.cfg.items() if k != "resume"}, "world_size": self.world}
        (self.out / "eval.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        try:
            plot_run(self.out, report)
        except Exception as e:  # plots are a convenience: never lose a run over them
            print(f"warning: plotting failed: {e}", file=sys.stderr)
        print(format_table(errors, train_errors, chance))
        return errors

    # -- metrics.csv (rows of steps beyond the resumed step are dropped)
    def _open_metrics(self) -> None:
        path = self.out / "metrics.csv"
        rows = []
        if self.step > 0 and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.reader(fh)][1:]
            rows = [r for r in rows if r and int(r[0]) <= self.step]
        self._metrics_fh = open(path, "w", newline="")
        self._metrics = csv.writer(self._metrics_fh)
        self._metrics.writerow(["step", "lr", "loss", "images", "images_per_s", "train_seconds"])
        self._metrics.writerows(rows)

    def _metrics_file_flush(self) -> None:
        if self.rank == 0:
            self._metrics_fh.flush()


def plot_run(run_dir, report: Optional[Mapping[str, Any]] = None) -> None:
    """``curves.png`` (training loss and learning rate per step) and ``errors.png``
    (per-domain top-1 error on the test split, training error beside it, chance level
    marked) in ``run_dir``; ``report``: the run's ``eval.json`` content (read from the run
    directory when None; without one, only the curves are drawn).

    The loss is smoothed over whole round-robin cycles (a multiple of D steps): a pure batch
    of each domain in turn makes the raw per-step loss oscillate with the domains'
    difficulties, and a cycle's mean is the mean over the domains."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = Path(run_dir)
    if report is None and (run / "eval.json").exists():
        report = json.loads((run / "eval.json").read_text())
    steps, lrs, losses = [], [], []
    with open(run / "metrics.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            steps.append(int(r["step"]))
            lrs.append(float(r["lr"]))
            losses.append(float(r["loss"]))
    cfg = (report or {}).get("config") or {}
    num_domains = len((report or {}).get("errors") or {}) or 1
    cycle = num_domains if cfg.get("batching", "round-robin") == "round-robin" else 1
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, losses, lw=0.5, alpha=0.3, color="C0", label="per step")
    k = cycle * max(1, round(len(losses) / (100 * cycle)))  # whole cycles, about 100 points
    if len(losses) >= 2 * k and k > 1:
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        what = f"mean of {k // cycle} round-robin cycle{'s' if k // cycle > 1 else ''} ({k} steps)" \
            if cycle > 1 else f"mean of {k} steps"
        ax[0].plot(steps[k - 1:], sm, lw=1.5, color="C1", label=what)
    ax[0].set_xlabel("step"), ax[0].set_ylabel("training loss"), ax[0].legend()
    ax[1].plot(steps, lrs)
    ax[1].set_yscale("log"), ax[1].set_xlabel("step"), ax[1].set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=100)
    plt.close(fig)
    errors = (report or {}).get("errors")
    if not errors:
        return
    names = list(errors) + ["mean"]

    def with_mean(values: Optional[Mapping[str, float]]) -> Optional[List[float]]:
        if not values or any(n not in values for n in errors):
            return None
        v = [float(values[n]) for n in errors]
        return v + [sum(v) / len(v)]

    test, train, chance = with_mean(errors), with_mean(report.get("train_errors")), with_mean(report.get("chance_errors"))
    x = np.arange(len(names))
    w = 0.4 if train else 0.8
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 3.8))
    ax.bar(x - (w / 2 if train else 0), test, w, color=["C0"] * len(errors) + ["C3"], label="test error")
    for i, v in enumerate(test):
        ax.text(i - (w / 2 if train else 0), v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    if train:
        ax.bar(x + w / 2, train, w, color="C2", alpha=0.6, label="training error")
    if chance:
        ax.hlines(chance, x - 0.45, x + 0.45, colors="k", linestyles="--", lw=1, label="chance (1 - 1/K)")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("top-1 error (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(run / "errors.png", dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    given, resume = read_command_line(argv)
    checkpoint = load_checkpoint(resume) if resume else None
    cfg = _config_of(given, checkpoint)
    if cfg["out"] is None:
        cfg["out"] = str(Path("runs") / f"{cfg['strategy']}-{cfg['sharing']}-{time.strftime('%Y%m%d-%H%M%S')}")
    import unirep_kernels
    with unirep_kernels.use_backend(cfg["backend"]):
        trainer = Trainer(cfg, checkpoint)
        del checkpoint
        if trainer.rank == 0:
            print(f"run {trainer.out}: {len(trainer.data)} domains {trainer.data.names}, "
                  f"{trainer.total} steps x {trainer.slots} x {cfg['batch_size']} images "
                  f"({cfg['batching']}), device {trainer.device}", file=sys.stderr, flush=True)
            if cfg.get("resume"):
                print(f"resumed from {cfg['resume']} at step {trainer.step} of {trainer.total}", file=sys.stderr,
                      flush=True)
            warmup = warmup_steps(cfg, trainer.total)
            if warmup != int(cfg["warmup_steps"]):
                print(f"warning: the run ({trainer.total} steps) is no longer than its warm-up "
                      f"({cfg['warmup_steps']} steps): warming up for {warmup} steps instead", file=sys.stderr,
                      flush=True)
        errors = trainer.run()
    if udist.is_distributed():
        torch.distributed.destroy_process_group()
    if errors is None and trainer.step < trainer.total and trainer._stop.signum:
        return 128 + int(trainer._stop.signum)
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
