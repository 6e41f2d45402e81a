"""Reporting a table: ours beside the paper's as markdown, CSV and a bar chart; the
paper's questions answered with a verdict that accounts for test sampling and the
seed-to-seed spread; and the Visual Decathlon score of every configuration."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .tables import ANALOGUES, Config, TableSpec, chance_error, num_classes_of

__all__ = ["comparisons", "seed_spread", "render_markdown", "write_csv", "plot_table", "decathlon_score",
           "decathlon_reference", "DECATHLON_GAMMA", "DECATHLON_POINTS"]


def _paper_values(spec: TableSpec, config: Config) -> Tuple[Optional[float], Optional[float], Dict[str, float]]:
    """``(paper mean, paper mean over the analogues of our domains, per our domain)``."""
    paper = spec.paper
    if paper is None:
        return None, None, {}
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
        seeds = [s for s in ra["seed_means"] if s in rb["seed_means"]]
        per_seed = [ra["seed_means"][s] - rb["seed_means"][s] for s in seeds]
        n_a, n_b, only = len(ra["seed_means"]), len(rb["seed_means"]), ""
        if seeds and set(ra["seed_means"]) != set(rb["seed_means"]):
            # a partial table: compare the seeds both rows have, not means over other seeds
            diff, n_a, n_b = sum(per_seed) / len(per_seed), len(seeds), len(seeds)
            only = f"; seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} only, the ones both rows have"
        se = math.hypot(_standard_error(ra, test_sizes), _standard_error(rb, test_sizes))
        if spread is not None:
            se = math.sqrt(se ** 2 + spread ** 2 * (1 / n_a + 1 / n_b))
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
        paper = (f"paper {pa - pb:+.1f}" if pa is not None and pb is not None
                 else "paper: not reported" if spec.paper is not None else "not in the paper")
        ratio = ra["parameters"] / rb["parameters"]
        lines.append(f"- {question}: {diff:+.2f} points (+-{2 * se:.2f}: 2 SE, {noise}{seed_text}{only}): "
                     f"{verdict}; {paper}; parameters {ratio:.3g}x")
    return lines


# ----------------------------------------------------------------------------- Visual Decathlon score

#: Rebuffi et al. 2017 ("Learning multiple visual domains with residual adapters"): each
#: domain is worth up to 1000 points, ``alpha_d * max(0, E_max_d - E_d) ** gamma`` with
#: ``E_max_d`` twice the error of a separate network trained on that domain alone (the
#: "no sharing" baseline), ``gamma = 2`` and ``alpha_d = 1000 / E_max_d ** gamma``: a
#: configuration as good as the baseline on a domain scores 250 there, a perfect one 1000.
DECATHLON_GAMMA = 2.0
DECATHLON_POINTS = 1000.0


def decathlon_score(errors: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """The Visual Decathlon score of per-domain top-1 errors (%) against the ``reference``
    (no-sharing) errors of the same domains: the sum over domains of
    ``1000 * (max(0, E_max - E) / E_max) ** 2`` with ``E_max = 2 * reference``. A domain
    whose reference error is 0 scores 1000 if its error is 0 too, else 0."""
    total = 0.0
    for d, e in errors.items():
        e_max = 2.0 * float(reference[d])
        if e_max <= 0.0:
            total += DECATHLON_POINTS if e <= 0.0 else 0.0
        else:
            total += DECATHLON_POINTS * (max(0.0, e_max - float(e)) / e_max) ** DECATHLON_GAMMA
    return total


def decathlon_reference(spec: TableSpec, records: Sequence[Mapping[str, Any]], out: Path,
                        seeds: Sequence[int]) -> Optional[Dict[str, Any]]:
    """The no-sharing errors a table's Decathlon scores are taken against:
    ``{"errors": {domain: error averaged over seeds}, "source": text}``, or None.

    A table with a "none" configuration uses its own; another one (Table 4, the checks)
    uses the finished "none" runs of Table 3 under the same ``OUT`` when their domains and
    their settings are those of this table's runs (the same regime)."""
    mine = [r for r in records if r["config"] == "none"]
    if mine:
        source = f"this table's no-sharing runs (seeds {', '.join(str(r['seed']) for r in mine)})"
        return {"errors": _mean_errors([r["errors"] for r in mine]), "source": source}
    if not records:
        return None
    from .runner import run_dir_name
    from .tables import TABLES
    base = TABLES["table3"].config("none")
    found, used = [], []
    ours = _comparable(json.loads((Path(records[0]["run_dir"]) / "eval.json").read_text())["config"]) \
        if records[0].get("run_dir") else None
    for s in seeds:
        path = Path(out) / "table3" / run_dir_name(base, s) / "eval.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        if list(report["errors"]) != list(spec.domains):
            continue
        if ours is not None and _comparable(report["config"]) != ours:
            continue
        found.append(report["errors"])
        used.append(s)
    if not found:
        return None
    return {"errors": _mean_errors(found),
            "source": f"Table 3's no-sharing runs in the same regime (seeds {', '.join(map(str, used))})"}


