"""Where the real ``mergekit-yaml`` is, for the tests that compare against it (skipped without)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_mergekit() -> str | None:
    """``$MERGEKIT_YAML``, the repo's ``.venv-mergekit`` (scripts/setup-mergekit.sh), or PATH."""
    for c in (os.environ.get("MERGEKIT_YAML"), str(ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"),
              shutil.which("mergekit-yaml")):
        if c and Path(c).is_file():
            return c
    return None
