"""Per-op axis-link handlers for the permutation tracer.

The tracer (:mod:`mergelab.align.spec.build`) runs the model once under a dispatch mode and sees
every ATen op with its real tensors.  For each op a handler here states which tensor axes
must carry the SAME permutation (``c.link``), which axes are split into / merged from
others (``c.prod`` for a reshape or a head split, ``c.cat`` for a concatenation), which axes
are merely reduced over or broadcast and so do not care (``c.ok``), and which must stay
in place (``c.freeze``).  Any axis of an op's inputs or outputs that its handler does not
mention is frozen (left unpermuted): a handler can be incomplete, never wrong by omission.

An op with no handler is not guessed: every axis it touches is frozen and its name is
recorded in ``PermutationSpec.unknown_ops``.

Handlers are keyed by the op's overload packet name, e.g. ``"aten.mm"``.  Module-level
handlers (for modules traced as one opaque step, e.g. ``nn.MultiheadAttention``) are keyed
by ``"module:<ClassName>"``.
"""
from __future__ import annotations

from typing import Callable

import torch

HANDLERS: dict[str, Callable] = {}


def handles(*names: str):
    def deco(fn):
        for n in names:
            HANDLERS[n] = fn
        return fn
    return deco


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def _dim(d, n):
    return d + n if d < 0 else d


def _same(c, a: torch.Tensor, b: torch.Tensor):
    """Link every axis of two tensors of the same shape."""
    for i in range(a.dim()):
        c.link(c.ax(a, i), c.ax(b, i))


def broadcast_link(c, src: torch.Tensor, out: torch.Tensor):
    """Right-aligned broadcasting: equal sizes link, size-1 source axes broadcast."""
    n, k = out.dim(), src.dim()
    for i in range(k):
        j = n - k + i
        if j < 0:
            continue
        if src.shape[i] == out.shape[j]:
            c.link(c.ax(src, i), c.ax(out, j))
    for j in range(n):   # axes the source broadcasts over do not care
        i = j - (n - k)
        if i < 0 or src.shape[i] == 1:
            c.ok(c.ax(out, j))


# ------------------------------------------------------------------ elementwise
def pointwise(c, op):
    outs = op.outs
    ins = op.in_tensors
    for o in outs:
        for t in ins:
            if t.dim() <= o.dim():
                broadcast_link(c, t, o)


for _n in ("aten.clone", "aten._to_copy", "aten.detach", "aten.alias", "aten.lift_fresh",
           "aten.contiguous", "aten.native_dropout", "aten.dropout", "aten.copy_", "aten.copy",
           "aten.masked_fill", "aten.masked_fill_", "aten._conj", "aten.to"):
    HANDLERS[_n] = pointwise


@handles("aten.fill_", "aten.zero_", "aten.zeros_like", "aten.ones_like", "aten.full_like",
         "aten.empty_like", "aten.new_zeros", "aten.new_ones", "aten.new_full", "aten.new_empty",
         "aten.zeros", "aten.ones", "aten.full", "aten.empty", "aten.scalar_tensor",
         "aten.lift_fresh_copy", "aten._local_scalar_dense", "aten.item", "aten.is_nonzero")
def uniform(c, op):
    """Outputs are uniform (or scalars): any permutation leaves them unchanged."""
    for t in op.in_tensors + op.outs:
        for i in range(t.dim()):
            c.ok(c.ax(t, i))


# ------------------------------------------------------------------ shape ops
def view_blocks(sin, sout):
    """Pair up the non-unit dims of two shapes of equal numel into minimal blocks."""
    a = [(i, s) for i, s in enumerate(sin) if s != 1]
    b = [(j, s) for j, s in enumerate(sout) if s != 1]
    blocks, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ia, jb = [a[i]], [b[j]]
        pa, pb = a[i][1], b[j][1]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ia.append(a[i]); pa *= a[i][1]; i += 1
            else:
                jb.append(b[j]); pb *= b[j][1]; j += 1
        blocks.append(([x for x, _ in ia], [y for y, _ in jb]))
    return blocks


