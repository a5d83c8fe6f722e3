"""Dense merges: ``linear``, ``task_arithmetic`` and ``slerp``.

Each is a pure function over the float32 tensors of one parameter name (see registry.py).
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from ..errors import MergelabError
from .chunks import FlatChunks, is_last
from .registry import Range, TensorContext, merge_method


@merge_method("linear", elementwise=True)
def linear(tensors: list[Tensor], base: Tensor | None, *, ctx: TensorContext,
           weight: list[float] = 1.0, normalize: bool = True) -> Tensor:
    """Weighted average ``Σ w_i θ_i / Σ w_i`` (mergekit's ``linear``); without ``normalize``
    the plain weighted sum ``Σ w_i θ_i``.

    Computed as ``c·θ_1 + Σ_{i>1} (w_i/d)(θ_i − θ_1)`` (d = Σw with normalize, else 1;
    c = Σw/d), which is the same number mathematically and returns the input bit-exactly
    when every model holds the same tensor.
    """
    total = math.fsum(weight)
    if normalize and abs(total) < 1e-8:
        raise MergelabError(
            f"{ctx.name or 'linear'}: the weights sum to {total:g}; with normalize: true they must not sum to 0")
    d = total if normalize else 1.0
    first = tensors[0]
    c = total / d
    if c == 1.0 and len(tensors) == 2 and weight[1] != 0.0:
        # the same formula, θ_1 + (w_2/d)(θ_2 − θ_1), in one fused pass (torch.lerp; for a
        # weight ≥ 0.5 it computes θ_2 − (1 − w)(θ_2 − θ_1), as accurate) instead of
        # clone + sub + add (benchmarks/method_kernels.py)
        return torch.lerp(first, tensors[1], weight[1] / d)
    out = first.clone() if c == 1.0 else first * c
    diff = None  # one scratch buffer for every θ_i − θ_1
    for w, t in zip(weight[1:], tensors[1:]):
        if w != 0.0:
            diff = torch.sub(t, first, out=diff if diff is not None else torch.empty_like(first))
            out.add_(diff, alpha=w / d)
    return out


def weighted_task_sum(tensors: list[Tensor], base: Tensor, weight: list[float], normalize: bool) -> Tensor:
    """``Σ w_i (θ_i − θ_0)``, divided by ``Σ w_i`` when ``normalize`` (|Σw| < 1e-8 divides by 1,
    as mergekit does)."""
    acc = diff = None  # the sum, and one scratch buffer for every other θ_i − θ_0
    for w, t in zip(weight, tensors):
        if w == 0.0:
            continue
        if acc is None:  # the first term w·τ: the same number as 0 + w·τ
            acc = torch.sub(t, base)
            if w != 1.0:
                acc.mul_(w)
        else:
            diff = torch.sub(t, base, out=diff if diff is not None else torch.empty_like(base))
            acc.add_(diff, alpha=w)
    if acc is None:
        acc = torch.zeros_like(base)
    if normalize:
        total = math.fsum(weight)
        if abs(total) >= 1e-8 and total != 1.0:
            acc.div_(total)
    return acc


@merge_method("task_arithmetic", needs_base=True, elementwise=True)
def task_arithmetic(tensors: list[Tensor], base: Tensor, *, weight: list[float] = 1.0,
                    lambda_: float = 1.0, normalize: bool = False, int8_mask: bool = False) -> Tensor:
    """Task arithmetic: ``θ_0 + λ Σ w_i τ_i`` with ``τ_i = θ_i − θ_0`` (divided by ``Σ w_i`` when
    ``normalize``).  ``λ = 0`` returns the base bit-exactly.  ``int8_mask`` (a mergekit
    memory option) is accepted and has no effect."""
    if lambda_ == 0.0:
        return base.clone()
    tau = weighted_task_sum(tensors, base, weight, normalize)
    if lambda_ != 1.0:
        tau.mul_(lambda_)
    return tau.add_(base)  # θ_0 + λτ, in place (a + b == b + a exactly)


def slerp_pair(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8,
               grams: tuple[float, float, float] | None = None) -> Tensor:
    """Spherical interpolation between two tensors seen as flat vectors (mergekit semantics).

    The angle is taken between the normalised vectors (a vector of norm ≤ eps is left
    unnormalised); when ``|cos| > dot_threshold`` the vectors are nearly colinear and the
    result is the linear interpolation ``(1−t)v0 + t v1``.  ``t = 0`` / ``t = 1`` return the
    endpoints bit-exactly.  ``grams``: ``(‖v0‖², ‖v1‖², ⟨v0, v1⟩)`` of the whole vectors when
    ``v0``, ``v1`` are row blocks of them (otherwise computed from ``v0``, ``v1``).
    """
    if t == 0.0:
        return v0.clone()
    if t == 1.0:
        return v1.clone()
    aa, bb, ab = _float64_grams(v0, v1) if grams is None else grams
    na, nb = math.sqrt(aa), math.sqrt(bb)
    dot = ab / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    if abs(dot) > dot_threshold:
        s0, s1 = 1.0 - t, t
    else:
        theta = math.acos(max(-1.0, min(1.0, dot)))
        s = math.sin(theta)
        s0 = math.sin(theta - theta * t) / s
        s1 = math.sin(theta * t) / s
    out = v0 * s0  # s0 v0 + s1 v1 with one temporary: peak = the two inputs + two tensors
    out += v1 * s1
    return out


_GRAM_CHUNK = 2**20


class _Grams:
    """(‖v0‖², ‖v1‖², ⟨v0, v1⟩) in float64: dot products over chunks of 2^20 entries of the whole
    flattened vectors, added in order (no float64 copy of a whole tensor; memory: O(chunk)).
    Fed whole tensors or their row blocks in order (regrouped into the same chunks by
    :class:`FlatChunks`), it gives the same bytes."""

    def __init__(self):
        self.chunks = FlatChunks(_GRAM_CHUNK)
        self.aa = self.bb = self.ab = 0.0

    def add(self, v0: Tensor, v1: Tensor, last: bool) -> None:
        for c0, c1 in self.chunks.add([v0, v1], last):
            x, y = c0.double(), c1.double()
            self.aa += float(torch.dot(x, x))
            self.bb += float(torch.dot(y, y))
            self.ab += float(torch.dot(x, y))
            del x, y  # before the next chunk's


def _float64_grams(v0: Tensor, v1: Tensor) -> tuple[float, float, float]:
    g = _Grams()
    g.add(v0, v1, True)
    return g.aa, g.bb, g.ab


def _slerp_ends(tensors: list[Tensor], base: Tensor | None) -> tuple[Tensor, Tensor]:
    if len(tensors) == 1:
        if base is None:
            raise MergelabError("slerp needs two models (or one model and a base_model)")
        return base, tensors[0]
    return tensors[0], tensors[1]


def slerp_prepass(params: dict, blocks) -> dict:
    """The whole tensor's ``grams`` of the two ends and whether the base equals the second model
    and not the first (then the ends are swapped), from its row blocks in order."""
    g, eq = _Grams(), [True, True]
    for ctx, base, ts in blocks():
        v0, v1 = _slerp_ends(ts, base)
        if len(ts) == 2 and base is not None:
            eq = [eq[0] and torch.equal(base, ts[0]), eq[1] and torch.equal(base, ts[1])]
        if params.get("t") not in (0.0, 1.0):
            g.add(v0, v1, is_last(ctx, v0))
    swap = len(ts) == 2 and base is not None and not eq[0] and eq[1]
    return {"swap": swap, "grams": (g.bb, g.aa, g.ab) if swap else (g.aa, g.bb, g.ab)}


@merge_method("slerp", min_models=1, max_models=2, elementwise=True, tensor_prepass=slerp_prepass)
def slerp(tensors: list[Tensor], base: Tensor | None, *, ctx: TensorContext,
          t: Annotated[float, Range(0, 1)] = 0.5) -> Tensor:
    """SLERP of two models; ``t = 0`` gives the first endpoint, ``t = 1`` the second.

    Endpoints, as in mergekit (where the ``base_model`` is the ``t = 0`` end):

    * one model and a base: ``slerp(base, model)``;
    * two models and no base: ``slerp(models[0], models[1])``;
    * two models and a base equal to one of them (a mergekit recipe that lists the base
      among ``models``): the base is the ``t = 0`` end.

    The angle needs the whole tensors; on row blocks it comes from :func:`slerp_prepass`
    (``ctx.tensor_state``), and every entry is then ``s0·v0 + s1·v1`` (elementwise).
    """
    v0, v1 = _slerp_ends(tensors, base)
    st = ctx.tensor_state
    if st is None:
        if len(tensors) == 2 and base is not None and not torch.equal(base, v0) and torch.equal(base, v1):
            v0, v1 = v1, v0
        return slerp_pair(t, v0, v1)
    if st["swap"]:
        v0, v1 = v1, v0
    return slerp_pair(t, v0, v1, grams=st["grams"])
