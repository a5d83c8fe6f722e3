"""Sparsified task-vector merges of mergekit's generalized family: ``breadcrumbs``,
``breadcrumbs_ties``, ``della`` and ``della_linear``.

Each model's task vector ``τ_i = θ_i − θ_0`` is sparsified, multiplied by its weight, then
either summed (``*_linear`` / ``breadcrumbs``; divided by ``Σ w`` with ``normalize``) or
merged by TIES sign consensus (``*_ties`` / ``della``: the elected sign of ``Σ w_i τ_i``,
+ where the sum is 0; only entries of that sign are summed, divided with ``normalize`` by
the weights of the agreeing entries), and ``θ_0 + λ·τ_m`` is returned.

* Breadcrumbs (Davari & Belilovsky 2023): per tensor, drop the ``⌊γ·n⌋`` largest and the
  smallest magnitudes so that ``⌊density·n⌋`` entries survive (when ``γ`` leaves too few,
  fewer of the largest are dropped).  Deterministic: entries are ranked by |τ| and, among
  equal magnitudes, the lower flat index ranks higher.  With ``rescale`` the kept entries are
  scaled so the L1 norm of the task vector is unchanged.  Streamed: a tensor prepass finds the
  two cuts by radix select over the row blocks (exact, as TIES does) and the L1 sums
  (per-row float64 sums added with ``fsum``), so the bytes do not depend on the block size.
* DELLA (Deep et al. 2024, MagPrune): per row (the whole tensor for a vector), each entry is
  kept with probability ``p = density − ε + 2ε·r`` where ``r`` ∈ [0, 1] is its magnitude rank
  in the row (0 for the smallest); with ``rescale`` the kept entries are scaled so that the
  task vector keeps its L1 norm, ``‖τ‖₁ / ‖m ⊙ τ‖₁`` over the whole tensor (mergekit 0.1.5's
  ``rescaled_masked_tensor``; the paper divides each kept entry by its ``p`` instead, which
  gives a 3–6 % smaller spread of the merged delta than mergekit's).  The draws come from CPU generators
  seeded with (recipe seed, tensor name, model index) (:func:`sparse.tensor_seed`) and the
  entry's 2^16-entry chunk (:func:`uniforms`), then moved to the tensor's device: the same
  recipe gives the same bytes on CPU and GPU and for any block size.  Streamed: the ranks
  of a matrix's rows lie inside a row block; for a vector a tensor prepass ranks the whole;
  the L1 factor comes from a tensor prepass that draws the masks (the same draws) and sums
  ``|τ|`` and ``|m ⊙ τ|`` per row in float64, added with ``fsum``.

"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from ..errors import MergelabError
from .registry import Range, TensorContext, merge_method
from .sparse import (CHUNK, UNIFORM_CACHE, Density, Trim, chunk_draws, disjoint_merge, elect_sign,
                     kth_largest_many, tensor_seed, trim_keep, uniforms)

Frac = Annotated[list[float], Range(0, 1)]


def combine(taus: list[Tensor], weight: list[float], consensus: bool, normalize: bool) -> Tensor:
    """mergekit's generalized task-arithmetic combination of (already sparsified) task vectors."""
    weighted = [t * w if w != 1.0 else t for t, w in zip(taus, weight)]
    if consensus:
        gamma = elect_sign(weighted, "mass", zero_sign=1.0)
        return disjoint_merge(weighted, weight, gamma, normalize)
    acc = weighted[0].clone()
    for x in weighted[1:]:
        acc += x
    total = math.fsum(weight)
    if normalize and abs(total) >= 1e-8:
        acc /= total
    return acc


def _finish(base: Tensor, tau: Tensor, lam: float) -> Tensor:
    if lam != 1.0:
        tau = tau * lam
    return base + tau


# ------------------------------------------------------------------ breadcrumbs

