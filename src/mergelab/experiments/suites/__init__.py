"""The reproduction suites: each suite's ``run(profile, quiet, seed=s) -> results`` for one
seed; :func:`run_suite` runs the seeds, aggregates them (mean ± 95 % interval) and writes the
report."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

from ...errors import MergelabError

SUITES = ("nonlocal-vision", "local-text", "fisher", "pretrained-vision")
PROFILES = ("smoke", "quick", "full")
_MODULES = {"nonlocal-vision": "nonlocal_vision", "local-text": "local_text", "fisher": "fisher",
            "pretrained-vision": "pretrained_vision"}


def run_suite(name: str, profile: str = "smoke", out: str | Path | None = None, quiet: bool = False,
              seeds: Sequence[int] | None = None, cache_root: str | Path | None = None) -> dict:
    """Run one suite for every seed (default: 1 for smoke, 3 otherwise) on one thread with the
    CPU kernels pinned; writes results.json, report.md and plots into ``out`` (default
    runs/<suite>) and returns the aggregated results."""
    from ..determinism import cpu_report, one_thread, pin_cpu_kernels
    from ..report import write_report
    from ..seeds import aggregate, default_seeds

    if profile not in PROFILES:
        raise MergelabError(f"unknown profile '{profile}' (known: {', '.join(PROFILES)})")
    if name not in _MODULES:
        raise MergelabError(f"unknown suite '{name}' (known: {', '.join(SUITES)})")
    seeds = list(seeds) if seeds is not None else default_seeds(profile)
    out = Path(out) if out is not None else Path("runs") / name
    pin_cpu_kernels()
    suite = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    from ...progress import progress

    with one_thread():  # one line per seed in a log (a bar on a terminal), whatever the suite prints
        per_seed = [suite.run(profile, quiet=quiet, cache_root=cache_root, seed=s)
                    for s in progress(seeds, desc=f"{name} {profile}", unit="seed", disable=quiet)]
    res = aggregate(per_seed, seeds)
    res["versions"] = {**res.get("versions", {}), **cpu_report()}
    res["paths"] = {k: str(v) for k, v in write_report(res, out).items()}
    return res
