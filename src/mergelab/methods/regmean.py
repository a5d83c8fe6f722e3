"""RegMean (Jin et al. 2023): per linear layer, the weight whose outputs best match every
model's outputs on that model's own inputs.

For a PyTorch weight ``W_i`` (d_out × d_in) with input Gram ``G_i = X_iᵀX_i`` (d_in × d_in):

    G̃_i = α·G_i + (1 − α)·diag(G_i)
    W*  = (Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹        solved with torch.linalg.solve in float64

Input features that are zero for every model (zero row and column in Σ G̃) do not affect any
output; their columns of W* are the plain average.  Weights with more than two dimensions
(convolutions) are flattened to (d_out, C_in·k_h·k_w) when the Gram has that size.  Every
tensor without a Gram in all models is averaged.

``ctx.stats["gram"]`` holds the per-model Grams for the weight's name (``None`` where a file
lacks it); ``ctx.stats["gram_count"]`` (optional) the per-model row counts, needed only for
``normalize_gram`` (each G_i divided by its number of rows).
"""
from __future__ import annotations

from typing import Annotated, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import MergelabError
from ..io.validate import check_states
from .registry import Range, TensorContext, merge_method


def _mean(tensors: Sequence[Tensor]) -> Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out / len(tensors) if len(tensors) > 1 else out


def regmean_weight(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 0.9) -> Tensor:
    """``(Σ W_i G̃_i)(Σ G̃_i)⁻¹`` for 2-D ``W_i`` (d_out × d_in), in float64, returned as float32."""
    d_in = weights[0].shape[1]
    lhs = torch.zeros(d_in, d_in, dtype=torch.float64)
    rhs = torch.zeros(weights[0].shape[0], d_in, dtype=torch.float64)
    for w, g in zip(weights, grams):
        g = g.to(torch.float64)
        gt = alpha * g
        gt.diagonal().add_((1.0 - alpha) * g.diagonal())
        lhs += gt
        rhs += w.to(torch.float64) @ gt
    active = lhs.diagonal() != 0
    out = torch.stack([w.to(torch.float64) for w in weights]).mean(0)
    if bool(active.any()):
        idx = active.nonzero().squeeze(1)
        a = lhs[idx][:, idx]
        # W* a = rhs  <=>  a W*ᵀ = rhsᵀ  (a symmetric)
        out[:, idx] = torch.linalg.solve(a, rhs[:, idx].T).T
    return out.to(torch.float32)


def _grams_of(ctx: TensorContext, n: int, shape: torch.Size) -> list[Tensor] | None:
    gs = (ctx.stats or {}).get("gram")
    if gs is None or len(gs) != n or any(g is None for g in gs) or len(shape) < 2:
        return None
    d_in = int(torch.tensor(shape[1:]).prod())
    for i, g in enumerate(gs):
        if tuple(g.shape) != (d_in, d_in):
            raise MergelabError(f"{ctx.name}: Gram of model {i} has shape {tuple(g.shape)},"
                                f" expected ({d_in}, {d_in}) for a weight of shape {tuple(shape)}")
    return list(gs)


@merge_method("regmean", stats=("gram",))
def regmean(tensors: list[Tensor], base: Tensor | None, *, ctx: TensorContext,
            alpha: Annotated[float, Range(0, 1)] = 0.9, normalize_gram: bool = False) -> Tensor:
    """RegMean for weights with a Gram in every model; the plain average elsewhere."""
    shape = tensors[0].shape
    grams = _grams_of(ctx, len(tensors), shape)
    if grams is None:
        return _mean(tensors)
    if normalize_gram:
        counts = (ctx.stats or {}).get("gram_count")
        if counts is None or any(c is None or float(c) <= 0 for c in counts):
            raise MergelabError(f"{ctx.name}: normalize_gram needs the row count of every Gram"
                                " ('count:<weight name>' in the Gram file's metadata)")
        grams = [g.to(torch.float64) / float(c) for g, c in zip(grams, counts)]
    flat = [t.reshape(shape[0], -1) for t in tensors]
    return regmean_weight(flat, grams, alpha).reshape(shape)


def regmean_merge(states: Sequence[Mapping[str, Tensor]], grams: Sequence[Mapping[str, Tensor]],
                  alpha: float = 0.9, counts: Sequence[Mapping[str, float]] | None = None,
                  normalize_gram: bool = False) -> dict[str, Tensor]:
    """RegMean over whole state dicts: ``grams[i]`` maps weight names to model i's Gram
    (``counts[i]`` optionally to its row count).  Other tensors are averaged; non-floating
    tensors are copied from ``states[0]``; outputs keep ``states[0]``'s dtypes."""
    from .registry import get_method

    spec = get_method("regmean")
    check_states(states, "regmean_merge", same=True)
    check_states([g for g in grams if isinstance(g, Mapping)], "regmean_merge: grams")
    n = len(states)
    if len(grams) != n:
        raise MergelabError(f"regmean_merge: {n} states but {len(grams)} Gram dicts")
    kwargs = spec.resolve({"alpha": alpha, "normalize_gram": normalize_gram},
                          [{"gram": "<dict>"} for _ in range(n)], where="regmean_merge")
    out = {}
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        stats = {"gram": [g.get(name) for g in grams]}
        if counts is not None:
            stats["gram_count"] = [c.get(name) for c in counts]
        ctx = TensorContext(name=name, stats=stats)
        out[name] = spec([s[name].float() for s in states], None, ctx=ctx, **kwargs).to(ref.dtype)
    return out