def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(smallest dropped, largest dropped) of a tensor of ``n`` entries: ``⌊density·n⌋`` kept,
    ``⌊γ·n⌋`` of the largest dropped unless that leaves fewer than ``⌊density·n⌋``."""
    keep = int(density * n)
    top = int(gamma * n)
    bot = n - keep - top
    if bot < 0:
        top += bot
        bot = 0
    return bot, top


@dataclass
class CrumbState:
    """One model's breadcrumbs band over a tensor: keep the ``hi`` largest (a Trim, None = all)
    minus the ``lo`` largest (None = none); ``scale`` the L1 rescale factor (1 without)."""

    hi: Trim | None
    lo: Trim | None
    scale: float = 1.0


def _rows_abs_sum(x: Tensor) -> list[float]:
    r = x.reshape(x.shape[0], -1) if x.dim() >= 1 else x.reshape(1, 1)
    return r.double().abs().sum(dim=1).tolist()


def breadcrumbs_prepass(params: dict, blocks) -> list[CrumbState | None]:
    """Each model's band (exact: radix select over the blocks' |τ|, two ranks per model) and,
    with ``rescale``, its L1 factor (per-row float64 sums added with ``fsum``), from a
    restartable stream of the tensor's row blocks; the result does not depend on the cut."""
    density, gamma = params["density"], params["gamma"]
    m = len(density)
    numel = []

    def taus():
        for ctx, base, ts in blocks():
            if not numel:
                numel.append(ctx.numel if ctx.numel is not None else base.numel())
            yield [t - base for t in ts]

    first = next(iter(taus()), None)
    if first is None:
        return [None] * m
    n = numel[0]
    ranks: list[int | None] = []
    none_kept: set[int] = set()
    for i in range(m):
        if density[i] >= 1.0 or n == 0:
            ranks += [None, None]
            continue
        bot, top = breadcrumbs_counts(n, density[i], gamma[i])
        # bot == n: ⌊density·n⌋ = 0 entries kept (a tiny tensor): rank 0, no select (below)
        ranks += [n - bot if 0 < bot < n else None, top if top > 0 else None]
        if bot == n:
            none_kept.add(i)

    def abs_chunks():
        for ts in taus():
            flat = [t.reshape(-1) for t in ts]
            for a in range(0, flat[0].numel(), CHUNK):
                cs = [f[a:a + CHUNK].abs().cpu() for f in flat]
                yield [cs[j // 2] if ranks[j] is not None else None for j in range(2 * m)]

    states: list[CrumbState | None] = []
    if params.get("tie_break", "index") == "argsort":
        # mergekit 0.1.5's own band: positions n_bot .. n_bot + keep − 1 of torch.sort(|τ|) (not
        # stable: its order among equal magnitudes is that of the torch build); the whole
        # tensor's |τ| and indices in memory
        for i in range(m):
            if density[i] >= 1.0:
                states.append(None)
                continue
            a = torch.cat([ts[i].reshape(-1).abs().float() for ts in taus()])
            bot, _top = breadcrumbs_counts(n, density[i], gamma[i])
            mask = torch.zeros(n, dtype=torch.bool, device=a.device)
            mask[torch.sort(a, descending=False).indices[bot:bot + int(density[i] * n)]] = True
            states.append(CrumbState(Trim(mask=mask), None))
    else:
        found = kth_largest_many(abs_chunks, ranks) if any(r is not None for r in ranks) else [None] * (2 * m)
        for i in range(m):
            if density[i] >= 1.0:
                states.append(None)
                continue
            hi, lo = found[2 * i], found[2 * i + 1]
            if i in none_kept:     # keep nothing: no value reaches +inf
                hi_trim = Trim(math.inf, 0)
            else:
                hi_trim = None if hi is None else Trim(hi[0], ranks[2 * i] - hi[1])
            states.append(CrumbState(hi_trim, None if lo is None else Trim(lo[0], ranks[2 * i + 1] - lo[1])))
    if params.get("rescale"):
        probe = [None if st is None else CrumbState(copy.copy(st.hi), copy.copy(st.lo)) for st in states]
        before: list[list[float]] = [[] for _ in range(m)]
        after: list[list[float]] = [[] for _ in range(m)]
        pos = 0
        for ts in taus():
            for i, (tau, st) in enumerate(zip(ts, probe)):
                if st is None:
                    continue
                before[i] += _rows_abs_sum(tau)
                after[i] += _rows_abs_sum(tau * crumbs_keep(tau, st, pos))
            pos += ts[0].numel()
        for i, st in enumerate(states):
            if st is not None:
                b, a = math.fsum(before[i]), math.fsum(after[i])
                st.scale = b / a if b >= 1e-8 and a >= 1e-8 else 1.0
    return states


def crumbs_keep(tau: Tensor, st: CrumbState, start: int) -> Tensor:
    """The keep-mask of a block of τ starting at flat index ``start`` (blocks in flat order)."""
    flat = tau.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=tau.device)
    for a in range(0, flat.numel(), CHUNK):
        c = flat[a:a + CHUNK]
        k = torch.ones(c.numel(), dtype=torch.bool, device=tau.device)
        if st.hi is not None:
            k &= trim_keep(c, st.hi, start + a)
        if st.lo is not None:
            k &= ~trim_keep(c, st.lo, start + a)
        keep[a:a + c.numel()] = k
    return keep.reshape(tau.shape)


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor | None:
    """Keep-mask (bool, same shape) of breadcrumbs' magnitude band of a whole tensor; None keeps
    everything.  Order: |τ| descending, then flat index ascending."""
    (st,) = breadcrumbs_prepass({"density": [density], "gamma": [gamma]},
                                lambda: iter([(TensorContext(), torch.zeros_like(tau), [tau])]))
    return None if st is None else crumbs_keep(tau, st, 0)


def _breadcrumbs(ctx, tensors, base, weight, density, gamma, lambda_, normalize, rescale, consensus,
                 tie_break="index"):
    states = ctx.tensor_state
    if states is None:
        states = breadcrumbs_prepass({"density": density, "gamma": gamma, "rescale": rescale, "tie_break": tie_break},
                                     lambda: iter([(TensorContext(), base, tensors)]))
    taus = []
    for t, st in zip(tensors, states):
        tau = t - base
        if st is not None:
            tau.mul_(crumbs_keep(tau, st, ctx.offset if ctx.tensor_state is not None else 0))
            if st.scale != 1.0:
                tau.mul_(st.scale)
        taus.append(tau)
    return _finish(base, combine(taus, weight, consensus, normalize), lambda_)


@merge_method("breadcrumbs", needs_base=True, elementwise=True, tensor_prepass=breadcrumbs_prepass)
def breadcrumbs(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext, weight: list[float] = 1.0,
                density: Density = 1.0, gamma: Frac = 0.01, lambda_: float = 1.0,
                normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                tie_break: Literal["index", "argsort"] = "index") -> Tensor:
    """Model Breadcrumbs: each task vector keeps the band of magnitudes between its smallest
    ``1 − density − γ`` and its largest ``γ`` fractions, then task arithmetic.  ``tie_break``:
    which of equal magnitudes at a cut survive: ``index`` (lower flat index first, streamed) or
    ``argsort`` (mergekit's own ``torch.sort`` order; the whole tensor in memory)."""
    return _breadcrumbs(ctx, tensors, base, weight, density, gamma, lambda_, normalize, rescale, False, tie_break)


@merge_method("breadcrumbs_ties", needs_base=True, elementwise=True, tensor_prepass=breadcrumbs_prepass)
def breadcrumbs_ties(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext, weight: list[float] = 1.0,
                     density: Density = 1.0, gamma: Frac = 0.01, lambda_: float = 1.0,
                     normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                     tie_break: Literal["index", "argsort"] = "index") -> Tensor:
    """Model Breadcrumbs' sparsification, then TIES sign consensus (``tie_break``: see
    :func:`breadcrumbs`)."""
    return _breadcrumbs(ctx, tensors, base, weight, density, gamma, lambda_, normalize, rescale, True, tie_break)


# ------------------------------------------------------------------ DELLA

def _row_ranks(a: Tensor) -> Tensor:
    """The rank (0 = smallest, ties by index) of every entry of ``a`` (≥ 0, float32) within its
    row (the last dimension), as float32.  On the CPU: one sort of unique int64 keys
    ``bits(a) << b | index`` in NumPy (its vectorised sort) and a float32 scatter of the ranks,
    several times faster than torch's stable sort + int64 scatter (benchmarks/method_kernels.py);
    elsewhere torch's stable sort.  Same ranks either way (tested)."""
    m = a.shape[-1]
    if a.device.type == "cpu" and 1 < m <= 1 << 24 and a.numel():
        import numpy as np

        b = (m - 1).bit_length()  # abs bits < 2^31: keys < 2^(31 + b), unique
        keys = (a.contiguous().numpy().view(np.int32).astype(np.int64) << b) | np.arange(m, dtype=np.int64)
        keys.sort(axis=-1)
        order = torch.from_numpy(keys & ((1 << b) - 1))
    else:
        order = torch.sort(a, dim=-1, stable=True).indices
    ar = torch.arange(m, device=a.device, dtype=torch.int64 if m > 1 << 24 else torch.float32)
    return torch.empty(order.shape, dtype=ar.dtype, device=a.device).scatter_(-1, order, ar.expand_as(order)).float()


def della_probs(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """Keep probabilities of MagPrune: per row, ``density − ε + 2ε·(rank − 1)/(m − 1)``, the rank
    (1 = smallest |τ|, ties by index) among the row's ``m`` entries; a vector is one row."""
    x = tau.reshape(1, -1) if tau.dim() < 2 else tau.movedim(1, -1)  # rows: dim 1 of a matrix or more
    m = x.shape[-1]
    r = _row_ranks(x.abs()) / (m - 1) if m > 1 else torch.zeros_like(x)
    p = (density - epsilon) + r * (2 * epsilon)
    return p.reshape(tau.shape) if tau.dim() < 2 else p.movedim(-1, 1)


def della_keep(tau: Tensor, density: float, epsilon: float, seed: int, start: int = 0,
               probs: Tensor | None = None, total: int | None = None) -> Tensor:
    """MagPrune's keep-mask of one task vector (or a row block of it, flat index ``start``);
    ``seed`` fixes the draws; ``probs``: the keep probabilities when they are not computed from
    ``tau`` itself (a block of a vector); ``total``: the whole tensor's number of entries, when
    ``tau`` is a row block (its chunks' draws are then shared between blocks: the same values,
    drawn once; see :func:`~mergelab.methods.sparse.chunk_draws`)."""
    p = della_probs(tau, density, epsilon) if probs is None else probs
    stop = start + tau.numel()
    if total is None or (start == 0 and stop == total):
        u = uniforms(start, stop, seed)
    else:
        u = chunk_draws(start, stop, total, seed, UNIFORM_CACHE, (), lambda lo, hi: uniforms(lo, hi, seed),
                        torch.float32)
    return u.to(tau.device).reshape(tau.shape) < p


def della_sparsify(tau: Tensor, density: float, epsilon: float, rescale: bool, seed: int,
                   start: int = 0, probs: Tensor | None = None, scale: float | None = None,
                   total: int | None = None) -> Tensor:
    """One task vector (or a row block of it) through MagPrune (see the module doc and
    :func:`della_keep`).  With ``rescale`` the kept entries are multiplied by ``scale``, the
    tensor's L1 factor ``‖τ‖₁ / ‖m ⊙ τ‖₁`` (computed here when None: ``tau`` is the whole tensor)."""
    if density >= 1.0:
        return tau
    out = tau * della_keep(tau, density, epsilon, seed, start, probs, total)
    if rescale:
        if scale is None:
            scale = _l1_factor([_rows_abs_sum(tau)], [_rows_abs_sum(out)])
        if scale != 1.0:
            out.mul_(scale)
    return out


def _l1_factor(before: list[list[float]], after: list[list[float]]) -> float:
    """mergekit's L1 rescale factor ``‖τ‖₁ / ‖m ⊙ τ‖₁`` (1 when either is below 1e-7)."""
    b, a = math.fsum(x for r in before for x in r), math.fsum(x for r in after for x in r)
    return b / a if b >= 1e-7 and a >= 1e-7 else 1.0


def della_prepass(params: dict, blocks) -> dict | None:
    """Per model, from a restartable stream of the tensor's row blocks (in flat order):
    ``probs``, a vector's keep probabilities over the whole vector (its one row spans every
    block; None for matrices, whose rows each lie in one block), and, with ``rescale``,
    ``scale``, the L1 factor of the whole tensor (the masks drawn as in the merge itself)."""
    density, epsilon = params["density"], params["epsilon"]
    parts: list[list[Tensor]] | None = None
    vector = False
    for _ctx, base, ts in blocks():
        if base.dim() != 1:
            break
        vector = True
        if parts is None:
            parts = [[] for _ in ts]
        for i, t in enumerate(ts):
            parts[i].append(t - base)
    probs = None
    if vector and parts is not None:
        probs = [None if d >= 1.0 else della_probs(torch.cat(p), d, e) for p, d, e in zip(parts, density, epsilon)]
    scale = None
    if params.get("rescale", True) and any(d < 1.0 for d in density):
        before: list[list[list[float]]] = [[] for _ in density]
        after: list[list[list[float]]] = [[] for _ in density]
        pos = 0
        for ctx, base, ts in blocks():
            for i, (t, d, e) in enumerate(zip(ts, density, epsilon)):
                if d >= 1.0:
                    continue
                tau = t - base
                p = None if probs is None else probs[i][pos:pos + tau.numel()]
                keep = della_keep(tau, d, e, tensor_seed(ctx.seed, ctx.name, i), pos, p, ctx.numel)
                before[i].append(_rows_abs_sum(tau))
                after[i].append(_rows_abs_sum(tau * keep))
            pos += base.numel()
        scale = [None if d >= 1.0 else _l1_factor(b, a) for b, a, d in zip(before, after, density)]
    return {"probs": probs, "scale": scale}


def _della(ctx, tensors, base, weight, density, epsilon, lambda_, normalize, rescale, consensus):
    taus = []
    state = ctx.tensor_state
    if state is None and rescale and ctx.offset == 0 and (ctx.numel is None or ctx.numel == base.numel()):
        # the whole tensor in one call: the same factor as the engine's prepass gives
        state = della_prepass({"density": density, "epsilon": epsilon, "rescale": True},
                              lambda: iter([(ctx, base, tensors)]))
    probs = None if state is None else state["probs"]
    scales = None if state is None else state["scale"]
    for i, (t, d, e) in enumerate(zip(tensors, density, epsilon)):
        if d < 1.0 and not (d - e > 0 and d + e < 1):
            raise MergelabError(
                f"{ctx.name or 'della'}: models[{i}]: epsilon {e:g} must leave density ± epsilon inside (0, 1)"
                f" (density {d:g})")
        p = None if probs is None or probs[i] is None else probs[i][ctx.offset:ctx.offset + t.numel()]
        taus.append(della_sparsify(t - base, d, e, rescale, tensor_seed(ctx.seed, ctx.name, i),
                                   start=ctx.offset, probs=p, scale=None if scales is None else scales[i],
                                   total=ctx.numel))
    return _finish(base, combine(taus, weight, consensus, normalize), lambda_)


@merge_method("della", needs_base=True, elementwise=True, tensor_prepass=della_prepass)
def della(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext, weight: list[float] = 1.0,
          density: Density = 1.0, epsilon: Annotated[list[float], Range(0, 1)] = 0.15,
          lambda_: float = 1.0, normalize: bool = True, rescale: bool = True,
          int8_mask: bool = False) -> Tensor:
    """DELLA: MagPrune sampling of each task vector (keep probability rising with the entry's
    magnitude rank in its row, from ``density − ε`` to ``density + ε``), rescaled to the task
    vector's L1 norm (mergekit 0.1.5), then TIES sign consensus and ``θ_0 + λ·τ_m``."""
    return _della(ctx, tensors, base, weight, density, epsilon, lambda_, normalize, rescale, True)


@merge_method("della_linear", needs_base=True, elementwise=True, tensor_prepass=della_prepass)
def della_linear(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext, weight: list[float] = 1.0,
                 density: Density = 1.0, epsilon: Annotated[list[float], Range(0, 1)] = 0.15,
                 lambda_: float = 1.0, normalize: bool = False, rescale: bool = True,
                 int8_mask: bool = False) -> Tensor:
    """DELLA's MagPrune sampling, then the weighted sum of the task vectors (no consensus)."""
    return _della(ctx, tensors, base, weight, density, epsilon, lambda_, normalize, rescale, False)