def reshape_link(c, src, out):
    if src.numel() == 0:
        return
    for ia, jb in view_blocks(list(src.shape), list(out.shape)):
        if len(ia) == 1 and len(jb) == 1:
            c.link(c.ax(src, ia[0]), c.ax(out, jb[0]))
        elif len(ia) == 1:
            c.prod(c.ax(src, ia[0]), [c.ax(out, j) for j in jb])
        elif len(jb) == 1:
            c.prod(c.ax(out, jb[0]), [c.ax(src, i) for i in ia])
        else:
            for i in ia:
                c.freeze(c.ax(src, i), f"{op_name(c)}: reshape mixes axes")
            for j in jb:
                c.freeze(c.ax(out, j), f"{op_name(c)}: reshape mixes axes")


def op_name(c):
    return c.op.name


@handles("aten.view", "aten._unsafe_view", "aten.reshape", "aten._reshape_alias", "aten.unsqueeze",
         "aten.unsqueeze_", "aten.squeeze", "aten.squeeze_", "aten.flatten", "aten.unflatten",
         "aten.view_copy", "aten._unsafe_view_copy")
def view(c, op):
    reshape_link(c, op.args[0], op.outs[0])


@handles("aten.expand", "aten.expand_copy", "aten.expand_as", "aten.broadcast_to")
def expand(c, op):
    broadcast_link(c, op.args[0], op.outs[0])


@handles("aten.t", "aten.transpose", "aten.transpose_", "aten.t_", "aten.permute", "aten.swapaxes",
         "aten.movedim", "aten.numpy_T", "aten.mT")
def transpose(c, op):
    x, y = op.args[0], op.outs[0]
    n = x.dim()
    name = op.name
    if name in ("aten.t", "aten.t_", "aten.numpy_T", "aten.mT"):
        perm = list(range(n))
        if n >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
    elif name == "aten.permute":
        perm = [_dim(d, n) for d in op.args[1]]
    else:
        d0, d1 = _dim(op.args[1], n), _dim(op.args[2], n)
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    for j, i in enumerate(perm):
        c.link(c.ax(x, i), c.ax(y, j))


@handles("aten.select")
def select(c, op):
    x, y = op.args[0], op.outs[0]
    d = _dim(op.args[1], x.dim())
    c.freeze(c.ax(x, d), "select picks one index")
    for i, j in zip([i for i in range(x.dim()) if i != d], range(y.dim())):
        c.link(c.ax(x, i), c.ax(y, j))


@handles("aten.slice", "aten.narrow")
def slice_(c, op):
    """A contiguous piece of an axis.  Pieces that tile the axis exactly make it their
    concatenation (resolved after the trace); any other slice pins the axis."""
    x, y = op.args[0], op.outs[0]
    s = op.schema_args()
    d = _dim(s.get("dim", 0), x.dim())
    n = x.shape[d]
    if op.name == "aten.narrow":
        start, step = int(s.get("start", 0)), 1
    else:
        start, step = s.get("start"), s.get("step", 1) or 1
        start = 0 if start is None else int(start)
    start = min(max(start + n if start < 0 else start, 0), n)
    for i in range(x.dim()):
        if i != d or y.shape[d] == n:
            c.link(c.ax(x, i), c.ax(y, i))
    if y.shape[d] == n:
        return
    if step != 1 or y.shape[d] == 0:
        c.freeze(c.ax(x, d), "slice takes part of an axis")
        c.freeze(c.ax(y, d), "slice takes part of an axis")
        return
    c.piece(c.ax(x, d), start, y.shape[d], c.ax(y, d))


@handles("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unsafe_split",
         "aten.unsafe_split_with_sizes", "aten.split_with_sizes_copy")
def split(c, op):
    """The cut axis is the concatenation of the pieces' axes (a fused QKV projection's
    output = [Q | K | V]): each piece may carry its own permutation, the parent axis gets
    the blockwise composite."""
    x = op.args[0]
    s = op.schema_args()
    d = _dim(s.get("dim", 0), x.dim())
    outs = [y for y in op.outs if y.dim() == x.dim()]
    for y in outs:
        for i in range(x.dim()):
            if i != d:
                c.link(c.ax(x, i), c.ax(y, i))
    if len(outs) == 1:
        c.link(c.ax(x, d), c.ax(outs[0], d))
    elif outs:
        c.cat(c.ax(x, d), [c.ax(y, d) for y in outs])


