"""Merges on the sphere and by angle: ``nuslerp``, ``multislerp``, ``karcher``, ``model_stock``.

Each result is a combination ``Σ c_i x_i`` (plus the base) whose coefficients depend only on
the Gram matrix ``G_ij = ⟨x_i, x_j⟩`` of the flattened inputs (or their task vectors).  So the
methods are streamed: a ``tensor_prepass`` accumulates ``G`` over the row blocks of a big tensor,
then every block is combined with the same coefficients (memory: one block per input).  ``G`` is
summed exactly (per-row float64 dot products added with ``math.fsum``), so the result does not
depend on how the tensor is cut.  Per-row variants (``nuslerp`` without flattening,
``model_stock`` with ``filter_wise``) need nothing beyond the rows of a block, except
``nuslerp_row_wise`` (vectors along the first dimension), whose per-column sums are accumulated
over blocks in float64 (not exactly: the last bit of the result may depend on the block size).
"""
from __future__ import annotations

import math
from typing import Annotated, Callable

import torch
from torch import Tensor

from ..errors import MergelabError
from .registry import Range, TensorContext, merge_method


_ROWS = 4096  # rows per step when summing a whole tensor's Gram (bounds the float64 temporaries)


def _as_rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() >= 1 else x.reshape(1, 1)


class GramSum:
    """The exact Gram matrix ``⟨x_i, x_j⟩`` of K tensors fed in row blocks (in any cut): per-row
    float64 dot products, added with ``math.fsum`` (an exactly rounded sum, independent of the
    order and grouping of the rows)."""

    def __init__(self):
        self.parts: dict[tuple[int, int], list[float]] = {}
        self.k = None

    def add(self, xs: list[Tensor]) -> None:
        self.k = len(xs)
        rows = [_as_rows(x) for x in xs]
        for a in range(0, rows[0].shape[0], _ROWS):
            ds = [r[a:a + _ROWS].double() for r in rows]
            for i in range(self.k):
                for j in range(i, self.k):
                    self.parts.setdefault((i, j), []).extend((ds[i] * ds[j]).sum(dim=1).tolist())

    def result(self) -> Tensor:
        G = torch.zeros(self.k, self.k, dtype=torch.float64, device="cpu")
        for (i, j), v in self.parts.items():
            G[i, j] = G[j, i] = math.fsum(v)
        return G


def gram(xs: list[Tensor]) -> Tensor:
    g = GramSum()
    g.add(xs)
    return g.result()


def _vectors(tensors: list[Tensor], base: Tensor | None, relative: bool) -> list[Tensor]:
    return [t - base for t in tensors] if (relative and base is not None) else list(tensors)


def _gram_prepass(relative: bool, needs: Callable[[dict, Tensor], bool] = lambda p, b: True):
    """A tensor_prepass that sums the Gram matrix of the (task) vectors over a tensor's blocks;
    None when ``needs(params, first block's reference tensor)`` says the blocks suffice."""

    def prepass(params: dict, blocks):
        g = GramSum()
        for _ctx, base, ts in blocks():
            ref = base if base is not None else ts[0]
            if not needs(params, ref.dim()):  # a block has the whole tensor's number of dimensions
                return None
            g.add(_vectors(ts, base, relative))
        return g.result() if g.k else None

    return prepass


def _combine(xs: list[Tensor], coef: list[float]) -> Tensor:
    res = xs[0] * coef[0]
    for x, c in zip(xs[1:], coef[1:]):
        res.add_(x, alpha=c)
    return res


# ------------------------------------------------------------------ nuslerp

def _f64(x) -> Tensor:
    """A float64 tensor of ``x`` on its own device (python numbers: on the CPU)."""
    return x.double() if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float64, device="cpu")


