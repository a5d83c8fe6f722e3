"""The reproduction suites: ``run(profile, out, quiet) -> results`` per suite."""
from __future__ import annotations

from pathlib import Path

from ...errors import MergelabError

SUITES = ("nonlocal-vision", "local-text", "fisher")
PROFILES = ("smoke", "quick", "full")


def run_suite(name: str, profile: str = "smoke", out: str | Path | None = None, quiet: bool = False) -> dict:
    """Run one suite; writes results.json, report.md and plots into ``out`` (default runs/<suite>)."""
    if profile not in PROFILES:
        raise MergelabError(f"unknown profile '{profile}' (known: {', '.join(PROFILES)})")
    out = Path(out) if out is not None else Path("runs") / name
    if name == "nonlocal-vision":
        from . import nonlocal_vision
        return nonlocal_vision.run(profile, out, quiet=quiet)
    if name == "local-text":
        from . import local_text
        return local_text.run(profile, out, quiet=quiet)
    if name == "fisher":
        from . import fisher
        return fisher.run(profile, out, quiet=quiet)
    raise MergelabError(f"unknown suite '{name}' (known: {', '.join(SUITES)})")
