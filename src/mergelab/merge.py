"""The streaming merge engine.

``merge(recipe, out)`` plans the jobs, then streams: a job reads the base and expert tensors
(float32), calls the registered method, and writes the result straight to its place in the
output shards.  For methods declared ``elementwise`` and readers that offer ``get_rows``,
a big tensor is cut into row blocks of a fixed byte budget (``block_size``), each block read,
merged and written at its offset on its own, so peak memory is a constant, whatever the
model size; other tensors are merged whole.  Worker threads overlap reading, computing and
writing; a FIFO byte budget admits a job only while the jobs in flight fit in the footprint
of the single largest job: about (number of inputs + 2) x the largest block or whole tensor
(float32) per job.

Everything that can be checked before work starts is checked first (recipe, parameters for
every tensor, files, names, shapes, output folder), so a user error writes nothing; an
error or Ctrl-C during the merge removes the temporary output folder.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from .progress import progress

from . import __version__
from .errors import MergelabError
from .io.reader import open_checkpoint
from .io.writer import (DEFAULT_SHARD_SIZE, AtomicFolder, ShardedWriter, TensorSpec, copy_model_files,
                        parse_dtype, parse_size, sha256_file, write_model_card)
from .methods.registry import MethodSpec, TensorContext, get_method
from .recipe import Recipe, is_static, layer_index, layer_t, tensor_params


@dataclass
class MergeResult:
    outputs: list[Path]                  # one folder, or one per variant for multi-output methods
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    method: str = ""
    variants: list[str] = field(default_factory=list)

    def summary(self) -> str:
        gb = (self.bytes_read + self.bytes_written) / 1e9
        return (f"merged {self.tensors} tensors with '{self.method}' in {self.seconds:.1f} s "
                f"({gb:.2f} GB read+written, {gb / max(self.seconds, 1e-9):.2f} GB/s) -> "
                + ", ".join(map(str, self.outputs)))


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor seed handed to methods as ``ctx.seed`` (stable across runs and machines)."""
    d = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------ planning
@dataclass
class _Input:
    label: str            # how messages name it
    ckpt: Any             # a Checkpoint or Checkpoint-like object


def _open(ref: Any, recipe: Recipe, where: str, inputs: dict | None, cache: dict) -> _Input:
    if inputs and isinstance(ref, str) and ref in inputs:
        ref = inputs[ref]
    if not isinstance(ref, (str, os.PathLike)):
        for m in ("keys", "shape", "dtype", "get"):
            if not hasattr(ref, m):
                raise MergelabError(f"{where}: expected a checkpoint path, found {type(ref).__name__}")
        return _Input(str(getattr(ref, "path", where)), ref)
    path = recipe.resolve_path(ref)
    key = str(Path(path).absolute())
    if key not in cache:
        if not Path(path).exists():
            raise MergelabError(f"{where}: {path}: no such file or folder")
        cache[key] = _Input(str(path), open_checkpoint(path))
    return cache[key]


def _same_input(a: Any, b: Any, recipe: Recipe) -> bool:
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        return Path(recipe.resolve_path(a)).absolute() == Path(recipe.resolve_path(b)).absolute()
    return a is b


def _fmt_shape(s) -> str:
    return str(tuple(int(x) for x in s))


def _check_compatible(ref: _Input, others: list[_Input]) -> None:
    rkeys = ref.ckpt.keys()
    rset = set(rkeys)
    for o in others:
        if o.ckpt is ref.ckpt:
            continue
        okeys = o.ckpt.keys()
        oset = set(okeys)
        for n in rkeys:
            if n not in oset:
                raise MergelabError(f"tensor '{n}' is in {ref.label} but missing from {o.label}")
        for n in okeys:
            if n not in rset:
                raise MergelabError(f"tensor '{n}' is in {o.label} but missing from {ref.label}")
        for n in rkeys:
            a, b = tuple(ref.ckpt.shape(n)), tuple(o.ckpt.shape(n))
            if a != b:
                raise MergelabError(
                    f"tensor '{n}' has shape {_fmt_shape(a)} in {ref.label} but {_fmt_shape(b)} in {o.label}")


