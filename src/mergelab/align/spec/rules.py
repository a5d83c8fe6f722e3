"""Axis rules ("exprs"): how one tensor axis is permuted, and applying them.

A rule is a nested tuple:

* ``("id", n)``: left in place;
* ``("group", name)``: the group's index vector;
* ``("prod", (e1, e2, ...))``: the axis is the row-major product of the parts;
* ``("cat", (e1, e2, ...))``: the axis is the concatenation of the parts;
* ``("headdim", name, o_axis)``: activations only: a per-head within-head axis, permuted
  jointly with the tensor's head axis ``o_axis`` by the group's composed vector.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch


def expr_size(e, sizes: Mapping[str, int]) -> int:
    k = e[0]
    if k == "id":
        return e[1]
    if k == "group":
        return sizes[e[1]]
    if k == "prod":
        return math.prod(expr_size(p, sizes) for p in e[1])
    if k == "cat":
        return sum(expr_size(p, sizes) for p in e[1])
    raise ValueError(e)


def expr_vector(e, perm: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The index vector (new index i takes old index v[i]) an axis rule gives."""
    k = e[0]
    if k == "id":
        return torch.arange(e[1])
    if k == "group":
        return perm[e[1]]
    if k == "prod":
        v = expr_vector(e[1][0], perm)
        for p in e[1][1:]:
            w = expr_vector(p, perm)
            v = (v[:, None] * len(w) + w[None, :]).reshape(-1)
        return v
    if k == "cat":
        out, off = [], 0
        for p in e[1]:
            w = expr_vector(p, perm)
            out.append(w + off)
            off += len(w)
        return torch.cat(out)
    raise ValueError(e)


def expr_groups(e) -> set[str]:
    if e[0] == "group" or e[0] == "headdim":
        return {e[1]}
    if e[0] in ("prod", "cat"):
        return set().union(*(expr_groups(p) for p in e[1]))
    return set()


def apply_axis(t: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(axis, idx.to(t.device))


def apply_exprs(t: torch.Tensor, exprs, perm) -> torch.Tensor:
    """Permute an activation tensor whose axes follow ``exprs`` (one per axis, None = in place)."""
    joint = {e[2] for e in exprs if e is not None and e[0] == "headdim"}
    for a, e in enumerate(exprs):
        if e is None or a in joint:
            continue
        if e[0] == "headdim":
            o = e[2]
            x = t.movedim((o, a), (0, 1))
            shp = x.shape
            x = x.reshape(shp[0] * shp[1], *shp[2:]).index_select(0, perm[e[1]].to(t.device))
            t = x.reshape(shp).movedim((0, 1), (o, a))
        else:
            t = apply_axis(t, a, expr_vector(e, perm))
    return t
