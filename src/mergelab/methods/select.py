"""Entry-selecting merges: ``sce``, ``nearswap``, ``arcee_fusion``, ``ram``, ``ramplus_tl``
and ``passthrough``.

``nearswap``, ``ram``, ``ramplus_tl`` and ``sce`` (their per-tensor counts, cuts and
coefficients from a tensor prepass) and ``passthrough`` are merged in row blocks of big
tensors; ``arcee_fusion`` needs whole-tensor quantiles.
"""
from __future__ import annotations

import copy
import math
from typing import Annotated, Literal

import torch
from torch import Tensor

from .registry import Range, TensorContext, merge_method
from .sparse import CHUNK, Trim, kth_largest_many, trim_keep

Positive = Annotated[float, Range(0, None, lo_open=True)]
NonNeg = Annotated[float, Range(0, None)]


# ------------------------------------------------------------------ passthrough

@merge_method("passthrough", max_models=1, elementwise=True)
def passthrough(tensors: list[Tensor], base: Tensor | None, *, scale: list[float] = 1.0) -> Tensor:
    """The single model's tensor, multiplied by its ``scale`` (per model, per tensor through
    filter rules; default 1: unchanged bytes)."""
    (t,) = tensors
    return t.clone() if scale[0] == 1.0 else t * scale[0]


# ------------------------------------------------------------------ nearswap

@merge_method("nearswap", needs_base=True, max_models=1, elementwise=True)
def nearswap(tensors: list[Tensor], base: Tensor, *, t: Positive) -> Tensor:
    """NearSwap: per entry ``w = clamp(t / |θ_0 − θ_1|, 0, 1)`` (1 where they are equal) and
    ``w·θ_1 + (1 − w)·θ_0``: entries already close to the base move to the other model."""
    (v1,) = tensors
    diff = (base - v1).abs()
    w = torch.where(diff > 0, (t / diff).clamp_(max=1.0), 1.0)
    return w * v1 + (1 - w) * base


# ------------------------------------------------------------------ SCE

def _sce_var(deltas: Tensor) -> Tensor:
    """``deltas.var(dim=0, unbiased=False)`` (mergekit's), bit for bit: torch's Welford update in
    float64, written out with elementwise ops, because torch's CPU reduction over a leading
    dimension of 2-5 models is several times slower (benchmarks/method_kernels.py; it made SCE
    the slowest method, 1390 CPU s at 1.1B).  Equality with torch.var is tested."""
    n = deltas.shape[0]
    mean = deltas[0].double()
    m2 = torch.zeros_like(mean)
    for k in range(1, n):
        x = deltas[k].double()
        delta = x - mean
        mean = mean + delta / (k + 1)
        m2 = m2 + delta * (x - mean)  # not addcmul: torch's kernel does not fuse (tested)
    return (m2 / n).float()


def _row_sq_sums(x: Tensor) -> list[float]:
    r = x.reshape(x.shape[0], -1) if x.dim() >= 1 else x.reshape(1, 1)
    return (r.double() ** 2).sum(dim=1).tolist()


def _sce_keep(var: Tensor, state: dict, start: int) -> Tensor | None:
    """SCE's Select mask of one block (flat index ``start``), consuming the threshold's ties in
    flat order; None keeps everything."""
    if state["select"] == "all":
        return None
    if state["select"] == "none":
        return torch.zeros_like(var, dtype=torch.bool)
    flat = var.reshape(-1)
    keep = torch.empty(flat.numel(), dtype=torch.bool, device=var.device)
    for a in range(0, flat.numel(), CHUNK):
        keep[a:a + CHUNK] = trim_keep(flat[a:a + CHUNK], state["trim"], start + a)
    return keep.reshape(var.shape)


