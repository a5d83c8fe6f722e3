"""Start-up of the ``mergelab`` command: Ctrl-C while the heavy modules (torch) are being
imported exits quietly with code 130 instead of printing an import traceback.

Only when this process is the command (``mergelab ...`` or ``python -m mergelab ...``); a
library user's ``import mergelab`` keeps Python's ordinary ``KeyboardInterrupt``.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def started_as_cli() -> bool:
    if sys.argv and os.path.basename(sys.argv[0]) in ("mergelab", "mergelab.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    for i, a in enumerate(orig[:-1]):
        if a == "-m" and orig[i + 1] == "mergelab":
            return True
    return False


@contextmanager
def quiet_interrupt() -> "Iterator[None]":  # noqa: F821  (no typing import: start-up)
    try:
        yield
    except KeyboardInterrupt:
        if not started_as_cli():
            raise
        sys.stderr.write("error: interrupted (Ctrl-C) during start-up\n")
        raise SystemExit(130) from None
