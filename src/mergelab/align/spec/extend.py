"""Specs of models too deep to hold in memory: built on a reduced-depth copy and extended.

The copy (same architecture and widths, fewer blocks in each repeated ``nn.ModuleList``,
e.g. ``num_hidden_layers=2``; real weights) is traced and self-tested as usual.  The deep
model (typically built under ``torch.device("meta")``: no weights, never run) gets, for each
parameter, the rule of its counterpart in the copy: blocks beyond the copy's length map to
the copy's last block, whose groups are renamed per block; groups shared across blocks
(named outside the last block: a residual stream, heads shared through a relative-position
bias) stay shared.  The extension refuses models it cannot map: a parameter without a
counterpart of the same shape, a module of another class, a per-block group that reaches
outside its block.
"""
from __future__ import annotations

from torch import nn

from ...errors import MergelabError
from .objects import Group, PermutationSpec
from .rules import expr_groups

WHERE = "permutation_spec (extending the reduced-depth copy's spec)"


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _lists(big: nn.Module, small: nn.Module):
    small_mods = dict(small.named_modules())
    out = []
    for name, m in big.named_modules():
        s = small_mods.get(name)
        if isinstance(m, nn.ModuleList) and isinstance(s, nn.ModuleList) and 0 < len(s) < len(m):
            out.append((name + "." if name else "", len(s)))
    return out


def _block(name: str, lists):
    """(prefix, index, rest) if ``name`` lies in a block of a repeated list, else None."""
    for prefix, k in lists:
        if name.startswith(prefix):
            idx, dot, rest = name[len(prefix):].partition(".")
            if idx.isdigit():
                return prefix, int(idx), k, rest
    return None


def extend_spec(small_spec: PermutationSpec, small: nn.Module, big: nn.Module) -> PermutationSpec:
    lists = _lists(big, small)
    if not lists:
        raise MergelabError(f"{WHERE}: the test model has no repeated module list shorter than the model's")

    def to_small(name):
        b = _block(name, lists)
        if b is None or b[1] < b[2]:
            return name, None
        prefix, j, k, rest = b
        return f"{prefix}{k - 1}" + (f".{rest}" if rest else ""), j

    def per_block(gname):       # a group named in the last block of the copy
        b = _block(gname, lists)
        return b is not None and b[1] == b[2] - 1

    for n in small_spec.groups:
        if per_block(n):
            prefix, j, _, _ = _block(n, lists)
            for p, _a in small_spec.members(n):
                if not p.startswith(f"{prefix}{j}."):
                    raise MergelabError(f"{WHERE}: group {n!r} reaches outside its block ({p!r})")

    def rename(e, j):
        if e[0] in ("group", "headdim"):
            n = e[1]
            if j is not None and per_block(n):
                prefix, i, _, rest = _block(n, lists)
                n = f"{prefix}{j}.{rest}"
            return (e[0], n) + tuple(e[2:])
        if e[0] in ("prod", "cat"):
            return (e[0], tuple(rename(p, j) for p in e[1]))
        return e

    small_mods = dict(small.named_modules())
    for name, m in big.named_modules():
        sm = small_mods.get(to_small(name)[0])
        if sm is None or type(sm) is not type(m):
            raise MergelabError(f"{WHERE}: module {name!r} ({type(m).__name__}) has no counterpart of the "
                                f"same class in the test model")
    small_state = small.state_dict()
    axes, frozen, groups = {}, {}, {}

    def add_group(gname, j):
        if gname in groups:
            return
        src, b = gname, _block(gname, lists)
        if b is not None and b[1] >= b[2] - 1:   # a deeper block's copy of a last-block group
            src = f"{b[0]}{b[2] - 1}.{b[3]}"
        g = small_spec.groups[src]
        if g.head_group:
            add_group(rename(("group", g.head_group), j)[1], j)
        groups[gname] = Group(gname, g.kind, g.size, g.n_heads, g.head_dim,
                              rename(("group", g.head_group), j)[1] if g.head_group else "", g.per_head)

    for name, t in big.state_dict().items():
        m, j = to_small(name)
        if m not in small_state or tuple(small_state[m].shape) != tuple(t.shape):
            raise MergelabError(f"{WHERE}: parameter {name!r} {tuple(t.shape)} has no counterpart {m!r} of "
                                f"that shape in the test model")
        for ap in small_spec.axes.get(m, []):
            e = rename(ap.expr, j)
            for gname in sorted(expr_groups(e)):
                add_group(gname, j)
            axes.setdefault(name, []).append(type(ap)(ap.axis, ap.start, ap.length, e))
        for key, why in small_spec.frozen.items():
            if key.startswith(m + ":"):
                frozen[name + key[len(m):]] = why
    for n, g in small_spec.groups.items():   # groups with no parameter axis of their own
        if not per_block(n) and n not in groups:
            add_group(n, None)
    return PermutationSpec(groups, axes, frozen, list(small_spec.unknown_ops), None)
