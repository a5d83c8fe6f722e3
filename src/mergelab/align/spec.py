"""Permutation specs derived from a traced model, and their self-test.

How a spec is built (:func:`permutation_spec`):

1. **Trace.** The model runs once on the example inputs under a dispatch mode that sees
   every ATen op with its real tensors (any Python control flow is fine, nothing is
   symbolic).  ``nn.MultiheadAttention`` is traced as one step (a module-level handler).
2. **Link axes.** Each op's handler (:mod:`mergelab.align.ops`) links tensor axes that must
   carry the same permutation; a union-find over ``(tensor, axis)`` merges them into classes.
   A reshape that splits an axis records a *product* structure (``768 = 12 heads x 64``), a
   concatenation a *cat* structure; classes with equal structure are merged, and so are the
   parts of a class split twice in the same way.
3. **Groups.** A class that holds a parameter axis becomes a group unless it touches a model
   input or output, an op that pins it (an embedding's rows, a slice, an unknown op), or has
   size 1.  Structured classes are not groups themselves; their permutation is composed
   from their parts.  Group kinds:

   * ``plain``: an ordinary hidden axis (a layer's units, a residual stream, conv channels);
   * ``heads``: the head axis of an attention block (size ``n_heads``): whole heads move;
   * ``within_head``: the dimensions inside a head (one for query/key, one for value/output).
     When every tensor that carries it also carries the head axis (true for SDPA-style and
     ``nn.MultiheadAttention`` attention) each head gets its own permutation
     (``per_head=True``) and the group's index vector is the *composed* permutation of the
     flat ``n_heads*head_dim`` axis (it is consistent with the head group's vector);
     otherwise one permutation is shared by all heads (a vector of ``head_dim``).
   GroupNorm's channel groups are represented the same way (``heads`` = the norm groups).
4. **Self-test, always.** A copy of the model is re-initialised at a larger scale (weights
   ``N(0, 1.5/sqrt(fan_in))``, norms and biases randomised) so that attention is far from
   uniform, a random permutation is drawn for every group, and the permuted copy is run
   again.  *Every* intermediate tensor of the trace must equal the original one permuted
   by the spec's rule for its axes (max abs difference <= 1e-5 x max(1, max|value|) in
   float32).  A spec that fails is never returned: :class:`MergelabError` names the op.

Unknown ops are never guessed: the axes they touch are left unpermuted, and their names
are listed in :attr:`PermutationSpec.unknown_ops`; :attr:`PermutationSpec.frozen` says, for
every parameter axis that is not permuted, why.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import MergelabError
from . import ops as _ops

LEAF_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)


# =========================================================================== expressions
# An axis rule ("expr") says how one tensor axis is permuted:
#   ("id", n)                    left in place
#   ("group", name)              the group's index vector
#   ("prod", (e1, e2, ...))      the axis is the row-major product of the parts
#   ("cat", (e1, e2, ...))       the axis is the concatenation of the parts
#   ("headdim", name, o_axis)    activations only: per-head within-head axis, permuted jointly
#                                with the tensor's head axis o_axis by the group's composed vector

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


# =========================================================================== spec objects
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


# =========================================================================== tracing
def _leaves(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _leaves(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _leaves(v)]
    return []


def call_model(model, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@dataclass
class _Op:
    name: str
    func: Any
    args: tuple
    kwargs: dict
    in_tensors: list
    outs: list
    module: Any = None

    def schema_args(self) -> dict:
        names = [a.name for a in self.func._schema.arguments]
        d = dict(zip(names, self.args))
        d.update(self.kwargs)
        return d


def _packet(func) -> str:
    return ".".join(str(func).split(".")[:2])


class _Recorder(TorchDispatchMode):
    """Records ATen ops (and leaf-module calls) in order.

    ``keep='all'`` stores full op records (tracing); ``keep='values'`` also cloned outputs;
    ``want={(op name, occurrence): [output indices]}`` stores only those outputs (keyed by
    the op's name and how many ops of that name ran before it, so that unrelated ops, e.g.
    an attention-mask branch taken for one batch and not another, do not shift the sites).
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in a dynamo "disable" unless this says
        # False; that wrapper imports torch._dynamo (and sympy) on first use, several
        # seconds.  This recorder never runs under torch.compile.
        return False

    def __init__(self, keep="all", want=None):
        super().__init__()
        self.keep, self.want = keep, want
        self.records: list = []
        self.values: list = []
        self.counts: dict = {}
        self.names: list[str] = []
        self.depth = 0

    def _add(self, name, func, args, kwargs, out, module=None):
        self.depth += 1   # the clones below must not be recorded
        try:
            self._add_inner(name, func, args, kwargs, out, module)
        finally:
            self.depth -= 1

    def _add_inner(self, name, func, args, kwargs, out, module=None):
        self.names.append(name)
        outs = _leaves(out)
        ins = _leaves(args) + _leaves(kwargs)
        if module is not None:
            ins += list(module.parameters()) + list(module.buffers())
        # the same bookkeeping in every mode, so that every mode runs the same ops
        self.records.append(_Op(name, func, args, kwargs or {}, ins, outs, module))
        if self.keep == "values":
            self.values.append([o.detach().clone() for o in outs])
        elif self.want is not None:
            k = self.counts.get(name, 0)
            self.counts[name] = k + 1
            js = self.want.get((name, k))
            if js is not None and all(j < len(outs) for j in js):
                self.values.append(((name, k), [outs[j].detach().clone() for j in js]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self._add(_packet(func), func, args, kwargs, out)
        return out


def run_recorded(model, inputs, keep="all", want=None):
    """Run ``model`` on ``inputs`` recording ops; returns (recorder, output)."""
    rec = _Recorder(keep, want)
    hooks = []
    for m in model.modules():
        if isinstance(m, LEAF_MODULES):
            def pre(mod, args, kwargs):
                rec.depth += 1

            def post(mod, args, kwargs, out):
                rec.depth -= 1
                if rec.depth == 0:
                    rec._add("module:" + type(mod).__name__, None, args, kwargs, out, module=mod)
            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(m.register_forward_hook(post, with_kwargs=True))
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), rec:
            out = call_model(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in hooks:
            h.remove()
    return rec, out


# =========================================================================== union-find
class _Graph:
    """Union-find over axis nodes, with product/concatenation structures and frozen flags."""

    def __init__(self):
        self.parent: dict = {}
        self.size: dict = {}
        self.frozen: dict = {}     # root -> reason
        self.structs: dict = {}    # root -> [(kind, parts)]
        self.nvirtual = 0

    def add(self, n, size):
        if n not in self.parent:
            self.parent[n] = n
            self.size[n] = size

    def find(self, n):
        p = self.parent
        while p[n] != n:
            p[n] = p[p[n]]
            n = p[n]
        return n

    def is_frozen(self, n):
        return self.find(n) in self.frozen

    def freeze(self, n, why):
        r = self.find(n)
        if r not in self.frozen:
            self.frozen[r] = why
            return True
        return False

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, "linked to an axis of another size")
            self.freeze(rb, "linked to an axis of another size")
            return False
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if rb in self.structs:
            self.structs.setdefault(ra, []).extend(self.structs.pop(rb))
        return True

    def struct(self, kind, whole, parts):
        self.structs.setdefault(self.find(whole), []).append((kind, tuple(parts)))

    def resolve(self):
        """Merge classes until structures are consistent; propagate frozen flags."""
        changed = True
        while changed:
            changed = False
            new = defaultdict(list)
            for r, lst in self.structs.items():
                for kind, parts in lst:
                    s = (kind, tuple(self.find(p) for p in parts))
                    if s not in new[self.find(r)]:
                        new[self.find(r)].append(s)
            self.structs = dict(new)
            for r, lst in list(self.structs.items()):
                if changed:
                    break
                k0, p0 = lst[0]
                if r in p0:
                    changed |= self.freeze(r, "axis is a part of itself")
                for k1, p1 in lst[1:]:
                    if changed:
                        break
                    if k0 == k1 and len(p0) == len(p1) and all(self.size[a] == self.size[b] for a, b in zip(p0, p1)):
                        for a, b in zip(p0, p1):
                            changed |= self.union(a, b)
                    else:
                        changed |= self.freeze(r, "axis is split in two incompatible ways")
            if changed:
                continue
            seen = {}
            for r, lst in list(self.structs.items()):
                key = lst[0]
                if key in seen and self.find(seen[key]) != self.find(r):
                    changed |= self.union(seen[key], r)
                    break
                seen.setdefault(key, r)
            if changed:
                continue
            for r, lst in self.structs.items():
                parts = lst[0][1]
                if r in self.frozen:
                    for p in parts:
                        changed |= self.freeze(p, self.frozen[r])
                elif all(self.find(p) in self.frozen for p in parts):
                    changed |= self.freeze(r, "all its parts are fixed")


class _Ctx:
    """What a handler sees: the op and the link/freeze vocabulary."""

    def __init__(self, builder, op):
        self.b, self.op = builder, op
        self.touched: set = set()

    def ax(self, t, a):
        a = a + t.dim() if a < 0 else a
        n = ("t", id(t), a)
        self.b.register(t)
        self.b.g.add(n, t.shape[a])
        self.touched.add(n)
        return n

    def seg(self, t, a, start, length):
        if start == 0 and length == t.shape[a]:
            return self.ax(t, a)
        self.b.register(t)
        n = ("s", id(t), a, start, length)
        if n not in self.b.g.parent and id(t) in self.b.state:
            self.b.param_order.append(n)
        self.b.g.add(n, length)
        self.touched.add(("t", id(t), a))
        self.b.segmented.add(("t", id(t), a))
        return n

    def virtual(self, size):
        self.b.g.nvirtual += 1
        n = ("v", self.b.g.nvirtual)
        self.b.g.add(n, size)
        if size == 1:
            self.b.g.freeze(n, "size 1")
        return n

    def link(self, a, b):
        self.b.g.union(a, b)

    def ok(self, n):
        pass   # touched by ax(); nothing else to say

    def freeze(self, n, why):
        self.b.g.freeze(n, why)

    def prod(self, whole, parts):
        parts = [p for p in parts if self.b.g.size[p] != 1]
        if not parts:
            return
        if len(parts) == 1:
            return self.link(whole, parts[0])
        if len(parts) > 2:   # right-nested: (a, (b, c))
            rest = self.virtual(math.prod(self.b.g.size[p] for p in parts[1:]))
            self.prod(rest, parts[1:])
            parts = [parts[0], rest]
        self.b.g.struct("prod", whole, parts)

    def cat(self, whole, parts):
        self.b.g.struct("cat", whole, parts)


class _Builder:
    def __init__(self, model, inputs):
        self.g = _Graph()
        self.known: dict[int, torch.Tensor] = {}
        self.state: dict[int, list[str]] = defaultdict(list)
        for name, t in model.state_dict(keep_vars=True).items():
            self.state[id(t)].append(name)
        self.inputs = _leaves(inputs)
        self.segmented: set = set()
        self.unknown: list[str] = []
        self.param_order: list = []    # param nodes in order of first use

    def register(self, t):
        if id(t) in self.known:
            return
        self.known[id(t)] = t
        if id(t) in self.state:
            for a in range(t.dim()):
                self.param_order.append(("t", id(t), a))
        elif not getattr(self, "_producing", False):
            # neither a parameter, a model input nor an op output: a constant (e.g. a
            # non-persistent buffer); its axes stay in place
            for a in range(t.dim()):
                n = ("t", id(t), a)
                self.g.add(n, t.shape[a])
                self.g.freeze(n, "constant tensor outside the state dict")

    def trace(self, model, inputs):
        for t in self.inputs:
            self._producing = True
            self.register(t)
            self._producing = False
            for a in range(t.dim()):
                n = ("t", id(t), a)
                self.g.add(n, t.shape[a])
                self.g.freeze(n, "model input")
        rec, out = run_recorded(model, inputs, keep="all")
        self.records = rec.records
        for op in rec.records:
            for t in op.in_tensors:
                self.register(t)
            self._producing = True
            for t in op.outs:
                self.register(t)
            self._producing = False
            c = _Ctx(self, op)
            h = _ops.HANDLERS.get(op.name)
            if h is None and op.func is not None and torch.Tag.pointwise in op.func.tags:
                h = _ops.pointwise
            if h is None:
                if op.name not in self.unknown:
                    self.unknown.append(op.name)
                why = f"unknown op {op.name}"
            else:
                h(c, op)
                why = f"{op.name} does not say how this axis moves"
            for t in op.in_tensors + op.outs:
                for a in range(t.dim()):
                    n = ("t", id(t), a)
                    if n not in c.touched and t.shape[a] > 1:
                        self.g.add(n, t.shape[a])
                        self.g.freeze(n, why)
        self.outputs = _leaves(out)
        for t in self.outputs:
            self.register(t)
            for a in range(t.dim()):
                n = ("t", id(t), a)
                self.g.add(n, t.shape[a])
                self.g.freeze(n, "model output")
        for n in self.segmented:
            if n in self.g.parent:   # used both whole and in segments: keep it all in place
                tid, a = n[1], n[2]
                for m in list(self.g.parent):
                    if m[0] == "s" and m[1] == tid and m[2] == a:
                        self.g.freeze(m, "axis used both whole and in segments")
                self.g.freeze(n, "axis used both whole and in segments")
        self.g.resolve()

    # ------------------------------------------------------------------ groups
    def build(self) -> PermutationSpec:
        g = self.g
        find = g.find
        nodes = list(g.parent)
        pnodes = [n for n in nodes if n[0] in ("t", "s") and n[1] in self.state]
        # relevant classes: those holding a parameter axis, and (recursively) their parts
        relevant = {find(n) for n in pnodes}
        stack = list(relevant)
        while stack:
            r = stack.pop()
            for _, parts in g.structs.get(r, [])[:1]:
                for p in parts:
                    if find(p) not in relevant:
                        relevant.add(find(p))
                        stack.append(find(p))

        def fixed(r):
            return r in g.frozen or r not in relevant or g.size[r] == 1

        # roles: heads (outer of a 2-part product whose inner also moves) and within-head
        outer_of: dict = defaultdict(set)
        inner_of: dict = defaultdict(set)
        for r, lst in g.structs.items():
            kind, parts = lst[0]
            if kind == "prod" and len(parts) == 2 and not fixed(r):
                o, i = parts
                if not fixed(o) and not fixed(i):
                    outer_of[o].add(r)
                    inner_of[i].add(o)
        # tensors carrying each class (for the per-head test)
        cls_tensors: dict = defaultdict(set)
        tensor_classes: dict = defaultdict(set)
        for n in nodes:
            if n[0] == "t":
                cls_tensors[find(n)].add(n[1])
                tensor_classes[n[1]].add(find(n))
        param_classes = {find(n) for n in pnodes}
        per_head = {}
        for i, outers in inner_of.items():
            o = next(iter(outers))
            per_head[i] = (len(outers) == 1 and i not in outer_of and i not in param_classes
                           and i not in g.structs
                           and all(o in tensor_classes[t] for t in cls_tensors[i]))

        atomic = [r for r in relevant if not fixed(r) and r not in g.structs]
        # order and names: first parameter axis (trace order) that shows the class
        order = {}
        label = {}
        for n in self.param_order:
            if n not in g.parent:
                continue
            r = find(n)
            nm = self._node_name(n)
            if r not in order:
                order[r] = len(order)
                label[r] = nm
            for kind, parts in g.structs.get(r, [])[:1]:
                for k, p in enumerate(parts):
                    p = find(p)
                    if p not in order:
                        order[p] = len(order)
                        label[p] = nm + ("/heads" if p in outer_of else "/within" if p in inner_of else f"/part{k}")
        atomic.sort(key=lambda r: order.get(r, 1 << 30))
        names, groups = {}, {}
        for r in atomic:
            nm = label.get(r, f"group{len(names)}")
            names[r] = nm
        for r in atomic:
            nm = names[r]
            if r in outer_of:
                groups[nm] = Group(nm, "heads", g.size[r], n_heads=g.size[r])
            elif r in inner_of:
                o = next(iter(inner_of[r]))
                H, d = g.size[o], g.size[r]
                ph = per_head[r]
                groups[nm] = Group(nm, "within_head", H * d if ph else d, n_heads=H, head_dim=d,
                                   head_group=names[o], per_head=ph)
            else:
                groups[nm] = Group(nm, "plain", g.size[r])
        # order: heads before their within-head groups is already guaranteed by naming order
        self.names = names

        memo = {}

        def expr(r):
            r = find(r)
            if r in memo:
                return memo[r]
            if fixed(r):
                e = ("id", g.size[r])
            elif r in names:
                e = ("group", names[r])
            else:
                kind, parts = g.structs[r][0]
                if kind == "prod" and len(parts) == 2 and find(parts[1]) in per_head \
                        and per_head[find(parts[1])] and find(parts[0]) in names:
                    e = ("group", names[find(parts[1])])
                else:
                    sub = tuple(expr(p) for p in parts)
                    e = ("id", g.size[r]) if all(s[0] == "id" for s in sub) else (kind, sub)
            memo[r] = e
            return e

        self.expr = expr
        axes: dict[str, list[AxisPerm]] = {}
        frozen: dict[str, str] = {}
        seg_index = defaultdict(list)
        for n in g.parent:
            if n[0] == "s":
                seg_index[(n[1], n[2])].append(n)
        for tid, pnames in self.state.items():
            t = self.known.get(tid)
            if t is None:
                continue
            for a in range(t.dim()):
                if t.shape[a] <= 1:
                    continue
                segs = sorted(seg_index[(tid, a)], key=lambda n: n[3])
                full = ("t", tid, a)
                entries, why = [], None
                if full in g.parent:
                    e = expr(full)
                    if e[0] != "id":
                        entries.append(AxisPerm(a, 0, t.shape[a], e))
                    else:
                        why = g.frozen.get(find(full), "nothing to permute")
                elif segs:
                    for n in segs:
                        e = expr(n)
                        if e[0] != "id":
                            entries.append(AxisPerm(a, n[3], n[4], e))
                    if not entries:
                        why = g.frozen.get(find(segs[0]), "nothing to permute")
                else:
                    why = "no op says how this axis moves (e.g. a kernel axis)"
                for pn in pnames:
                    if entries:
                        axes.setdefault(pn, []).extend(entries)
                    else:
                        frozen[f"{pn}:{a}"] = why
        # activation rules for the self-test and activation matching
        act = []
        for i, op in enumerate(self.records):
            act.append([self._act_exprs(t, per_head, names) for t in op.outs])
        info = _TraceInfo([op.name for op in self.records], act)
        return PermutationSpec(groups, axes, frozen, list(self.unknown), info)

    def _act_exprs(self, t, per_head, names):
        g = self.g
        ex = []
        for a in range(t.dim()):
            n = ("t", id(t), a)
            if n not in g.parent or t.shape[a] <= 1:
                ex.append(None)
                continue
            r = g.find(n)
            if per_head.get(r) and r in names:
                grp = names[r]
                o = next(rr for rr in self._inner_outer(r))
                oa = next(b for b in range(t.dim()) if ("t", id(t), b) in g.parent and g.find(("t", id(t), b)) == o)
                ex.append(("headdim", grp, oa))
                continue
            e = self.expr(n)
            ex.append(None if e[0] == "id" else e)
        return ex

    def _inner_outer(self, r):
        g = self.g
        for rr, lst in g.structs.items():
            kind, parts = lst[0]
            if kind == "prod" and len(parts) == 2 and g.find(parts[1]) == r:
                yield g.find(parts[0])

    def _node_name(self, n):
        nm = self.state[n[1]][0]
        if n[0] == "s":
            return f"{nm}:{n[2]}[{n[3]}:{n[3] + n[4]}]"
        return f"{nm}:{n[2]}"


@dataclass
class _TraceInfo:
    op_names: list[str]
    act_exprs: list   # per op, per output: per-axis rule or None


# =========================================================================== public
def _reinit(model: nn.Module, seed: int, gain: float = 1.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen or not t.is_floating_point() or t.numel() == 0:
                continue
            seen.add(id(t))
            r = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if name.endswith("running_var"):
                v = torch.rand(t.shape, generator=gen) + 0.5
            elif t.dim() >= 2:
                v = r * (gain / math.sqrt(t[0].numel()))
            elif name.endswith("bias") or name.endswith("running_mean"):
                v = r * 0.3
            else:
                v = 1.0 + 0.3 * r
            t.copy_(v.to(t.dtype))


def _compare(ref_vals, new_vals, info: _TraceInfo, perm, names2):
    for i, (outs_a, outs_b) in enumerate(zip(ref_vals, new_vals)):
        for j, (a, b) in enumerate(zip(outs_a, outs_b)):
            ex = info.act_exprs[i][j]
            exp = apply_exprs(a, ex, perm) if any(e is not None for e in ex) else a
            if exp.shape != b.shape:
                return i, j, float("inf")
            if not (a.is_floating_point() or a.is_complex()):
                if not torch.equal(exp, b):
                    return i, j, float("inf")
                continue
            if a.numel() == 0:
                continue
            diff = torch.sub(exp, b)
            d = float((diff.abs() if diff.is_complex() else diff.abs_()).max())
            if d == d and d != float("inf"):   # all finite: the common, fast case
                if exp.is_complex():
                    scale = float(exp.abs().max())
                else:
                    lo, hi = torch.aminmax(exp)
                    scale = max(-float(lo), float(hi))
                if d <= 1e-5 * max(1.0, scale):
                    continue
                return i, j, d
            fin = torch.isfinite(exp)
            if not torch.equal(fin, torch.isfinite(b)) or not torch.equal(
                    torch.nan_to_num(exp[~fin], nan=0.0), torch.nan_to_num(b[~fin], nan=0.0)):
                return i, j, float("inf")
            if not fin.any():
                continue
            tol = 1e-5 * max(1.0, float(exp[fin].abs().max()))
            d = float((exp[fin] - b[fin]).abs().max())
            if not d <= tol:
                return i, j, d
    if len(ref_vals) != len(new_vals):
        return min(len(ref_vals), len(new_vals)), 0, float("inf")
    return None


def self_test(spec: PermutationSpec, model: nn.Module, example_inputs, seed: int = 0, reinit: bool = True):
    """Check ``spec`` on ``model``: every traced activation permutes as the spec says.

    Raises :class:`MergelabError` naming the first op whose output disagrees.
    """
    from .apply import permute
    if reinit:
        m1 = copy.deepcopy(model).float().eval()
        _reinit(m1, seed + 1)
    else:   # the caller's own float copy
        m1 = model.eval()
    rec1, _ = run_recorded(m1, example_inputs, keep="values")
    if rec1.names != spec.trace.op_names:
        raise MergelabError("self-test: the model ran a different sequence of ops than when traced "
                            "(data-dependent control flow?)")
    perm = spec.random_permutation(seed)
    state = {k: v.detach() for k, v in m1.state_dict().items()}
    m2 = copy.deepcopy(m1)
    m2.load_state_dict(permute(spec, state, perm))
    rec2, _ = run_recorded(m2, example_inputs, keep="values")
    bad = _compare(rec1.values, rec2.values, spec.trace, perm, None)
    if bad is not None:
        i, j, d = bad
        groups = sorted(set().union(*[expr_groups(e) for e in spec.trace.act_exprs[i][j] if e is not None])) \
            if i < len(spec.trace.act_exprs) and j < len(spec.trace.act_exprs[i]) else []
        raise MergelabError(f"permutation spec self-test failed at op #{i} {rec1.names[i]} output {j}: "
                            f"max abs difference {d:.3g}; groups on that tensor: {groups or 'none'}")


def permutation_spec(model: nn.Module, example_inputs, seed: int = 0) -> PermutationSpec:
    """Trace ``model`` on ``example_inputs`` and return its self-tested permutation spec.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    Use inputs that exercise every path (e.g. an attention mask with padding).
    """
    if not isinstance(model, nn.Module):
        raise MergelabError(f"permutation_spec: expected a torch.nn.Module, found {type(model).__name__}")
    work = copy.deepcopy(model).float().eval()
    _reinit(work, seed + 1)
    b = _Builder(work, example_inputs)
    try:
        b.trace(work, example_inputs)
    except MergelabError:
        raise
    except Exception as e:   # the model itself failed on these inputs
        raise MergelabError(f"permutation_spec: running the model on the example inputs failed: "
                            f"{type(e).__name__}: {e}") from e
    spec = b.build()
    self_test(spec, work, example_inputs, seed=seed, reinit=False)
    return spec
