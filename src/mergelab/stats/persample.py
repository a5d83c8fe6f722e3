"""Per-example parameter gradients from forward hooks, in closed form (the "hooks" backend).

One batched forward records, for every call of a parameterised leaf module, its input and its
output; the output is handed downstream as a clone, so a later in-place operation (``out +=
identity``, ``ReLU(inplace=True)``) cannot rewrite the recorded tensor.  One
``torch.autograd.grad`` of the seeded log-probabilities with respect to the recorded outputs
(not the parameters: the engine then skips every weight-gradient kernel) gives each call's
output gradient ``g``; with its input ``a`` the per-example parameter gradients follow in closed
form:

* ``nn.Linear`` on ``(B, ..., in)``: ``Σ_t g_t a_tᵀ`` (for ``(B, in)`` inputs used once, the
  squared sum is ``(g²)ᵀ(a²)``, never materialising per-example gradients);
* ``nn.Conv1d`` / ``nn.Conv2d`` (zeros padding, any stride/padding/dilation/groups): a grouped
  weight-gradient convolution with the batch folded into the groups, or unfold + batched
  matmul for small maps; a subclass with its own ``forward`` (e.g. TF "SAME" padding applied
  before the convolution) is recorded at ``_conv_forward``, the convolution's real input;
* BatchNorm (eval: ``x̂`` from the running statistics), LayerNorm, GroupNorm: ``Σ g·x̂`` and
  ``Σ g`` over the non-example axes;
* ``nn.Embedding``: per-example row sums keyed by unique ``(example, index)`` pairs, never a
  dense vocabulary-sized gradient per example;
* with ``generic=True`` (opt-in, used by the layer-by-layer causal-LM Fisher), any other leaf
  module called on one tensor (a model's own RMSNorm classes, whatever their formula): its
  per-example gradients from ``vmap`` of ``grad`` over the module alone, given the recorded
  input and output gradient of each example (the module's code, not a formula written here).

A module called several times, or a parameter shared by several modules, has its per-example
gradients summed over all the calls before squaring.  Everything assumes eval mode (examples
are independent) and that axis 0 of every hooked input is the example axis; a call that breaks
that raises :class:`Unsupported`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_KINDS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, *_BN, nn.LayerNorm, nn.GroupNorm,
                            nn.Embedding)


class Unsupported(Exception):
    """A module or a call the hooks backend cannot handle exactly."""


def unsupported_reason(m: nn.Module, generic: bool = False) -> str | None:
    """Why ``m``'s own parameters cannot get per-example gradients from hooks (None: they can).
    ``generic``: accept any leaf module (no submodules) through :func:`_generic_grad`."""
    kind = next((k for k in _KINDS if isinstance(m, k)), None)
    if kind is None or not closed_form(m):
        if generic and not any(True for _ in m.children()):
            return None
        if kind is None:
            return f"{type(m).__name__} is not a supported module type"
        return f"{type(m).__name__} overrides {kind.__name__}.forward"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
        return f"{type(m).__name__} with padding_mode='{m.padding_mode}'"
    if isinstance(m, _BN) and (m.running_mean is None or m.running_var is None):
        return "BatchNorm without running statistics (uses batch statistics in eval mode)"
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
        return "Embedding with max_norm or scale_grad_by_freq"
    return None


def closed_form(m: nn.Module) -> bool:
    """Whether ``m``'s per-example gradients follow from the formulas below: one of the
    supported kinds with that kind's own ``forward`` (or a conv recorded at ``_conv_forward``).
    Other leaf modules (a norm subclass with its own forward, e.g. a channels-first LayerNorm;
    an RMSNorm class) go through :func:`_generic_grad` where ``generic`` allows them."""
    kind = next((k for k in _KINDS if isinstance(m, k)), None)
    return kind is not None and (type(m).forward is kind.forward or _records_conv_forward(m, kind))


def _records_conv_forward(m: nn.Module, kind: type) -> bool:
    """A Conv1d/Conv2d subclass with its own ``forward`` (TF "SAME" padding, a pre- or
    post-processing step) but ``Conv._conv_forward`` kept: the convolution's real input is what
    ``_conv_forward`` receives, so it is recorded there (:class:`Recorder`), and a forward that
    does not call it exactly once with the module's own weight and bias raises
    :class:`Unsupported`."""
    return kind in (nn.Conv1d, nn.Conv2d) and type(m)._conv_forward is kind._conv_forward


def owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``{id(parameter): [(module, attribute), ...]}`` over every module holding it directly."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    seen_modules: set[int] = set()
    for _, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen_modules:
            continue
        seen_modules.add(id(m))
        for attr, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((m, attr))
    return out


def plan(model: nn.Module, names: list[str], generic: bool = False
         ) -> tuple[list[nn.Module], str | None]:
    """The modules to hook for parameters ``names``, or a reason why hooks cannot serve them."""
    params = dict(model.named_parameters())
    own = owners(model)
    mods: dict[int, nn.Module] = {}
    for n in names:
        holders = own.get(id(params[n]), [])
        if not holders:
            return [], f"parameter '{n}' is held by no module"
        for m, _ in holders:
            why = unsupported_reason(m, generic)
            if why is not None:
                return [], f"parameter '{n}': {why}"
            mods[id(m)] = m
    return list(mods.values()), None


# ---------------------------------------------------------------- recording
@dataclass
class Call:
    module: nn.Module
    input: Tensor        # detached
    output: Tensor       # the module's own output (the graph node we differentiate against)


class Recorder:
    """Forward hooks on ``modules`` recording every call (input, output) of a forward over
    ``batch`` examples while active.

    A call on a single row while the batch has several (BERT's position embeddings on
    ``position_ids`` of shape ``(1, T)``, broadcast over the batch downstream) is recorded as if
    made per example: its output is expanded to the batch before it is handed on, so that its
    gradient keeps the example axis."""

    def __init__(self, modules: list[nn.Module], batch: int):
        self.modules, self.batch, self.calls, self.handles = modules, batch, [], []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not args or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
            raise Unsupported(f"{type(module).__name__} called without a tensor input/output")
        if not closed_form(module) and (len(args) != 1 or kwargs):
            raise Unsupported(f"{type(module).__name__} called with more than one input (the "
                              f"generic per-example gradient needs the module of one tensor)")
        if not out.requires_grad:   # e.g. a frozen module on the raw input: make it a graph leaf
            out.requires_grad_(True)
        x = args[0].detach()
        if self.batch > 1 and x.ndim >= 1 and x.shape[0] == 1 and out.ndim >= 1 and out.shape[0] == 1:
            x = x.expand(self.batch, *x.shape[1:])
            out = out.expand(self.batch, *out.shape[1:])
        self.calls.append(Call(module, x, out))
        return out.clone()

    def _at_conv_forward(self, m: nn.Module) -> None:
        """Record ``m`` (a conv whose ``forward`` is its own) where the convolution runs: its
        ``_conv_forward`` is wrapped on the instance for the pass; hooks around ``forward``
        check it ran exactly once per call, on the module's own parameters."""
        conv = type(m)._conv_forward
        count = [0]

        def wrapped(x, weight, bias):
            if weight is not m.weight or bias is not m.bias:
                raise Unsupported(f"{type(m).__name__}.forward convolves with a tensor other than "
                                  f"its own weight/bias (a reparametrisation)")
            count[0] += 1
            return self._hook(m, (x,), {}, conv(m, x, weight, bias))

        def before(module, args):
            count[0] = 0

        def after(module, args, out):
            if count[0] != 1:
                raise Unsupported(f"{type(m).__name__}.forward called _conv_forward {count[0]} times "
                                  f"in one call (expected once)")

        m._conv_forward = wrapped
        self.patched.append(m)
        self.handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]

    def __enter__(self) -> "Recorder":
        self.calls, self.handles, self.patched = [], [], []
        for m in self.modules:
            kind = next((k for k in (nn.Conv1d, nn.Conv2d) if isinstance(m, k)), None)
            if kind is not None and type(m).forward is not kind.forward and _records_conv_forward(m, kind):
                self._at_conv_forward(m)
            else:
                self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for m in self.patched:
            del m._conv_forward   # the class's method again
        self.handles, self.patched = [], []


