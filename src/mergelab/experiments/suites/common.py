"""Shared plumbing of the suites: merging state dicts through the public API
(:func:`mergelab.merge_states`, the same per-tensor driver as ``merge()``), coefficient grids
scored on validation data, versions, timers.  Heads (``head.*``) are never merged.
"""
from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor


def merge_state(method: str, base: Mapping[str, Tensor] | None, experts: Sequence[Mapping[str, Tensor]],
                params: dict[str, Any] | None = None, model_params: Sequence[dict] | None = None,
                stats: Mapping[str, Sequence[Mapping[str, Tensor]]] | None = None,
                names: Sequence[str] | None = None, model_names: Sequence[str] = (),
                seed: int = 0) -> dict[str, Tensor] | dict[str, dict[str, Tensor]]:
    """Merge the ``names`` (default: every non-head key) of ``experts`` with a registered method,
    through the public :func:`mergelab.merge_states` (the engine's driver, as ``merge()`` uses).

    Returns one state dict, or for ``multi_output`` methods ``{variant: state}``. Keys not in
    ``names`` are not returned (the caller keeps heads and buffers as it sees fit).
    """
    from ... import merge_states

    names = list(names) if names is not None else [k for k in experts[0] if not k.startswith("head.")]
    return merge_states(method, list(experts), base, model_params=model_params, stats=stats, names=names,
                        model_names=list(model_names) or None, seed=seed, **dict(params or {}))


def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float,
                names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """(1-α)·a + α·b through the registered ``linear`` method (integer buffers from ``a``)."""
    return merge_state("linear", None, [a, b], {"weight": [1 - alpha, alpha]},
                       names=names if names is not None else list(a))


def choose(grid: Sequence[Any], score: Callable[[Any], float]) -> tuple[Any, dict]:
    """The grid value with the best score (first one on ties) and every score."""
    scores = {}
    best, best_s = None, -float("inf")
    for g in grid:
        s = score(g)
        scores[str(g)] = s
        if s > best_s + 1e-12:
            best, best_s = g, s
    return best, scores


def versions() -> dict[str, str]:
    import numpy

    from ... import __version__

    v = {"mergelab": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "numpy": numpy.__version__, "machine": f"{platform.machine()} / {torch.get_num_threads()} threads"}
    try:
        import transformers
        v["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return v


class Timer:
    """Wall seconds per phase in ``t``; this process's CPU seconds per phase in ``cpu`` (on a
    shared machine the CPU time is what a 1-thread run would take alone, roughly)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.t[key] = round(self.t.get(key, 0.0) + time.perf_counter() - t0, 2)
            self.cpu[key] = round(self.cpu.get(key, 0.0) + time.process_time() - c0, 2)


def data_free_bodies(method: str, coef: float, base: Mapping[str, Tensor], states: Mapping[str, Mapping[str, Tensor]],
                     order: Sequence[str], ties_density: float) -> dict[str, Any] | None:
    """``{task: merged body state}`` for the data-free suite methods (``task_arithmetic``,
    ``ties``, ``ties_tall``: one shared body, or one per task for TALL), or ``None`` for a
    method that needs statistics (the suite builds those itself)."""
    es = [states[t] for t in order]
    if method == "task_arithmetic":
        m = merge_state("task_arithmetic", base, es, {"lambda": coef})
    elif method == "ties":
        m = merge_state("ties", base, es, {"lambda": coef, "density": ties_density, "merge": "mean"})
    elif method == "ties_tall":
        per = merge_state("tall_masks", base, es, {"base_merge": "ties", "density": ties_density,
                                                   "merge": "mean", "lambda": coef}, model_names=list(order))
        return {t: per[t] for t in order}
    else:
        return None
    return {t: m for t in order}
