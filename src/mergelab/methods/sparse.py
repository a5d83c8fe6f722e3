"""Sparse task-vector merges: ``ties``, ``dare_linear``, ``dare_ties``, ``tall_masks``, ``consensus``.

Building blocks (usable on their own):

* :func:`kth_largest` — exact k-th largest of non-negative float32 values streamed in chunks,
  by a two-level radix select on the float32 bit pattern (65,536-bin histograms of the high
  and then the low 16 bits), so memory does not grow with the number of values;
* :func:`trim_mask` — the TIES trim, per tensor (mergekit: exactly ⌊k·n⌋ entries survive) or
  against a given threshold (the paper's global top-k);
* :func:`elect_sign` and :func:`disjoint_merge` — TIES sign election and disjoint merge;
* :func:`dare_mask` — DARE's seeded Bernoulli keep-mask, reproducible per tensor name.

Work on big tensors is done in chunks of ``CHUNK`` entries so that the temporaries stay small:
peak memory is the inputs, the output and O(models × CHUNK).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Annotated, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from ..errors import MergelabError
from .basic import weighted_task_sum
from .registry import Range, TensorContext, merge_method

CHUNK = 1 << 20
Density = Annotated[list[float], Range(0, 1, lo_open=True)]


# ------------------------------------------------------------------ radix select

def _bucket(counts: Tensor, rank: int) -> tuple[int, int]:
    """Index of the bucket holding the ``rank``-th largest value (1-based), and the rank inside it."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([rank], dtype=from_top.dtype)))
    above = int(from_top[i - 1]) if i > 0 else 0
    return counts.numel() - 1 - i, rank - above


def kth_largest(chunks: Callable[[], Iterable[Tensor]], rank: int) -> float:
    """The ``rank``-th largest (1-based) of the non-negative float32 values yielded by ``chunks()``.

    ``chunks`` is called twice (two streaming passes).  Non-negative IEEE floats order like
    their bit patterns read as integers, so pass 1 histograms the high 16 bits, pass 2 the
    low 16 bits of the values in the selected high bucket; the result is exact.
    """
    hi_counts = torch.zeros(1 << 16, dtype=torch.int64)
    n = 0
    for x in chunks():
        bits = x.detach().reshape(-1).to(torch.float32).view(torch.int32)
        hi_counts += torch.bincount(bits >> 16, minlength=1 << 16)
        n += bits.numel()
    if not 1 <= rank <= n:
        raise ValueError(f"rank {rank} outside 1..{n}")
    hi, rank2 = _bucket(hi_counts, rank)
    lo_counts = torch.zeros(1 << 16, dtype=torch.int64)
    for x in chunks():
        bits = x.detach().reshape(-1).to(torch.float32).view(torch.int32)
        sel = bits[(bits >> 16) == hi]
        if sel.numel():
            lo_counts += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
    lo, _ = _bucket(lo_counts, rank2)
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32))


def _flat_chunks(x: Tensor) -> Iterator[Tensor]:
    flat = x.reshape(-1)
    for s in range(0, flat.numel(), CHUNK):
        yield flat[s:s + CHUNK]


# ------------------------------------------------------------------ trim / elect / disjoint

def trim_mask(tau: Tensor, density: float) -> Tensor:
    """mergekit's per-tensor magnitude trim: a bool mask keeping exactly ``⌊density·n⌋``
    entries of largest ``|τ|``; among equal magnitudes at the threshold the lowest flat
    indices are kept (mergekit's argsort leaves that order unspecified)."""
    n = tau.numel()
    if density >= 1.0:
        return torch.ones_like(tau, dtype=torch.bool)
    k = int(density * n)
    if k == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    a = tau.abs()
    t = kth_largest(lambda: (a,), k)
    mask = a > t
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero((a == t).reshape(-1)).squeeze(1)[:need]
        mask.view(-1)[ties] = True
    return mask