# ---------------------------------------------------------------- per-example gradients
@dataclass
class Rows:
    """Sparse per-example gradient of an embedding table: row ``keys % V`` of example
    ``keys // V`` receives ``values`` (summed over duplicate keys)."""
    keys: Tensor     # (R,) int64
    values: Tensor   # (R, d)
    n_rows: int      # V


def _check_batch(call: Call, g: Tensor, b: int) -> None:
    if call.input.ndim == 0 or call.input.shape[0] != b or g.shape[0] != b:
        raise Unsupported(f"{type(call.module).__name__} called on a tensor whose first axis "
                          f"({call.input.shape[0] if call.input.ndim else 'none'}) is not the "
                          f"example axis ({b})")


def _conv_weight(m: nn.Conv1d | nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-example conv weight gradients (B, *weight.shape)."""
    if isinstance(m, nn.Conv1d):
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        k, s, d = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
        pad = m.padding if isinstance(m.padding, str) else (0, m.padding[0])
    else:
        k, s, d, pad = m.kernel_size, m.stride, m.dilation, m.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        else:  # "same" (stride 1): total d·(k-1) per axis, the odd extra on the right/bottom
            tot = [d[i] * (k[i] - 1) for i in range(2)]
            x = F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
            pad = (0, 0)
    b, cin, h, w = x.shape
    cout, groups = g.shape[1], m.groups
    ho, wo = g.shape[2], g.shape[3]
    if groups == 1 and (ho * wo <= 64 or k == (1, 1)):
        # small maps / 1x1: a channels-last strided view of the padded input is the unfolded
        # matrix (B, L, kh·kw·cin); one batched matmul
        xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0])) if pad[0] or pad[1] else x
        xp = xp.contiguous(memory_format=torch.channels_last)
        sb, sc, sh, sw = xp.stride()
        u = xp.as_strided((b, ho, wo, k[0], k[1], cin),
                          (sb, sh * s[0], sw * s[1], sh * d[0], sw * d[1], sc))
        out = torch.bmm(g.reshape(b, cout, ho * wo), u.reshape(b, ho * wo, k[0] * k[1] * cin))
        out = out.view(b, cout, k[0], k[1], cin).permute(0, 1, 4, 2, 3)
    else:
        # larger maps: the weight-gradient convolution with the batch folded into the groups
        out = torch.nn.grad.conv2d_weight(
            x.reshape(1, b * cin, h, w), (b * cout, cin // groups, *k),
            g.reshape(1, b * cout, ho, wo), stride=s, padding=pad, dilation=d,
            groups=b * groups).view(b, cout, cin // groups, *k)
    return out.squeeze(3) if isinstance(m, nn.Conv1d) else out


def _norm_hat(m: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The normalised input x̂ and the axes to sum ``g·x̂`` over (besides the example axis)."""
    if isinstance(m, _BN):
        if x.ndim < 2:
            raise Unsupported("BatchNorm input without a channel axis")
        shape = (1, -1) + (1,) * (x.ndim - 2)
        xh = (x - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
        return xh.to(x.dtype), tuple(range(2, x.ndim))
    if isinstance(m, nn.LayerNorm):
        nd = len(m.normalized_shape)
        if x.ndim <= nd:
            raise Unsupported("LayerNorm input without an example axis")
        axes = tuple(range(x.ndim - nd, x.ndim))
        var, mean = torch.var_mean(x, dim=axes, keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + m.eps), tuple(range(1, x.ndim - nd))
    # GroupNorm
    if x.ndim < 2:
        raise Unsupported("GroupNorm input without a channel axis")
    b, c = x.shape[:2]
    xr = x.reshape(b, m.num_groups, -1)
    var, mean = torch.var_mean(xr, dim=-1, keepdim=True, correction=0)
    return ((xr - mean) * torch.rsqrt(var + m.eps)).view(x.shape), tuple(range(2, x.ndim))


def _generic_grad(m: nn.Module, x: Tensor, g: Tensor, want: str) -> Tensor:
    """Per-example gradient ``(B, *shape)`` of ``m``'s parameter ``want`` for a leaf module of
    any kind: ``vmap`` over examples of the gradient of ``<m(x_n), g_n>`` (the module's own
    forward, run on one example at a time with a batch axis of 1)."""
    from torch.func import functional_call, grad, vmap

    p = {want: m._parameters[want].detach()}

    def inner(pp, xi, gi):
        out = functional_call(m, pp, (xi.unsqueeze(0),))
        return (out * gi.unsqueeze(0)).sum()
    with torch.enable_grad():
        return vmap(grad(inner), in_dims=(None, 0, 0))(p, x, g.to(x.dtype))[want].detach()


def per_example(call: Call, g: Tensor, b: int, want: str) -> Tensor | Rows:
    """Per-example gradient of parameter attribute ``want`` ("weight"/"bias") over one call:
    dense ``(B, *shape)`` or :class:`Rows`."""
    m, x = call.module, call.input
    _check_batch(call, g, b)
    out: dict[str, Tensor | Rows] = {}
    if not closed_form(m):
        if m._parameters.get(want) is None:
            raise Unsupported(f"{type(m).__name__} has no parameter '{want}'")
        return _generic_grad(m, x, g, want)
    if isinstance(m, nn.Linear):
        x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
        if want == "weight":
            out["weight"] = torch.bmm(g3.transpose(1, 2), x3)
        if want == "bias":
            out["bias"] = g3.sum(1)
    elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if x.ndim != (3 if isinstance(m, nn.Conv1d) else 4):
            raise Unsupported(f"{type(m).__name__} called on an unbatched input")
        if want == "weight":
            out["weight"] = _conv_weight(m, x, g)
        if want == "bias":
            out["bias"] = g.flatten(2).sum(2)
    elif isinstance(m, _BN) and want == "weight" and x.ndim > 2:
        # Σ g·x̂ = (Σ g·x − μ Σ g) / √(σ² + ε): no x̂ temporary
        xf, gf = x.reshape(b, x.shape[1], -1), g.reshape(b, g.shape[1], -1)
        gx = (gf * xf).sum(2)
        out["weight"] = (gx - m.running_mean * gf.sum(2)) * torch.rsqrt(m.running_var + m.eps)
    elif isinstance(m, (*_BN, nn.LayerNorm, nn.GroupNorm)):
        if want == "weight":
            xh, axes = _norm_hat(m, x)
            out["weight"] = (g * xh).sum(axes) if axes else g * xh
        if want == "bias":
            axes = tuple(range(1, g.ndim - len(m.normalized_shape))) if isinstance(m, nn.LayerNorm) \
                else tuple(range(2, g.ndim))
            out["bias"] = g.sum(axes) if axes else g
    elif isinstance(m, nn.Embedding):
        idx = x.reshape(b, -1).long()
        keys = (torch.arange(b, device=idx.device)[:, None] * m.num_embeddings + idx).reshape(-1)
        vals = g.reshape(-1, g.shape[-1])
        if m.padding_idx is not None:
            keep = idx.reshape(-1) != m.padding_idx
            keys, vals = keys[keep], vals[keep]
        out["weight"] = Rows(keys, vals, m.num_embeddings)
    if want not in out:
        raise Unsupported(f"{type(m).__name__} has no parameter attribute '{want}' handled by hooks")
    return out[want]


def _densify(r: Rows, b: int) -> Tensor:
    d = r.values.shape[-1]
    dense = torch.zeros(b * r.n_rows, d, dtype=r.values.dtype, device=r.values.device)
    return dense.index_add_(0, r.keys, r.values).view(b, r.n_rows, d)


def _rows_square_sum(parts: list[Rows], shape: torch.Size) -> Tensor:
    keys = torch.cat([r.keys for r in parts])
    vals = torch.cat([r.values for r in parts])
    uk, inv = torch.unique(keys, return_inverse=True)
    per = torch.zeros(uk.shape[0], vals.shape[1], dtype=vals.dtype, device=vals.device)
    per.index_add_(0, inv, vals)                                 # per (example, row) sums
    out = torch.zeros(shape, dtype=torch.float64, device=vals.device)
    return out.index_add_(0, uk % parts[0].n_rows, _at_least_float32(per).square().to(torch.float64))


def _at_least_float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _single_position_conv(c: Call, g: Tensor) -> bool:
    """A 1x1, ungrouped, unpadded conv with a one-position output map: its output reads the
    input at the origin only, so the example's weight gradient is ``g ⊗ x[..., 0, 0]``."""
    m = c.module
    return (isinstance(m, (nn.Conv1d, nn.Conv2d)) and closed_form(m) and m.groups == 1
            and all(k == 1 for k in m.kernel_size) and not isinstance(m.padding, str)
            and all(p == 0 for p in m.padding) and g.ndim == c.input.ndim >= 3
            and all(d == 1 for d in g.shape[2:]))


class Accumulator:
    """Groups a backward's per-call output gradients by parameter and adds Σ_n g_n² to sums."""

    def __init__(self, model: nn.Module, names: list[str], block: int | None = None):
        """``block``: with a number of floats, the per-example weight gradients of an
        ``nn.Linear`` on ``(B, ..., in)`` inputs are formed in output-row blocks of at most that
        many floats (memory ``block``, not ``B × out × in``; opt-in, the layer-by-layer Fisher
        uses it)."""
        params = dict(model.named_parameters())
        own = owners(model)
        self.names, self.block = names, block
        self.where: dict[tuple[int, str], str] = {}      # (id(module), attr) -> parameter name
        self.shape = {n: params[n].shape for n in names}
        for n in names:
            for m, a in own[id(params[n])]:
                self.where[(id(m), a)] = n

    def contributions(self, calls: list[Call], grads: list[Tensor | None], b: int
                      ) -> dict[str, list[tuple[Call, Tensor, str]]]:
        by: dict[str, list[tuple[Call, Tensor, str]]] = {n: [] for n in self.names}
        for c, g in zip(calls, grads):
            if g is None:
                continue
            for a, p in c.module._parameters.items():
                n = self.where.get((id(c.module), a)) if p is not None else None
                if n is not None:
                    by[n].append((c, g, a))
        return by

    def per_example(self, calls, grads, b) -> dict[str, Tensor]:
        """Dense per-example gradients ``(B, *shape)`` (for checks)."""
        out = {}
        for n, parts in self.contributions(calls, grads, b).items():
            acc = None
            for c, g, a in parts:
                v = per_example(c, g, b, a)
                v = _densify(v, b) if isinstance(v, Rows) else v
                acc = v if acc is None else acc + v
            out[n] = torch.zeros((b, *self.shape[n])) if acc is None else acc.detach().float().cpu()
        return out

    def add_squares(self, sums: dict[str, Tensor], calls, grads, b: int) -> None:
        """``sums[name] += Σ_n (Σ_calls g_n)²`` for every parameter."""
        for n, parts in self.contributions(calls, grads, b).items():
            if not parts:
                continue
            if len(parts) == 1:
                c, g, a = parts[0]
                linear = closed_form(c.module) and isinstance(c.module, nn.Linear)
                if linear and c.input.ndim == 2 and g.ndim == 2:
                    _check_batch(c, g, b)
                    g, x = _at_least_float32(g), _at_least_float32(c.input)
                    if a == "weight":     # Σ_n (g_n a_nᵀ)² = (g²)ᵀ(a²): no per-example tensor
                        sums[n] += g.square().t() @ x.square()
                    else:
                        sums[n] += g.square().sum(0)
                    continue
                if _single_position_conv(c, g):
                    # a 1x1 conv whose output map is one position (a late stage at a small
                    # resolution): each example's gradient is an outer product, as for Linear
                    _check_batch(c, g, b)
                    g2 = _at_least_float32(g.reshape(b, -1))
                    if a == "weight":
                        x = _at_least_float32(c.input.reshape(b, c.input.shape[1], -1)[:, :, 0])
                        sums[n] += (g2.square().t() @ x.square()).view(sums[n].shape)
                    else:
                        sums[n] += g2.square().sum(0)
                    continue
                if self.block is not None and linear and a == "weight" and c.input.ndim >= 3:
                    _check_batch(c, g, b)
                    x3 = _at_least_float32(c.input.reshape(b, -1, c.input.shape[-1]))
                    g3 = _at_least_float32(g.reshape(b, -1, g.shape[-1]))
                    step = max(1, self.block // (b * x3.shape[-1]))
                    for r in range(0, g3.shape[-1], step):
                        pe = torch.bmm(g3[:, :, r:r + step].transpose(1, 2), x3)
                        sums[n][r:r + step] += pe.square_().sum(0)
                        del pe
                    continue
            vals = [per_example(c, g, b, a) for c, g, a in parts]
            if all(isinstance(v, Rows) for v in vals):
                sums[n] += _rows_square_sum(vals, sums[n].shape)
                continue
            tot = None
            for v in vals:
                v = _densify(v, b) if isinstance(v, Rows) else v
                tot = v if tot is None else tot + v
            # squares summed over the chunk in (at least) float32, then added to float64 sums
            sums[n] += _at_least_float32(tot).square().sum(0)


def seeded_backward(logp: Tensor, seed: Tensor, calls: list[Call], retain: bool
                    ) -> list[Tensor | None]:
    """Output gradients of every recorded call for the loss ``Σ seed ⊙ log p``."""
    loss = (logp * seed).sum()
    return list(torch.autograd.grad(loss, [c.output for c in calls], retain_graph=retain,
                                    allow_unused=True))


def hooks_check(model: nn.Module, modules: list[nn.Module], names: list[str],
                forward: Callable[[], Tensor], b: int, rtol: float = 1e-4) -> str | None:
    """Compare the hooks' per-example gradients of ``b`` examples (the inputs ``forward`` runs)
    with autograd's, one backward per example, for a random seed over the classes.  Each
    example separately, not only their sum: this also catches a module whose first axis is not
    the example axis.  Returns None when they agree, else a one-line description of the first
    mismatch."""
    params = dict(model.named_parameters())
    acc = Accumulator(model, names)
    try:
        with Recorder(modules, b) as rec:
            logp = forward()
        g = torch.Generator().manual_seed(12345)
        seed = torch.randn(logp.shape, generator=g).to(logp.device, logp.dtype)
        grads = seeded_backward(logp, seed, rec.calls, retain=False)
        mine = acc.per_example(rec.calls, grads, b)
    except (Unsupported, RuntimeError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    logp = forward()
    scale = 0.0
    ref = {n: torch.zeros_like(mine[n]) for n in names}
    for i in range(b):
        s = torch.zeros_like(seed)
        s[i] = seed[i]
        gi = torch.autograd.grad((logp * s).sum(), [params[n] for n in names],
                                 retain_graph=i + 1 < b, allow_unused=True)
        for n, v in zip(names, gi):
            if v is not None:
                ref[n][i] = v.float().cpu()
    scale = max(float(v.abs().max()) for v in ref.values())
    for n in names:
        tol = rtol * max(float(ref[n].abs().max()), 1e-3 * scale) + 1e-12
        err = float((mine[n] - ref[n]).abs().max())
        if not err <= tol:
            return f"parameter '{n}': per-example gradient off by {err:.3g} (tolerance {tol:.3g})"
    return None
