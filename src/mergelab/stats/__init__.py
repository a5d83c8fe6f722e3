"""Statistics passes: activation moments at sites, Gram matrices, diagonal Fisher.

Every pass takes a model and an iterable of batches (see :mod:`mergelab.stats.batch` for the
batch conventions), accumulates float64 sums, all-reduces them under torchrun, and returns
named tensors that save to safetensors (``.save(path)``, rank 0 only).

The names resolve lazily (see ``mergelab._lazy``): a merge imports
:mod:`mergelab.stats.distributed` (torchrun ranks) without loading the passes.
"""
from __future__ import annotations

from .._lazy import lazy_names

__all__ = ["Stats", "activation_stats", "Fisher", "diagonal_fisher", "sample_labels", "Grams",
           "gram_matrices", "Site", "discover_sites", "find_head", "resolve_sites"]

lazy_names(__name__, {
    "Stats": ".activations", "activation_stats": ".activations",
    "Fisher": ".fisher", "diagonal_fisher": ".fisher", "sample_labels": ".fisher",
    "Grams": ".gram", "gram_matrices": ".gram",
    "Site": ".sites", "discover_sites": ".sites", "find_head": ".sites", "resolve_sites": ".sites",
})
