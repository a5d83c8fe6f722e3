"""Fixed flat chunks of a tensor that arrives whole or in row blocks.

Reductions whose float result depends on how the values are grouped (a float64 dot product per
chunk, the chunks' results added in order) give the same bytes whether a method sees a whole
tensor or the engine's row blocks, when both group the values into the same chunks: entries
``[0, size)``, ``[size, 2·size)``, ... of the whole flattened tensor.  :class:`FlatChunks`
regroups the pieces of one tensor (fed in flat order) into those chunks.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor


class FlatChunks:
    """Regroups the pieces of several same-size tensors, fed in flat order, into the chunks
    ``[k·size, (k+1)·size)`` of the whole flattened tensors (the last one shorter).

    ``add(pieces, last)`` yields every chunk completed by ``pieces`` (one piece per tensor, all
    of the same number of entries), and with ``last`` (the tensor's final piece) the remainder.
    A chunk inside one piece at a multiple of ``size`` is a view of it (what slicing the whole
    tensor gives); any other chunk is assembled in one buffer per tensor, reused from chunk to
    chunk (so a yielded chunk is valid until the next one is asked for), and the pieces are not
    kept: memory is one chunk per tensor."""

    def __init__(self, size: int):
        self.size = size
        self.bufs: list[Tensor] = []
        self.have = 0

    def add(self, pieces: Sequence[Tensor], last: bool) -> Iterator[list[Tensor]]:
        flats = [p.reshape(-1) for p in pieces]
        m = flats[0].numel()
        pos = 0
        while pos < m:
            take = min(self.size - self.have, m - pos)
            if self.have == 0 and take == self.size and pos % self.size == 0:
                yield [f[pos:pos + take] for f in flats]
            else:
                if (len(self.bufs) != len(flats)
                        or any(b.dtype != f.dtype or b.device != f.device for b, f in zip(self.bufs, flats))):
                    self.bufs = [torch.empty(self.size, dtype=f.dtype, device=f.device) for f in flats]
                for b, f in zip(self.bufs, flats):
                    b[self.have:self.have + take] = f[pos:pos + take]
                self.have += take
                if self.have == self.size:
                    yield self._pop()
            pos += take
        if last and self.have:
            yield self._pop()

    def _pop(self) -> list[Tensor]:
        n, self.have = self.have, 0
        return [b[:n] for b in self.bufs]


def is_last(ctx, piece: Tensor) -> bool:
    """Whether ``piece`` (a method's input for ``ctx``) ends its tensor: a whole tensor, or the
    row block that reaches ``ctx.numel``."""
    return ctx.numel is None or ctx.offset + piece.numel() >= ctx.numel
