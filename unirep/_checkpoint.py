"""Reading a run's checkpoint with one clear error when it cannot be read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import torch

from .data.paths import expand_path

CHECKPOINT = "checkpoint.pt"
#: What every checkpoint of ``python -m unirep.train`` holds.
REQUIRED_KEYS = ("step", "model", "config", "data")


class CheckpointError(ValueError):
    """A checkpoint is missing, empty, truncated or not one of ``unirep.train``; the
    message names the file."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


def checkpoint_path(run: str | os.PathLike) -> Path:
    """The checkpoint file of a run directory, or ``run`` itself when it is a file."""
    run = expand_path(run)
    return run / CHECKPOINT if run.is_dir() else run


def read_checkpoint(run: str | os.PathLike) -> Dict[str, Any]:
    """``torch.load`` of a run's checkpoint (a run directory or the file itself) on the CPU.

    Raises:
        CheckpointError: no such file, or a file ``torch.load`` cannot read (empty,
            truncated, another format), or a file that lacks the keys of a checkpoint.
    """
    path = checkpoint_path(run)
    if not path.exists():
        raise CheckpointError(path, f"no such run directory or file (expected a run directory of "
                                    f"python -m unirep.train, or its {CHECKPOINT})")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "the file is empty (a checkpoint cut short?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load's zip reader, pickle and EOF errors for a damaged file
        why = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]  # torch appends paragraphs of advice
        raise CheckpointError(path, f"not a readable checkpoint (truncated or not written by torch.save?): "
                                    f"{type(exc).__name__}: {why}") from exc
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(path, f"not a checkpoint of python -m unirep.train (no {', '.join(missing)})")
    return ckpt
