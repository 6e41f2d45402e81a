"""``python -m unirep.experiments``: see :mod:`unirep.experiments.cli`."""

import sys

from .cli import main

sys.exit(main())
