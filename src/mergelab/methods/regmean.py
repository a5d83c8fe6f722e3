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

import math
from typing import Annotated, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import MergelabError
from .registry import Range, TensorContext, merge_method


def _mean(tensors: Sequence[Tensor]) -> Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out / len(tensors) if len(tensors) > 1 else out


_CHUNK = 1 << 18  # float64 entries of one column block of a Gram (2 MiB)
_ROWS = 1 << 20   # float64 entries of one row block of Σ W_i G̃_i (8 MiB; and of W_i's rows):
                  # each row block re-forms every G̃_i (d_in² element operations against
                  # rows·d_in² multiply-adds: negligible above a few dozen rows).  The bytes do
                  # not depend on it for 256 and 512 rows of 2048 (checked 2026-11-26); very
                  # few rows (tens) can give other last bits (MKL's gemm/trsm take another path)


def _gram_cols(g: Tensor, c0: int, c1: int, alpha: float, count: float | None, buf: Tensor | None = None) -> Tensor:
    """Columns ``c0:c1`` of ``G̃ = α·G + (1 − α)·diag(G)`` in float64 (``G`` divided by ``count``),
    written into ``buf`` (d_in × at least c1 − c0, float64, reused from call to call) when given."""
    c1 = min(c1, g.shape[1])
    if buf is None:
        gt = g[:, c0:c1].to(torch.float64, copy=True)
    else:
        gt = buf[:, :c1 - c0]
        gt.copy_(g[:, c0:c1])
    if count is not None:
        gt.div_(count)
    diag = gt[c0:c1].diagonal().clone()             # G[j, j] for j in c0:c1
    gt.mul_(alpha)                                  # α·G
    gt[c0:c1].diagonal().add_(diag.mul_(1.0 - alpha))  # + (1 − α)·diag(G)
    return gt


def regmean_weight(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 0.9,
                   counts: Sequence[float] | None = None) -> Tensor:
    """``(Σ W_i G̃_i)(Σ G̃_i)⁻¹`` for 2-D ``W_i`` (d_out × d_in), in float64, returned as float32.

    ``counts`` (optional) divides each ``G_i`` by its row count first (``normalize_gram``).

    Memory: one float64 d_in × d_in matrix (``Σ G̃_i``, LU-factorised in place) and the float32
    result, plus blocks of about ``_CHUNK`` float64 entries: ``G̃_i`` is formed column block by
    column block, and ``Σ W_i G̃_i`` row block by row block, each block solved in place and
    written into the result.  Every entry is computed by the same float64 operations in the
    same order as forming each ``G̃_i`` and ``Σ W_i G̃_i`` whole and calling
    ``torch.linalg.solve`` (the right-hand sides of a triangular solve are independent)."""
    d_out, d_in = weights[0].shape
    dev = weights[0].device
    f64 = torch.float64
    cnt = [None] * len(grams) if counts is None else [float(c) for c in counts]
    cols = max(1, _CHUNK // max(d_in, 1))
    # column-major (the layout LAPACK factorises in), so the LU below runs in place, no copy
    lhs = torch.zeros(d_in, d_in, dtype=f64, device=dev).mT
    gbuf = torch.empty(d_in, min(cols, d_in), dtype=f64, device=dev)  # one column block of a G̃_i, reused
    for g, c in zip(grams, cnt):
        g = g.to(dev)
        for c0 in range(0, d_in, cols):
            lhs[:, c0:c0 + cols] += _gram_cols(g, c0, c0 + cols, alpha, c, gbuf)
    active = lhs.diagonal() != 0
    out = torch.empty(d_out, d_in, dtype=torch.float32, device=dev)
    every = bool(active.all())
    if not every:
        # columns of features no model sees: the plain average (float64 sum, then / N)
        dead = (~active).nonzero().squeeze(1)
        acc = weights[0][:, dead].to(f64)
        for w in weights[1:]:
            acc += w[:, dead].to(f64)
        out[:, dead] = (acc / len(weights)).to(torch.float32)
        del acc
    if not bool(active.any()):
        return out
    idx = None if every else active.nonzero().squeeze(1)
    a = lhs if every else lhs[idx][:, idx]
    del lhs
    # W* a = b  <=>  a W*ᵀ = bᵀ (a symmetric): LU of a in place, then each row block of b
    # solved in place in its transpose (a column-major view), as torch.linalg.solve(a, bᵀ) does.
    piv = torch.empty(a.shape[0], dtype=torch.int32, device=dev)
    info = torch.empty((), dtype=torch.int32, device=dev)
    torch.linalg.lu_factor_ex(a, out=(a, piv, info))
    if int(info) > 0:
        raise torch.linalg.LinAlgError("linalg.solve: The solver failed because the input matrix is"
                                       f" singular (U[{int(info)},{int(info)}] is zero)")
    gs = [g.to(dev) for g in grams]
    rows = min(d_out, max(1, _ROWS // max(d_in, 1)))
    # the row-block buffers are allocated once and reused (a fresh pair per block kept the
    # previous pair alive during the allocation, and the C heap grew block after block)
    bbuf = torch.empty(rows, d_in, dtype=f64, device=dev)
    wbuf = torch.empty(rows, d_in, dtype=f64, device=dev)
    pbuf = torch.empty(rows, min(cols, d_in), dtype=f64, device=dev)
    for r0 in range(0, d_out, rows):
        r1 = min(d_out, r0 + rows)
        b = bbuf[:r1 - r0]
        b.zero_()
        for w, g, c in zip(weights, gs, cnt):
            wr = wbuf[:r1 - r0]
            wr.copy_(w[r0:r1])
            for c0 in range(0, d_in, cols):
                gc = _gram_cols(g, c0, c0 + cols, alpha, c, gbuf)
                prod = pbuf[:r1 - r0, :gc.shape[1]]
                torch.mm(wr, gc, out=prod)
                b[:, c0:c0 + cols] += prod
        if not every:
            b = b[:, idx]
        bt = b.T
        torch.linalg.lu_solve(a, piv, bt, out=bt)
        if every:
            out[r0:r1] = b
        else:
            out[r0:r1, idx] = b.to(torch.float32)
    return out


def _grams_of(ctx: TensorContext, n: int, shape: torch.Size) -> list[Tensor] | None:
    gs = (ctx.stats or {}).get("gram")
    if gs is None or len(gs) != n or any(g is None for g in gs) or len(shape) < 2:
        return None
    d_in = math.prod(shape[1:])
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
        counts = [float(c) for c in counts]
    flat = [t.reshape(shape[0], -1) for t in tensors]
    return regmean_weight(flat, grams, alpha, counts if normalize_gram else None).reshape(shape)


def regmean_merge(states: Sequence[Mapping[str, Tensor]], grams: Sequence[Mapping[str, Tensor]],
                  alpha: float = 0.9, counts: Sequence[Mapping[str, float]] | None = None,
                  normalize_gram: bool = False, device: str | None = None) -> dict[str, Tensor]:
    """RegMean over whole state dicts: ``merge_states("regmean", ...)`` (the engine's driver).

    ``grams[i]`` maps weight names to model i's Gram (``counts[i]`` optionally to its row
    count).  Other tensors are averaged; non-floating tensors are copied from ``states[0]``;
    outputs keep ``states[0]``'s dtypes."""
    from ..engine.states import regmean_merge as run

    return run(states, grams, alpha=alpha, counts=counts, normalize_gram=normalize_gram, device=device)