def _num_layers(ref: _Input) -> int | None:
    cfg = getattr(ref.ckpt, "config", None) or {}
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(k), int):
            return cfg[k]
    idx = [layer_index(n) for n in ref.ckpt.keys()]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else None


@dataclass
class _Plan:
    recipe: Recipe
    method: MethodSpec
    base: _Input | None
    experts: list[_Input]
    stats: dict[str, list[_Input]]           # kind -> per-expert statistics file
    names: list[str]                          # every tensor, in output order
    merged: set[str]                          # names that go through the method (floating point)
    kwargs: dict[str, dict]                   # name -> resolved keyword params
    out_dtype: dict[str, torch.dtype]
    ref: _Input
    models: dict[str, _Input] = field(default_factory=dict)  # recipe models[].model -> input as read


def plan(recipe: Any, *, dtype: str | None = None, inputs: dict | None = None) -> _Plan:
    """Validate a recipe against its checkpoints and resolve every tensor's parameters."""
    r = Recipe.load(recipe)
    method = get_method(r.merge_method)
    if r.align is not None:   # align first: the models it moves are read through permuted views
        from .align.pipeline import recipe_inputs
        inputs = {**(inputs or {}), **recipe_inputs(r, inputs)}
    if not r.models:
        raise MergelabError("recipe: 'models' is empty")
    cache: dict[str, _Input] = {}
    base = _open(r.base_model, r, "base_model", inputs, cache) if r.base_model is not None else None
    if method.needs_base and base is None:
        raise MergelabError(f"recipe: method '{method.name}' needs a base_model")
    if r.weights is not None:  # mergelab's per-model weight list: one value per entry of `models`
        if len(r.weights) != len(r.models):
            raise MergelabError(
                f"recipe: 'weights' has {len(r.weights)} values but 'models' has {len(r.models)} entries"
                " (weight list of the wrong length)")
        for i, m in enumerate(r.models):
            if "weight" in m.parameters:
                raise MergelabError(f"recipe: models[{i}]: weight given twice (in 'weights' and in its parameters)")
    entries = list(enumerate(r.models))
    if method.needs_base:  # mergekit: the base listed among the models is not an expert
        entries = [(i, m) for i, m in entries if not _same_input(m.model, r.base_model, r)]
    experts = [_open(m.model, r, f"models[{i}].model", inputs, cache) for i, m in entries]
    stats: dict[str, list[_Input]] = {k: [] for k in method.stats}
    model_params = []
    for i, m in entries:
        p = dict(m.parameters)
        if r.weights is not None:
            p["weight"] = r.weights[i]
        for kind in method.stats:
            if kind not in p:
                raise MergelabError(
                    f"recipe: models[{i}]: method '{method.name}' needs a '{kind}' statistics file per model")
            src = p[kind]  # stays in the params: resolve() expects it and passes it over
            if not isinstance(src, str):
                raise MergelabError(f"recipe: models[{i}]: '{kind}' must be the path of a statistics file")
            st = _open(src, r, f"models[{i}].parameters.{kind}", inputs, {})
            found = (getattr(st.ckpt, "metadata", None) or {}).get("mergelab_kind")
            if found is not None and found != kind:
                raise MergelabError(f"{st.label}: statistics file of kind '{found}', expected '{kind}'")
            stats[kind].append(st)
        model_params.append(p)

    ref = base if base is not None else experts[0] if experts else None
    if ref is None:
        raise MergelabError("recipe: no model to merge besides the base_model")
    _check_compatible(ref, experts + ([base] if base is not None else []))
    names = ref.ckpt.keys()
    merged = {n for n in names if ref.ckpt.dtype(n).is_floating_point}

    forced = parse_dtype(dtype, "--dtype") or parse_dtype(r.out_dtype, "recipe: out_dtype") or parse_dtype(r.dtype, "recipe: dtype")
    out_dtype = {n: (forced if (forced is not None and n in merged) else ref.ckpt.dtype(n)) for n in names}

    kwargs: dict[str, dict] = {}
    # as in mergekit, every list is a depth gradient or a list of filter rules, wherever it is
    glob = dict(r.parameters)
    static = is_static(glob) and all(is_static(p) for p in model_params)
    if static:
        kw = method.resolve(glob, model_params, where="recipe")
        kwargs = {n: kw for n in merged}
    else:
        L = _num_layers(ref)
        cache_kw: dict[tuple, dict] = {}
        for n in names:
            if n not in merged:
                continue
            t = layer_t(n, L)
            g = tensor_params(glob, n, t)
            mp = [tensor_params(p, n, t) for p in model_params]
            key = (repr(sorted(g.items())), repr([sorted(x.items()) for x in mp]))
            if key not in cache_kw:
                cache_kw[key] = method.resolve(g, mp, where=f"recipe (tensor '{n}')")
            kwargs[n] = cache_kw[key]
    if not experts:
        method.resolve({}, [], where="recipe")  # raises the method's "takes at least N models"
    models = {str(m.model): _open(m.model, r, f"models[{i}].model", inputs, cache) for i, m in enumerate(r.models)
              if isinstance(m.model, (str, os.PathLike))}
    if r.repair is not None or r.tact is not None:
        from .repair.pipeline import check_stages
        check_stages(r, models, multi_output=method.multi_output)
    return _Plan(r, method, base, experts, stats, names, merged, kwargs, out_dtype, ref, models)