def global_rank(n_total: int, density: float) -> int | None:
    """The rank (1-based, from the top) of the paper's global threshold, or None to keep all.

    The TIES reference keeps ``|τ| ≥ kthvalue(|τ|, n − ⌊n·k⌋)`` (k-th smallest), i.e. the
    ``(⌊n·k⌋ + 1)``-th largest magnitude of the whole flattened model, ties included."""
    keep = int(n_total * density)
    if keep >= n_total:
        return None
    return keep + 1


def elect_sign(weighted: Sequence[Tensor], majority: str = "mass", zero_sign: float = 1.0) -> Tensor:
    """TIES sign election over the (weighted, trimmed) task vectors of one chunk.

    ``mass``: γ = sign(Σ_t τ_t); ``frequency``: γ = sign(Σ_t sign τ_t).  Entries whose sum is
    exactly 0 take ``zero_sign`` (+1 in mergekit; the paper uses the sign of the whole
    model's sum of elected signs, 0 leaves them unmerged)."""
    if majority == "mass":
        s = torch.stack(list(weighted)).sum(0) if len(weighted) > 1 else weighted[0].clone()
    elif majority == "frequency":
        s = torch.zeros_like(weighted[0])
        for x in weighted:
            s += torch.sign(x)
    else:
        raise MergelabError(f"majority must be 'mass' or 'frequency', found {majority!r}")
    gamma = torch.sign(s)
    gamma[gamma == 0] = zero_sign
    return gamma


def disjoint_merge(weighted: Sequence[Tensor], weights: Sequence[float], gamma: Tensor,
                   normalize: bool) -> Tensor:
    """Sum of the non-zero weighted entries whose sign equals γ; with ``normalize`` divided by
    the sum of the weights of those entries (1 where none agree), i.e. the disjoint mean."""
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma) if normalize else None
    for w, x in zip(weights, weighted):
        keep = (x * gamma) > 0  # non-zero and of the elected sign
        num += x * keep
        if den is not None:
            den.add_(keep, alpha=w)
    if den is not None:
        den[den == 0] = 1.0
        num /= den
    return num


# ------------------------------------------------------------------ DARE mask

