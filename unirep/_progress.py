"""Progress of long loops on stderr: a tqdm bar on a terminal; anywhere else (a pipe, a log
file, a job scheduler) one plain line every :data:`INTERVAL` seconds, never the bar's
carriage returns."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional

#: Seconds between two lines when stderr is not a terminal.
INTERVAL = 30.0

_now = time.monotonic  # the clock (tests replace it)


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str, unit: str,
                 enabled: Optional[bool] = None, delay: float = 2.0, leave: bool = True):
    """A tqdm-like progress object (``update``, ``set_postfix_str``, ``close``, iteration).

    ``enabled``: True shows progress from the start, False never, None (default) only once
    the loop has taken ``delay`` seconds. On a terminal it is a tqdm bar; otherwise a line
    ``desc: n/total unit`` at most every :data:`INTERVAL` seconds and one when it ends.
    """
    if enabled is not False and sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, delay=0 if enabled else delay, leave=leave)
    return _Lines(iterable, total, desc, unit, quiet=enabled is False, delay=0.0 if enabled else delay)


class _Lines:
    def __init__(self, iterable, total, desc, unit, quiet: bool, delay: float):
        self.iterable, self.desc, self.unit, self.quiet, self.delay = iterable, desc, unit, quiet, delay
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, 0, ""
        self.start = _now()
        self.last: Optional[float] = None  # when the last line was written

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def update(self, n: int = 1) -> None:
        self.n += n
        now = _now()
        due = now - self.start >= self.delay if self.last is None else now - self.last >= INTERVAL
        if due and not self.quiet:
            self._line(f"{self.n}/{self.total}" if self.total else f"{self.n}")
            self.last = now

    def close(self) -> None:
        if self.last is not None and not self.quiet:  # it spoke: say it is done
            self._line(f"done, {self.n} {self.unit} in {_now() - self.start:.0f} s")
            self.last = None
            self.quiet = True

    def _line(self, what: str) -> None:
        extra = f" ({self.postfix})" if self.postfix else ""
        unit = "" if what.startswith("done") else f" {self.unit}"
        print(f"{self.desc}: {what}{unit}{extra}", file=sys.stderr, flush=True)