# ------------------------------------------------------------------ the streaming pass
class _Budget:
    """FIFO admission by bytes: job i starts after job i-1 started and when it fits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.turn = 0
        self.cv = threading.Condition()
        self.stop = False

    def acquire(self, ticket: int, cost: int) -> bool:
        with self.cv:
            while not self.stop and not (self.turn == ticket and (self.used == 0 or self.used + cost <= self.limit)):
                self.cv.wait()
            if self.stop:
                return False
            self.used += cost
            self.turn += 1
            self.cv.notify_all()
            return True

    def release(self, cost: int) -> None:
        with self.cv:
            self.used -= cost
            self.cv.notify_all()

    def halt(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()


_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Keep freed block-sized buffers in the C heap for reuse (glibc only, once per process).

    glibc returns every allocation above its mmap threshold (128 KiB at first) to the OS on
    free, so each fresh float32 block page-faults again: measured on the 110M task-arithmetic
    merge, 130k-510k minor faults and 0.6-1.8 s of system time, against ~0 and 0.2 s with a
    64 MiB mmap threshold and a 256 MiB trim threshold.  Buffers above 64 MiB (whole big
    tensors) are still mapped and returned as before.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _nonfinite(t: torch.Tensor) -> bool:
    """True if ``t`` holds NaN or Inf.  One reduction pass: the sum is finite whenever every
    element is (barring overflow past 3e38, which the exact check then settles)."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return False
    return not bool(torch.isfinite(t).all())


