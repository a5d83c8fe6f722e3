"""Permutation alignment: specs derived from a traced model, weight / activation matching,
many-model alignment, and applying permutations (eagerly or lazily while reading)."""
from .apply import (PermutedCheckpoint, compose, invert, load_permutation, permute, permute_tensor,
                    rename_spec, save_permutation)
from .matching import (activation_matching, align_to_reference, merge_many, signature_match,
                       transfer_permutation, weight_matching)
from .spec import Group, Permutation, PermutationSpec, permutation_spec, self_test

__all__ = ["Group", "Permutation", "PermutationSpec", "PermutedCheckpoint", "activation_matching",
           "align_to_reference", "compose", "invert", "load_permutation", "merge_many",
           "permutation_spec", "permute", "permute_tensor", "rename_spec", "save_permutation", "self_test",
           "signature_match",
           "transfer_permutation", "weight_matching"]
