"""mergelab: merge neural networks.

The public API is re-exported here; the README documents each name. The names are
resolved lazily (PEP 562): ``import mergelab`` costs milliseconds, and torch is imported
the first time a name that needs it is used (``mergelab.merge``, ``from mergelab import
repair``, ...). ``mergelab --help`` therefore never loads torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "MergelabError": ".errors", "CheckpointError": ".errors", "RecipeError": ".errors",
    "DataError": ".errors", "DeviceError": ".errors",
    "merge": ".engine", "merge_states": ".engine",
    "fisher_merge": ".engine.states", "regmean_merge": ".engine.states",
    "load_state": ".io", "open_checkpoint": ".io", "save_state": ".io",
    "Permutation": ".align", "PermutationSpec": ".align", "activation_matching": ".align",
    "load_permutation": ".align", "permutation_spec": ".align", "permute": ".align",
    "save_permutation": ".align", "weight_matching": ".align",
    "activation_stats": ".stats", "diagonal_fisher": ".stats", "gram_matrices": ".stats",
    "coefficient_search": ".methods.search",
    "TaskConditionedModel": ".repair", "repair": ".repair", "tact": ".repair",
}

__all__ = [
    "__version__", "MergelabError", "CheckpointError", "RecipeError", "DataError", "DeviceError",
    "merge", "merge_states", "load_state", "open_checkpoint", "save_state",
    "permutation_spec", "PermutationSpec", "Permutation", "weight_matching", "activation_matching",
    "permute", "save_permutation", "load_permutation",
    "activation_stats", "gram_matrices", "diagonal_fisher",
    "fisher_merge", "regmean_merge", "coefficient_search",
    "repair", "tact", "TaskConditionedModel",
]


from ._lazy import lazy_names  # noqa: E402

lazy_names(__name__, _LAZY)