class _Runner:
    def __init__(self, p: _Plan, device: torch.device, allow_nonfinite: bool, seed: int, block_bytes: int):
        self.p = p
        self.device = device
        self.allow = allow_nonfinite
        self.seed = seed
        self.block_elems = max(1, block_bytes // 4)
        self.bytes_read = 0
        self._lock = threading.Lock()
        readers = [i.ckpt for i in ([p.base] if p.base else []) + p.experts]
        self.blockable = (p.method.elementwise and not p.stats
                          and all(callable(getattr(c, "get_rows", None)) for c in readers))

    def rows_per_block(self, name: str) -> int | None:
        """Rows of ``name`` per block when it is merged in row blocks; None: merged whole."""
        shape = tuple(self.p.ref.ckpt.shape(name))
        if not self.blockable or len(shape) == 0:
            return None
        rows = max(1, self.block_elems // max(1, _numel(shape[1:])))
        return rows if rows < shape[0] else None

    def _read(self, inp: _Input, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        raw = inp.ckpt.get(name) if rows is None else inp.ckpt.get_rows(name, *rows)
        with self._lock:
            self.bytes_read += raw.numel() * raw.element_size()
        t = raw.to(self.device).to(torch.float32)
        del raw
        if not self.allow and _nonfinite(t):
            raise MergelabError(
                f"{inp.label}: tensor '{name}' holds NaN or Inf (use --allow-nonfinite / allow_nonfinite: true to merge anyway)")
        return t

    def inputs(self, name: str, rows: tuple[int, int] | None = None, tensor_state: Any = None):
        """``(ctx, base, tensors)`` of one tensor, or of its rows ``rows[0]:rows[1]``."""
        seen: dict[int, torch.Tensor] = {}

        def rd(inp):
            k = id(inp.ckpt)
            if k not in seen:
                seen[k] = self._read(inp, name, rows)
            return seen[k]

        base = rd(self.p.base) if self.p.base is not None else None
        tensors = [rd(e) for e in self.p.experts]
        stats = {}
        for kind, files in self.p.stats.items():
            vals = []
            for st in files:
                if name in st.ckpt:
                    vals.append(st.ckpt.get(name).to(self.device))
                else:
                    vals.append(None)
            stats[kind] = vals
        ctx = TensorContext(name=name, seed=tensor_seed(self.seed, name), stats=stats,
                            model_names=[e.label for e in self.p.experts], tensor_state=tensor_state)
        if rows is not None:
            shape = self.p.ref.ckpt.shape(name)
            ctx.offset, ctx.numel = rows[0] * _numel(shape[1:]), _numel(shape)
        return ctx, base, tensors

    def tensor_state(self, name: str, rows: int) -> Any:
        """The method's tensor_prepass over the row blocks of ``name`` (None without one)."""
        if self.p.method.tensor_prepass is None:
            return None
        n0 = self.p.ref.ckpt.shape(name)[0]

        def blocks():
            for a in range(0, n0, rows):
                yield self.inputs(name, (a, min(a + rows, n0)))

        return self.p.method.tensor_prepass(self.p.kwargs[name], blocks)

    def stream(self) -> "_Stream":
        """The prepass stream: every merged name once, in order, one at a time; re-iterable
        (each ``iter()`` reads the checkpoints again), so a prepass may take several passes."""
        return _Stream(self)

    def compute(self, name: str, prepass: Any, rows: tuple[int, int] | None = None,
                tensor_state: Any = None) -> dict[str, torch.Tensor]:
        """The method's output(s) for one tensor or for its rows ``rows`` (stored dtype)."""
        ctx, base, tensors = self.inputs(name, rows, tensor_state)
        ctx.prepass = prepass
        out = self.p.method(tensors, base, ctx=ctx, **self.p.kwargs[name])
        del tensors, base
        shape = tuple(self.p.ref.ckpt.shape(name))
        if rows is not None:
            shape = (rows[1] - rows[0],) + shape[1:]
        outs = out if isinstance(out, dict) else {"": out}
        if self.p.method.multi_output != isinstance(out, dict):
            raise AssertionError(f"method '{self.p.method.name}' returned {type(out).__name__} for '{name}'")
        res = {}
        for k, v in outs.items():
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise AssertionError(f"method '{self.p.method.name}' returned {got} for '{name}', expected {shape}")
            if not self.allow and _nonfinite(v):
                raise MergelabError(
                    f"method '{self.p.method.name}' produced NaN or Inf for tensor '{name}'"
                    " (use --allow-nonfinite to keep it)")
            res[str(k)] = v.to(self.p.out_dtype[name])
        return res


class _Stream:
    def __init__(self, runner: _Runner):
        self.runner = runner

    def __iter__(self) -> Iterator[tuple[TensorContext, torch.Tensor | None, list[torch.Tensor]]]:
        for n in self.runner.p.names:
            if n in self.runner.p.merged:
                yield self.runner.inputs(n)


def merge(recipe: Any, out: str | os.PathLike, *, force: bool = False, dtype: str | None = None,
          shard_size: int | str | None = None, device: str = "cpu", threads: int | None = None,
          quiet: bool = False, allow_nonfinite: bool | None = None, inputs: dict | None = None,
          checksums: bool = True, block_size: int | str | None = None) -> MergeResult:
    """Run a merge recipe (a YAML path, YAML text, dict or :class:`Recipe`) into the folder ``out``.

    ``dtype`` overrides the recipe's stored dtype; ``shard_size`` like ``"5GB"``;
    ``threads`` worker threads (default: all cores, at most 4); ``inputs`` maps model names
    used in the recipe to Checkpoint-like objects (e.g. lazily permuted views).
    ``block_size``: float32 bytes of one input's row block for elementwise methods (default
    ``1MiB``); the output does not depend on it.
    Multi-output methods write one sub-folder of ``out`` per variant.
    """
    t0 = time.perf_counter()
    p = plan(recipe, dtype=dtype, inputs=inputs)
    r = p.recipe
    allow = r.allow_nonfinite if allow_nonfinite is None else allow_nonfinite
    size = parse_size(shard_size if shard_size is not None else DEFAULT_SHARD_SIZE)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergelabError("--device cuda: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise MergelabError(f"--device: expected cpu or cuda, found {device!r}")
    nthreads = threads if threads else min(4, os.cpu_count() or 1)
    if nthreads < 1:
        raise MergelabError(f"--threads: expected a positive number, found {threads}")
    block_bytes = parse_size(block_size if block_size is not None else DEFAULT_BLOCK_SIZE)
    atomic = AtomicFolder(out, force)  # refuses an existing output before any work

    runner = _Runner(p, dev, allow, r.seed, block_bytes)
    if runner.blockable:
        _tune_malloc()
    specs = [TensorSpec(n, tuple(p.ref.ckpt.shape(n)), p.out_dtype[n]) for n in p.names]
    n_in = len({id(e.ckpt) for e in p.experts + ([p.base] if p.base else [])})
    # jobs: (name, rows per block or None for a whole tensor, row range or None for all rows)
    jobs: list[tuple[str, int | None, tuple[int, int] | None, int]] = []
    for n in p.names:
        if n not in p.merged:
            continue
        shape = p.ref.ckpt.shape(n)
        rows = runner.rows_per_block(n)
        if rows is None:
            jobs.append((n, None, None, (n_in + 2) * 4 * _numel(shape)))
            continue
        c = (n_in + 2) * 4 * rows * _numel(shape[1:])
        if p.method.tensor_prepass is not None:  # a per-tensor state: all blocks in order, one job
            jobs.append((n, rows, None, c))
        else:
            jobs += [(n, rows, (a, min(a + rows, shape[0])), c) for a in range(0, shape[0], rows)]
    # the largest whole tensor runs alone; blocks (all about the same size) run one per worker
    whole = [j[3] for j in jobs if j[1] is None]
    blocks = [j[3] for j in jobs if j[1] is not None]
    budget = _Budget(max(max(whole, default=1), nthreads * max(blocks, default=0)))

    # checksums of the inputs, on a background thread while the merge runs
    files: dict[str, list[Path]] = {}
    for inp in ([p.base] if p.base else []) + p.experts + [s for v in p.stats.values() for s in v]:
        fl = getattr(inp.ckpt, "files", None)
        if fl:
            files[inp.label] = list(fl)
    sums: dict[str, dict[str, str]] = {}
    ck_pool = ThreadPoolExecutor(1) if checksums and files else None
    ck_fut = ck_pool.submit(lambda: {lab: {f.name: sha256_file(f) for f in fl} for lab, fl in files.items()}) if ck_pool else None

    old_threads = torch.get_num_threads()
    # blocks are small: the worker threads use the cores, one intra-op thread each
    torch.set_num_threads(1 if runner.blockable else max(1, min(nthreads, os.cpu_count() or 1)))
    bar = progress(total=len(jobs) + len(p.names) - len(p.merged), disable=quiet, unit="job",
               desc=f"merge {p.method.name}", leave=False)
    writers: dict[str, ShardedWriter] = {}
    wlock = threading.Lock()
    written = [0]
    try:
        with atomic as tmp:
            def writer(variant: str) -> ShardedWriter:
                with wlock:
                    if variant not in writers:
                        folder = tmp / variant if variant else tmp
                        folder.mkdir(exist_ok=True)
                        writers[variant] = ShardedWriter(folder, specs, size, {"mergelab_version": __version__})
                    return writers[variant]

            if not p.method.multi_output:
                writer("")
            prepass = None
            if p.method.prepass is not None:
                kw0 = next(iter(p.kwargs.values()), {})
                prepass = p.method.prepass(kw0, runner.stream())

            def put(name: str, outs: dict[str, torch.Tensor], start: int | None) -> None:
                for variant, tensor in outs.items():
                    w = writer(variant)
                    if start is None:
                        w.write(name, tensor)
                    else:
                        w.write_rows(name, start, tensor)
                    with wlock:
                        written[0] += tensor.numel() * tensor.element_size()

            def job(i: int, name: str, rows: int | None, rng: tuple[int, int] | None, c: int) -> None:
                if not budget.acquire(i, c):
                    return
                try:
                    if rows is None:
                        put(name, runner.compute(name, prepass), None)
                    else:
                        state = runner.tensor_state(name, rows)
                        a0, a1 = rng if rng is not None else (0, p.ref.ckpt.shape(name)[0])
                        for a in range(a0, a1, rows):
                            b = min(a + rows, a1)
                            put(name, runner.compute(name, prepass, (a, b), state), a)
                except BaseException:
                    budget.halt()
                    raise
                finally:
                    budget.release(c)
                bar.update(1)

            with ThreadPoolExecutor(nthreads) as pool:
                futs = [pool.submit(job, i, *j) for i, j in enumerate(jobs)]
                try:
                    for f in futs:
                        f.result()
                except BaseException:
                    budget.halt()
                    for f in futs:
                        f.cancel()
                    raise
            if not writers:
                raise MergelabError(f"method '{p.method.name}': nothing to merge (no floating-point tensors)")
            # tensors that are not merged (integer buffers): copied from the reference model
            for n in p.names:
                if n not in p.merged:
                    t = p.ref.ckpt.get(n)
                    for w in writers.values():
                        w.write(n, t)
                        written[0] += t.numel() * t.element_size()
                    bar.update(1)
            for w in writers.values():
                w.close()
            if ck_fut is not None:
                sums = ck_fut.result()
            src_folder = _folder_of(p.base or p.experts[0])
            stored = {p.out_dtype[n] for n in p.merged}
            cfg_dtype = stored.pop() if len(stored) == 1 else None
            variants = sorted(writers)
            for v in variants:
                folder = tmp / v if v else tmp
                copy_model_files(src_folder, folder, cfg_dtype)
                write_model_card(folder, recipe_yaml=r.to_yaml(), version=__version__, inputs=sums,
                                 extra=(f"Variant `{v}` of method `{p.method.name}`." if v else ""))
            if r.repair is not None or r.tact is not None:  # after the merge, inside the atomic folder
                from .repair.pipeline import run_stages
                run_stages(r, tmp, p.experts, p.models, shard_size=size, quiet=quiet)
    finally:
        for w in writers.values():
            w.abort()
        bar.close()
        torch.set_num_threads(old_threads)
        if ck_pool is not None:
            ck_pool.shutdown(wait=False, cancel_futures=True)
    outp = Path(out).expanduser().absolute()
    return MergeResult(outputs=[outp / v if v else outp for v in variants], tensors=len(p.names),
                       bytes_read=runner.bytes_read, bytes_written=written[0],
                       seconds=time.perf_counter() - t0, method=p.method.name, variants=[v for v in variants if v])


DEFAULT_BLOCK_SIZE = 2**20


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _folder_of(inp: _Input) -> Path | None:
    path = getattr(inp.ckpt, "path", None)
    if path is None:
        return None
    path = Path(path)
    return path if path.is_dir() else path.parent


__all__ = ["merge", "plan", "MergeResult", "tensor_seed"]