@handles("aten.unbind")
def unbind(c, op):
    x = op.args[0]
    d = _dim(op.args[1] if len(op.args) > 1 else 0, x.dim())
    c.freeze(c.ax(x, d), "unbind takes single entries of this axis")
    others = [i for i in range(x.dim()) if i != d]
    for y in op.outs:
        for i, j in zip(others, range(y.dim())):
            c.link(c.ax(x, i), c.ax(y, j))


@handles("aten.constant_pad_nd", "aten.reflection_pad1d", "aten.reflection_pad2d", "aten.reflection_pad3d",
         "aten.replication_pad1d", "aten.replication_pad2d", "aten.replication_pad3d")
def pad(c, op):
    """Padding changes (trailing) axes listed in ``pad``; the others pass through."""
    x, y = op.args[0], op.outs[0]
    widths = list(op.args[1])
    n = x.dim()
    padded = {n - 1 - k for k in range(len(widths) // 2) if widths[2 * k] or widths[2 * k + 1]}
    for i in range(n):
        if i in padded:
            c.freeze(c.ax(x, i), f"{op.name} pads this axis")
            c.freeze(c.ax(y, i), f"{op.name} pads this axis")
        else:
            c.link(c.ax(x, i), c.ax(y, i))


@handles("aten.roll")
def roll(c, op):
    """A cyclic shift along ``dims`` (spatial axes in Swin): those stay in place, the others
    pass through."""
    x, y = op.args[0], op.outs[0]
    s = op.schema_args()
    dims = [_dim(d, x.dim()) for d in (s.get("dims") or [])]
    for i in range(x.dim()):
        if not dims or i in dims:
            c.freeze(c.ax(x, i), "roll shifts entries along this axis")
            c.freeze(c.ax(y, i), "roll shifts entries along this axis")
        else:
            c.link(c.ax(x, i), c.ax(y, i))


@handles("aten.as_strided", "aten.as_strided_", "aten.as_strided_copy")
def as_strided(c, op):
    """A view with explicit sizes/strides: an output axis with the same (size, stride) as an
    input axis (same storage offset) is that axis; others stay in place."""
    x, y = op.args[0], op.outs[0]
    if y.storage_offset() != x.storage_offset():
        return
    used = set()
    for j in range(y.dim()):
        if y.shape[j] == 1:
            c.ok(c.ax(y, j))
            continue
        for i in range(x.dim()):
            if i not in used and x.shape[i] == y.shape[j] and x.stride(i) == y.stride(j):
                used.add(i)
                c.link(c.ax(x, i), c.ax(y, j))
                break
    if x.numel() == y.numel():
        for i in range(x.dim()):
            if x.shape[i] == 1:
                c.ok(c.ax(x, i))


@handles("aten._weight_norm_interface", "aten._weight_norm")
def weight_norm(c, op):
    """w = v * g / ||v|| (norm over every axis but ``dim``): w's axes are v's; g (and the
    returned norms) carry axis ``dim``; the axes the norm sums over may be permuted freely."""
    v, g = op.args[0], op.args[1]
    dim = _dim(op.args[2] if len(op.args) > 2 else op.kwargs.get("dim", 0), v.dim())
    outs = op.outs
    _same(c, v, outs[0])
    for t in [g] + list(outs[1:]):
        if t.dim() == v.dim():
            for i in range(v.dim()):
                if i == dim:
                    c.link(c.ax(t, i), c.ax(v, i))
                else:
                    c.ok(c.ax(t, i))
        elif t.dim() == 1 and t.shape[0] == v.shape[dim]:
            c.link(c.ax(t, 0), c.ax(v, dim))
@handles("aten.cat", "aten.concat", "aten.concatenate")
def cat(c, op):
    ts = [t for t in op.args[0] if not (t.dim() == 1 and t.numel() == 0)]
    y = op.outs[0]
    d = _dim(op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0), y.dim())
    for t in ts:
        for i in range(y.dim()):
            if i != d:
                c.link(c.ax(t, i), c.ax(y, i))
    if len(ts) == 1:
        c.link(c.ax(ts[0], d), c.ax(y, d))
    else:
        c.cat(c.ax(y, d), [c.ax(t, d) for t in ts])


@handles("aten.stack")
def stack(c, op):
    ts, y = op.args[0], op.outs[0]
    d = _dim(op.args[1] if len(op.args) > 1 else 0, y.dim())
    c.freeze(c.ax(y, d), "stack axis")
    for t in ts:
        for i, j in zip(range(t.dim()), [j for j in range(y.dim()) if j != d]):
            c.link(c.ax(t, i), c.ax(y, j))


# ------------------------------------------------------------------ reductions
def _reduce(c, x, outs, dims, keepdim, invariant=True):
    n = x.dim()
    dims = list(range(n)) if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0) \
        else [_dim(d, n) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    for y in outs:
        if y.dim() == 0:
            continue
        kept = [i for i in range(n) if i not in dims] if not keepdim else list(range(n))
        for j, i in enumerate(kept):
            if i in dims:
                continue
            c.link(c.ax(x, i), c.ax(y, j))
    for i in dims:
        if invariant:
            c.ok(c.ax(x, i))
        else:
            c.freeze(c.ax(x, i), "arg-reduction returns positions")


@handles("aten.sum", "aten.mean", "aten.amax", "aten.amin", "aten.var", "aten.std", "aten.var_mean",
         "aten.std_mean", "aten.logsumexp", "aten.linalg_vector_norm", "aten.norm", "aten.prod",
         "aten.all", "aten.any", "aten.max", "aten.min", "aten.argmax", "aten.argmin")
def reduce(c, op):
    x = op.args[0]
    name = op.name
    s = op.schema_args()
    dims = s.get("dim", s.get("dims"))
    keepdim = bool(s.get("keepdim", False))
    if name == "aten.prod" and "dim" in s:
        dims = [s["dim"]]
    if name in ("aten.max", "aten.min") and "dim" in s and len(op.outs) == 2:
        # values are invariant, indices are not: freeze the reduced axis
        _reduce(c, x, op.outs, [s["dim"]], keepdim, invariant=False)
        return
    if name in ("aten.max", "aten.min") and "other" in s:
        pointwise(c, op)
        return
    if name in ("aten.argmax", "aten.argmin"):
        _reduce(c, x, op.outs, None if dims is None else [dims], keepdim, invariant=False)
        return
    if isinstance(dims, int):
        dims = [dims]
    _reduce(c, x, op.outs, dims, keepdim)


@handles("aten._softmax", "aten._log_softmax", "aten.softmax", "aten.log_softmax")
def softmax(c, op):
    _same(c, op.args[0], op.outs[0])


def _pin_one_axis(c, x, y, d: int, why: str):
    """``y`` follows ``x`` on every axis but ``d``, which is pinned in both."""
    for i in range(x.dim()):
        if i == d:
            c.freeze(c.ax(x, i), why)
            c.freeze(c.ax(y, i), why)
        else:
            c.link(c.ax(x, i), c.ax(y, i))


@handles("aten.cumsum", "aten.cumprod")
def cumsum(c, op):
    x = op.args[0]
    _pin_one_axis(c, x, op.outs[0], _dim(op.args[1], x.dim()), f"{op.name} runs along this axis")


# ------------------------------------------------------------------ linear algebra
@handles("aten.mm")
def mm(c, op):
    a, b = op.args[0], op.args[1]
    y = op.outs[0]
    c.link(c.ax(a, 0), c.ax(y, 0))
    c.link(c.ax(a, 1), c.ax(b, 0))
    c.link(c.ax(b, 1), c.ax(y, 1))


@handles("aten.addmm")
def addmm(c, op):
    bias, a, b = op.args[0], op.args[1], op.args[2]
    y = op.outs[0]
    c.link(c.ax(a, 0), c.ax(y, 0))
    c.link(c.ax(a, 1), c.ax(b, 0))
    c.link(c.ax(b, 1), c.ax(y, 1))
    broadcast_link(c, bias, y)


@handles("aten.bmm", "aten.baddbmm")
def bmm(c, op):
    if op.name == "aten.baddbmm":
        bias, a, b = op.args[0], op.args[1], op.args[2]
    else:
        bias, a, b = None, op.args[0], op.args[1]
    y = op.outs[0]
    c.link(c.ax(a, 0), c.ax(b, 0))
    c.link(c.ax(a, 0), c.ax(y, 0))
    c.link(c.ax(a, 1), c.ax(y, 1))
    c.link(c.ax(a, 2), c.ax(b, 1))
    c.link(c.ax(b, 2), c.ax(y, 2))
    if bias is not None:
        broadcast_link(c, bias, y)


@handles("aten.mv")
def mv(c, op):
    a, x = op.args[0], op.args[1]
    y = op.outs[0]
    c.link(c.ax(a, 0), c.ax(y, 0))
    c.link(c.ax(a, 1), c.ax(x, 0))


@handles("aten.dot", "aten.vdot")
def dot(c, op):
    a, b = op.args[0], op.args[1]
    c.link(c.ax(a, 0), c.ax(b, 0))


# ------------------------------------------------------------------ conv / pooling
@handles("aten.convolution", "aten._convolution")
def convolution(c, op):
    x, w, bias = op.args[0], op.args[1], op.args[2]
    transposed, groups = bool(op.args[6]), int(op.args[8])
    y = op.outs[0]
    batched = x.dim() == w.dim()
    ci = 1 if batched else 0
    if batched:
        c.link(c.ax(x, 0), c.ax(y, 0))
    w_in, w_out = (0, 1) if transposed else (1, 0)   # weight axis that meets input / output
    if groups == 1:
        c.link(c.ax(x, ci), c.ax(w, w_in))
        c.link(c.ax(y, ci), c.ax(w, w_out))
    elif transposed:
        return  # grouped transposed conv: left unpermuted (untouched axes freeze)
    else:
        g = c.virtual(groups)
        cin, cout = w.shape[1], w.shape[0] // groups
        c.prod(c.ax(x, ci), [g, c.ax(w, 1)] if cin > 1 else [g])
        wo = c.ax(w, 0)
        if cout > 1:
            co = c.virtual(cout)
            c.prod(wo, [g, co])
        else:
            c.link(wo, g)
        c.link(c.ax(y, ci), wo)
    if isinstance(bias, torch.Tensor):
        c.link(c.ax(bias, 0), c.ax(y, ci))


def _pool(c, op):
    x = op.args[0]
    name = op.name
    k = 3 if "3d" in name else 2 if "2d" in name else 1
    lead = x.dim() - k
    for y in op.outs:
        for i in range(lead):
            c.link(c.ax(x, i), c.ax(y, i))


for _n in ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
           "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
           "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d",
           "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
           "upsample_nearest1d", "upsample_nearest2d", "upsample_bilinear2d",
           "_upsample_nearest_exact2d", "_adaptive_avg_pool1d", "max_pool1d_with_indices"):
    HANDLERS["aten." + _n] = _pool


