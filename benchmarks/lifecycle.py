"""The domain lifecycle measured on the built-in benchmark (issue 17).

    python benchmarks/lifecycle.py adapt        [--held-out A,B,C] [--base-steps N] [--adapt-steps N]
    python benchmarks/lifecycle.py recalibrate  [--run RUN_DIR]
    python benchmarks/lifecycle.py export       [--run RUN_DIR]

``adapt``: for each held-out domain H, train the fast-preset network on the other 7 built-in
domains (``--base-steps``), then learn H with ``--adapt-steps`` steps three ways: adapting
only H's own parameters (``python -m unirep.adapt --train domain``), fine-tuning every
parameter (``--train all``), and a specialist network of the same architecture trained from
scratch on H alone with the same steps and batch size. Table: H's test error, parameters
trained (count and share of the model), training time; plus how much the 7 old domains'
errors moved.

``recalibrate``: shift one domain of a trained run (brightness and contrast, a colour cast,
both), measure its error, re-estimate its moments from the shifted *training* images
without labels (:func:`unirep.recalibrate`), measure again on the shifted test images; the
other domains' errors must not move.

``export``: :func:`unirep.export_domain` of each domain of a run: largest difference to
the universal model, and eval speed of both side by side in the same process.

Every part runs on one thread (``torch.set_num_threads(1)``: the machine is shared) and
writes ``benchmarks/results/lifecycle-<part>-cpu-<date>.{md,json}`` stating the date, the
device and the load average while it ran. The runs go to ``--work`` (default
/tmp/unirep-lifecycle), not to the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from unirep.adapt import adapt  # noqa: E402
from unirep.train import Trainer, build_data, load_run, resolve_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_HELD_OUT = ("traffic_signs", "house_numbers", "textures")
ALL = ("digits", "characters", "sketches", "plankton", "traffic_signs", "house_numbers", "pedestrians", "textures")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"


def load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def header(title: str, started: str, loads) -> list:
    return [f"# {title}", "",
            f"Date {datetime.date.today().isoformat()} (started {started}); device: CPU only ({machine()}); "
            f"machine shared with other jobs: {'; '.join(loads)} (1, 5, 15 min, 2 cores).", ""]


def train_run(options: dict, quiet=True) -> dict:
    cfg = resolve_config(dict(options, progress=False))
    t = Trainer(cfg)
    start = time.perf_counter()
    errors = t.run()
    return {"errors": errors, "train_seconds": t.elapsed, "wall_seconds": time.perf_counter() - start,
            "parameters": sum(p.numel() for p in t.model.parameters())}


# ----------------------------------------------------------------------------- adapt

def part_adapt(args) -> None:
    started = time.strftime("%H:%M")
    loads = [load()]
    rows, raw = [], {}
    work = Path(args.work)
    for held in args.held_out:
        base_dir = work / f"base-without-{held}"
        seven = [d for d in ALL if d != held]
        if not (base_dir / "eval.json").exists():
            base = train_run(dict(domains=seven, steps=args.base_steps, seed=args.seed, out=str(base_dir)))
        else:
            base = json.loads((base_dir / "eval.json").read_text())
            base["wall_seconds"] = None
        loads.append(load())
        entry = {"base": {"errors": base["errors"], "train_seconds": base["train_seconds"]}}
        for train in ("domain", "all"):
            out = work / f"adapt-{train}-{held}"
            if (out / "adapt.json").exists():
                rep = json.loads((out / "adapt.json").read_text())
            else:
                rep = adapt(base_dir, {"builtin": held}, train=train, out=out, quiet=True,
                            given={"steps": args.adapt_steps, "seed": args.seed, "progress": False})
            entry[train] = rep
            loads.append(load())
        spec = train_run(dict(domains=[held], steps=args.adapt_steps, seed=args.seed,
                              out=str(work / f"specialist-{held}")))
        entry["specialist"] = spec
        loads.append(load())
        raw[held] = entry
        print(f"{held}: domain {entry['domain']['errors'][held]:.2f}  all {entry['all']['errors'][held]:.2f}  "
              f"specialist {spec['errors'][held]:.2f}", file=sys.stderr, flush=True)
        for label, key in (("adapt, this domain's parameters only", "domain"), ("adapt, fine-tune everything", "all")):
            r = entry[key]
            rows.append((held, label, r["errors"][held], r["trained_parameters"], 100 * r["trained_share"],
                         r["train_seconds"], r.get("max_old_error_change")))
        rows.append((held, "specialist from scratch", spec["errors"][held], spec["parameters"], None,
                     spec["train_seconds"], None))
    lines = header("Adapting a trained universal network to a held-out domain", started, loads)
    lines += [f"Fast preset (32x32 images, widths 16-32-64-128, one unit per stage, strategy bn-domain, deep "
              f"sharing, batch 64). Base: trained on the 7 other built-in domains for {args.base_steps} steps "
              f"(round-robin). Every way of learning the held-out domain gets the same budget: "
              f"{args.adapt_steps} steps of 64 images of that domain (the warm-up and cosine schedule of the "
              f"preset). Error: top-1 on the held-out domain's 500 test images. Parameters trained: what the "
              f"optimizer updates (for the specialist, its whole network; share: of the adapted 8-domain model). "
              f"Time: training seconds (evaluation excluded) on this loaded machine, comparable within this table "
              f"only. Old domains: largest change of an old domain's test error after adapting.", "",
              "| held-out domain | method | error (%) | parameters trained | share (%) | train time (s) | "
              "old domains' error change (points) |",
              "|---|---|---|---|---|---|---|"]
    for held, label, err, n, share, secs, moved in rows:
        lines.append(f"| {held} | {label} | {err:.2f} | {n:,} | {'' if share is None else f'{share:.2f}'} | "
                     f"{secs:.1f} | {'' if moved is None else f'{moved:.2f}'} |")
    base_means = {h: sum(raw[h]["base"]["errors"].values()) / len(raw[h]["base"]["errors"]) for h in raw}
    lines += ["", "Base runs' mean error over their 7 domains: "
              + ", ".join(f"without {h}: {m:.2f}%" for h, m in base_means.items()) + "."]
    gaps = [raw[h]["domain"]["errors"][h] - raw[h]["all"]["errors"][h] for h in raw]
    shares = [100 * raw[h]["domain"]["trained_share"] for h in raw]
    lines += ["", f"Domain-only minus fine-tune-all error: {', '.join(f'{g:+.2f}' for g in gaps)} points "
              f"(goal: within 5); domain-only trains {max(shares):.2f}% of the parameters at most (goal: under 5%)."]
    write("adapt", lines, {"args": vars(args), "results": raw, "loads": loads})


# ----------------------------------------------------------------------------- recalibrate

def shift(images: torch.Tensor, kind: str) -> torch.Tensor:
    """A drifted copy of uint8 images (N, 3, H, W): ``dark``: brightness x0.55 and contrast
    x0.6 around the mean; ``cast``: a colour cast (R x1.3, G x0.9, B x0.5, +20 on red);
    ``both``: both; results clipped to [0, 255]."""
    x = images.float()
    if kind in ("dark", "both"):
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (m + 0.6 * (x - m)) * 0.55
    if kind in ("cast", "both"):
        x = x * torch.tensor([1.3, 0.9, 0.5]).view(1, 3, 1, 1) + torch.tensor([20.0, 0, 0]).view(1, 3, 1, 1)
    return x.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def error_of(model, images, labels, domain, mean, std, batch=256) -> float:
    from unirep.data import whiten
    model.eval()
    wrong = 0
    for i in range(0, images.shape[0], batch):
        x = whiten(images[i:i + batch], mean, std)
        wrong += int((model(x, domain).argmax(1) != labels[i:i + batch]).sum())
    return 100.0 * wrong / images.shape[0]


def part_recalibrate(args) -> None:
    import copy

    from unirep import recalibrate
    started = time.strftime("%H:%M")
    loads = [load()]
    cfg, model, ckpt = load_run(args.run)
    data = build_data(cfg)
    rows, raw = [], {}
    for name in args.domains:
        d = data.index(name)
        ds = data[d]
        mean, std = ckpt["data"]["mean"][d], ckpt["data"]["std"][d]
        (xtr, _), (xte, yte) = ds.train, ds.test
        clean = error_of(model, xte, yte, d, mean, std)
        for kind in ("dark", "cast", "both"):
            shifted = shift(xte, kind)
            before = error_of(model, shifted, yte, d, mean, std)
            fixed = copy.deepcopy(model)
            t0 = time.perf_counter()
            recalibrate(fixed, shift(xtr, kind), d, mean=mean, std=std)
            secs = time.perf_counter() - t0
            after = error_of(fixed, shifted, yte, d, mean, std)
            back_clean = error_of(fixed, xte, yte, d, mean, std)
            others = max(abs(error_of(fixed, data[o].test[0], data[o].test[1], o, ckpt["data"]["mean"][o],
                                      ckpt["data"]["std"][o])
                             - error_of(model, data[o].test[0], data[o].test[1], o, ckpt["data"]["mean"][o],
                                        ckpt["data"]["std"][o])) for o in range(len(data)) if o != d)
            recovered = (before - after) / (before - clean) * 100 if before > clean else float("nan")
            rows.append((name, kind, clean, before, after, recovered, back_clean, others, secs))
            raw[f"{name}/{kind}"] = dict(zip(("domain", "shift", "clean", "shifted", "recalibrated", "recovered_pct",
                                              "recalibrated_on_clean", "other_domains_max_change", "seconds"),
                                             rows[-1]))
            loads.append(load())
            print(rows[-1], file=sys.stderr, flush=True)
    lines = header("Recalibrating a drifted domain from unlabelled images (AdaBN)", started, loads)
    lines += [f"Run: {args.run} ({cfg['strategy']}, {cfg['sharing']} sharing, {ckpt['step']} steps, domains "
              f"{data.names}). Each domain's images are shifted, train and test alike, and whitened with the "
              f"domain's original statistics (the deployed preprocessing does not know about the drift). "
              f"Shifts: dark = brightness x0.55 and contrast x0.6; cast = channel gains (1.3, 0.9, 0.5) and +20 "
              f"on red; both = dark then cast; clipped to [0, 255]. Recalibration: `unirep.recalibrate` on the "
              f"shifted training images (2000, no labels, batches of 256) re-estimates that domain's moments; "
              f"errors are on the shifted test images (500). Recovered: share of the error added by the shift "
              f"that recalibration removes.", "",
              "| domain | shift | clean error (%) | shifted (%) | shifted, recalibrated (%) | recovered (%) | "
              "recalibrated model on clean images (%) | other domains' error change (points) | recalibration (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, kind, clean, before, after, rec, back, others, secs in rows:
        lines.append(f"| {name} | {kind} | {clean:.2f} | {before:.2f} | {after:.2f} | {rec:.0f} | {back:.2f} | "
                     f"{others:.2f} | {secs:.1f} |")
    write("recalibrate", lines, {"run": str(args.run), "results": raw, "loads": loads})


# ----------------------------------------------------------------------------- export

def part_export(args) -> None:
    from unirep import export_domain
    started = time.strftime("%H:%M")
    loads = [load()]
    cfg, model, ckpt = load_run(args.run)
    data = build_data(cfg)
    rows = []
    batch = 256
    for d, name in enumerate(data.names):
        plain = export_domain(model, d)
        k = data.num_classes[d]
        x = data[d].whiten(data[d].test[0][:batch])
        with torch.no_grad():
            diff = float((plain(x) - model(x, d)[:, :k]).abs().max())
            for _ in range(2):  # warm-up
                model(x, d), plain(x)
            t_mux, t_plain = [], []
            for _ in range(args.repeats):  # interleaved, best of
                t0 = time.perf_counter(); model(x, d); t1 = time.perf_counter(); plain(x); t2 = time.perf_counter()
                t_mux.append(t1 - t0), t_plain.append(t2 - t1)
        rows.append((name, diff, min(t_mux) * 1e3, min(t_plain) * 1e3, min(t_mux) / min(t_plain),
                     sum(m.numel() for m in plain.parameters())))
        loads.append(load())
    lines = header("Exporting one domain as a plain PyTorch module", started, loads)
    lines += [f"Run: {args.run} ({cfg['strategy']}, {cfg['sharing']} sharing, domains {data.names}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters in the universal model). Eval forward of "
              f"{batch} test images ({data.image_size}x{data.image_size}) of one domain, best of {args.repeats} "
              f"interleaved repeats, 1 thread: the universal model `model(x, d)` vs `unirep.export_domain(model, d)` "
              f"(norms folded into the preceding convs, the domain's head only). The ratio is what counts; the "
              f"absolute times hold for this loaded machine only.", "",
              "| domain | max abs difference | universal (ms) | exported (ms) | speed-up | exported parameters |",
              "|---|---|---|---|---|---|"]
    for name, diff, tm, tp, ratio, n in rows:
        lines.append(f"| {name} | {diff:.1e} | {tm:.1f} | {tp:.1f} | {ratio:.2f}x | {n:,} |")
    write("export", lines, {"run": str(args.run), "rows": rows, "loads": loads})


def write(part: str, lines: list, obj: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"lifecycle-{part}-cpu-{datetime.date.today().isoformat()}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(obj, indent=2, default=str) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.md and .json", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("adapt", "recalibrate", "export"))
    p.add_argument("--held-out", type=lambda s: s.split(","), default=list(DEFAULT_HELD_OUT))
    p.add_argument("--base-steps", type=int, default=2800, help="base run's steps (400 per domain)")
    p.add_argument("--adapt-steps", type=int, default=400, help="steps to learn the held-out domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/unirep-lifecycle", help="where the runs go")
    p.add_argument("--run", default=None, help="recalibrate/export: a run directory (default: the first base run)")
    p.add_argument("--domains", type=lambda s: s.split(","), default=["digits", "sketches", "textures"],
                   help="recalibrate: the domains to shift")
    p.add_argument("--repeats", type=int, default=10, help="export: timing repeats")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.run is None:
        args.run = str(Path(args.work) / f"base-without-{args.held_out[0]}")
    {"adapt": part_adapt, "recalibrate": part_recalibrate, "export": part_export}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
