"""Permutation alignment: specs derived from a traced model, weight / activation matching,
many-model alignment, and applying permutations (eagerly or lazily while reading)."""
from .apply import (PermutedCheckpoint, compose, invert, load_permutation, permute, permute_tensor,
                    save_permutation)
from .spec import Group, Permutation, PermutationSpec, permutation_spec, self_test

__all__ = ["Group", "Permutation", "PermutationSpec", "PermutedCheckpoint", "compose", "invert",
           "load_permutation", "permutation_spec", "permute", "permute_tensor", "save_permutation",
           "self_test"]