# ------------------------------------------------------------------ normalisation
@handles("aten.native_batch_norm", "aten._native_batch_norm_legit_no_training",
         "aten._native_batch_norm_legit", "aten._native_batch_norm_legit_functional",
         "aten.batch_norm")
def batch_norm(c, op):
    x = op.args[0]
    ch = c.ax(x, 1) if x.dim() > 1 else c.ax(x, 0)
    for p in op.args[1:5]:
        if isinstance(p, torch.Tensor) and p.dim() == 1 and p.numel() > 0:
            c.link(c.ax(p, 0), ch)
    _same(c, x, op.outs[0])
    for s in op.outs[1:]:
        if s.dim() == 1 and s.numel() == x.shape[1]:
            c.link(c.ax(s, 0), ch)


@handles("aten.native_layer_norm", "aten._fused_rms_norm", "aten.rms_norm", "aten.layer_norm")
def layer_norm(c, op):
    x, shape = op.args[0], list(op.args[1])
    y = op.outs[0]
    _same(c, x, y)
    k = len(shape)
    for p in op.args[2:4]:
        if isinstance(p, torch.Tensor) and p.dim() == k:
            for i in range(k):
                c.link(c.ax(p, i), c.ax(x, x.dim() - k + i))
    for s in op.outs[1:]:   # mean / rstd: leading axes, trailing ones are size 1
        for i in range(min(s.dim(), x.dim() - k)):
            if s.shape[i] == x.shape[i]:
                c.link(c.ax(s, i), c.ax(x, i))