def _comparable(cfg: Mapping[str, Any]) -> Tuple:
    """What must agree between two runs for one to serve as the other's no-sharing baseline."""
    keys = ("image_size", "widths", "stem_width", "units_per_stage", "batch_size", "steps", "augment", "decay",
            "lr", "warmup_steps", "label_smoothing", "train_per_domain", "test_per_domain", "domains")
    return tuple(json.dumps(cfg.get(k), default=str) for k in keys)


def _mean_errors(per_run: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    return {d: sum(e[d] for e in per_run) / len(per_run) for d in per_run[0]}


def _row_decathlon(row: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                   reference: Optional[Mapping[str, Any]]) -> Optional[float]:
    """A configuration's Decathlon score: the mean over its seeds of each seed's score."""
    if reference is None:
        return None
    mine = [r for r in records if r["config"] == row["config"]]
    return sum(decathlon_score(r["errors"], reference["errors"]) for r in mine) / len(mine)


# ----------------------------------------------------------------------------- markdown, CSV, plot


def render_markdown(spec: TableSpec, settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], mode: str,
                    command: str, wall: float, seeds: Sequence[int] = (0,),
                    records: Sequence[Mapping[str, Any]] = (), reference: Optional[Mapping[str, Any]] = None,
                    missing: Sequence[str] = ()) -> str:
    """The table (ours beside the paper's) as markdown, with the settings and the answers.
    ``rows``: :func:`~unirep.experiments.aggregate` of the ``records``; ``mode``: the
    regime; ``reference``: the no-sharing errors of the Decathlon score
    (:func:`decathlon_reference`; None: no score column); ``missing``: runs not finished
    and left out ("<config> seed <k>"), named in the header."""
    domains = list(spec.domains)
    seeds = list(seeds)
    base = next((r for r in rows if r["config"] == spec.baseline), None)
    test_sizes = {d: int(settings["test_per_domain"]) for d in domains}
    devices = sorted({d for r in rows for d in str(r["device"]).split("; ")})
    dates = sorted({d for r in rows for d in str(r["date"]).split("; ")})
    steps = int(settings["batches_per_domain"]) * len(domains)
    runs = sum(len(r["seeds"]) for r in rows)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean over seeds)"
    extra = []
    if settings.get("label_smoothing"):
        extra.append(f"label smoothing {settings['label_smoothing']}")
    if settings.get("final_norm") not in (None, "auto"):
        extra.append(f"final norm {settings['final_norm']}")
    title = (f"# {spec.title}: ours on the built-in benchmark vs the paper" if spec.paper is not None
             else f"# {spec.title} (built-in benchmark)")
    lines = [title, "",
             f"Command: `{command}` ({mode} regime); device: {'; '.join(devices)}; torch {torch.__version__}; "
             f"date: {'; '.join(dates)}; wall time of the {runs} runs (each measured when it ran: data loading, "
             f"training, evaluation): {_total_wall(rows)}; this command: {wall:.0f} s "
             f"({sum(1 for r in rows if r.get('reused'))} of {len(rows)} configurations entirely reused from "
             f"earlier runs).", ""]
    earlier = sorted({str(r["source"]) for r in records or () if r.get("source")})
    if earlier:
        taken = sorted(f"{r['config']} seed {r['seed']}" for r in records if r.get("source"))
        lines += [f"{len(taken)} of the {runs} runs are taken from the records of an earlier command "
                  f"({', '.join(f'`{e}`' for e in earlier)}: {', '.join(taken)}), not trained again.", ""]
    if missing:
        lines += [f"**Partial table**: {len(missing)} of {len(missing) + runs} runs had not finished and are left "
                  f"out ({', '.join(missing)}). Each row's mean is over the seeds it has ('mean per seed'); the "
                  f"answers compare only the seeds both rows have.", ""]
    lines += [f"Settings: {len(domains)} built-in domains ({', '.join(domains)}; {settings['train_per_domain']} "
              f"train / {settings['test_per_domain']} test images each), {settings['image_size']}x"
              f"{settings['image_size']} images, ResNet with {settings['units_per_stage']} unit(s) per stage, widths "
              f"{'-'.join(str(w) for w in settings['widths'])} (stem {settings['stem_width']}) at x1, "
              f"augmentation {'on' if settings['augment'] else 'off'}; round-robin pure batches of "
              f"{settings['batch_size']}, {settings['batches_per_domain']} per domain ({steps} steps), SGD momentum "
              f"{settings['momentum']}, weight decay {settings['weight_decay']}, lr {settings['warmup_lr']} for "
              f"{settings['warmup_steps']} steps then {settings['lr']} -> {settings['final_lr']} "
              f"({settings['decay']}){''.join('; ' + e for e in extra)}; {seed_text}. Top-1 error (%) on the test "
              f"split; chance: {chance_error(domains):.1f} mean.", ""]
    head = ["configuration", "params", "domain-specific"]
    if base is not None:
        head.append(f"params / {spec.baseline}")
    head += domains + ["**mean (ours)**"]
    if len(seeds) > 1:
        head.append("mean per seed")
    head.append("train error")
    if reference is not None:
        head.append("Decathlon score")
    if spec.paper is not None:
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
        row.append(_fmt(r.get("mean_train_error")))
        if reference is not None:
            row.append(_fmt(_row_decathlon(r, records, reference), 0))
        if spec.paper is not None:
            row.append(_fmt(pmean, 1))
        if show_analogue:
            row.append(_fmt(panalogue, 2))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Train error: the mean over domains of the top-1 error on a fixed subset of each domain's "
                  "training images (un-augmented, eval mode), beside the test error, to tell under-training "
                  "(both high) from over-fitting (train error far below test error)."]
    if reference is not None:
        lines += ["", f"Decathlon score (Rebuffi et al. 2017): up to {DECATHLON_POINTS:.0f} points per domain, "
                      f"{DECATHLON_POINTS:.0f} ((E_max - E) / E_max)^{DECATHLON_GAMMA:g} with E_max twice the "
                      f"domain's no-sharing error, here from {reference['source']}; the mean over seeds of each "
                      f"seed's score. No sharing itself scores about {len(domains) * 250} "
                      f"({len(domains)} domains x 250)."]
    if spec.paper is not None and spec.paper["rows"]:
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
                                                   for d, n in zip(domains, num_classes_of(domains))) + "."
                         for s in seeds)
        lines += ["", "Full sharing: class k of each domain is trained and tested as output perm[k] of the shared "
                      f"classifier (the permutation is seeded by the run's seed). {perms}"]
    questions = "The paper's questions" if spec.paper is not None else "The questions"
    lines += ["", f"{questions}, our answers (difference of mean top-1 error; negative: the first is "
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


def _total_wall(records: Sequence[Mapping[str, Any]]) -> str:
    walls = [r.get("wall_seconds") for r in records]
    known = [w for w in walls if w is not None]
    text = f"{sum(known):.0f} s ({sum(known) / 60:.1f} min)"
    return text if len(known) == len(walls) else text + f", {len(walls) - len(known)} unknown"


def write_csv(spec: TableSpec, records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
              path: Path, reference: Optional[Mapping[str, Any]] = None) -> None:
    """One row per configuration and seed (the model, parameter counts, per-domain and mean
    error, mean training error, Decathlon score, the paper's mean, steps and times), then,
    with several seeds, one row per configuration with ``seed`` = ``mean`` (averages over
    the seeds)."""
    domains = list(spec.domains)
    cols = (["table", "config", "label", "seed", "strategy", "sharing", "width", "permute_labels", "parameters",
             "domain_specific_parameters"] + [f"error_{d}" for d in domains]
            + ["mean_error", "mean_train_error", "decathlon_score", "paper_row", "paper_mean_error",
               "paper_analogue_mean_error", "steps", "train_seconds", "wall_seconds", "device", "date", "torch"])
    ordered = sorted(records, key=lambda r: ([c.key for c in spec.configs].index(r["config"]), r["seed"]))
    if len({r["seed"] for r in records}) > 1:
        ordered += [dict(r, seed="mean", torch=torch.__version__, decathlon=_row_decathlon(r, records, reference))
                    for r in rows]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in ordered:
            c = spec.config(r["config"])
            pmean, panalogue, _ = _paper_values(spec, c)
            score = (r.get("decathlon") if r["seed"] == "mean"
                     else decathlon_score(r["errors"], reference["errors"]) if reference is not None else None)
            w.writerow([spec.name, c.key, c.label, r["seed"], c.strategy, c.sharing, c.width, r.get("permute_labels"),
                        r["parameters"], r["domain_specific_parameters"]]
                       + [f"{r['errors'][d]:.2f}" for d in domains]
                       + [f"{r['mean_error']:.3f}", _fmt(r.get("mean_train_error"), 3), _fmt(score, 1), c.paper_row,
                          "" if pmean is None else round(pmean, 3),
                          "" if panalogue is None else f"{panalogue:.3f}", r["steps"],
                          _fmt(r.get("train_seconds"), 1), _fmt(r.get("wall_seconds"), 1), r["device"], r["date"],
                          r["torch"]])


def plot_table(spec: TableSpec, rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Bar chart: mean error per configuration, ours (averaged over seeds; the whiskers
    span the seeds' means) beside the paper's where it has one (left), and our per-domain
    errors (right)."""
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
    several = any(len(r["seed_means"]) > 1 for r in rows)
    with_paper = spec.paper is not None
    width = 0.4 if with_paper else 0.7
    ax[0].bar(x - (0.2 if with_paper else 0.0), ours, width, yerr=spread if several else None, capsize=3,
              label="ours (built-in benchmark)" + (", range over seeds" if several else ""), color="C0")
    for i, o in enumerate(ours):
        ax[0].text(i - (0.2 if with_paper else 0.0), o, f"{o:.1f}", ha="center", va="bottom", fontsize=7)
    if with_paper:
        paper = [_paper_values(spec, spec.config(k))[0] for k in keys]
        ax[0].bar(x + 0.2, [p if p is not None else 0 for p in paper], 0.4, label="paper", color="C1")
        for i, p in enumerate(paper):
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
