"""Progress output that reads well both on a terminal and in a log file.

:func:`progress` is the one progress helper of the package. On a terminal (stderr is a TTY) it
is a ``tqdm`` bar that redraws in place. Anywhere else (a log file, a pipe, CI) a redrawing bar
would leave carriage returns and hundreds of partial lines, so it writes ONE line per phase to
stderr when the phase ends: ``<desc>: <n>[/<total>] <unit> in <s> s``. ``disable=True`` prints
nothing in either case. It supports what the call sites use: iteration, ``update(n)``,
``close()`` and ``with``.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator


def is_terminal(stream=None) -> bool:
    s = sys.stderr if stream is None else stream
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """The log-file form of a progress bar: counts, and prints one line on ``close``."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False):
        self.iterable, self.total, self.desc, self.unit, self.disable = iterable, total, desc, unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        self.n = 0
        self.t0 = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for x in self.iterable if self.iterable is not None else ():
                yield x
                self.n += 1
        finally:  # a loop left early (break, error) prints nothing: it did not finish the phase
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:  # tqdm compatibility; nothing to redraw
        pass

    def close(self, failed: bool | None = None) -> None:
        """Print the phase's line, unless an exception is on its way out (an error or Ctrl-C:
        then the one ``error:`` line says what happened, and nothing else is printed)."""
        if self.closed:
            return
        self.closed = True
        if failed is None:
            failed = sys.exc_info()[0] is not None
        if self.disable or failed:
            return
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        sys.stderr.write(f"{self.desc or 'progress'}: {count} {self.unit} in {time.perf_counter() - self.t0:.1f} s\n")
        sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", disable: bool = False, leave: bool = False):
    """A ``tqdm`` bar on a terminal, else a :class:`LineProgress` (one line when the phase ends)."""
    if disable or not is_terminal():
        return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
