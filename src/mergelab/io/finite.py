"""The finite check of tensors as they will be stored.

A value can be finite in float32 and infinite once cast to the stored dtype (float16 tops out
at 65504): the check runs on the stored tensor, after the cast, for every stored variant.
"""
from __future__ import annotations

import torch

from ..errors import MergelabError


def nonfinite(t: torch.Tensor) -> bool:
    """True if ``t`` holds NaN or Inf.  One reduction pass: the sum is finite whenever every
    element is (barring overflow, which the exact check then settles)."""
    if t.numel() == 0 or not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return False
    return not bool(torch.isfinite(t).all())


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def check_stored(name: str, computed: torch.Tensor, stored: torch.Tensor, *, who: str) -> None:
    """Raise if the stored tensor ``stored`` (``computed`` cast to its dtype) holds NaN or Inf.

    ``who`` names the producer (``method 'ties'``, ``tact task 'a'``).  The message names the
    tensor, the dtype and the largest magnitude, and suggests a wider dtype when the cast
    (not the computation) made the values infinite."""
    if not nonfinite(stored):
        return
    if nonfinite(computed):
        raise MergelabError(f"{who} produced NaN or Inf for tensor '{name}' (use --allow-nonfinite to keep it)")
    big = float(computed.detach().abs().max())
    raise MergelabError(
        f"tensor '{name}': {who} gives values up to {big:.6g} in magnitude, beyond the range of the stored "
        f"dtype {_dtype_name(stored.dtype)} (max {torch.finfo(stored.dtype).max:.6g}); store it as bfloat16 or "
        f"float32 (dtype: / --dtype), or use --allow-nonfinite to write Inf")
