"""``python -m unirep.adapt RUN_DIR --data PATH --out DIR``: learn a new domain on a trained
run without retraining (or, by default, disturbing) the old ones.

The run's model gets one more domain (:func:`unirep.add_domain`, new rows from the mean of
the old ones) and is trained on batches of the new domain alone, with the run's own
regime (the trainer of ``python -m unirep.train``, its learning-rate schedule, checkpoints,
``--resume`` and outputs). ``--train domain`` (the default) trains only the new domain's
own parameters: its rows of the norm scales and biases, its moments, its DomainScale2d rows,
its head, and its copy of the domain-specific stages under sharing ``none``/``partial-*``;
every old domain then computes bit for bit what it computed before. ``--train all`` trains
everything (the old domains' own rows still stay, but the shared trunk moves).

``--out`` becomes an ordinary run directory (``config.json``, ``checkpoint.pt``,
``eval.json``, ...) that ``python -m unirep.evaluate`` and ``predict`` accept, plus
``adapt.json``: the parameters trained (count and share of the model), the wall time, and
every domain's error before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from . import _cli
from ._checkpoint import checkpoint_path, read_checkpoint
from .data.paths import expand_path

#: Options of ``python -m unirep.train`` that ``adapt`` passes on (the rest is the run's).
PASSED_ON = ("steps", "batch_size", "lr", "warmup_lr", "warmup_steps", "final_lr", "decay", "weight_decay",
             "momentum", "seed", "device", "backend", "checkpoint_every", "progress", "eval_batch_size")


def data_spec(text: str) -> Dict[str, str]:
    """``--data``: an existing path (``PATH`` or ``PATH:FORMAT``) or a built-in domain name,
    as an entry of the ``added_domains`` option."""
    from .data import BUILTIN_DOMAINS
    path = expand_path(text)
    if path.exists():
        return {"path": str(path), "format": "auto"}
    if ":" in text:
        head, fmt = text.rsplit(":", 1)
        if expand_path(head).exists():
            return {"path": str(expand_path(head)), "format": fmt}
    if text in BUILTIN_DOMAINS:
        return {"builtin": text}
    raise _cli.CLIError("--data", f"{text!r} is neither an existing dataset path (PATH or PATH:FORMAT) nor a "
                                  f"built-in domain ({', '.join(BUILTIN_DOMAINS)})")


def adapt_config(parent: Dict[str, Any], run_dir, spec: Dict[str, str], name: str, train: str, out: str,
                 given: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The trainer configuration (a dict, see :func:`unirep.train.resolve_config`) of
    adapting the run ``run_dir`` (its checkpoint ``parent``) to the new domain ``spec``
    named ``name``: the run's own configuration plus the lifecycle options, with
    ``given`` (trainer options, e.g. ``{"steps": 500}``) overriding. The default budget
    is the new domain's share of the run's: its steps divided by its domains."""
    from .train import resolve_config
    saved = {k: v for k, v in parent["config"].items() if k not in ("resume", "stop_at", "out")}
    old = len(parent["data"]["names"])
    options = dict(given or {})
    options.setdefault("steps", max(1, math.ceil(int(saved.get("steps") or 1) / old)))
    options.update(added_domains=list(saved.get("added_domains") or []) + [dict(spec, name=name)],
                   init_from=str(checkpoint_path(run_dir)), train_domains=[name], trainable=train, out=str(out))
    return resolve_config(options, saved)


def new_domain_name(spec: Dict[str, str], name: Optional[str]) -> str:
    """The new domain's name: ``--domain-name``, else the built-in name or the folder's."""
    if name:
        return name
    if "builtin" in spec:
        return spec["builtin"]
    p = Path(spec["path"])
    return p.stem if p.is_file() else p.name


