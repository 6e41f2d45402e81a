"""``python -m unirep.experiments``: see :mod:`unirep.experiments.cli`."""

import sys

from .. import _cli
from .cli import main

sys.exit(_cli.run(main, prog="python -m unirep.experiments"))
