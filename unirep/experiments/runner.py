"""Running a table: one seeded trainer run per configuration and seed (reused when it
finished earlier, resumed when it was interrupted), then the records aggregated over seeds
and the table written (:mod:`.report`)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .report import decathlon_reference, plot_table, render_markdown, write_csv
from .tables import (_IRRELEVANT, Config, TableSpec, check_seeds, num_classes_of, regime_of, spec_of,
                     table_settings, trainer_argv, trainer_config)

__all__ = ["ExperimentError", "RunInterrupted", "run_table", "run_dir_name", "aggregate", "count_model_parameters",
           "describe_device"]


class ExperimentError(RuntimeError):
    """A run directory holds a run made with other settings."""


class RunInterrupted(ExperimentError):
    """A run was stopped by a signal; its checkpoint is written and the same command
    continues it."""


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


class RunBusy(Exception):
    """A run directory is being trained by another live process (see :func:`_claim`)."""


LOCK_FILE = "running.pid"


def _lock_owner(run_dir: Path) -> Optional[int]:
    """The live process that holds ``run_dir``'s lock, or None (no lock, or a stale one)."""
    try:
        pid = int((run_dir / LOCK_FILE).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return pid


@contextlib.contextmanager
def _claim(run_dir: Path):
    """Hold ``run_dir/running.pid`` while training there, so that two experiments commands
    sharing an ``--out`` (e.g. a table and a check that reuses its runs) never train the
    same configuration at once. A lock left by a dead process is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(run_dir)
            if owner is not None:
                raise RunBusy(f"{run_dir} is being trained by process {owner}") from None
            lock.unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


#: seconds between two looks at a lock held by another process
LOCK_POLL_SECONDS = 30.0


def _wait_until_free(run_dir: Path, head: str) -> None:
    owner = _lock_owner(run_dir)
    if owner is not None:
        print(f"{head}: waiting for process {owner}, which is training {run_dir}", file=sys.stderr, flush=True)
    while _lock_owner(run_dir) is not None:
        time.sleep(LOCK_POLL_SECONDS)


def _run_config(spec: TableSpec, config: Config, settings: Mapping[str, Any], run_dir: Path,
                index: int, total: int, wait: bool = True) -> Dict[str, Any]:
    """Run (or reuse, or resume) one configuration; returns its result record.

    If another process is training ``run_dir``: wait for it and reuse its result
    (``wait=True``), or raise :class:`RunBusy`."""
    from unirep import train as T
    given = trainer_config(spec, config, settings, run_dir)
    intended = T.resolve_config(given)
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
        return dict(record, reused=True, run_dir=str(run_dir))
    try:
        with _claim(run_dir):
            return _train_config(spec, config, run_dir, given, intended, head)
    except RunBusy:
        if not wait:
            raise
    _wait_until_free(run_dir, head)
    return _run_config(spec, config, settings, run_dir, index, total, wait=True)


def _train_config(spec: TableSpec, config: Config, run_dir: Path, given: Dict[str, Any],
                  intended: Dict[str, Any], head: str) -> Dict[str, Any]:
    """Train one configuration in ``run_dir`` (resuming its checkpoint if there is one)."""
    from unirep import train as T
    result_path, eval_path, ckpt_path = run_dir / "experiment.json", run_dir / "eval.json", run_dir / T.CHECKPOINT
    checkpoint = None
    if ckpt_path.exists():
        checkpoint = T.load_checkpoint(ckpt_path)  # the only load: the trainer restores from it
        diff = _config_differences(intended, checkpoint["config"])
        if diff:
            raise ExperimentError(f"{run_dir} holds a checkpoint made with other settings "
                                  f"({'; '.join(diff)}); delete it or choose another --out")
        print(f"{head}: resuming from step {checkpoint['step']} ({ckpt_path})", file=sys.stderr, flush=True)
        intended = T.resolve_config(dict(given, resume=str(ckpt_path)), dict(checkpoint["config"]))
    else:
        print(f"{head}: {config.label} -> {run_dir}", file=sys.stderr, flush=True)
    import unirep_kernels
    t0 = time.perf_counter()
    with unirep_kernels.use_backend(intended["backend"]):
        trainer = T.Trainer(intended, checkpoint)
        del checkpoint
        errors = trainer.run()
    wall = time.perf_counter() - t0
    if errors is None:  # stopped by a signal: the checkpoint is written
        raise RunInterrupted(f"{head} stopped at step {trainer.step}; its checkpoint is in {run_dir}: run the "
                             f"same command again to continue")
    report = json.loads(eval_path.read_text())
    record = _record(spec, config, report, device=describe_device(trainer.device), wall=wall)
    result_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{head}: mean top-1 error {record['mean_error']:.2f}% ({wall:.0f} s)", file=sys.stderr, flush=True)
    return dict(record, run_dir=str(run_dir))


def _record(spec: TableSpec, config: Config, report: Mapping[str, Any], device: str,
            wall: Optional[float]) -> Dict[str, Any]:
    cfg = report["config"]
    params, specific = count_model_parameters(cfg, num_classes_of(spec.domains))
    return {"table": spec.name, "config": config.key, "label": config.label, "strategy": config.strategy,
            "sharing": config.sharing, "width": config.width, "seed": cfg["seed"],
            "permute_labels": cfg.get("permute_labels"),
            "errors": report["errors"], "mean_error": report["mean_error"],
            "train_errors": report.get("train_errors"), "mean_train_error": report.get("mean_train_error"),
            "parameters": params, "domain_specific_parameters": specific, "steps": report["step"],
            "train_seconds": report.get("train_seconds"), "wall_seconds": wall, "device": device,
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}


def run_dir_name(config: Config, seed: int) -> str:
    """Run directory of a configuration and seed: ``<config>`` for seed 0, else
    ``<config>-seed<seed>``."""
    return config.key if int(seed) == 0 else f"{config.key}-seed{int(seed)}"


def runs_folder(out: str | Path, spec: TableSpec) -> Path:
    """Where a table's runs live: ``OUT/<table>``; a check's runs live beside those of the
    table whose settings it uses, so that a configuration they share is trained once."""
    return Path(out) / (spec.settings_of or spec.name)


def run_table(table: str, quick: bool = False, out: str | Path = "runs/experiments",
              overrides: Optional[Mapping[str, Any]] = None, results_dir: Optional[str | Path] = None,
              command: Optional[str] = None, dry_run: bool = False,
              seeds: Optional[Sequence[int]] = None, regime: Optional[str] = None,
              parallel: int = 1, finished_only: bool = False,
              configs: Optional[Sequence[str]] = None,
              records_from: Sequence[str | Path] = ()) -> Dict[str, Any]:
    """Run every configuration of ``table`` (a table of the paper: "table2", "table3",
    "table4"; or one of our checks: "convergence", "in-ablation") and write the comparison
    with the paper as ``OUT/<table>/<table>.{md,csv,png}``.

    Args:
        table: which table.
        quick: the same as ``regime="quick"``.
        out: parent of the table's folder; every configuration runs in
            ``OUT/<table>/<config>`` (``<config>-seed<k>`` for seed k > 0; finished ones are
            reused, interrupted ones resumed; a check's runs go beside those of the table
            whose settings it uses, see :func:`runs_folder`).
        overrides: settings to change (e.g. ``{"batches_per_domain": 10}``).
        results_dir: also copy the three files to
            ``RESULTS_DIR/<table>-<regime>-<device>-<date>.{md,csv,png}``.
        command: the command line to print in the files' header.
        dry_run: print the configurations, their options and parameter counts; train nothing.
        seeds: train every configuration once per seed (model initialization, batches and
            the label permutation of full sharing); the table reports the mean over seeds
            and each seed's mean.  Default: the ``seed`` setting (0).  All configurations
            of the first seed run before those of the next.
        regime: "quick", "converged" or "full" (default: "quick" if ``quick`` else "full");
            see :data:`unirep.experiments.REGIMES`.
        parallel: train this many configurations at a time, each in its own process with
            an equal share of torch's threads (on a CPU, two single-threaded runs do about
            20% more work than one run on two threads; see docs/experiments.md). A run is
            seeded and bitwise repeatable for a given thread count; another thread count
            changes the convolutions' last bits, so ``parallel`` changes results within
            the seed-to-seed noise, not more.
        finished_only: train nothing; write the table from the runs that have finished
            (each row averaged over the seeds it has, the runs left out named in the
            header). For a table whose runs are still training, or that a time budget
            cut short.
        configs: run only these configurations (keys as in ``--dry-run``; default all),
            e.g. the cheap rows of a table first; the table then has only their rows.
        records_from: CSV files this command wrote earlier (``<table>.csv``, or its copy in
            ``benchmarks/results``): a configuration and seed recorded there and not
            finished under ``OUT`` is taken from the file instead of trained, after checking
            that its table, domains, steps and parameter count are this command's. So a
            table can be completed over several sessions, or machines, without the run
            folders (see :func:`read_records`).

    Returns:
        ``{"spec", "settings", "seeds", "records" (one per configuration and seed), "rows"
        (one per configuration, averaged over seeds), "files", "wall_seconds"}``.
    """
    spec = spec_of(table)
    if configs is not None:
        spec = only_configs(spec, configs)
    regime = regime_of(quick, regime)
    settings = table_settings(table, overrides=overrides, regime=regime)
    seeds = [int(settings["seed"])] if seeds is None else [int(s) for s in seeds]
    check_seeds(seeds)
    settings["seed"] = seeds[0]
    runs = runs_folder(out, spec)
    t0 = time.perf_counter()
    if dry_run:
        from unirep import train as T
        for i, c in enumerate(spec.configs, 1):
            run_dir = runs / run_dir_name(c, seeds[0])
            cfg = T.resolve_config(trainer_config(spec, c, settings, run_dir))
            params, specific = count_model_parameters(cfg, num_classes_of(spec.domains))
            print(f"[{i}/{len(spec.configs)}] {c.key}: {c.label}; {params:,} parameters "
                  f"({specific:,} domain-specific)\n    python -m unirep.train "
                  f"{' '.join(trainer_argv(spec, c, settings, run_dir))}")
        return {"spec": spec, "settings": settings, "seeds": seeds, "records": [], "rows": [], "files": [],
                "wall_seconds": 0.0}
    folder = Path(out) / spec.name
    jobs = [(spec, c, dict(settings, seed=s), runs / run_dir_name(c, s), i, len(seeds) * len(spec.configs))
            for i, (s, c) in enumerate(((s, c) for s in seeds for c in spec.configs), 1)]
    earlier = {}
    for path in records_from:
        earlier.update({(r["config"], r["seed"]): r for r in read_records(path, spec, settings)})
    taken = {key: earlier[key] for job in jobs if (key := (job[1].key, job[2]["seed"])) in earlier
             and not (job[3] / "eval.json").exists()}
    from_files = list(taken.values())
    jobs = [job for job in jobs if (job[1].key, job[2]["seed"]) not in taken]
    missing = []
    if finished_only:
        missing = [f"{job[1].key} seed {job[2]['seed']}" for job in jobs if not (job[3] / "eval.json").exists()]
        jobs = [job for job in jobs if (job[3] / "eval.json").exists()]
        if not jobs and not from_files:
            raise ExperimentError(f"--finished-only: no finished run of {spec.name} in {runs}")
    folder.mkdir(parents=True, exist_ok=True)
    order = [c.key for c in spec.configs]
    records = sorted(_run_jobs(jobs, 1 if finished_only else parallel) + from_files,
                     key=lambda r: (seeds.index(r["seed"]), order.index(r["config"])))  # seeds, then configs
    wall = time.perf_counter() - t0
    command = command or f"python -m unirep.experiments {spec.name} --regime {regime}"
    rows = aggregate(spec, records)
    reference = decathlon_reference(spec, records, Path(out), seeds)
    md = render_markdown(spec, settings, rows, regime, command, wall, seeds, records=records, reference=reference,
                         missing=missing)
    files = [folder / f"{spec.name}.md", folder / f"{spec.name}.csv", folder / f"{spec.name}.png"]
    files[0].write_text(md)
    write_csv(spec, records, rows, files[1], reference=reference)
    plot_table(spec, rows, files[2])
    print(md)
    if results_dir is not None:
        dest = Path(results_dir)
        dest.mkdir(parents=True, exist_ok=True)
        device = _device_slug(records)
        date = time.strftime("%Y-%m-%d")
        for f in files:
            shutil.copyfile(f, dest / f"{spec.name}-{regime}-{device}-{date}{f.suffix}")
    print(f"{spec.name}: {wall:.0f} s in all; files: {', '.join(str(f) for f in files)}", file=sys.stderr)
    return {"spec": spec, "settings": settings, "seeds": seeds, "records": records, "rows": rows, "files": files,
            "wall_seconds": wall}


def read_records(path: str | Path, spec: TableSpec, settings: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The per-seed records of ``spec``'s table in a CSV that :func:`run_table` wrote
    (rows of another table, and the ``seed = mean`` rows, are skipped), as records of
    reused runs (``source``: the file).

    Raises :class:`ExperimentError` if the file is missing or unreadable, or a record's
    domains, steps or parameter count differ from what ``settings`` give: it was made with
    other settings and cannot join this table."""
    from unirep import train as T
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise ExperimentError(f"--records: cannot read {path}: {e.strerror or e}") from None
    mine = [r for r in rows if r.get("table") == spec.name]
    needed = {"table", "config", "seed", "mean_error", "steps", "parameters"}
    needed |= {f"error_{d}" for d in spec.domains} if mine else set()
    if not rows or not needed <= set(rows[0]):
        raise ExperimentError(f"--records: {path} is not a table CSV of {spec.name} (it lacks "
                              f"{', '.join(sorted(needed - set(rows[0] if rows else ())))})")
    steps = int(settings["batches_per_domain"]) * len(spec.domains)
    num_classes = num_classes_of(spec.domains)
    counts: Dict[str, Tuple[int, int]] = {}  # a configuration's parameter counts do not depend on its seed
    out = []
    for row in mine:
        if row["seed"] == "mean" or row["config"] not in {c.key for c in spec.configs}:
            continue
        config = spec.config(row["config"])
        if config.key not in counts:
            cfg = T.resolve_config(trainer_config(spec, config, dict(settings, seed=int(row["seed"])), Path(".")))
            counts[config.key] = count_model_parameters(cfg, num_classes)
        params, specific = counts[config.key]
        head = f"--records: {path}: {config.key} seed {row['seed']}"
        if int(row["steps"]) != steps or int(row["parameters"]) != params:
            raise ExperimentError(f"{head} was made with other settings ({row['steps']} steps, {row['parameters']} "
                                  f"parameters; this table: {steps} steps, {params} parameters)")
        errors = {d: float(row[f"error_{d}"]) for d in spec.domains}
        # the file's per-domain errors are exact (k/N as 2 decimals) and its mean rounded:
        # the mean is recomputed as the trainer computes it, so a table made from records
        # is the table made from the runs
        mean = sum(errors.values()) / len(errors)
        if abs(mean - float(row["mean_error"])) > 1e-3:
            raise ExperimentError(f"{head}: its mean error {row['mean_error']} is not the mean of its domains' "
                                  f"({mean:.3f}); the file was edited")
        number = lambda v: None if v in ("", "-", None) else float(v)  # noqa: E731
        out.append({"table": spec.name, "config": config.key, "label": config.label, "strategy": config.strategy,
                    "sharing": config.sharing, "width": config.width, "seed": int(row["seed"]),
                    "permute_labels": int(row["permute_labels"]) if row.get("permute_labels") else None,
                    "errors": errors, "mean_error": mean, "train_errors": None,
                    "mean_train_error": number(row.get("mean_train_error")), "parameters": params,
                    "domain_specific_parameters": specific, "steps": steps,
                    "train_seconds": number(row.get("train_seconds")), "wall_seconds": number(row.get("wall_seconds")),
                    "device": row.get("device") or "unknown", "date": row.get("date") or "unknown",
                    "torch": row.get("torch") or "unknown", "reused": True, "source": str(path)})
    if not out:
        raise ExperimentError(f"--records: {path} holds no run of {spec.name}'s configurations "
                              f"({', '.join(c.key for c in spec.configs)})")
    return out