def sce_prepass(params: dict, blocks) -> dict:
    """SCE's per-tensor state from a restartable stream of the tensor's row blocks: the Select
    cut (the ``⌊topk·z⌋`` largest variances, z = positions of non-zero variance, by radix select;
    ties: lower flat index first) and the models' mean-square coefficients (exact sums)."""
    topk = params["select_topk"]

    def deltas():
        for _ctx, base, ts in blocks():
            yield base, torch.stack([t - base for t in ts])

    state: dict = {"select": "all"}
    numel = 0
    if topk < 1:
        nz = 0
        for _b, d in deltas():
            nz += int(torch.count_nonzero(_sce_var(d)))
        k = int(abs(topk) * nz)
        if k == 0:
            state = {"select": "none"}
        elif params.get("tie_break", "index") == "argsort":
            # mergekit 0.1.5's own choice: torch.topk over the whole tensor's variances (its order
            # among equal variances is that of the torch build); the whole tensor in memory
            var = torch.cat([_sce_var(d).reshape(-1) for _b, d in deltas()])
            mask = torch.zeros(var.numel(), dtype=torch.bool, device=var.device)
            mask[torch.topk(var.abs(), k=k, largest=True).indices] = True
            state = {"select": "cut", "trim": Trim(mask=mask)}
        else:
            chunks = lambda: ((c.cpu(),) for _b, d in deltas()  # noqa: E731
                              for c in _sce_var(d).reshape(-1).split(CHUNK))
            (found,) = kth_largest_many(chunks, [k])
            state = {"select": "cut", "trim": Trim(found[0], k - found[1])}
    probe = dict(state, trim=copy.copy(state["trim"])) if state["select"] == "cut" else state
    sums: list[list[float]] | None = None
    pos = 0
    for _b, d in deltas():
        keep = _sce_keep(_sce_var(d), probe, pos)
        if keep is not None:
            d = d * keep
        if sums is None:
            sums = [[] for _ in range(d.shape[0])]
        for i in range(d.shape[0]):
            sums[i] += _row_sq_sums(d[i])
        pos += d[0].numel()
        numel += d[0].numel()
    ms = [math.fsum(v) / max(1, numel) for v in (sums or [])]
    total = math.fsum(ms)
    state["coef"] = [1.0 / len(ms)] * len(ms) if total == 0 else [m / total for m in ms]
    return state


@merge_method("sce", needs_base=True, elementwise=True, tensor_prepass=sce_prepass)
def sce(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
        select_topk: Annotated[float, Range(0, 1)] = 1.0, int8_mask: bool = False,
        tie_break: Literal["index", "argsort"] = "index") -> Tensor:
    """SCE (FuseChat, Wan et al. 2024): Select the top ``select_topk`` positions by variance of
    the task vectors across models (1: all); Calculate each model's coefficient as the mean
    square of its (selected) task vector, normalised to sum 1 (equal when all are 0); Erase
    the entries whose sign disagrees with the sign of the unweighted sum (+ when 0); the
    result ``θ_0 + Σ c_i m_i τ_i / Σ c_i m_i`` (a 0 divisor counts as 1).  Streamed: the
    Select cut and the coefficients come from a tensor prepass over the row blocks.
    ``tie_break``: which of equal variances at the cut are selected: ``index`` (lower flat index
    first, streamed) or ``argsort`` (mergekit's own ``torch.topk`` order; the whole tensor's
    variances in memory)."""
    state = ctx.tensor_state
    start = ctx.offset
    if state is None:
        state = sce_prepass({"select_topk": select_topk, "tie_break": tie_break},
                            lambda: iter([(ctx, base, tensors)]))
        start = 0
    deltas = torch.stack([t - base for t in tensors])
    keep = _sce_keep(_sce_var(deltas), state, start)
    if keep is not None:
        deltas *= keep
    coef = state["coef"]
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for c, d in zip(coef, deltas):
        agree = torch.sign(d) == majority
        num.addcmul_(d, agree, value=c)
        den.add_(agree, alpha=c)
    den[den == 0] = 1.0
    return base + num / den


# ------------------------------------------------------------------ Arcee Fusion

def _kth(x: Tensor, k: int) -> float:
    """The k-th smallest (1-based) entry of a flat tensor."""
    return float(torch.kthvalue(x, k).values)


def quantile_linear(x: Tensor, q: float) -> float:
    """``torch.quantile``'s default (linear interpolation between order statistics), without
    its size limit: exact for any number of entries."""
    n = x.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    a = _kth(x, lo + 1)
    if frac == 0.0 or lo + 1 >= n:
        return a
    b = _kth(x, lo + 2)
    return a + frac * (b - a)


