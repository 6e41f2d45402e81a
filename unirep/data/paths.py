"""Paths a user gives: ``~`` and environment variables are expanded."""

from __future__ import annotations

import os
from pathlib import Path


def expand_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` / ``~user`` and ``$VAR`` / ``${VAR}`` expanded, as a shell would."""
    return Path(os.path.expanduser(os.path.expandvars(os.fspath(path))))
