"""``python -m unirep.evaluate RUN_DIR``: per-domain top-1 error of a trained run on the
test split (whitened, no augmentation: the central crop) and the mean, as in the paper's
Tables 2-4.  Uses the run's checkpoint and rebuilds its data from the saved configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import _cli
from .train import build_data, evaluate_model, format_table, load_run, resolve_device


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _cli.ArgumentParser(prog="python -m unirep.evaluate",
                            description="Per-domain top-1 error (%) of a run on the test split, and the mean.")
    p.add_argument("run_dir", help="a run directory of python -m unirep.train (or its checkpoint.pt)")
    _cli.add_run_options(p)
    p.add_argument("--batch-size", type=_cli.positive_int, default=256, help="evaluation batch size (default 256)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--write", action="store_true", help="also (re)write RUN_DIR/eval.json")
    args = p.parse_args(argv)
    import unirep_kernels
    device = resolve_device(args.device)
    with unirep_kernels.use_backend(args.backend):
        cfg, model, ckpt = load_run(args.run_dir, device)
        data = build_data(cfg)
        if data.names != ckpt["data"]["names"]:
            raise SystemExit(f"the run's data has domains {data.names}, the checkpoint {ckpt['data']['names']}")
        errors = evaluate_model(model, data, device, args.batch_size)
    mean = sum(errors.values()) / len(errors)
    result = {"step": ckpt["step"], "errors": errors, "mean_error": mean}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.run_dir} (step {ckpt['step']})")
        print(format_table(errors))
    if args.write:
        run = Path(args.run_dir)
        run = run if run.is_dir() else run.parent
        (run / "eval.json").write_text(json.dumps(dict(result, config=cfg), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run(main))
