"""The one seed function of mergelab.

Every random choice of a merge derives from the recipe ``seed`` through :func:`derive_seed`
(blake2b of the ``"\\x00"``-joined parts, 63 bits; stable across processes, platforms and
devices, unlike Python's ``hash``):

* the per-tensor seed handed to methods as ``ctx.seed``: ``derive_seed(recipe_seed, name)``
  (the engine's driver sets it, whichever entry point: ``merge()``, ``merge_states()``, the
  experiment suites, ``fisher_merge``/``regmean_merge``);
* a per-model seed inside one tensor: ``tensor_seed(ctx.seed, name, i)``
  (= ``derive_seed(ctx.seed, name, i)``; DARE's masks);
* a per-chunk generator seed: ``derive_seed(model_seed, chunk)`` (see ``sparse.dare_keep``).
"""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and any number of parts (names, indices)."""
    text = "\x00".join([str(int(seed))] + [str(int(p)) if isinstance(p, (bool, int)) else str(p) for p in parts])
    h = hashlib.blake2b(text.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def tensor_seed(seed: int, name: str, index: int = 0) -> int:
    """Seed of model ``index`` for the tensor ``name`` (``derive_seed(seed, name, index)``)."""
    return derive_seed(seed, name, int(index))


def context_seed(recipe_seed: int, name: str) -> int:
    """``ctx.seed`` of the tensor ``name``: ``derive_seed(recipe_seed, name)``."""
    return derive_seed(recipe_seed, name)
