"""The ATen recorder: runs a model under a dispatch mode and keeps every op (and leaf-module
call) in order, optionally with its output values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

LEAF_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)

# in-place ops that change a tensor's shape or strides (not its values)
META_INPLACE = frozenset({"aten.as_strided_", "aten.squeeze_", "aten.unsqueeze_", "aten.transpose_",
                          "aten.t_", "aten.swapdims_", "aten.swapaxes_", "aten.resize_",
                          "aten.resize_as_"})


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
        self.param_storages: set = set()

    def _of_param(self, t) -> bool:
        if not self.param_storages:
            return False
        try:
            return t.untyped_storage().data_ptr() in self.param_storages
        except (RuntimeError, NotImplementedError):
            return False

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
            # views of parameters (a weight's transpose) are not kept: they are the permuted
            # parameter itself, and a large model's self-test would hold its weights twice more
            # (None: not compared; the function check is the ops that consume them)
            self.values.append([None if self._of_param(o) else o.detach().clone() for o in outs])
        elif self.want is not None:
            k = self.counts.get(name, 0)
            self.counts[name] = k + 1
            js = self.want.get((name, k))
            if js is not None and all(j < len(outs) for j in js):
                self.values.append(((name, k), [outs[j].detach().clone() for j in js]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _packet(func)
        before = None
        if self.depth == 0 and self.keep == "all" and name in META_INPLACE and args \
                and isinstance(args[0], torch.Tensor):
            x = args[0]
            before = x.as_strided(x.shape, x.stride(), x.storage_offset())
        out = func(*args, **kwargs)
        if self.depth == 0:
            if before is not None and (before.shape != x.shape or before.stride() != x.stride()):
                # an in-place change of shape/strides: the tensor object is the same before
                # and after, so earlier records get a view with the old metadata and this
                # op reads that view (axis nodes are keyed by the object's identity)
                self._rebind(x, before)
                args = (before,) + tuple(args[1:])
            self._add(name, func, args, kwargs, out)
        return out

    def _rebind(self, x, y):
        def sub(v):
            if v is x:
                return y
            if isinstance(v, list):
                return [sub(u) for u in v]
            if isinstance(v, tuple):
                return tuple(sub(u) for u in v)
            if isinstance(v, dict):
                return {k: sub(u) for k, u in v.items()}
            return v
        for op in self.records:
            op.args, op.kwargs = sub(op.args), sub(op.kwargs)
            op.in_tensors, op.outs = sub(op.in_tensors), sub(op.outs)


def run_recorded(model, inputs, keep="all", want=None):
    """Run ``model`` on ``inputs`` recording ops; returns (recorder, output)."""
    rec = _Recorder(keep, want)
    if keep == "values":
        rec.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()
                              if p.device.type != "meta" and p.numel()}
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
