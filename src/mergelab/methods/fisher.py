"""Fisher merging (Matena & Raffel 2022): a per-entry precision-weighted average.

    θ* = Σ_i λ_i F_i θ_i / Σ_i λ_i F_i,   F_i ← max(F_i, floor)

``ctx.stats["fisher"]`` holds the per-model diagonal Fisher tensors of the current name
(``None`` where a model's Fisher file lacks it, e.g. buffers; such names are averaged with
the weights).  With ``normalize`` each λ_i is divided by ‖F_i‖₂ taken over all merged entries
(the names that have a Fisher in every model, before flooring, as the reference does);
the norms come from :func:`fisher_prepass`, one streaming pass over the Fisher tensors.
Given the norms, entry j of the result depends on entry j of the tensors and Fishers only, so
the engine merges big tensors in row blocks (with the Fishers' row blocks).
"""
from __future__ import annotations

import math
from typing import Annotated, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import MergelabError
from .chunks import FlatChunks, is_last
from .registry import Range, TensorContext, merge_method

Weight = Annotated[list[float], Range(0, None)]
Floor = Annotated[float, Range(0, None, lo_open=True)]


def _fishers_of(ctx: TensorContext, n: int) -> list[Tensor] | None:
    fs = (ctx.stats or {}).get("fisher")
    if fs is None or len(fs) != n or any(f is None for f in fs):
        return None
    return list(fs)


def fisher_prepass(params: dict, stream) -> list[float] | None:
    """``‖F_i‖₂`` per model over every name that has a Fisher in all models (float64 sums).

    ``stream`` yields ``(ctx, base, tensors)`` with ``ctx.stats["fisher"]`` filled.  Without
    ``normalize`` it returns None and reads nothing."""
    if not params.get("normalize", False):
        return None
    sq = None
    # float64 dot products over chunks of 2^20 entries of each whole flattened Fisher (no float64
    # copy of a whole tensor), in order: the engine's row blocks are regrouped into the same
    # chunks, so the norms have the same bytes whether the stream gives whole tensors or blocks
    chunks = FlatChunks(_CHUNK)
    for ctx, _base, tensors in stream:
        fs = _fishers_of(ctx, len(tensors))
        if fs is None:
            continue
        if sq is None:
            sq = [0.0] * len(fs)
        for xs in chunks.add(fs, is_last(ctx, fs[0])):
            for i, c in enumerate(xs):
                x = c.double()
                sq[i] += float(torch.dot(x, x))
                del x  # one float64 chunk at a time
    if sq is None:
        return None
    return [math.sqrt(s) for s in sq]


def fisher_combine(tensors: Sequence[Tensor], fishers: Sequence[Tensor], coeffs: Sequence[float],
                   floor: float, favor_target: bool) -> Tensor:
    """``Σ c_i F_i θ_i / Σ c_i F_i`` with ``F_i ← max(F_i, floor)`` (only F_0 when ``favor_target``)."""
    out = torch.empty_like(tensors[0], dtype=torch.float32)
    flat_out = out.view(-1)
    ts = [t.reshape(-1) for t in tensors]
    fs = [f.reshape(-1) for f in fishers]
    # elementwise, so computed over chunks of the flattened tensors: the same bytes as one
    # whole-tensor pass, with memory = the inputs + the output + O(chunk)
    for a in range(0, flat_out.numel(), _CHUNK):
        b = min(a + _CHUNK, flat_out.numel())
        num = torch.zeros_like(flat_out[a:b])
        den = torch.zeros_like(num)
        for i, (t, f, c) in enumerate(zip(ts, fs, coeffs)):
            f = f[a:b].to(torch.float32)
            if not favor_target or i == 0:
                f = torch.clamp_min(f, floor)
            cf = f * c
            den += cf
            num += cf * t[a:b]
        torch.div(num, den, out=flat_out[a:b])
    return out


_CHUNK = 2**20


def _check_weights(weight: Sequence[float], where: str) -> None:
    if not any(w > 0 for w in weight):
        raise MergelabError(f"{where}: fisher merge needs at least one positive weight, found {list(weight)}")


@merge_method("fisher", stats=("fisher",), prepass=fisher_prepass, elementwise=True)
def fisher(tensors: list[Tensor], base: Tensor | None, *, ctx: TensorContext,
           weight: Weight = 1.0, floor: Floor = 1e-6, normalize: bool = False,
           favor_target: bool = False) -> Tensor:
    """Fisher-weighted average; names without a Fisher in every model get ``Σ w_i θ_i / Σ w_i``."""
    _check_weights(weight, ctx.name or "fisher")
    fs = _fishers_of(ctx, len(tensors))
    if fs is None:
        total = math.fsum(weight)
        out = torch.zeros_like(tensors[0])
        for w, t in zip(weight, tensors):
            out.add_(t, alpha=w / total)
        return out
    for i, f in enumerate(fs):
        if f.numel() != tensors[i].numel():
            raise MergelabError(f"{ctx.name}: Fisher of model {i} has shape {tuple(f.shape)},"
                                f" the tensor has {tuple(tensors[i].shape)}")
    coeffs = list(weight)
    if normalize:
        norms = ctx.prepass
        if not norms:
            raise MergelabError(f"{ctx.name}: fisher normalize: true needs the prepass norms")
        coeffs = [w / n if n > 0 else 0.0 for w, n in zip(weight, norms)]
        _check_weights(coeffs, ctx.name)
    return fisher_combine(tensors, fs, coeffs, floor, favor_target)


def fisher_merge(states: Sequence[Mapping[str, Tensor]], fishers: Sequence[Mapping[str, Tensor]],
                 weights: Sequence[float] | None = None, floor: float = 1e-6, normalize: bool = False,
                 favor_target: bool = False, device: str | None = None) -> dict[str, Tensor]:
    """Fisher-merge whole state dicts: ``merge_states("fisher", ...)`` (the engine's driver).

    ``states[0]`` is the target: it fixes the names, and non-floating tensors are copied from
    it.  Floating outputs are cast back to the target's dtype."""
    from ..engine.states import fisher_merge as run

    return run(states, fishers, weights=weights, floor=floor, normalize=normalize,
               favor_target=favor_target, device=device)
