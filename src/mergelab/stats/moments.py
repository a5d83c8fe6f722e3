"""Streaming per-channel mean and standard deviation, accumulated in float64.

An activation tensor is reduced to rows of channels: a conv output ``(N, C, H, W)`` gives
``N*H*W`` rows of ``C``; a token tensor ``(N, T, C)`` gives ``N*T`` rows, or only the rows
whose attention mask is 1.  :class:`Moments` keeps the float64 sums ``Σx``, ``Σx²`` and the
row count, so partial results add up exactly (across batches and across ranks).  The
variance is the population variance ``Σx²/n − mean²``; float64 keeps the cancellation
harmless for activations whose |mean|/std is below ~1e6.
"""
from __future__ import annotations

import torch
from torch import Tensor


def channel_rows(x: Tensor, dim: int, mask: Tensor | None = None) -> Tensor:
    """``(rows, C)`` view of ``x`` with channels on ``dim``; ``mask`` (N, T) selects tokens."""
    dim = dim % x.ndim
    if (mask is not None and x.ndim == 3 and dim == 2 and tuple(mask.shape) == tuple(x.shape[:2])):
        return x[mask.to(torch.bool)]
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def channel_sums(x: Tensor, dim: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Float64 per-channel ``(Σx, Σx², rows)`` of ``x`` (channels on ``dim``), without
    permuting ``x`` into rows first (that copy dominated the cost on conv maps)."""
    x = x.detach()
    dim = dim % x.ndim
    if mask is not None and x.ndim == 3 and dim == 2 and tuple(mask.shape) == tuple(x.shape[:2]):
        x = x[mask.to(torch.bool)]
        dim = 1
    dims = tuple(d for d in range(x.ndim) if d != dim)
    s = x.double().sum(dims)
    ss = x.square().sum(dims, dtype=torch.float64)
    return s, ss, x.numel() // max(1, x.shape[dim])


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

    def tensors(self) -> list[Tensor]:
        """The raw sums, for an all-reduce."""
        return [self.sum, self.sumsq, self.count]
