"""Merges on the sphere and by angle: ``nuslerp``, ``multislerp``, ``karcher``, ``model_stock``.

All four depend on norms and angles of whole tensors (or whole rows), so they are merged
whole, not in row blocks.  Norms and dot products are accumulated in float64.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from ..errors import MergelabError
from .registry import Range, TensorContext, merge_method


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


# ------------------------------------------------------------------ nuslerp

def slerp_rows(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """SLERP of the vectors along the last dimension of ``v0`` and ``v1`` (mergekit's nuslerp
    kernel): the angle between the normalised vectors (norms clamped below at 1e-7);
    ``(sin((1−t)θ) v0 + sin(tθ) v1) / sin θ``, or the linear interpolation where
    ``|sin θ| < eps``."""
    a, b = v0.double(), v1.double()
    na = a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    nb = b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((a / na) * (b / nb)).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    s = torch.sin(theta)
    colinear = s.abs() < eps
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1 - t) * theta) / torch.where(colinear, 1.0, s))
    c1 = torch.where(colinear, t, torch.sin(t * theta) / torch.where(colinear, 1.0, s))
    return (c0.to(v0.dtype) * v0 + c1.to(v0.dtype) * v1)


@merge_method("nuslerp", max_models=2)
def nuslerp(tensors: list[Tensor], base: Tensor | None, *, weight: list[float] = 1.0,
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
    v0, v1 = tensors
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    shape = v0.shape
    if nuslerp_flatten or v0.dim() < 2:
        res = slerp_rows(t, v0.reshape(1, -1), v1.reshape(1, -1)).reshape(shape)
    elif nuslerp_row_wise:
        res = slerp_rows(t, v0.movedim(0, -1), v1.movedim(0, -1)).movedim(-1, 0)
    else:
        res = slerp_rows(t, v0, v1)
    return res + base if base is not None else res


# ------------------------------------------------------------------ multislerp

@merge_method("multislerp")
def multislerp(tensors: list[Tensor], base: Tensor | None, *, weight: list[float] = 1.0,
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
    xs = [t - base for t in tensors] if base is not None else list(tensors)
    w = list(weight)
    if normalize_weights:
        s = math.fsum(w)
        w = [x / s for x in w]
    norms = [math.sqrt(max(_dot(x, x), 0.0)) for x in xs]
    # everything is a combination Σ a_i x_i: work with the Gram matrix of the x_i
    G = torch.tensor([[_dot(a, b) for b in xs] for a in xs], dtype=torch.float64)
    k = len(xs)
    a = torch.tensor([w[i] / (norms[i] + eps) for i in range(k)], dtype=torch.float64)  # m = Σ a_i x_i
    mnorm = math.sqrt(max(float(a @ G @ a), 0.0))
    if mnorm < eps:
        if k == 2:
            res = xs[0] * w[0] + xs[1] * w[1]
            return res + base if base is not None else res
        raise MergelabError("multislerp: the weighted mean of the unit tensors is zero (antipodal models"
                            " whose weights cancel); change the weights")
    mhat = a / mnorm
    Gm = G @ mhat
    dots = [float(Gm[i]) / (norms[i] + eps) for i in range(k)]          # ⟨u_i, m̂⟩
    v = torch.tensor([w[i] / (norms[i] + eps) for i in range(k)], dtype=torch.float64)
    v = v - sum(w[i] * dots[i] for i in range(k)) * mhat               # Σ w_i (u_i − ⟨u_i,m̂⟩ m̂)
    vnorm = math.sqrt(max(float(v @ G @ v), 0.0)) + eps
    scale = sum(n * wi for n, wi in zip(norms, w))
    coef = scale * (math.cos(vnorm) * mhat + (math.sin(vnorm) / vnorm) * v)
    res = xs[0] * float(coef[0])
    for i in range(1, k):
        res.add_(xs[i], alpha=float(coef[i]))
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
        return torch.zeros(0, dtype=torch.float64), []
    U = torch.tensor([[float(G[i, j]) / (norms[i] * norms[j]) for j in valid] for i in valid], dtype=torch.float64)
    asum = math.fsum(alphas[i] for i in valid)
    al = [alphas[i] / asum for i in valid]
    m = len(valid)
    c = torch.tensor(al, dtype=torch.float64)

    def norm(x):
        return math.sqrt(max(float(x @ U @ x), 0.0))

    n0 = norm(c)
    if n0 < tol:
        c = torch.zeros(m, dtype=torch.float64)
        c[0] = 1.0
    else:
        c = c / n0
    for _ in range(max_iter):
        Uc = U @ c
        T = torch.zeros(m, dtype=torch.float64)
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


@merge_method("karcher")
def karcher(tensors: list[Tensor], base: Tensor | None, *, max_iter: Annotated[int, Range(0, None)] = 10,
            tol: Annotated[float, Range(0, None)] = 1e-5) -> Tensor:
    """Karcher (Riemannian, Fréchet) mean of the models' directions on the unit sphere, with
    equal weights, scaled by the mean of their norms (mergekit's ``karcher``; the base_model,
    if any, is not used).  Inputs of norm ≤ tol do not pull the direction; all of them: 0."""
    n = len(tensors)
    if n == 1:
        return tensors[0].clone()
    G = torch.tensor([[_dot(a, b) for b in tensors] for a in tensors], dtype=torch.float64)
    alphas = [1.0 / n] * n
    c, valid = karcher_coefficients(G, alphas, max_iter, tol)
    if not valid:
        return torch.zeros_like(tensors[0])
    norms = [math.sqrt(max(float(G[i, i]), 0.0)) for i in range(n)]
    scale = sum(a * (nm if nm > 0 else 0.0) for a, nm in zip(alphas, norms))
    res = torch.zeros_like(tensors[0])
    for ci, i in zip(c.tolist(), valid):
        res.add_(tensors[i], alpha=scale * ci / norms[i])
    return res


# ------------------------------------------------------------------ model stock

@merge_method("model_stock", needs_base=True, min_models=2)
def model_stock(tensors: list[Tensor], base: Tensor, *, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024): with offsets ``d_i = θ_i − θ_0`` and ``cos θ`` the mean
    pairwise cosine of the offsets (norm products clamped below at 1e-6, cosines to
    [−1, 1]), ``t = N cos θ / (1 + (N − 1) cos θ)`` and the result
    ``t·mean(θ_i) + (1 − t)·θ_0``.  ``filter_wise``: one ``t`` per row (a vector is one row)."""
    shape = base.shape
    if filter_wise and base.dim() >= 2:
        b = base.double()
        ds = [t.double() - b for t in tensors]
    else:
        b = base.double().reshape(1, -1)
        ds = [t.double().reshape(1, -1) - b for t in tensors]
    norms = [d.norm(dim=-1) for d in ds]
    cos = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            c = (ds[i] * ds[j]).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            cos.append(c.clamp(-1, 1))
    ct = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ds)
    t = (n * ct) / (1 + (n - 1) * ct)
    mean = sum(ds) / n
    return (b + t * mean).reshape(shape).to(base.dtype)
