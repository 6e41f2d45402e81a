"""``python -m unirep.experiments {table2,table3,table4,convergence,in-ablation}``: the
paper's Tables 2, 3 and 4 reproduced on the built-in benchmark, and our own checks.

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
* **convergence**: Table 3's deep configuration at its steps and at twice its steps.
* **in-ablation**: Table 4's instance normalization with the layer before global pooling
  changed, and with another learning rate or warm-up.

Every table also reports each configuration's training error and its Visual Decathlon score
(Rebuffi et al. 2017) against the no-sharing errors.

Resumable: a configuration whose run directory holds ``eval.json`` is not run again (its
result is reused, after checking that it was made with the same settings); one with only a
checkpoint continues from it.  Ctrl-C checkpoints the running configuration and stops; run
the same command again to go on.

Regimes (``--regime``): ``quick`` (minutes per table on a 2-core CPU, a smoke test),
``converged`` (every configuration trained to convergence on a 2-core CPU: where our
conclusions come from) and ``full`` (the paper's section 4.1, a GPU job).  See
docs/experiments.md for the settings, the measured tables and what they say.

Modules: :mod:`.tables` (the paper's numbers, our tables and checks, the regimes' settings
and the trainer configuration of a row), :mod:`.runner` (running, reusing, resuming and
aggregating), :mod:`.report` (markdown, CSV, plot, verdicts, Decathlon score), :mod:`.cli`
(the command line).
"""

from .report import (DECATHLON_GAMMA, DECATHLON_POINTS, comparisons, decathlon_score, plot_table, render_markdown,
                     seed_spread, write_csv)
from .runner import (ExperimentError, RunInterrupted, aggregate, count_model_parameters, describe_device,
                     run_dir_name, run_table)
from .tables import (ALL_DOMAINS, ANALOGUES, CHECK_NAMES, CHECKS, COMMON_SETTINGS, CONVERGED_SETTINGS, FULL_SETTINGS,
                     PAPER_TABLE2, PAPER_TABLE3, PAPER_TABLE4, QUICK_SETTINGS, REGIME_NAMES, REGIMES, TABLE_NAMES,
                     TABLES, Config, TableSpec, chance_error, check_seeds, spec_of, table_settings, trainer_argv,
                     trainer_config)
from .cli import build_parser, main

__all__ = ["ExperimentError", "RunInterrupted", "TABLES", "TABLE_NAMES", "CHECKS", "CHECK_NAMES", "REGIMES",
           "REGIME_NAMES", "QUICK_SETTINGS", "CONVERGED_SETTINGS", "FULL_SETTINGS", "COMMON_SETTINGS",
           "PAPER_TABLE2", "PAPER_TABLE3", "PAPER_TABLE4", "ANALOGUES", "ALL_DOMAINS", "Config", "TableSpec",
           "table_settings", "trainer_config", "trainer_argv", "check_seeds", "spec_of", "run_table",
           "run_dir_name", "aggregate", "comparisons", "seed_spread", "render_markdown", "write_csv", "plot_table",
           "decathlon_score", "DECATHLON_GAMMA", "DECATHLON_POINTS", "count_model_parameters", "chance_error",
           "describe_device", "build_parser", "main"]
