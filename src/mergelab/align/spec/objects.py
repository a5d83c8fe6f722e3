"""Spec objects: groups, per-axis rules, permutations and the spec itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ...errors import MergelabError
from .rules import expr_groups


@dataclass
class Group:
    name: str
    kind: str               # "plain" | "heads" | "within_head"
    size: int               # length of the stored index vector
    n_heads: int = 0        # within_head: number of heads; heads: == size
    head_dim: int = 0       # within_head: dims per head
    head_group: str = ""    # within_head: its head group
    per_head: bool = False  # within_head: one permutation per head (vector of n_heads*head_dim)


@dataclass
class AxisPerm:
    axis: int
    start: int              # segment of the axis this rule covers (whole axis: 0, size)
    length: int
    expr: tuple


class Permutation(dict):
    """``{group name: int64 index vector}``; new index i takes old index ``v[i]``.

    ``history`` holds the objective after each sweep when it came from a matcher.
    """

    def __init__(self, *a, history=None, **kw):
        super().__init__(*a, **kw)
        self.history: list[float] = list(history or [])


@dataclass
class PermutationSpec:
    """Groups of (parameter, axis) that must be permuted together.

    Usable with any ``name -> tensor`` mapping: :attr:`axes` says, per parameter name, how
    each permuted axis (or axis segment) is permuted.
    """

    groups: dict[str, Group]
    axes: dict[str, list[AxisPerm]]
    frozen: dict[str, str] = field(default_factory=dict)      # "param:axis" -> why not permuted
    unknown_ops: list[str] = field(default_factory=list)
    trace: Any = field(default=None, repr=False, compare=False)  # _TraceInfo when traced

    # ---- inspection
    def __len__(self) -> int:
        return len(self.groups)

    def members(self, group: str) -> list[tuple[str, int]]:
        """(param, axis) pairs whose rule involves ``group``."""
        return [(p, a.axis) for p, lst in self.axes.items() for a in lst if group in expr_groups(a.expr)]

    def summary(self) -> str:
        lines = [f"PermutationSpec: {len(self.groups)} groups"]
        for g in self.groups.values():
            extra = f" heads={g.n_heads} head_dim={g.head_dim} per_head={g.per_head} of {g.head_group}" \
                if g.kind == "within_head" else ""
            lines.append(f"  {g.kind:11s} {g.size:6d}  {g.name}{extra}  ({len(self.members(g.name))} axes)")
        if self.unknown_ops:
            lines.append(f"  unknown ops (axes left in place): {', '.join(self.unknown_ops)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PermutationSpec({len(self.groups)} groups, {len(self.axes)} permuted tensors)"

    # ---- permutations
    def identity(self) -> Permutation:
        return Permutation({n: torch.arange(g.size) for n, g in self.groups.items()})

    def random_permutation(self, seed: int = 0) -> Permutation:
        gen = torch.Generator().manual_seed(seed)
        p = Permutation()
        for n, g in self.groups.items():
            if g.kind != "within_head" or not g.per_head:
                p[n] = torch.randperm(g.size, generator=gen)
        for n, g in self.groups.items():
            if g.kind == "within_head" and g.per_head:
                taus = [torch.randperm(g.head_dim, generator=gen) for _ in range(g.n_heads)]
                p[n] = compose_heads(p[g.head_group], taus, g.head_dim)
        return p

    def check(self, perm: Mapping[str, torch.Tensor], where: str = "permutation") -> Permutation:
        """Validate a permutation against this spec (names, sizes, head consistency)."""
        missing = [n for n in self.groups if n not in perm]
        if missing:
            raise MergelabError(f"{where}: group {missing[0]!r} missing; expected {len(self.groups)} groups, "
                                f"found {len(perm)}")
        out = Permutation(history=getattr(perm, "history", None))
        for n, g in self.groups.items():
            v = torch.as_tensor(perm[n]).to(torch.int64).reshape(-1)
            if len(v) != g.size or not torch.equal(torch.sort(v).values, torch.arange(g.size)):
                raise MergelabError(f"{where}: group {n!r} is not a permutation of {g.size} indices "
                                    f"(length {len(v)})")
            out[n] = v
        for n, g in self.groups.items():
            if g.kind == "within_head" and g.per_head:
                v = out[n].view(g.n_heads, g.head_dim)
                heads = v // g.head_dim
                if not torch.equal(heads, out[g.head_group][:, None].expand_as(heads)):
                    raise MergelabError(f"{where}: within-head group {n!r} moves dims across heads "
                                        f"inconsistently with head group {g.head_group!r}")
        return out


def compose_heads(sigma: torch.Tensor, taus, d: int) -> torch.Tensor:
    """Flat vector for new slot h: old head sigma[h], dims permuted by taus[sigma[h]]."""
    return torch.cat([int(s) * d + taus[int(s)] for s in sigma])


def split_heads(flat: torch.Tensor, d: int):
    """Inverse of :func:`compose_heads`: (sigma, taus indexed by old head)."""
    v = flat.view(-1, d)
    sigma = v[:, 0] // d
    taus = [None] * len(sigma)
    for h, s in enumerate(sigma.tolist()):
        taus[s] = v[h] - s * d
    return sigma, taus
