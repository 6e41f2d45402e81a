"""The command line of ``python -m unirep.experiments`` (see the package docstring)."""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, List, Optional, Sequence, Tuple

from .. import _cli
from .runner import ExperimentError, RunInterrupted, run_table
from .tables import CHECK_NAMES, REGIME_NAMES, TABLE_NAMES, check_seeds, regime_of, table_settings

__all__ = ["build_parser", "main"]


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


def _key_list(text: str) -> List[str]:
    keys = [v for v in text.replace(",", " ").split()]
    if not keys:
        raise argparse.ArgumentTypeError("--configs takes configuration names such as none,deep")
    return keys


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m unirep.experiments``."""
    p = _cli.ArgumentParser(
        prog="python -m unirep.experiments",
        description="Reproduce the paper's Table 2 (full sharing), Table 3 (sharing, width) or Table 4 "
                    "(normalization) on the built-in benchmark, or run one of our checks (convergence: the deep "
                    "configuration at twice the steps; in-ablation: where instance normalization goes): every "
                    "configuration is a seeded run of unirep.train in OUT/<table>/<config> (finished runs are "
                    "reused, interrupted ones resumed); the table is printed beside the paper's and written as "
                    "OUT/<table>/<table>.{md,csv,png}.")
    p.add_argument("table", choices=TABLE_NAMES + CHECK_NAMES, help="which table or check")
    p.add_argument("--regime", choices=REGIME_NAMES, default=None,
                   help="quick (minutes per table on 2 CPU cores: a smoke test), converged (every configuration "
                        "trained to convergence on 2 CPU cores, about an hour per table and seed: the regime our "
                        "conclusions come from) or full (the paper's section 4.1: ResNet-38 at 64x64, a GPU job; "
                        "the default)")
    p.add_argument("--quick", action="store_true", help="the same as --regime quick")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/experiments/<regime>)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="also copy the table to DIR/<table>-<regime>-<device>-<date>.{md,csv,png}")
    p.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                   metavar="KEY=VALUE",
                   help="change one setting, e.g. --set device=cuda, --set batches_per_domain=300, "
                        "--set seed=1 (see --dry-run and docs/experiments.md for the names)")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="LIST",
                   help="train every configuration once per seed, e.g. --seeds 0,1 (default: one seed, 0); the "
                        "table reports the mean over seeds and each seed's mean")
    p.add_argument("--parallel", type=_cli.positive_int, default=1, metavar="N",
                   help="train N configurations at a time, each in its own process with 1/N of the threads "
                        "(default 1; on a 2-core CPU, 2 does about 20%% more work per hour)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: write the table from the runs that have finished (rows averaged over "
                        "the seeds they have; the runs left out are named in the table)")
    p.add_argument("--configs", type=_key_list, default=None, metavar="LIST",
                   help="run only these configurations, e.g. --configs none,deep (names as --dry-run prints "
                        "them; default: all); the table has only their rows")
    p.add_argument("--records", action="append", default=[], metavar="CSV",
                   help="take the runs recorded in CSV (a table CSV this command wrote earlier, e.g. in "
                        "benchmarks/results) instead of training them again, after checking their settings; "
                        "repeatable. To finish a table over several sessions or machines")
    p.add_argument("--dry-run", action="store_true",
                   help="print every configuration's trainer options and parameter count; train nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m unirep.experiments``)."""
    args = build_parser().parse_args(argv)
    overrides = dict(args.overrides)
    try:
        regime = regime_of(args.quick, args.regime)
        table_settings(args.table, overrides=overrides, regime=regime)
        if args.seeds is not None:
            check_seeds(args.seeds)
    except ValueError as e:
        raise SystemExit(f"python -m unirep.experiments: {e}") from None
    out = args.out if args.out is not None else f"runs/experiments/{regime}"
    command = "python -m unirep.experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        run_table(args.table, out=out, overrides=overrides, results_dir=args.results, command=command,
                  dry_run=args.dry_run, seeds=args.seeds, regime=regime, parallel=args.parallel,
                  finished_only=args.finished_only, configs=args.configs,
                  records_from=args.records)
    except RunInterrupted as e:
        print(f"python -m unirep.experiments: {e}", file=sys.stderr)
        return 130
    except ExperimentError as e:
        print(f"python -m unirep.experiments: {e}", file=sys.stderr)
        return 1
    return 0