def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit generator seed from the recipe seed, the tensor name and the model index
    (blake2b, stable across processes and platforms, unlike Python's ``hash``)."""
    h = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{int(index)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def dare_keep(shape_numel: int, density: float, seed: int) -> Iterator[Tensor]:
    """Chunks (of ``CHUNK`` entries, flat order) of DARE's Bernoulli(density) keep-mask."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    for s in range(0, shape_numel, CHUNK):
        yield torch.rand(min(CHUNK, shape_numel - s), generator=g) < density


# ------------------------------------------------------------------ the shared core

def _resolve_normalize(normalize: bool, merge: str) -> bool:
    return {"auto": normalize, "mean": True, "sum": False}[merge]


def sparse_task_merge(tensors: list[Tensor], base: Tensor, *, weight: list[float], density: list[float],
                      sparsify: str, consensus: bool, normalize: bool, majority: str = "mass",
                      rescale: bool = True, thresholds: Sequence[float] | None = None,
                      zero_sign: float = 1.0, name: str = "", seed: int = 0) -> Tensor:
    """The merged task vector ``τ_m`` of the generalized task-arithmetic family.

    ``sparsify``: ``"magnitude"`` (TIES trim; per tensor unless ``thresholds`` gives each
    model's global magnitude threshold), ``"random"`` (DARE) or ``"none"``.  Then the
    trimmed deltas are multiplied by their weights; with ``consensus`` the signs are elected
    and only agreeing entries are merged (:func:`disjoint_merge`), otherwise all are summed
    (divided by Σw when ``normalize``, as in mergekit).
    """
    n_models = len(tensors)
    numel = base.numel()
    masks: list[Tensor | None] = [None] * n_models
    if sparsify == "magnitude" and thresholds is None:
        for i, t in enumerate(tensors):
            if density[i] < 1.0:
                masks[i] = trim_mask(t - base, density[i]).reshape(-1)
    keep_iters: list[Iterator[Tensor] | None] = [None] * n_models
    if sparsify == "random":
        for i in range(n_models):
            if density[i] < 1.0:
                keep_iters[i] = dare_keep(numel, density[i], tensor_seed(seed, name, i))

    out = torch.empty(numel, dtype=torch.float32)
    flat_base = base.reshape(-1)
    flat = [t.reshape(-1) for t in tensors]
    total = math.fsum(weight)
    for s in range(0, numel, CHUNK):
        e = min(s + CHUNK, numel)
        b = flat_base[s:e]
        weighted = []
        for i in range(n_models):
            tau = flat[i][s:e] - b  # a fresh temporary: masked and scaled in place
            if masks[i] is not None:
                tau.masked_fill_(~masks[i][s:e], 0.0)
            elif thresholds is not None and thresholds[i] is not None:
                tau.masked_fill_(tau.abs() < thresholds[i], 0.0)
            elif keep_iters[i] is not None:
                tau.masked_fill_(~next(keep_iters[i]), 0.0)
                if rescale:
                    tau.div_(density[i])
            if weight[i] != 1.0:
                tau.mul_(weight[i])
            weighted.append(tau)
        if consensus:
            gamma = elect_sign(weighted, majority, zero_sign)
            out[s:e] = disjoint_merge(weighted, weight, gamma, normalize)
        else:
            acc = weighted[0].clone()
            for x in weighted[1:]:
                acc += x
            if normalize and abs(total) >= 1e-8 and total != 1.0:
                acc /= total
            out[s:e] = acc
    return out.reshape(base.shape)


def _finish(base: Tensor, tau: Tensor, lam: float) -> Tensor:
    if lam == 0.0:
        return base.clone()
    if lam != 1.0:
        tau = tau * lam
    return base + tau


# ------------------------------------------------------------------ TIES

def _stream_passes(stream):
    """A zero-argument callable that restarts ``stream`` (engine streams are re-iterable).
    A one-shot iterator is materialised once (memory grows with the model; warned)."""
    if iter(stream) is stream:
        warnings.warn("prepass got a one-shot iterator; holding every tensor in memory for the"
                      " extra passes (give a re-iterable stream to keep memory bounded)")
        items = list(stream)
        return lambda: iter(items)
    return lambda: iter(stream)


def global_ties_prepass(params: dict, stream) -> dict | None:
    """Prepass for ``scope: global`` (the TIES paper's top-k over the whole flattened model).

    Streams the model three times with bounded memory: two passes of radix select give each
    model's exact magnitude threshold (:func:`global_rank`), a third sums the elected signs
    over the whole model, whose sign resolves entries whose delta sum is exactly 0 (the
    reference ``resolve_zero_signs``).  Returns ``{"thresholds": [...], "zero_sign": ±1|0}``.
    For ``scope: per_tensor`` it returns None without reading anything.
    """
    if params.get("scope", "per_tensor") != "global":
        return None
    passes = _stream_passes(stream)
    density = params["density"]
    n_models = len(density)
    n_total = None
    thresholds: list[float | None] = []
    for i in range(n_models):
        if n_total is None:
            n_total = sum(base.numel() for _ctx, base, _ts in passes())
        rank = global_rank(n_total, density[i])
        if rank is None:
            thresholds.append(None)
            continue

        def chunks(i=i):
            for _ctx, base, ts in passes():
                d = ts[i] - base
                yield from (c.abs() for c in _flat_chunks(d))

        thresholds.append(kth_largest(chunks, rank))
    weight = params.get("weight", [1.0] * n_models)
    majority = params.get("majority", "mass")
    sign_sum = 0.0
    for _ctx, base, ts in passes():
        for s in range(0, base.numel(), CHUNK):
            b = base.reshape(-1)[s:s + CHUNK]
            weighted = []
            for i, t in enumerate(ts):
                tau = t.reshape(-1)[s:s + CHUNK] - b
                if thresholds[i] is not None:
                    tau = torch.where(tau.abs() >= thresholds[i], tau, 0.0)
                weighted.append(tau * weight[i])
            sign_sum += float(elect_sign(weighted, majority, zero_sign=0.0).sum(dtype=torch.float64))
    zero_sign = 1.0 if sign_sum > 0 else -1.0 if sign_sum < 0 else 0.0
    return {"thresholds": thresholds, "zero_sign": zero_sign}


def _global_state(ctx: TensorContext, method: str) -> dict:
    if not isinstance(ctx.prepass, dict) or "thresholds" not in ctx.prepass:
        raise MergelabError(f"{ctx.name}: method '{method}' with scope: global needs its prepass"
                            " (the engine runs it; call the prepass yourself when calling the function directly)")
    return ctx.prepass


@merge_method("ties", needs_base=True, prepass=global_ties_prepass)
def ties(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
         weight: list[float] = 1.0, density: Density = 1.0, lambda_: float = 1.0,
         normalize: bool = True, majority: Literal["mass", "frequency"] = "mass",
         scope: Literal["per_tensor", "global"] = "per_tensor",
         merge: Literal["auto", "mean", "sum"] = "auto", int8_mask: bool = False) -> Tensor:
    """TIES-merging: trim each task vector to its top-``density`` magnitudes, elect a sign per
    entry, merge the agreeing entries, ``θ_0 + λ·τ_m``.

    ``scope: per_tensor`` (mergekit): ⌊density·n⌋ entries kept per tensor; a zero sign sum
    elects +.  ``scope: global`` (paper): one threshold per model over the whole model from
    the prepass, ties kept; a zero sign sum takes the whole model's majority sign.
    ``merge``: ``mean`` (dis-mean: divided by the weights of the agreeing entries), ``sum``
    (dis-sum), ``auto`` follows ``normalize`` (mergekit's key).
    """
    thresholds, zero_sign = None, 1.0
    if scope == "global":
        st = _global_state(ctx, "ties")
        thresholds, zero_sign = st["thresholds"], st["zero_sign"]
    tau = sparse_task_merge(tensors, base, weight=weight, density=density, sparsify="magnitude",
                            consensus=True, normalize=_resolve_normalize(normalize, merge),
                            majority=majority, thresholds=thresholds, zero_sign=zero_sign)
    return _finish(base, tau, lambda_)


# ------------------------------------------------------------------ DARE

@merge_method("dare_linear", needs_base=True)
def dare_linear(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
                weight: list[float] = 1.0, density: Density = 1.0, lambda_: float = 1.0,
                rescale: bool = True, normalize: bool = False, int8_mask: bool = False) -> Tensor:
    """DARE then task arithmetic: each delta entry is kept with probability ``density``
    (drop rate p = 1 − density) and, with ``rescale``, divided by ``density``; then
    ``θ_0 + λ Σ w_i τ̃_i`` (÷ Σw with ``normalize``).  The mask is seeded by the recipe seed,
    the tensor name and the model index: same inputs, same bytes."""
    tau = sparse_task_merge(tensors, base, weight=weight, density=density, sparsify="random",
                            consensus=False, normalize=normalize, rescale=rescale,
                            name=ctx.name, seed=ctx.seed)
    return _finish(base, tau, lambda_)


@merge_method("dare_ties", needs_base=True)
def dare_ties(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
              weight: list[float] = 1.0, density: Density = 1.0, lambda_: float = 1.0,
              rescale: bool = True, normalize: bool = False,
              majority: Literal["mass", "frequency"] = "mass", int8_mask: bool = False) -> Tensor:
    """DARE then TIES sign election and disjoint merge (mergekit's ``dare_ties``: normalize
    defaults to false, a zero sign sum elects +)."""
    tau = sparse_task_merge(tensors, base, weight=weight, density=density, sparsify="random",
                            consensus=True, normalize=normalize, rescale=rescale, majority=majority,
                            name=ctx.name, seed=ctx.seed)
    return _finish(base, tau, lambda_)


# ------------------------------------------------------------------ TALL masks and consensus

def multitask_vector(tensors: list[Tensor], base: Tensor, base_merge: str, density: list[float],
                     merge: str, ctx: TensorContext) -> Tensor:
    """τ_MTL: the unscaled task-arithmetic sum Σ τ_t, or TIES (dis-``merge``, per tensor or,
    when the prepass ran, global scope)."""
    n = len(tensors)
    if base_merge == "task_arithmetic":
        return weighted_task_sum(tensors, base, [1.0] * n, normalize=False)
    thresholds, zero_sign = None, 1.0
    if isinstance(ctx.prepass, dict) and "thresholds" in ctx.prepass:
        thresholds, zero_sign = ctx.prepass["thresholds"], ctx.prepass["zero_sign"]
    return sparse_task_merge(tensors, base, weight=[1.0] * n, density=density, sparsify="magnitude",
                             consensus=True, normalize=(merge == "mean"), thresholds=thresholds,
                             zero_sign=zero_sign)


def tall_mask(tau_t: Tensor, tau_mtl: Tensor, lam: float) -> Tensor:
    """TALL mask of one task: ``|τ_t| ≥ λ_t·|τ_MTL − τ_t|`` (tact-merge's ≥)."""
    return tau_t.abs() >= lam * (tau_mtl - tau_t).abs()


def _tall_prepass(params: dict, stream):
    if params.get("base_merge") == "ties":
        return global_ties_prepass(params, stream)
    return None


def _variant_names(ctx: TensorContext, n: int) -> list[str]:
    # the last path component of each model name (the engine writes one folder per variant)
    names = [str(x).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] for x in ctx.model_names]
    if len(names) != n or len(set(names)) != n or not all(names):
        names = [str(i) for i in range(n)]
    return names


@merge_method("tall_masks", needs_base=True, multi_output=True, prepass=_tall_prepass)
def tall_masks(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
               lambda_: list[float] = 1.0,
               base_merge: Literal["task_arithmetic", "ties"] = "task_arithmetic",
               density: Density = 1.0, merge: Literal["sum", "mean"] = "sum",
               scope: Literal["per_tensor", "global"] = "per_tensor",
               output: Literal["models", "masks"] = "models") -> dict[str, Tensor]:
    """TALL masks: τ_MTL from ``base_merge``; per task t the mask
    ``m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t|``; ``output: models`` gives one model per task,
    ``θ_0 + m_t ⊙ τ_MTL``; ``output: masks`` the boolean masks.  Variants are named after the
    models (``ctx.model_names``) or their indices."""
    tau_mtl = multitask_vector(tensors, base, base_merge, density, merge, ctx)
    out = {}
    for name, lam, t in zip(_variant_names(ctx, len(tensors)), lambda_, tensors):
        m = tall_mask(t - base, tau_mtl, lam)
        out[name] = m if output == "masks" else base + torch.where(m, tau_mtl, 0.0)
    return out


@merge_method("consensus", needs_base=True, prepass=_tall_prepass)
def consensus(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
              k: Annotated[int, Range(0, None)] = 2, alpha: float = 1.0,
              lambda_: list[float] = 1.0,
              base_merge: Literal["task_arithmetic", "ties"] = "task_arithmetic",
              density: Density = 1.0, merge: Literal["sum", "mean"] = "sum",
              scope: Literal["per_tensor", "global"] = "per_tensor") -> Tensor:
    """Consensus merging: count the TALL masks ``c = Σ_t m_t`` and keep the entries active in
    at least ``k`` tasks: ``θ_0 + α·1{c ≥ k} ⊙ τ_MTL``."""
    tau_mtl = multitask_vector(tensors, base, base_merge, density, merge, ctx)
    count = torch.zeros_like(base, dtype=torch.int32)
    for lam, t in zip(lambda_, tensors):
        count += tall_mask(t - base, tau_mtl, lam)
    return _finish(base, torch.where(count >= k, tau_mtl, 0.0), alpha)
