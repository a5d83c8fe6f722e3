"""Streaming per-channel mean and standard deviation, accumulated in float64.

An activation tensor is reduced to rows of channels: a conv output ``(N, C, H, W)`` gives
``N*H*W`` rows of ``C``; a token tensor ``(N, T, C)`` gives ``N*T`` rows, or only the rows
whose attention mask is 1.  :class:`Moments` keeps the float64 sums ``Σx``, ``Σx²`` and the
row count, so partial results add up exactly (across batches and across ranks).  The
variance is the population variance ``Σx²/n − mean²``; float64 keeps the cancellation
harmless for activations whose |mean|/std is below ~1e6.  Each batch's sums come from an
exact two-pass (centred) computation in float32 with float64 accumulation
(:func:`centred_sums`), not from a float64 copy of the activations.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import distributed


def masks_tokens(x: Tensor, dim: int, mask: Tensor | None) -> bool:
    """Whether ``mask`` (N, T) selects the tokens of ``x``: an ``(N, T, C)`` tensor, channels last."""
    return (mask is not None and x.ndim == 3 and dim % 3 == 2
            and tuple(mask.shape) == tuple(x.shape[:2]))


def channel_rows(x: Tensor, dim: int, mask: Tensor | None = None) -> Tensor:
    """``(rows, C)`` view of ``x`` with channels on ``dim``; ``mask`` (N, T) selects tokens."""
    dim = dim % x.ndim
    if masks_tokens(x, dim, mask):
        return x[mask.to(torch.bool)]
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def centred_sums(x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact two-pass per-channel sums of ``x`` (channels on ``dim``) without a float64 copy.

    ``x`` is viewed as ``(P, C, L)`` (a free view of a contiguous tensor).  Float32 partial
    sums along the contiguous ``L`` axis (each over at most H·W values), added in float64, give
    ``Σx``; the centred tensor ``y = x − k`` with ``k`` = the float32 mean gives ``Σ(x − k)²``
    by a fused norm.  Returns float64 ``(Σx, Σ(x − k)², k)`` and ``y`` as ``(P, C, L)``, which
    a caller may reuse (the joint TACT pass writes its output from it).  About 3x cheaper
    than converting ``x`` to float64 on conv maps, and as exact: the rounding of ``k`` is
    removed in float64 by the caller's ``var = Σ(x − k)²/n − (Σx/n − k)²``.  Half-precision
    input is computed in float32 (``y`` is then float32)."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    shape, c = x.shape, x.shape[dim]
    v = x.reshape(math.prod(shape[:dim]), c, math.prod(shape[dim + 1:]))
    n = v.shape[0] * v.shape[2]
    if v.shape[2] > 1:
        s = v.sum(2).sum(0, dtype=torch.float64)
    else:
        s = v[:, :, 0].sum(0, dtype=torch.float64)
    k = (s / n).to(x.dtype)
    y = v - k.view(1, c, 1)
    if v.shape[2] > 1:
        ssc = torch.linalg.vector_norm(y, 2, 2).square().sum(0, dtype=torch.float64)
    else:
        ssc = torch.linalg.vector_norm(y[:, :, 0], 2, 0).double().square()
    return s, ssc, k.double(), y


def channel_sums(x: Tensor, dim: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Float64 per-channel ``(Σx, Σx², rows)`` of ``x`` (channels on ``dim``; ``mask`` (N, T)
    selects the tokens of an ``(N, T, C)`` tensor), from :func:`centred_sums`."""
    x = x.detach()
    dim = dim % x.ndim
    if masks_tokens(x, dim, mask):
        x = x[mask.to(torch.bool)]
        dim = 1
    n = x.numel() // max(1, x.shape[dim])
    if not x.is_floating_point() or n == 0:
        x = x.double()
        dims = tuple(d for d in range(x.ndim) if d != dim)
        return x.sum(dims), x.square().sum(dims), n
    s, ssc, k, _ = centred_sums(x, dim)
    return s, ssc + k * (2 * s - n * k), n                # Σx² = Σ(x−k)² + 2kΣx − nk²


class Moments:
    """Float64 running ``Σx``, ``Σx²`` and count per channel."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, rows: Tensor) -> None:
        """Add rows ``(R, C)``."""
        r = rows.detach().to(torch.float64)
        self.add(r.sum(0), (r * r).sum(0), r.shape[0])

    def update_tensor(self, x: Tensor, dim: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """Add an activation tensor (see :func:`channel_sums`); returns the batch's sums."""
        s, ss, n = channel_sums(x, dim, mask)
        self.add(s.clone(), ss.clone(), n)
        return s, ss, n

    def add(self, s: Tensor, ss: Tensor, n: int) -> None:
        if self.sum is None:
            self.sum, self.sumsq = s, ss
        else:
            self.sum += s
            self.sumsq += ss
        self.count += n

    @property
    def mean(self) -> Tensor:
        return self.sum / self.count

    @property
    def var(self) -> Tensor:
        m = self.mean
        return (self.sumsq / self.count - m * m).clamp_min(0)

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()


def reduce_moments(moments: Sequence[Moments], device: torch.device | str = "cpu") -> None:
    """Sum the moments over the ranks of a torchrun pass, in place (no-op on one process).

    A rank that saw no rows at a site (it owned no batch) contributes zeros; a site that no
    rank saw keeps ``sum is None`` on every rank."""
    sums = distributed.reduce_partial([t for m in moments for t in (m.sum, m.sumsq)], device)
    for k, m in enumerate(moments):
        m.sum, m.sumsq = sums[2 * k], sums[2 * k + 1]
    distributed.all_reduce_sum([m.count for m in moments])