def build_parser() -> _cli.ArgumentParser:
    from unirep_kernels.backends import NAMES as BACKENDS
    S = argparse.SUPPRESS
    p = _cli.ArgumentParser(
        prog="python -m unirep.adapt",
        description="Add a new domain to a trained run and train it: by default only the new domain's own "
                    "parameters (norm rows, moments, scales, head), leaving every old domain bit for bit "
                    "as it was. Writes a run directory that evaluate and predict accept.")
    p.add_argument("run_dir", help="a run directory of python -m unirep.train or unirep.adapt (or its checkpoint.pt)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="the new domain: a dataset path that unirep.data.load_dataset reads (PATH:FORMAT to "
                        "force a format) or a built-in domain name")
    p.add_argument("--domain-name", default=None, metavar="NAME",
                   help="the new domain's name in the run (default: the built-in name or the folder's)")
    p.add_argument("--train", choices=("domain", "all"), default="domain",
                   help="domain (default): only the new domain's parameters; all: every parameter")
    p.add_argument("--out", required=True, help="the new run directory")
    g = p.add_argument_group("training (default: the run's own, for the new domain's share of its steps)")
    g.add_argument("--steps", type=_cli.positive_int, default=S,
                   help="optimizer steps (default: the run's steps divided by its number of domains)")
    g.add_argument("--batch-size", type=_cli.positive_int, default=S)
    g.add_argument("--lr", type=_cli.positive_float, default=S, help="peak learning rate")
    g.add_argument("--warmup-lr", type=_cli.positive_float, default=S)
    g.add_argument("--warmup-steps", type=_cli.non_negative_int, default=S)
    g.add_argument("--final-lr", type=_cli.positive_float, default=S)
    g.add_argument("--decay", choices=["exp", "step", "cosine"], default=S)
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--device", default=S, help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--backend", choices=("auto",) + BACKENDS, default=S)
    g.add_argument("--checkpoint-every", type=_cli.non_negative_int, default=S)
    g.add_argument("--progress", dest="progress", action="store_true", default=S)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    return p


def adapt(run_dir, spec: Dict[str, str], *, name: Optional[str] = None, train: str = "domain", out,
          given: Optional[Dict[str, Any]] = None, quiet: bool = False) -> Dict[str, Any]:
    """Adapt the run ``run_dir`` to a new domain (see the module docstring) and return the
    report written to ``out/adapt.json``. ``spec``: :func:`data_spec`'s dict; ``given``:
    trainer options overriding the run's (``steps``, ``lr``, ...)."""
    import unirep_kernels

    from .lifecycle import count_domain_parameters
    from .models import count_parameters
    from .train import Trainer, format_table

    if train not in ("domain", "all"):
        raise ValueError(f"adapt: train must be 'domain' or 'all', got {train!r}")
    parent = read_checkpoint(run_dir)
    names = list(parent["data"]["names"])
    name = new_domain_name(spec, name)
    if name in names:
        raise _cli.CLIError("--domain-name", f"the run already has a domain {name!r} (its domains: {names}); "
                                             f"give the new one another name")
    out = expand_path(out)
    if (out / "checkpoint.pt").exists():
        raise _cli.CLIError("--out", f"{out} already holds a run; choose a new directory")
    cfg = adapt_config(parent, run_dir, spec, name, train, str(out), given)
    parent_report = Path(checkpoint_path(run_dir)).parent / "eval.json"
    before = json.loads(parent_report.read_text()).get("errors") if parent_report.exists() else None
    with unirep_kernels.use_backend(cfg["backend"]):
        trainer = Trainer(cfg)
        model = trainer.model
        d = trainer.data.index(name)
        total = count_parameters(model)
        trained = count_domain_parameters(model, d) if train == "domain" else total
        if not quiet:
            print(f"adapt {run_dir} -> {out}: new domain {name!r} (index {d}, {trainer.data.num_classes[d]} "
                  f"classes), {trainer.total} steps x {cfg['batch_size']} images; training {train}: "
                  f"{trained:,} of {total:,} parameters ({100.0 * trained / total:.2f}%)", file=sys.stderr,
                  flush=True)
        start = time.perf_counter()
        errors = trainer.run()
        wall = time.perf_counter() - start
    report = {"parent": str(checkpoint_path(run_dir)), "domain": name, "domain_index": d, "train": train,
              "trained_parameters": trained, "total_parameters": total, "trained_share": trained / total,
              "steps": trainer.total, "train_seconds": trainer.elapsed, "wall_seconds": wall,
              "errors": errors, "parent_errors": before}
    if before is not None and errors is not None:
        common = [n for n in before if n in errors]
        report["max_old_error_change"] = max((abs(errors[n] - before[n]) for n in common), default=0.0)
    if errors is not None:
        (out / "adapt.json").write_text(json.dumps(report, indent=2) + "\n")
        if not quiet:
            print(f"trained {trained:,} of {total:,} parameters ({100.0 * trained / total:.2f}%) in "
                  f"{trainer.elapsed:.1f}s; {name}: {errors[name]:.2f}% error"
                  + (f"; old domains' errors changed by at most {report['max_old_error_change']:.2f} points"
                     if "max_old_error_change" in report else ""), file=sys.stderr, flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    opts = vars(args)  # the training options not given are absent (argparse.SUPPRESS)
    given = {k: opts[k] for k in PASSED_ON if k in opts}
    report = adapt(args.run_dir, data_spec(args.data), name=args.domain_name, train=args.train, out=args.out,
                   given=given)
    return 0 if report.get("errors") is not None else 1  # None: stopped by a signal


if __name__ == "__main__":
    sys.exit(_cli.run(main))
