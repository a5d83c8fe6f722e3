"""Merging-coefficient search: score candidate coefficient vectors with a user evaluation.

Two models: the grid of ``(λ, 1 − λ)`` for λ ∈ {1, 0.98, …, 0} (51 pairs by default, as in
the Fisher-merging reference).  More models: ``n_samples`` draws from Dirichlet(1), the
uniform distribution on the simplex, seeded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import MergelabError


@dataclass
class SearchResult:
    """``table``: (coefficients, score) pairs sorted best first; ``best`` is ``table[0]``."""

    table: list[tuple[tuple[float, ...], float]]

    @property
    def best(self) -> tuple[tuple[float, ...], float]:
        return self.table[0]

    @property
    def best_coefficients(self) -> tuple[float, ...]:
        return self.table[0][0]

    @property
    def best_score(self) -> float:
        return self.table[0][1]


def pairwise_grid(n_points: int = 51) -> list[tuple[float, float]]:
    """``n_points`` pairs ``(λ, 1 − λ)`` with λ evenly spaced from 1 down to 0."""
    if n_points < 2:
        raise MergelabError(f"coefficient grid needs at least 2 points, found {n_points}")
    return [(1.0 - i / (n_points - 1), i / (n_points - 1)) for i in range(n_points)]


def dirichlet_samples(n_models: int, n_samples: int, seed: int = 0) -> list[tuple[float, ...]]:
    """``n_samples`` coefficient vectors drawn from Dirichlet(1, …, 1) with a fixed seed."""
    rng = np.random.default_rng(seed)
    return [tuple(float(x) for x in row) for row in rng.dirichlet(np.ones(n_models), size=n_samples)]


def coefficient_search(merge_fn: Callable[[tuple[float, ...]], Any], n_models: int,
                       evaluate: Callable[[Any], float],
                       grid: int | Sequence[Sequence[float]] = 51, n_samples: int = 50, seed: int = 0,
                       maximize: bool = True) -> SearchResult:
    """Merge with each candidate coefficient vector and score it.

    ``merge_fn(coeffs)`` builds a merged model (anything ``evaluate`` accepts);
    ``evaluate(merged)`` returns a number (higher is better unless ``maximize=False``).
    Candidates: ``grid`` given as explicit coefficient vectors; otherwise for two models a
    pairwise grid of ``grid`` points, for more ``n_samples`` Dirichlet(1) draws.
    Ties in score keep the candidates' order (stable sort).
    """
    if n_models < 2:
        raise MergelabError(f"coefficient search needs at least 2 models, found {n_models}")
    if isinstance(grid, int):
        candidates = pairwise_grid(grid) if n_models == 2 else dirichlet_samples(n_models, n_samples, seed)
    else:
        candidates = [tuple(float(x) for x in c) for c in grid]
        for c in candidates:
            if len(c) != n_models:
                raise MergelabError(f"coefficient search: candidate {c} has {len(c)} values, expected {n_models}")
    rows = []
    for c in candidates:
        score = float(evaluate(merge_fn(tuple(c))))
        rows.append((tuple(c), score))
    rows.sort(key=lambda r: -r[1] if maximize else r[1])
    return SearchResult(rows)
