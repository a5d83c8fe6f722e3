"""mergelab: merge neural networks.

The public API is re-exported here; the README documents each name.
"""
__version__ = "0.1.0"

from ._startup import quiet_interrupt  # noqa: E402

with quiet_interrupt():  # the mergelab command: Ctrl-C while torch loads exits quietly
    from .errors import CheckpointError, DataError, DeviceError, MergelabError, RecipeError  # noqa: E402
    from .merge import merge  # noqa: E402  (the shim module first: `mergelab.merge` stays the function)
    from .engine import merge_states  # noqa: E402
    from .engine.states import fisher_merge, regmean_merge  # noqa: E402  (in-memory Fisher / RegMean on the driver)
    from .io import load_state, open_checkpoint, save_state  # noqa: E402
    from .align import (Permutation, PermutationSpec, activation_matching, load_permutation,  # noqa: E402
                        permutation_spec, permute, save_permutation, weight_matching)
    from .stats import activation_stats, diagonal_fisher, gram_matrices  # noqa: E402
    from .methods.search import coefficient_search  # noqa: E402
    from .repair import TaskConditionedModel, repair, tact  # noqa: E402

__all__ = [
    "__version__", "MergelabError", "CheckpointError", "RecipeError", "DataError", "DeviceError",
    "merge", "merge_states", "load_state", "open_checkpoint", "save_state",
    "permutation_spec", "PermutationSpec", "Permutation", "weight_matching", "activation_matching",
    "permute", "save_permutation", "load_permutation",
    "activation_stats", "gram_matrices", "diagonal_fisher",
    "fisher_merge", "regmean_merge", "coefficient_search",
    "repair", "tact", "TaskConditionedModel",
]