def only_configs(spec: TableSpec, keys: Sequence[str]) -> TableSpec:
    """``spec`` restricted to the configurations ``keys`` (in the table's order); its
    comparisons keep those whose two configurations are both left."""
    wanted = list(dict.fromkeys(keys))
    unknown = [k for k in wanted if k not in {c.key for c in spec.configs}]
    if unknown or not wanted:
        raise ExperimentError(f"{spec.name} has no configuration {', '.join(map(repr, unknown)) or '(none given)'}; "
                              f"have {', '.join(c.key for c in spec.configs)}")
    kept = tuple(c for c in spec.configs if c.key in wanted)
    comparisons = tuple(q for q in spec.comparisons if q[1] in wanted and q[2] in wanted)
    baseline = spec.baseline if spec.baseline in wanted else None
    return dataclasses.replace(spec, configs=kept, comparisons=comparisons, baseline=baseline)


def _run_jobs(jobs: Sequence[tuple], parallel: int) -> List[Dict[str, Any]]:
    """Records of ``_run_config(*job)`` for every job, in order; ``parallel`` at a time in
    worker processes (the longest-looking first: the widest models, so that no long run is
    left alone at the end)."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    todo = [j for j in jobs if not (j[3] / "eval.json").exists()]
    if parallel == 1 or len(todo) <= 1:
        # a configuration another process is training is left for last, then waited for
        records: Dict[int, Dict[str, Any]] = {}
        for i, job in enumerate(jobs):
            try:
                records[i] = _run_config(*job, wait=False)
            except RunBusy:
                pass
        for i, job in enumerate(jobs):
            if i not in records:
                records[i] = _run_config(*job, wait=True)
        return [records[i] for i in range(len(jobs))]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    threads = max(1, torch.get_num_threads() // parallel)
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][1].width * jobs[i][1].steps_factor)
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = {i: pool.submit(_run_config, *jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]


def aggregate(spec: TableSpec, records: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per configuration (in the table's order) from the records of every seed:
    per-domain and mean error averaged over the seeds (training error too, where recorded),
    each seed's mean error (``seed_means``, by seed), parameter counts, summed times."""
    rows = []
    for c in spec.configs:
        mine = sorted((r for r in records if r["config"] == c.key), key=lambda r: r["seed"])
        if not mine:
            continue
        n = len(mine)
        walls = [r.get("wall_seconds") for r in mine]
        trained = [r for r in mine if r.get("mean_train_error") is not None]
        rows.append({
            "config": c.key, "label": c.label, "seeds": [r["seed"] for r in mine],
            "errors": {d: sum(r["errors"][d] for r in mine) / n for d in mine[0]["errors"]},
            "mean_error": sum(r["mean_error"] for r in mine) / n,
            "mean_train_error": (sum(r["mean_train_error"] for r in trained) / len(trained)
                                 if len(trained) == n else None),
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


def _device_slug(records: Sequence[Mapping[str, Any]]) -> str:
    kinds = {str(r["device"]).split(" ")[0] for r in records if r.get("device") != "unknown"}
    return "-".join(sorted(kinds)) or "unknown"
