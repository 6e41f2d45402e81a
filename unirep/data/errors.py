"""Exceptions raised by :mod:`unirep.data`."""

from __future__ import annotations

import os


class DataFormatError(ValueError):
    """A dataset file or folder is missing, corrupt, empty or holds invalid labels.

    ``path`` is the offending file or folder; the message always names it.
    """

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")