def fusion_importance(theta: Tensor, base: Tensor) -> Tensor:
    """Arcee Fusion's importance: ``|θ − θ_0|`` times the KL divergence, per vector along the last
    dimension, between softmax(θ) and softmax(θ_0) (each + 1e-8)."""
    eps = 1e-8
    p = torch.softmax(theta, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (theta - base).abs() * kl


def fusion_quantile(x: Tensor, q: float) -> float:
    """mergekit 0.1.5's quantile of Arcee Fusion: the order statistic at 0-based index
    ``⌊q·(n − 1)⌋`` (product in float32, as mergekit's float32 ``q`` tensor), no interpolation
    (so the median is the lower middle value and the quartiles are order statistics)."""
    n = x.numel()
    # a float32 product on the host, rounded as mergekit's float32 q tensor
    idx = int((torch.tensor(q, dtype=torch.float32, device="cpu")
               * torch.tensor(n - 1, dtype=torch.float32, device="cpu")).item())
    return _kth(x, idx + 1)


@merge_method("arcee_fusion", needs_base=True, max_models=1)
def arcee_fusion(tensors: list[Tensor], base: Tensor) -> Tensor:
    """Arcee Fusion: keep the other model's change where its importance (see
    :func:`fusion_importance`) reaches ``median + 1.5·(Q3 − Q1)`` of the tensor's
    importances (quantiles: :func:`fusion_quantile`, the order statistic at ``⌊q(n − 1)⌋``;
    the threshold formed in float32); elsewhere the base.  mergekit estimates the quantiles
    from a random sample of 10^6 entries on bigger tensors; here they are exact."""
    (theta,) = tensors
    if base.dim() == 0:
        return theta.clone()
    imp = fusion_importance(theta, base)
    flat = imp.reshape(-1).float()
    q1, median, q3 = (torch.tensor(fusion_quantile(flat, q), dtype=torch.float32, device=imp.device)
                      for q in (0.25, 0.5, 0.75))
    mask = imp >= median + 1.5 * (q3 - q1)
    return base + (theta - base) * mask


# ------------------------------------------------------------------ RAM

def _ram_parts(tensors: list[Tensor], base: Tensor, epsilon: float):
    taus = [t - base for t in tensors]
    nz = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros_like(base, dtype=torch.int32)
    for m in nz:
        count += m
    return taus, nz, count


@merge_method("ram", needs_base=True, elementwise=True)
def ram(tensors: list[Tensor], base: Tensor, *, epsilon: NonNeg = 1e-5) -> Tensor:
    """Reinforced Agent Merging (RAM): an entry changed (``|τ| > epsilon``) by one model only
    takes that change whole; one changed by several takes the mean of their changes; entries
    no model changes stay at the base."""
    taus, nz, count = _ram_parts(tensors, base, epsilon)
    acc = torch.zeros_like(base)
    for tau, m in zip(taus, nz):
        acc += tau * m
    return base + acc / count.clamp(min=1)


def _ramplus_counts(tensors: list[Tensor], base: Tensor, epsilon: float) -> list[tuple[int, int]]:
    """Per model: (changed entries also changed by another model, changed entries only it changes)."""
    _taus, nz, count = _ram_parts(tensors, base, epsilon)
    unique, shared = count == 1, count > 1
    return [(int((m & shared).sum()), int((m & unique).sum())) for m in nz]


def ramplus_scales(counts: list[tuple[int, int]], r: float, alpha: float, epsilon: float) -> list[float]:
    """``1 + r·clamp(ρ_i, 0, α)`` with ``ρ_i = shared_i / max(unique_i, epsilon)`` (0 when both are 0)."""
    out = []
    for n_shared, n_unique in counts:
        den = max(n_unique, epsilon)
        rho = n_shared / den if den > 0 else 0.0
        out.append(1.0 + r * min(max(rho, 0.0), alpha))
    return out


def _ramplus_prepass(params: dict, blocks) -> list[float] | None:
    """The per-model scales of ``ramplus_tl`` from counts summed over a tensor's blocks (exact)."""
    total = None
    for _ctx, base, ts in blocks():
        c = _ramplus_counts(ts, base, params["epsilon"])
        total = c if total is None else [(a + x, b + y) for (a, b), (x, y) in zip(total, c)]
    if total is None:
        return None
    return ramplus_scales(total, params["r"], params["alpha"], params["epsilon"])


@merge_method("ramplus_tl", needs_base=True, elementwise=True, tensor_prepass=_ramplus_prepass)
def ramplus_tl(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext, r: NonNeg = 0.1,
               alpha: NonNeg = 0.2, epsilon: NonNeg = 1e-5) -> Tensor:
    """RAM+ (tensor-local): as :func:`ram`, but the unique changes of model i are scaled by
    ``1 + r·clamp(ρ_i, 0, α)``, ``ρ_i`` = (its changed entries shared with another model) /
    (its changed entries no other model changes) over the tensor (counted over all blocks by
    the tensor prepass when the tensor is merged in row blocks)."""
    lams = ctx.tensor_state
    if lams is None:
        lams = ramplus_scales(_ramplus_counts(tensors, base, epsilon), r, alpha, epsilon)
    taus, nz, count = _ram_parts(tensors, base, epsilon)
    unique, shared = count == 1, count > 1
    acc = torch.zeros_like(base)
    for tau, m, lam in zip(taus, nz, lams):
        z = tau * m
        acc += z * unique * lam + z * shared / count.clamp(min=1)
    return base + acc