@handles("aten.native_group_norm")
def group_norm(c, op):
    x, w, b = op.args[0], op.args[1], op.args[2]
    groups = int(op.args[6])
    y = op.outs[0]
    _same(c, x, y)
    ch = c.ax(x, 1)
    C = x.shape[1]
    for p in (w, b):
        if isinstance(p, torch.Tensor):
            c.link(c.ax(p, 0), ch)
    if groups == 1 or groups == C:
        g = ch if groups == C else None
    else:
        g = c.virtual(groups)
        c.prod(ch, [g, c.virtual(C // groups)])   # whole groups move; inside a group, any order
    for s in op.outs[1:]:   # mean / rstd of shape (N, G)
        c.link(c.ax(s, 0), c.ax(x, 0))
        if g is not None and s.dim() > 1:
            c.link(c.ax(s, 1), g)


# ------------------------------------------------------------------ embedding / attention
@handles("aten.embedding")
def embedding(c, op):
    w, idx = op.args[0], op.args[1]
    y = op.outs[0]
    c.freeze(c.ax(w, 0), "embedding rows are looked up by index")
    c.link(c.ax(w, 1), c.ax(y, y.dim() - 1))
    for i in range(idx.dim()):
        c.link(c.ax(idx, i), c.ax(y, i))


@handles("aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention",
         "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_attention_math",
         "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_fused_attention_overrideable")
def sdpa(c, op):
    s = op.schema_args()
    q, k, v = s["query"], s["key"], s["value"]
    y = op.outs[0]
    n = q.dim()
    if k.dim() != n or v.dim() != n or n < 3:
        return
    for i in range(n - 2):   # batch and head axes
        c.link(c.ax(q, i), c.ax(y, i))
        c.link(c.ax(k, i), c.ax(v, i))
        if q.shape[i] == k.shape[i]:
            c.link(c.ax(q, i), c.ax(k, i))
        elif i == n - 3 and k.shape[i] > 0 and q.shape[i] % k.shape[i] == 0:
            # grouped-query attention (enable_gqa): query head h reads key/value head
            # h // G, so the query head axis is (kv heads) x (G query heads per kv head)
            c.prod(c.ax(q, i), [c.ax(k, i), c.virtual(q.shape[i] // k.shape[i])])
        elif k.shape[i] == 1:
            c.ok(c.ax(k, i))
    c.link(c.ax(q, n - 1), c.ax(k, n - 1))      # query/key dims are contracted together
    c.link(c.ax(k, n - 2), c.ax(v, n - 2))      # key/value sequence
    c.link(c.ax(q, n - 2), c.ax(y, n - 2))
    c.link(c.ax(v, n - 1), c.ax(y, n - 1))
    for extra in op.outs[1:]:   # logsumexp (B, H, L) and RNG state
        if extra.dim() == n - 1 and tuple(extra.shape) == tuple(q.shape[:-1]):
            for i in range(n - 1):
                c.link(c.ax(extra, i), c.ax(q, i))
    mask = s.get("attn_mask", s.get("attn_bias"))
    if isinstance(mask, torch.Tensor):
        scores = list(q.shape[:-1]) + [k.shape[-2]]
        m = mask.dim()
        for i in range(m):
            j = n - m + i
            if j >= 0 and mask.shape[i] == scores[j] and mask.shape[i] != 1:
                ref = c.ax(k, n - 2) if j == n - 1 else c.ax(q, j)
                c.link(c.ax(mask, i), ref)


@handles("module:MultiheadAttention")
def multihead_attention(c, op):
    """nn.MultiheadAttention, traced as one step.

    in_proj_weight rows are three segments (Q, K, V).  Q and K segments split as
    (heads, head_dim) with one shared within-head group; V and out_proj's input split as
    (heads, head_dim) with a second one; the head axis is shared by both.
    """
    m = op.module
    q, k, v = op.args[0], op.args[1], op.args[2]
    y = op.outs[0]
    if not m._qkv_same_embed_dim or m.bias_k is not None:
        return   # separate q/k/v projections or add_bias_kv: left unpermuted
    E, H = m.embed_dim, m.num_heads
    d = E // H
    W, B = m.in_proj_weight, m.in_proj_bias
    seq_first = not m.batch_first and q.dim() == 3
    for x in (q, k, v):
        c.link(c.ax(x, x.dim() - 1), c.ax(W, 1))
    heads, qk, vo = c.virtual(H), c.virtual(d), c.virtual(d)
    for j, inner in ((0, qk), (1, qk), (2, vo)):
        c.prod(c.seg(W, 0, j * E, E), [heads, inner])
        if B is not None:
            c.prod(c.seg(B, 0, j * E, E), [heads, inner])
    c.prod(c.ax(m.out_proj.weight, 1), [heads, vo])
    c.link(c.ax(m.out_proj.weight, 0), c.ax(y, y.dim() - 1))
    if m.out_proj.bias is not None:
        c.link(c.ax(m.out_proj.bias, 0), c.ax(y, y.dim() - 1))
    for i in range(y.dim() - 1):
        c.link(c.ax(q, i), c.ax(y, i))
    if k.dim() == 3:
        c.link(c.ax(k, 0), c.ax(v, 0)); c.link(c.ax(k, 1), c.ax(v, 1))
        if seq_first:
            c.link(c.ax(k, 1), c.ax(q, 1))
        else:
            c.link(c.ax(k, 0), c.ax(q, 0))
    if len(op.outs) > 1:   # attention weights (N, [H,] L, S)
        w = op.outs[1]
        c.link(c.ax(w, 0), c.ax(q, 1 if seq_first else 0))
        if w.dim() == 4:
            c.link(c.ax(w, 1), heads)


@handles("aten.arange", "aten.randn", "aten.rand", "aten.randint", "aten.randperm", "aten.linspace",
         "aten.eye", "aten.tril", "aten.triu", "aten.bernoulli", "aten.normal")
def pinned_outputs(c, op):
    """Outputs whose entries differ by position (positions, random draws, masks): pinned."""
    for t in op.outs:
        for i in range(t.dim()):
            c.freeze(c.ax(t, i), f"{op.name} output depends on position")
    for t in op.in_tensors:
        for i in range(t.dim()):
            c.freeze(c.ax(t, i), f"{op.name} output depends on position")


@handles("aten.index", "aten._unsafe_index")
def index(c, op):
    """``x[..., idx, ...]``: indexed axes are addressed by position (pinned, and so are the
    index tensors' axes that form the result); the other axes pass through."""
    x, y = op.args[0], op.outs[0]
    idx = list(op.args[1])
    pos = [i for i, t in enumerate(idx) if t is not None]
    if not pos or any(t is not None and t.dtype == torch.bool for t in idx):
        return _pinned(c, op)
    ishape = torch.broadcast_shapes(*[idx[i].shape for i in pos])
    k = len(ishape)
    contiguous = pos == list(range(pos[0], pos[-1] + 1))
    rest = [i for i in range(x.dim()) if i not in pos]
    start = pos[0] if contiguous else 0
    out_of = {}
    for i in rest:
        out_of[i] = i if (contiguous and i < start) else (i - len(pos) + k if contiguous else
                                                          k + rest.index(i))
    for i in range(x.dim()):
        if i in pos:
            c.freeze(c.ax(x, i), f"{op.name} addresses entries by position")
        else:
            c.link(c.ax(x, i), c.ax(y, out_of[i]))
    for j in range(start, start + k):
        c.freeze(c.ax(y, j), f"{op.name} result axis comes from the index")
    for i in pos:
        for a in range(idx[i].dim()):
            c.freeze(c.ax(idx[i], a), f"{op.name} index")


@handles("aten.index_select")
def index_select(c, op):
    x = op.args[0]
    _pin_one_axis(c, x, op.outs[0], _dim(op.args[1], x.dim()), f"{op.name} addresses entries by position")
    for a in range(op.args[2].dim()):
        c.freeze(c.ax(op.args[2], a), f"{op.name} index")


@handles("aten.gather", "aten.take", "aten.take_along_dim", "aten.index_put", "aten.index_put_",
         "aten.scatter", "aten.scatter_add", "aten.masked_select", "aten.nonzero", "aten.sort",
         "aten.topk", "aten.flip")
def indexing(c, op):
    """Ops that address entries by position: every axis they touch stays in place."""
    _pinned(c, op)


def _pinned(c, op):
    for t in op.in_tensors + op.outs:
        for i in range(t.dim()):
            c.freeze(c.ax(t, i), f"{op.name} addresses entries by position")
