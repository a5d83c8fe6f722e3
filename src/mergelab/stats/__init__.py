"""Statistics passes: activation moments at sites, Gram matrices, diagonal Fisher.

Every pass takes a model and an iterable of batches (see :mod:`mergelab.stats.batch` for the
batch conventions), accumulates float64 sums, all-reduces them under torchrun, and returns
named tensors that save to safetensors (``.save(path)``, rank 0 only).
"""
from .activations import Stats, activation_stats
from .fisher import Fisher, diagonal_fisher, sample_labels
from .gram import Grams, gram_matrices
from .sites import Site, discover_sites, find_head, resolve_sites

__all__ = ["Stats", "activation_stats", "Fisher", "diagonal_fisher", "sample_labels", "Grams",
           "gram_matrices", "Site", "discover_sites", "find_head", "resolve_sites"]
