"""Sparsified task-vector merges of mergekit's generalized family: ``breadcrumbs``,
``breadcrumbs_ties``, ``della`` and ``della_linear``.

Each model's task vector ``τ_i = θ_i − θ_0`` is sparsified, multiplied by its weight, then
either summed (``*_linear`` / ``breadcrumbs``; divided by ``Σ w`` with ``normalize``) or
merged by TIES sign consensus (``*_ties`` / ``della``: the elected sign of ``Σ w_i τ_i``,
+ where the sum is 0; only entries of that sign are summed, divided with ``normalize`` by
the weights of the agreeing entries), and ``θ_0 + λ·τ_m`` is returned.

* Breadcrumbs (Davari & Belilovsky 2023): per tensor, drop the ``⌊γ·n⌋`` largest and the
  smallest magnitudes so that ``⌊density·n⌋`` entries survive (when ``γ`` leaves too few,
  fewer of the largest are dropped).  Deterministic: among equal magnitudes the lower flat
  index ranks lower (a stable sort).  With ``rescale`` the kept entries are scaled so the
  L1 norm of the task vector is unchanged.
* DELLA (Deep et al. 2024, MagPrune): per row (the whole tensor for a vector), each entry is
  kept with probability ``p = density − ε + 2ε·r`` where ``r`` ∈ [0, 1] is its magnitude rank
  in the row (0 for the smallest); with ``rescale`` a kept entry is divided by its ``p``, so
  the sparsified vector equals ``τ`` in expectation.  The draws come from a CPU generator
  seeded with (recipe seed, tensor name, model index) (:func:`sparse.tensor_seed`) and are
  then moved to the tensor's device: the same recipe gives the same bytes on CPU and GPU.

Both are per-tensor (a sort per tensor or per row), so they are merged whole, not in blocks.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from ..errors import MergelabError
from .registry import Range, TensorContext, merge_method
from .sparse import Density, disjoint_merge, elect_sign, tensor_seed

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


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float) -> Tensor | None:
    """Keep-mask (bool, same shape) of breadcrumbs' magnitude band; None keeps everything."""
    if density >= 1.0:
        return None
    n = tau.numel()
    bot, top = breadcrumbs_counts(n, density, gamma)
    order = torch.sort(tau.reshape(-1).abs(), stable=True).indices  # ascending, ties by index
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[bot:n - top]] = True
    return mask.reshape(tau.shape)


def _l1_rescaled(tau: Tensor, mask: Tensor) -> Tensor:
    kept = tau * mask
    before, after = float(tau.abs().sum(dtype=torch.float64)), float(kept.abs().sum(dtype=torch.float64))
    if before >= 1e-8 and after >= 1e-8:
        kept *= before / after
    return kept


def _breadcrumbs(tensors, base, weight, density, gamma, lambda_, normalize, rescale, consensus):
    taus = []
    for t, d, g in zip(tensors, density, gamma):
        tau = t - base
        m = breadcrumbs_mask(tau, d, g)
        if m is not None:
            tau = _l1_rescaled(tau, m) if rescale else tau.mul_(m)
        taus.append(tau)
    return _finish(base, combine(taus, weight, consensus, normalize), lambda_)


@merge_method("breadcrumbs", needs_base=True)
def breadcrumbs(tensors: list[Tensor], base: Tensor, *, weight: list[float] = 1.0,
                density: Density = 1.0, gamma: Frac = 0.01, lambda_: float = 1.0,
                normalize: bool = False, rescale: bool = False, int8_mask: bool = False) -> Tensor:
    """Model Breadcrumbs: each task vector keeps the band of magnitudes between its smallest
    ``1 − density − γ`` and its largest ``γ`` fractions, then task arithmetic."""
    return _breadcrumbs(tensors, base, weight, density, gamma, lambda_, normalize, rescale, False)


@merge_method("breadcrumbs_ties", needs_base=True)
def breadcrumbs_ties(tensors: list[Tensor], base: Tensor, *, weight: list[float] = 1.0,
                     density: Density = 1.0, gamma: Frac = 0.01, lambda_: float = 1.0,
                     normalize: bool = False, rescale: bool = False, int8_mask: bool = False) -> Tensor:
    """Model Breadcrumbs' sparsification, then TIES sign consensus."""
    return _breadcrumbs(tensors, base, weight, density, gamma, lambda_, normalize, rescale, True)


# ------------------------------------------------------------------ DELLA

def della_probs(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """Keep probabilities of MagPrune: per row, ``density − ε + 2ε·(rank − 1)/(m − 1)``, the rank
    (1 = smallest |τ|, ties by index) among the row's ``m`` entries; a vector is one row."""
    x = tau.reshape(1, -1) if tau.dim() < 2 else tau.movedim(1, -1)  # rows: dim 1 of a matrix or more
    m = x.shape[-1]
    order = torch.sort(x.abs(), dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(m, device=tau.device).expand_as(order))
    r = ranks.to(torch.float32) / (m - 1) if m > 1 else torch.zeros_like(x)
    p = (density - epsilon) + r * (2 * epsilon)
    return p.reshape(tau.shape) if tau.dim() < 2 else p.movedim(-1, 1)


def della_sparsify(tau: Tensor, density: float, epsilon: float, rescale: bool, seed: int) -> Tensor:
    """One task vector through MagPrune (see the module doc); ``seed`` fixes the draws."""
    if density >= 1.0:
        return tau
    p = della_probs(tau, density, epsilon)
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.rand(tau.shape, generator=g).to(tau.device)
    keep = u < p
    out = tau * keep
    if rescale:
        out /= p
    return out


def _della(ctx, tensors, base, weight, density, epsilon, lambda_, normalize, rescale, consensus):
    taus = []
    for i, (t, d, e) in enumerate(zip(tensors, density, epsilon)):
        if d < 1.0 and not (d - e > 0 and d + e < 1):
            raise MergelabError(
                f"{ctx.name or 'della'}: models[{i}]: epsilon {e:g} must leave density ± epsilon inside (0, 1)"
                f" (density {d:g})")
        taus.append(della_sparsify(t - base, d, e, rescale, tensor_seed(ctx.seed, ctx.name, i)))
    return _finish(base, combine(taus, weight, consensus, normalize), lambda_)


@merge_method("della", needs_base=True)
def della(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext, weight: list[float] = 1.0,
          density: Density = 1.0, epsilon: Annotated[list[float], Range(0, 1)] = 0.15,
          lambda_: float = 1.0, normalize: bool = True, rescale: bool = True,
          int8_mask: bool = False) -> Tensor:
    """DELLA: MagPrune sampling of each task vector (keep probability rising with the entry's
    magnitude rank in its row, from ``density − ε`` to ``density + ε``), rescaled by
    ``1/p``, then TIES sign consensus and ``θ_0 + λ·τ_m``."""
    return _della(ctx, tensors, base, weight, density, epsilon, lambda_, normalize, rescale, True)


@merge_method("della_linear", needs_base=True)
def della_linear(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext, weight: list[float] = 1.0,
                 density: Density = 1.0, epsilon: Annotated[list[float], Range(0, 1)] = 0.15,
                 lambda_: float = 1.0, normalize: bool = False, rescale: bool = True,
                 int8_mask: bool = False) -> Tensor:
    """DELLA's MagPrune sampling, then the weighted sum of the task vectors (no consensus)."""
    return _della(ctx, tensors, base, weight, density, epsilon, lambda_, normalize, rescale, False)
