"""The spec builder: links axes op by op (handlers in :mod:`mergelab.align.ops`), then turns
the union-find classes into groups, per-parameter axis rules and activation rules."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from .. import ops as _ops
from .objects import AxisPerm, Group, PermutationSpec
from .record import _leaves, run_recorded
from .unionfind import _Graph


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
        self.b.segmented[("t", id(t), a)] = None
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

    def piece(self, whole, start, length, node):
        """``node`` is ``whole[start:start+length]`` (resolved once every piece is known)."""
        self.b.slices.setdefault((whole[1], whole[2]), []).append((start, length, node))


class _Builder:
    def __init__(self, model, inputs):
        self.g = _Graph()
        self.known: dict[int, torch.Tensor] = {}
        self.state: dict[int, list[str]] = defaultdict(list)
        self.state_tensors: dict[int, torch.Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            self.state[id(t)].append(name)
            self.state_tensors[id(t)] = t
        self.inputs = _leaves(inputs)
        # non-persistent buffers (e.g. rotary frequencies): named in the frozen reasons
        self.buffer_names = {id(t): n for n, t in model.named_buffers() if id(t) not in self.state}
        self.segmented: dict = {}      # ordered set: (t, id, axis) used in segments
        self.slices: dict = {}         # (id, axis) -> [(start, length, out node)]
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
            bn = self.buffer_names.get(id(t))
            why = (f"its values follow the constant buffer {bn} (outside the state dict) along "
                   f"this axis" if bn else "constant tensor outside the state dict")
            for a in range(t.dim()):
                n = ("t", id(t), a)
                self.g.add(n, t.shape[a])
                self.g.freeze(n, why)

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
        self._resolve_slices()
        for n in self.segmented:
            if n in self.g.parent:   # used both whole and in segments: keep it all in place
                tid, a = n[1], n[2]
                for m in list(self.g.parent):
                    if m[0] == "s" and m[1] == tid and m[2] == a:
                        self.g.freeze(m, "axis used both whole and in segments")
                self.g.freeze(n, "axis used both whole and in segments")
        self.g.resolve()

    def _resolve_slices(self):
        """Slices of one axis that tile it exactly (``x[..., :d/2]``, ``x[..., d/2:]``; a fused
        projection cut by slicing) make it the concatenation of the pieces; any other slice
        (part of an axis, overlapping pieces, steps) pins the axis and the pieces."""
        g = self.g
        for (tid, a), pieces in self.slices.items():
            whole = ("t", tid, a)
            n = g.size[whole]
            ranges: dict = {}
            for start, length, node in pieces:
                ranges.setdefault((start, length), []).append(node)
            for nodes in ranges.values():
                for m in nodes[1:]:
                    g.union(nodes[0], m)
            keys = sorted(ranges)
            pos, ok = 0, True
            for start, length in keys:
                ok = ok and start == pos and length > 0
                pos = start + length
            if ok and pos == n and len(keys) > 1:
                g.struct("cat", whole, [ranges[k][0] for k in keys])
            else:
                g.freeze(whole, "slice takes part of an axis")
                for nodes in ranges.values():
                    g.freeze(nodes[0], "slice takes part of an axis")

    # ------------------------------------------------------------------ groups
    def build(self) -> PermutationSpec:
        g = self.g
        find = g.find
        nodes = list(g.parent)
        pnodes = [n for n in nodes if n[0] in ("t", "s") and n[1] in self.state]
        # relevant classes: those holding a parameter axis, and (recursively) their parts
        # (dicts as ordered sets throughout: iteration must not depend on ids or hashes)
        relevant = dict.fromkeys(find(n) for n in pnodes)
        stack = list(relevant)
        while stack:
            r = stack.pop()
            for _, parts in g.structs.get(r, [])[:1]:
                for p in parts:
                    if find(p) not in relevant:
                        relevant[find(p)] = None
                        stack.append(find(p))

        def fixed(r):
            return r in g.frozen or r not in relevant or g.size[r] == 1

        # roles: heads (outer of a 2-part product whose inner also moves) and within-head
        outer_of: dict = defaultdict(dict)
        inner_of: dict = defaultdict(dict)
        for r, lst in g.structs.items():
            kind, parts = lst[0]
            if kind == "prod" and len(parts) == 2 and not fixed(r):
                o, i = parts
                if not fixed(o) and not fixed(i):
                    outer_of[o][r] = None
                    inner_of[i][o] = None
        # tensors carrying each class (for the per-head test)
        cls_tensors: dict = defaultdict(dict)
        tensor_classes: dict = defaultdict(dict)
        for n in nodes:
            if n[0] == "t":
                cls_tensors[find(n)][n[1]] = None
                tensor_classes[n[1]][find(n)] = None
        param_classes = dict.fromkeys(find(n) for n in pnodes)
        per_head = {}
        for i, outers in inner_of.items():
            # one inner permutation per head needs a single head axis that is itself a
            # group and travels with the inner axis on every tensor; an inner axis under
            # several head axes (grouped-query attention: query heads = kv heads x group)
            # shares one permutation across heads
            o = next(iter(outers))
            per_head[i] = (len(outers) == 1 and o not in g.structs and i not in outer_of
                           and i not in param_classes and i not in g.structs
                           and all(o in tensor_classes[t] for t in cls_tensors[i]))

        atomic = [r for r in relevant if not fixed(r) and r not in g.structs]
        atomic_set = dict.fromkeys(atomic)
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
            stack = [(r, nm)]
            while stack:   # parts, and parts of parts (GQA: query heads = kv heads x group)
                q, qn = stack.pop()
                for kind, parts in g.structs.get(q, [])[:1]:
                    for k, p in enumerate(parts):
                        p = find(p)
                        if p not in order:
                            order[p] = len(order)
                            label[p] = qn + ("/heads" if p in outer_of else "/within" if p in inner_of
                                             else f"/part{k}")
                            stack.append((p, label[p]))
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
                # its head group: the first outer that is a group itself (trace order)
                o = next((x for x in inner_of[r] if x in atomic_set), next(iter(inner_of[r])))
                H, d = g.size[o], g.size[r]
                ph = per_head[r]
                groups[nm] = Group(nm, "within_head", H * d if ph else d, n_heads=H, head_dim=d,
                                   head_group=names.get(o, ""), per_head=ph)
            else:
                groups[nm] = Group(nm, "plain", g.size[r])
        # order: heads before their within-head groups is already guaranteed by naming order
        self.names = names
        self.per_head = per_head

        memo = {}

        def expr(r):
            r = find(r)
            if r in memo:
                return memo[r]
            if r in g.frozen or g.size[r] == 1:
                e = ("id", g.size[r])
            elif r in names:
                e = ("group", names[r])
            elif r not in g.structs:   # an atomic class that is no group
                e = ("id", g.size[r])
            else:   # composed from its parts (also for activation axes holding no parameter)
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
            if t is None:   # not used on this forward pass (e.g. a training-only embedding)
                t = self.state_tensors[tid]
                for a in range(t.dim()):
                    if t.shape[a] > 1:
                        for pn in pnames:
                            frozen[f"{pn}:{a}"] = "not used by the traced forward pass: how it moves is unknown"
                continue
            for a in range(t.dim()):
                if t.shape[a] <= 1:
                    continue
                segs = sorted(seg_index[(tid, a)], key=lambda n: n[3])
                full = ("t", tid, a)
                entries, why, parts_frozen = [], None, []
                if full in g.parent:
                    e = expr(full)
                    if e[0] != "id":
                        entries.append(AxisPerm(a, 0, t.shape[a], e))
                        parts_frozen.extend(self._frozen_parts(full, ""))
                    else:
                        why = g.frozen.get(find(full), "nothing to permute")
                elif segs:
                    for n in segs:
                        e = expr(n)
                        if e[0] != "id":
                            entries.append(AxisPerm(a, n[3], n[4], e))
                        parts_frozen.extend(self._frozen_parts(n, f"[{n[3]}:{n[3] + n[4]}]"))
                    if not entries:
                        why = g.frozen.get(find(segs[0]), "nothing to permute")
                else:
                    why = "no op says how this axis moves (e.g. a kernel axis)"
                for pn in pnames:
                    if entries:
                        axes.setdefault(pn, []).extend(entries)
                        for path, w in parts_frozen:   # pinned parts of a permuted axis
                            frozen[f"{pn}:{a}{path}"] = w
                    else:
                        frozen[f"{pn}:{a}"] = why
        # activation rules for the self-test and activation matching
        act = []
        for i, op in enumerate(self.records):
            act.append([self._act_exprs(t, per_head, names) for t in op.outs])
        info = _TraceInfo([op.name for op in self.records], act)
        return PermutationSpec(groups, axes, frozen, list(self.unknown), info)

    def _frozen_parts(self, n, path):
        """(path, reason) for each pinned part (size > 1) of the axis node ``n``'s structure,
        e.g. the within-head dims of a rotary query projection: ``/part1`` is the second
        part of a product (heads x head_dim) or concatenation."""
        g, names, per_head = self.g, self.names, self.per_head
        r = g.find(n)
        if g.size[r] == 1 or r in names:
            return []
        if r in g.frozen:
            return [(path, f"size {g.size[r]}: {g.frozen[r]}")] if path else []
        if r not in g.structs:
            return [(path, f"size {g.size[r]}: not a group (no parameter axis moves with it)")] if path else []
        kind, parts = g.structs[r][0]
        if kind == "prod" and len(parts) == 2 and per_head.get(g.find(parts[1])) and g.find(parts[0]) in names:
            return []
        out = []
        for k, p in enumerate(parts):
            out.extend(self._frozen_parts(p, f"{path}/part{k}"))
        return out

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
