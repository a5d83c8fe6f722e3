"""The per-tensor driver: the one place where a method meets its tensors.

Every entry point (``merge()`` from files, ``merge_states()`` in memory, the experiment
suites, ``fisher_merge``/``regmean_merge``) builds a :class:`Driver` over a plan and asks it
for whole tensors or row blocks.  It owns:

* the :class:`TensorContext` of each call, with ONE seed function
  (``ctx.seed = methods.seeds.context_seed(recipe_seed, name)``);
* the method's prepasses (whole-model ``prepass``, e.g. global TIES top-k or Fisher norms;
  per-tensor ``tensor_prepass`` over row blocks);
* device placement: inputs are read where they are stored (the storage device: CPU for
  files, the state's device in memory), moved to the math ``device`` and made float32 there;
  the method computes on the math device; results are cast to the stored dtype on the math
  device and handed back on the storage device;
* the checks: non-finite inputs, the method's output shape, and non-finite values AFTER the
  cast to the stored dtype (so float16 overflow is caught), unless ``allow_nonfinite``.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

import torch

from ..device import resolve_device
from ..errors import MergelabError
from ..io.finite import check_stored, nonfinite
from ..methods.registry import TensorContext
from ..methods.seeds import context_seed
from .sources import Input

DEFAULT_BLOCK_SIZE = 2**20
# a tensor prepass (TIES per tensor, TALL/consensus, DELLA, ...) keeps the raw blocks it read
# for the merge pass when the tensor's inputs total at most this many stored bytes: the merge
# then skips the second read and check (1.1B TIES: ~7% of the CPU); memory: one such tensor
# per worker thread on top of the row blocks (docs/engine.md, "Memory")
KEEP_BYTES = 96 << 20


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def math_device(device: Any) -> torch.device:
    """A validated math device (``cpu``, ``cuda``, ``cuda:N``; under torchrun a plain ``cuda``
    is this process's GPU): :func:`mergelab.device.resolve_device`."""
    return resolve_device("cpu" if device is None else device, "--device")


class Driver:
    """Feeds a plan's tensors (whole or in row blocks) through its method; see the module doc."""

    def __init__(self, plan: Any, *, device: Any = "cpu", storage: Any = "cpu", seed: int = 0,
                 allow_nonfinite: bool = False, block_bytes: int = DEFAULT_BLOCK_SIZE):
        self.p = plan
        self.device = math_device(device)
        self.storage = torch.device(storage)
        self.seed = seed
        self.allow = allow_nonfinite
        self.block_elems = max(1, block_bytes // 4)
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._seeds: dict[tuple[int, str], int] = {}
        self._kept: dict[tuple, torch.Tensor] = {}   # raw blocks a tensor prepass read, for the merge pass
        self._keeping = threading.local()            # .name: the tensor whose prepass this thread runs
        # elementwise methods are merged in row blocks when every input (models, base and the
        # statistics files, e.g. Fisher) can be read by rows
        self.blockable = (plan.method.elementwise
                          and all(callable(getattr(i.ckpt, "get_rows", None))
                                  for i in list(plan.readers) + [s for v in plan.stats.values() for s in v]))

    # -- what to cut -------------------------------------------------------------------
    def rows_per_block(self, name: str) -> int | None:
        """Rows of ``name`` per block when it is merged in row blocks; None: merged whole."""
        shape = self.p.shape(name)
        if not self.blockable or len(shape) == 0:
            return None
        for files in self.p.stats.values():  # a statistic of another shape: whole (the method checks it)
            if any(name in st.ckpt and tuple(st.ckpt.shape(name)) != tuple(shape) for st in files):
                return None
        rows = max(1, self.block_elems // max(1, numel(shape[1:])))
        return rows if rows < shape[0] else None

    # -- reading -----------------------------------------------------------------------
    def _read(self, inp: Input, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        key = (id(inp.ckpt), name, rows)
        keep = getattr(self._keeping, "name", None) == name  # in this tensor's prepass: keep
        with self._lock:  # the prepass keeps (and looks up again) the blocks; the merge takes them
            raw = self._kept.get(key) if keep else self._kept.pop(key, None)
        if raw is not None:  # read (and checked) by this tensor's prepass
            return raw.to(self.device).to(torch.float32)
        raw = inp.ckpt.get(name) if rows is None else inp.ckpt.get_rows(name, *rows)
        with self._lock:
            self.bytes_read += raw.numel() * raw.element_size()
            if keep:
                self._kept[key] = raw
        t = raw.to(self.device).to(torch.float32)
        del raw
        if not self.allow and nonfinite(t):
            raise MergelabError(
                f"{inp.label}: tensor '{name}' holds NaN or Inf (use --allow-nonfinite / allow_nonfinite: true to merge anyway)")
        return t

    def _stats(self, name: str, rows: tuple[int, int] | None = None) -> dict[str, list]:
        stats: dict[str, list] = {}
        for kind, files in self.p.stats.items():
            stats[kind] = [None if name not in st.ckpt
                           else (st.ckpt.get(name) if rows is None else st.ckpt.get_rows(name, *rows)).to(self.device)
                           for st in files]
            if kind == "gram":  # row counts from the Gram files' metadata ('count:<name>')
                counts = [(getattr(st.ckpt, "metadata", None) or {}).get(f"count:{name}") for st in files]
                if any(c is not None for c in counts):
                    stats["gram_count"] = [None if c is None else float(c) for c in counts]
        return stats

    def context(self, name: str, rows: tuple[int, int] | None = None, tensor_state: Any = None) -> TensorContext:
        seed = self._seeds.get((self.seed, name))
        if seed is None:  # once per tensor, not per row block
            seed = self._seeds[(self.seed, name)] = context_seed(self.seed, name)
        ctx = TensorContext(name=name, seed=seed, stats=self._stats(name, rows),
                            model_names=[e.label for e in self.p.experts], tensor_state=tensor_state,
                            device=self.device)
        if rows is not None:
            shape = self.p.shape(name)
            ctx.offset, ctx.numel = rows[0] * numel(shape[1:]), numel(shape)
        return ctx

    def inputs(self, name: str, rows: tuple[int, int] | None = None, tensor_state: Any = None):
        """``(ctx, base, tensors)`` of one tensor, or of its rows ``rows[0]:rows[1]`` (math device, float32)."""
        seen: dict[int, torch.Tensor] = {}

        def rd(inp):
            k = id(inp.ckpt)
            if k not in seen:
                seen[k] = self._read(inp, name, rows)
            return seen[k]

        base = rd(self.p.base) if self.p.base is not None else None
        tensors = [rd(e) for e in self.p.experts]
        return self.context(name, rows, tensor_state), base, tensors

    # -- prepasses ---------------------------------------------------------------------
    def stream(self) -> "Stream":
        """The prepass stream: every merged name once, in order, one at a time, as whole tensors
        or, where the tensor is merged in row blocks, as its row blocks in order (``ctx.offset``,
        ``ctx.numel`` set as for the merge); re-iterable (each ``iter()`` reads the inputs
        again), so a prepass may take several passes.  Memory: one whole tensor's inputs, or one
        block's."""
        return Stream(self)

    def prepass(self) -> Any:
        """The method's whole-model prepass (None without one)."""
        if self.p.method.prepass is None:
            return None
        kw0 = next(iter(self.p.kwargs.values()), {})
        return self.p.method.prepass(kw0, self.stream())

    def tensor_state(self, name: str, rows: int) -> Any:
        """The method's tensor_prepass over the row blocks of ``name`` (None without one)."""
        if self.p.method.tensor_prepass is None:
            return None
        n0 = self.p.shape(name)[0]
        keep = self.keep_raw(name)

        def blocks():
            self._keeping.name = name if keep else None
            try:
                for a in range(0, n0, rows):
                    yield self.inputs(name, (a, min(a + rows, n0)))
            finally:
                self._keeping.name = None

        return self.p.method.tensor_prepass(self.p.kwargs[name], blocks)

    def keep_raw(self, name: str) -> bool:
        """Whether the prepass of ``name`` keeps the blocks it read for the merge pass (stored
        dtype, at most ``KEEP_BYTES`` for all inputs of the tensor)."""
        if not KEEP_BYTES:
            return False
        seen, total = set(), 0
        for inp in list(self.p.readers):
            if id(inp.ckpt) in seen or name not in inp.ckpt:
                continue
            seen.add(id(inp.ckpt))
            total += numel(inp.ckpt.shape(name)) * inp.ckpt.dtype(name).itemsize
        return total <= KEEP_BYTES

    # -- one call ----------------------------------------------------------------------
    def compute(self, name: str, prepass: Any, rows: tuple[int, int] | None = None,
                tensor_state: Any = None) -> dict[str, torch.Tensor]:
        """``{variant: tensor}`` of one tensor or of its rows ``rows``: stored dtype, storage device
        (variant ``""`` for single-output methods)."""
        ctx, base, tensors = self.inputs(name, rows, tensor_state)
        ctx.prepass = prepass
        method = self.p.method
        out = method(tensors, base, ctx=ctx, **self.p.kwargs[name])
        del tensors, base
        shape = self.p.shape(name)
        if rows is not None:
            shape = (rows[1] - rows[0],) + shape[1:]
        outs = out if isinstance(out, dict) else {"": out}
        if method.multi_output != isinstance(out, dict):
            raise AssertionError(f"method '{method.name}' returned {type(out).__name__} for '{name}'")
        res = {}
        for k, v in outs.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise AssertionError(f"method '{method.name}' returned {got} for '{name}', expected {shape}")
            stored = v.to(self.p.out_dtype[name])
            if not self.allow:
                check_stored(name, v, stored, who=f"method '{method.name}'")
            res[str(k)] = stored.to(self.storage)
        return res


class Stream:
    def __init__(self, driver: Driver):
        self.driver = driver

    def __iter__(self) -> Iterator[tuple[TensorContext, torch.Tensor | None, list[torch.Tensor]]]:
        d = self.driver
        for n in d.p.names:
            if n not in d.p.merged:
                continue
            rows = d.rows_per_block(n)
            if rows is None:
                yield d.inputs(n)
                continue
            n0 = d.p.shape(n)[0]
            for a in range(0, n0, rows):
                yield d.inputs(n, (a, min(a + rows, n0)))