def slerp_coefficients(t: float, g00, g11, g01, eps: float = 1e-8):
    """mergekit's nuslerp weights (c0, c1) of ``c0 v0 + c1 v1`` from ‖v0‖², ‖v1‖², ⟨v0, v1⟩
    (tensors of any shape, float64): the angle between the vectors normalised with norms
    clamped below at 1e-7; ``sin((1−t)θ)/sin θ`` and ``sin(tθ)/sin θ``, or ``1 − t`` and ``t``
    where ``|sin θ| < eps`` (nearly colinear)."""
    n0 = torch.sqrt(_f64(g00).clamp(min=0)).clamp(min=1e-7)
    n1 = torch.sqrt(_f64(g11).clamp(min=0)).clamp(min=1e-7)
    cos = (_f64(g01) / (n0 * n1)).clamp(-1, 1)
    theta = torch.acos(cos)
    s = torch.sin(theta)
    colinear = s.abs() < eps
    safe = torch.where(colinear, torch.ones_like(s), s)
    c0 = torch.where(colinear, torch.full_like(s, 1.0 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(s, t), torch.sin(t * theta) / safe)
    return c0, c1


def slerp_rows(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """SLERP of the vectors along the last dimension of ``v0`` and ``v1`` (per-row weights)."""
    a, b = v0.double(), v1.double()
    c0, c1 = slerp_coefficients(t, (a * a).sum(-1, keepdim=True), (b * b).sum(-1, keepdim=True),
                                (a * b).sum(-1, keepdim=True), eps)
    return c0.to(v0.dtype) * v0 + c1.to(v0.dtype) * v1


def _nuslerp_flat(params: dict, dim: int) -> str:
    if params.get("nuslerp_flatten", True) or dim < 2:
        return "flat"
    return "cols" if params.get("nuslerp_row_wise", False) else "rows"


def _nuslerp_prepass(params: dict, blocks):
    """Gram of the two (task) vectors: exact for the flattened mode; per column, summed over the
    blocks, with ``nuslerp_row_wise``; None for per-row SLERP (the blocks hold whole rows)."""
    mode = None
    g = GramSum()
    cols = None
    for _ctx, base, ts in blocks():
        if len(ts) != 2:
            return None
        ref = base if base is not None else ts[0]
        mode = _nuslerp_flat(params, ref.dim())
        if mode == "rows":
            return None
        v0, v1 = _vectors(ts, base, True)
        if mode == "flat":
            g.add([v0, v1])
        else:
            a, b = v0.double(), v1.double()
            part = torch.stack([(a * a).sum(0), (b * b).sum(0), (a * b).sum(0)])
            cols = part if cols is None else cols + part
    if mode == "flat" and g.k:
        return ("flat", g.result())
    if mode == "cols" and cols is not None:
        return ("cols", cols)
    return None


@merge_method("nuslerp", max_models=2, elementwise=True, tensor_prepass=_nuslerp_prepass)
def nuslerp(tensors: list[Tensor], base: Tensor | None, *, ctx: TensorContext, weight: list[float] = 1.0,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False) -> Tensor:
    """SLERP of two models at ``t = w_2/(w_1 + w_2)`` (0.5 when the weights sum to ~0).

    With a ``base_model`` (not one of the two) the task vectors are interpolated and added
    to the base.  ``nuslerp_flatten`` (default): the tensors are one vector each; otherwise
    SLERP runs per vector along the last dimension, or along the first with
    ``nuslerp_row_wise`` (mergekit's code: ``dim=0`` when row_wise, else ``-1``).  One
    model without a base is returned as is.
    """
    if len(tensors) == 1:
        if base is not None:
            raise MergelabError("nuslerp: with a base_model it takes exactly two other models")
        return tensors[0].clone()
    total = math.fsum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    v0, v1 = _vectors(tensors, base, True)
    mode = _nuslerp_flat({"nuslerp_flatten": nuslerp_flatten, "nuslerp_row_wise": nuslerp_row_wise}, v0.dim())
    state = ctx.tensor_state
    if mode == "flat":
        G = state[1] if state is not None else gram([v0, v1])
        c0, c1 = slerp_coefficients(t, G[0, 0], G[1, 1], G[0, 1])
        res = _combine([v0, v1], [float(c0), float(c1)])
    elif mode == "cols":
        if state is not None:
            g00, g11, g01 = state[1]
        else:
            a, b = v0.double(), v1.double()
            g00, g11, g01 = (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)
        c0, c1 = slerp_coefficients(t, g00, g11, g01)
        res = c0.to(v0.dtype) * v0 + c1.to(v0.dtype) * v1
    else:
        res = slerp_rows(t, v0, v1)
    return res + base if base is not None else res


# ------------------------------------------------------------------ multislerp

def multislerp_coefficients(G: Tensor, w: list[float], eps: float) -> list[float] | None:
    """Coefficients of ``Σ c_i x_i`` for multislerp from the Gram matrix of the x_i (see the
    method); None when the weighted mean of the unit vectors vanishes."""
    k = G.shape[0]
    norms = [math.sqrt(max(float(G[i, i]), 0.0)) for i in range(k)]
    a = torch.tensor([w[i] / (norms[i] + eps) for i in range(k)], dtype=torch.float64, device="cpu")  # m = Σ a_i x_i
    mnorm = math.sqrt(max(float(a @ G @ a), 0.0))
    if mnorm < eps:
        return None
    mhat = a / mnorm
    Gm = G @ mhat
    dots = [float(Gm[i]) / (norms[i] + eps) for i in range(k)]          # ⟨u_i, m̂⟩
    v = torch.tensor([w[i] / (norms[i] + eps) for i in range(k)], dtype=torch.float64, device="cpu")
    v = v - sum(w[i] * dots[i] for i in range(k)) * mhat               # Σ w_i (u_i − ⟨u_i,m̂⟩ m̂)
    vnorm = math.sqrt(max(float(v @ G @ v), 0.0)) + eps
    scale = sum(n * wi for n, wi in zip(norms, w))
    return (scale * (math.cos(vnorm) * mhat + (math.sin(vnorm) / vnorm) * v)).tolist()


@merge_method("multislerp", elementwise=True, tensor_prepass=_gram_prepass(relative=True))
def multislerp(tensors: list[Tensor], base: Tensor | None, *, ctx: TensorContext, weight: list[float] = 1.0,
               normalize_weights: bool = True, eps: Annotated[float, Range(0, None)] = 1e-8) -> Tensor:
    """Barycentric interpolation on the hypersphere (mergekit's ``multislerp``).

    With a base, x_i = θ_i − θ_0, else x_i = θ_i.  Unit vectors ``u_i = x_i/(‖x_i‖ + eps)``;
    their weighted mean ``m`` normalised to ``m̂``; tangent vectors ``u_i − ⟨u_i, m̂⟩ m̂``
    averaged with the weights to ``v``; the result ``(cos‖v‖ m̂ + sin‖v‖ v/‖v‖)·Σ w_i ‖x_i‖``
    (``‖v‖`` + eps), plus the base.  Weights are divided by their sum with
    ``normalize_weights``.  When ``‖m‖ < eps`` two models fall back to ``w_1 x_1 + w_2 x_2``;
    more models are an error (antipodal inputs).
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    xs = _vectors(tensors, base, True)
    w = list(weight)
    if normalize_weights:
        s = math.fsum(w)
        w = [x / s for x in w]
    G = ctx.tensor_state if ctx.tensor_state is not None else gram(xs)
    coef = multislerp_coefficients(G, w, eps)
    if coef is None:
        if len(xs) != 2:
            raise MergelabError(f"{ctx.name or 'multislerp'}: the weighted mean of the unit tensors is zero"
                                " (antipodal models whose weights cancel); change the weights")
        coef = w
    res = _combine(xs, coef)
    return res + base if base is not None else res


# ------------------------------------------------------------------ karcher

def karcher_coefficients(G: Tensor, alphas: list[float], max_iter: int, tol: float) -> tuple[Tensor, list[int]]:
    """The weighted Karcher mean on the unit sphere of vectors with Gram matrix ``G`` as
    coefficients on the unit vectors of the valid inputs (norm > tol), by Riemannian gradient
    steps from the normalised weighted mean (mergekit's iteration)."""
    k = G.shape[0]
    norms = [math.sqrt(max(float(G[i, i]), 0.0)) for i in range(k)]
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return torch.zeros(0, dtype=torch.float64, device="cpu"), []
    U = torch.tensor([[float(G[i, j]) / (norms[i] * norms[j]) for j in valid] for i in valid], dtype=torch.float64, device="cpu")
    asum = math.fsum(alphas[i] for i in valid)
    al = [alphas[i] / asum for i in valid]
    m = len(valid)
    c = torch.tensor(al, dtype=torch.float64, device="cpu")

    def norm(x):
        return math.sqrt(max(float(x @ U @ x), 0.0))

    n0 = norm(c)
    if n0 < tol:
        c = torch.zeros(m, dtype=torch.float64, device="cpu")
        c[0] = 1.0
    else:
        c = c / n0
    for _ in range(max_iter):
        Uc = U @ c
        T = torch.zeros(m, dtype=torch.float64, device="cpu")
        for j in range(m):
            dot = max(-1.0, min(1.0, float(Uc[j])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = al[j] * theta / math.sin(theta)
            T[j] += f
            T -= f * dot * c
        tn = norm(T)
        if tn < tol:
            break
        c = math.cos(tn) * c + (math.sin(tn) / tn) * T
        un = norm(c)
        if un > tol:
            c = c / un
    return c, valid


@merge_method("karcher", elementwise=True, tensor_prepass=_gram_prepass(relative=False))
def karcher(tensors: list[Tensor], base: Tensor | None, *, ctx: TensorContext,
            max_iter: Annotated[int, Range(0, None)] = 10,
            tol: Annotated[float, Range(0, None)] = 1e-5) -> Tensor:
    """Karcher (Riemannian, Fréchet) mean of the models' directions on the unit sphere, with
    equal weights, scaled by the mean of their norms (mergekit's ``karcher``; the base_model,
    if any, is not used).  Inputs of norm ≤ tol do not pull the direction; all of them: 0."""
    n = len(tensors)
    if n == 1:
        return tensors[0].clone()
    G = ctx.tensor_state if ctx.tensor_state is not None else gram(tensors)
    alphas = [1.0 / n] * n
    c, valid = karcher_coefficients(G, alphas, max_iter, tol)
    if not valid:
        return torch.zeros_like(tensors[0])
    norms = [math.sqrt(max(float(G[i, i]), 0.0)) for i in range(n)]
    scale = sum(a * nm for a, nm in zip(alphas, norms))
    return _combine([tensors[i] for i in valid], [scale * ci / norms[i] for ci, i in zip(c.tolist(), valid)])


# ------------------------------------------------------------------ model stock

def model_stock_t(G: Tensor) -> Tensor:
    """Model Stock's interpolation factor from the Gram matrices (..., N, N) of the offsets:
    ``N c/(1 + (N − 1) c)``, c the mean pairwise cosine (norm products clamped at 1e-6,
    cosines to [−1, 1]); 0 where ``|1 + (N − 1) c| < 1e-6`` (opposing offsets: no finite
    estimate, so the base is kept, as mergekit does)."""
    n = G.shape[-1]
    norms = torch.sqrt(torch.diagonal(G, dim1=-2, dim2=-1).clamp(min=0))
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append((G[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(den), den))


@merge_method("model_stock", needs_base=True, min_models=2, elementwise=True,
              tensor_prepass=_gram_prepass(relative=True, needs=lambda p, dim: not (p.get("filter_wise") and dim >= 2)))
def model_stock(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024): with offsets ``d_i = θ_i − θ_0`` and ``cos θ`` the mean
    pairwise cosine of the offsets (norm products clamped below at 1e-6, cosines to
    [−1, 1]), ``t = N cos θ / (1 + (N − 1) cos θ)`` and the result
    ``t·mean(θ_i) + (1 − t)·θ_0``.  ``filter_wise``: one ``t`` per row (a vector is one row).

    ``t`` comes from the float64 Gram matrix; the combination is computed in the inputs' dtype
    in mergekit's order (``t·mean + (1 − t)·θ_0``, ``t`` rounded to that dtype), so with the
    same ``t`` the bytes equal mergekit's (a float64 combination costs several times more,
    benchmarks/method_kernels.py, for nothing the stored bfloat16/float32 result can hold)."""
    n = len(tensors)
    if filter_wise and base.dim() >= 2:
        rows = [d.double().reshape(d.shape[0], -1) for d in _vectors(tensors, base, True)]
        G = torch.stack([torch.stack([(a * b).sum(1) for b in rows], -1) for a in rows], -2)  # (R, N, N)
        t = model_stock_t(G).reshape((-1,) + (1,) * (base.dim() - 1))
    else:
        G = ctx.tensor_state if ctx.tensor_state is not None else gram(_vectors(tensors, base, True))
        t = model_stock_t(G)
    t = t.to(device=base.device, dtype=base.dtype)
    avg = tensors[0].clone()
    for x in tensors[1:]:
        avg.add_(x)
    avg.div_(n)
    return avg.mul_(t).add_(base * (1 - t))
