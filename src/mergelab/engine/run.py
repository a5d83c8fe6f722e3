"""``merge(recipe, out)``: plan -> jobs -> output -> stages.

Worker threads overlap reading, computing and writing; an error or Ctrl-C during the merge
removes the temporary output folder (nothing is written before every check passed).
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ..progress import progress

from ..errors import MergelabError
from ..io.outputs import Output
from ..io import prehash
from ..io.checksums import Cancelled, file_digest, resolve_checksums
from ..io.writer import DEFAULT_SHARD_SIZE, TensorSpec, check_shard_size, parse_size
from ..recipe import Recipe
from . import stages
from .driver import DEFAULT_BLOCK_SIZE, Driver, numel
from .jobs import make_jobs, run_jobs
from .output import Outputs
from .planning import Plan, plan
from .ranks import Team, partition


@dataclass
class MergeResult:
    outputs: list[Path]                  # one folder, or one per variant for multi-output methods
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    method: str = ""
    variants: list[str] = field(default_factory=list)
    rank: int = 0                        # under torchrun: this process's rank, the world size,
    world: int = 1                       # the tensors it merged and the bytes it wrote
    rank_tensors: int = 0
    rank_bytes: int = 0

    def rank_line(self) -> str:
        return (f"rank {self.rank}/{self.world}: merged {self.rank_tensors} of {self.tensors} tensors "
                f"({self.rank_bytes} bytes)")

    def summary(self) -> str:
        gb = (self.bytes_read + self.bytes_written) / 1e9
        return (f"merged {self.tensors} tensors with '{self.method}' in {self.seconds:.1f} s "
                f"({gb:.2f} GB read+written, {gb / max(self.seconds, 1e-9):.2f} GB/s) -> "
                + ", ".join(map(str, self.outputs)))


_MALLOC_TUNED = False


def tune_malloc() -> None:
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
        from .._libc import libc as _c

        libc = _c()
        libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def trim_heap() -> None:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Called after the whole-model prepass: it runs on this thread and the merge on worker
    threads, whose glibc arenas are separate, so with :func:`tune_malloc`'s 256 MiB trim
    threshold the prepass's freed buffers would otherwise stay resident under the merge's."""
    try:
        import ctypes
        import ctypes.util

        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Checksums:
    """The checksum (``algorithm``: BLAKE3 by default, or SHA-256; :mod:`mergelab.io.checksums`)
    of every byte of every input file, computed on background threads while the merge runs.

    The files are hashed in parallel, one file per thread, up to ``threads`` at once (the
    hashes release the GIL), largest file first. A file shared by several inputs is hashed
    once."""

    def __init__(self, p: Plan, algorithm: str | None, threads: int = 1):
        files: dict[str, list] = {}
        for inp in p.readers + [s for v in p.stats.values() for s in v]:
            fl = getattr(inp.ckpt, "files", None)
            if fl:
                files[inp.label] = list(fl)
        unique = {os.path.realpath(f): f for fl in files.values() for f in fl}
        self.files, self.pool, self.futs, self.algorithm = files, None, {}, algorithm
        if algorithm is not None and unique:
            # the command may have started some before importing torch (io/prehash.py)
            self.futs = {k: f for k in unique if (f := prehash.take(unique[k], algorithm)) is not None}
            # largest first: the longest hash starts at once
            order = sorted((k for k in unique if k not in self.futs), key=lambda k: -_size(unique[k]))
            if order:
                self.pool = ThreadPoolExecutor(max(1, min(threads, len(order))), thread_name_prefix=f"mergelab-{algorithm}")
                self.futs.update({k: self.pool.submit(file_digest, unique[k], algorithm) for k in order})
        prehash.discard()  # started for a file the plan does not read: stop it
        self.unique = unique

    def _digest(self, key: str) -> str:
        try:
            return self.futs[key].result()
        except (Cancelled, CancelledError):  # a started hash stopped early: hash it here
            return file_digest(self.unique[key], self.algorithm)

    def result(self) -> dict:
        if not self.futs:
            return {}
        return {lab: {f.name: self._digest(os.path.realpath(f)) for f in fl} for lab, fl in self.files.items()}

    def close(self) -> None:
        prehash.discard(everything=True)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _threads(threads: int | None) -> int:
    n = threads if threads else min(4, os.cpu_count() or 1)
    if n < 1:
        raise MergelabError(f"--threads: expected a positive number, found {threads}")
    return n


def merge(recipe: Any, out: str | os.PathLike, *, force: bool = False, dtype: str | None = None,
          shard_size: int | str | None = None, device: str | None = None, threads: int | None = None,
          quiet: bool = False, allow_nonfinite: bool | None = None, inputs: dict | None = None,
          checksums: bool | str = True, block_size: int | str | None = None, allow_crimes: bool = False,
          seed: int | None = None, copy_tokenizer: bool = True, model_card: bool = True) -> MergeResult:
    """Run a merge recipe (a YAML path, YAML text, dict or :class:`Recipe`) into the folder ``out``.

    ``dtype`` overrides the recipe's stored dtype; ``shard_size`` like ``"5GB"``; ``device``
    the math device (``cpu``, ``cuda``, ``cuda:1``; default the recipe's ``device:``, else
    cpu; reading and writing stay streamed through the CPU); ``threads`` worker threads
    (default: all cores, at most 4); ``inputs`` maps model names used in the recipe to
    Checkpoint-like objects (e.g. lazily permuted views).  ``checksums``: the algorithm of the
    input checksums in the model card, ``"blake3"`` (the default, ``True``), ``"sha256"``, or
    ``False``/``"none"`` for none (:mod:`mergelab.io.checksums`).  ``block_size``: float32 bytes of
    one input's row block for elementwise methods (default ``1MiB``); the output does not
    depend on it.  Multi-output methods write one sub-folder of ``out`` per variant.
    ``allow_crimes`` merges checkpoints of different architectures (config.json
    ``architectures``/``model_type``); ``seed`` overrides the recipe's ``seed``;
    ``copy_tokenizer=False`` copies the config files but no tokenizer files;
    ``model_card=False`` writes no README.md.

    Under ``torchrun`` every process calls this with the same arguments; the tensors are split
    across the processes and the output is the same bytes (:mod:`mergelab.engine.ranks`).
    """
    r = Recipe.load(recipe)
    checksums = resolve_checksums(checksums)  # an option value: checked before any work
    parse_size(shard_size if shard_size is not None else DEFAULT_SHARD_SIZE, "--shard-size")  # option values
    parse_size(block_size if block_size is not None else DEFAULT_BLOCK_SIZE, "--block-size")  # before any work
    team = Team()
    # the output is checked against every input and locked (by rank 0) before any work, for the whole run
    claim, err = contextlib.nullcontext(), None
    if team.lead:
        try:
            claim = Output(out, kind="folder", option="-o", force=force, inputs=r.input_paths(inputs))
        except MergelabError as e:
            err = str(e)
    err = team.share(err)
    if err is not None:
        raise MergelabError(err)
    with claim:
        return _merge(r, out, team, force=force, dtype=dtype, shard_size=shard_size, device=device,
                      threads=threads, quiet=quiet, allow_nonfinite=allow_nonfinite, inputs=inputs,
                      checksums=checksums, block_size=block_size, allow_crimes=allow_crimes, seed=seed,
                      copy_tokenizer=copy_tokenizer, model_card=model_card)


def _merge(recipe: Any, out: str | os.PathLike, team: Team, *, force: bool, dtype: str | None,
           shard_size: int | str | None, device: str | None, threads: int | None, quiet: bool,
           allow_nonfinite: bool | None, inputs: dict | None, checksums: str | None, block_size: int | str | None,
           allow_crimes: bool, seed: int | None, copy_tokenizer: bool, model_card: bool) -> MergeResult:
    t0 = time.perf_counter()
    p = plan(recipe, dtype=dtype, inputs=inputs, allow_crimes=allow_crimes)
    r = p.recipe
    if seed is not None and int(seed) != r.seed:  # --random-seed: recorded in the model card too
        extra = {k: getattr(r, k) for k in ("_base_dir", "_card_yaml", "_layer_count", "_vocab", "_chat_template") if hasattr(r, k)}
        r = p.recipe = r.model_copy(update={"seed": int(seed)})
        for k, v in extra.items():
            setattr(r, k, v)
    allow = r.allow_nonfinite if allow_nonfinite is None else allow_nonfinite
    size = parse_size(shard_size if shard_size is not None else DEFAULT_SHARD_SIZE, "--shard-size")
    specs = [TensorSpec(n, p.shape(n), p.out_dtype[n]) for n in p.names]
    check_shard_size(specs, size)
    nthreads = _threads(threads)
    block_bytes = parse_size(block_size if block_size is not None else DEFAULT_BLOCK_SIZE, "--block-size")
    d = Driver(p, device=device if device is not None else (r.device or "cpu"), storage="cpu", seed=r.seed, allow_nonfinite=allow,
               block_bytes=block_bytes)
    folder = team.folder(out, force)  # refuses an existing output before any work
    if team.lead:
        folder.atomic.check_space(sum(t.nbytes for t in specs))  # one variant's weights: a lower bound
    if d.blockable:
        tune_malloc()
    jobs = make_jobs(d)
    mine = None                       # the tensors this rank writes (None: all)
    if team.world > 1:
        nbytes = {n: numel(p.shape(n)) * p.out_dtype[n].itemsize for n in p.names}
        mine = set(partition(p.names, nbytes, team.world)[team.rank])
        jobs = [j for j in jobs if j.name in mine]
    sums = _Checksums(p, checksums if team.lead and model_card else None, nthreads)  # the card records them
    old_threads = torch.get_num_threads()
    # blocks are small: the worker threads use the cores, one intra-op thread each
    torch.set_num_threads(1 if d.blockable else max(1, min(nthreads, os.cpu_count() or 1)))
    unmerged = [n for n in p.names if n not in p.merged and (mine is None or n in mine)]
    bar = progress(total=len(jobs) + len(unmerged), disable=quiet or not team.lead, unit="job",
               desc=f"merge {p.method.name}", leave=False)
    outs = None
    # the objects alive now (torch's modules, the plan) are not garbage: the collector's full
    # passes skip them for the merge (they took ~3% of a 1.1B task-arithmetic merge's CPU);
    # a caller's own gc.freeze() is left as it is
    froze = gc.get_freeze_count() == 0
    if froze:
        gc.freeze()
    try:
        with folder as tmp:
            prepass = d.prepass()
            if p.method.prepass is not None:
                trim_heap()
            variants = _variants(d, prepass) if team.world > 1 and p.method.multi_output else None
            if team.lead:             # rank 0 lays the shards out, the others open them
                outs = Outputs(p, tmp, size, only=mine, variants=variants,
                               copy_tokenizer=copy_tokenizer, model_card=model_card)
            team.barrier()
            if not team.lead:
                outs = Outputs(p, tmp, size, only=mine, create=False, variants=variants)
            run_jobs(d, jobs, prepass, outs.put, nthreads, lambda: bar.update(1))
            outs.close(lambda: bar.update(1))
            team.barrier()            # every rank's tensors are written
            if team.lead:
                outs.describe(sums.result(), sums.algorithm)
            team.barrier()            # the merged folder is complete: the stages read it
            stages.after_merge(p, tmp, shard_size=size, quiet=quiet or not team.lead)
    finally:
        if froze:
            gc.unfreeze()
        if outs is not None:
            outs.abort()
        bar.close()
        torch.set_num_threads(old_threads)
        sums.close()
    outp = Path(out).expanduser().absolute()
    return MergeResult(outputs=[outp / v if v else outp for v in outs.variants], tensors=len(p.names),
                       bytes_read=d.bytes_read, bytes_written=outs.written,
                       seconds=time.perf_counter() - t0, method=p.method.name, variants=[v for v in outs.variants if v],
                       rank=team.rank, world=team.world, rank_tensors=len(p.names) if mine is None else len(mine),
                       rank_bytes=outs.written)


def _variants(d: Driver, prepass: Any) -> list[str]:
    """A multi-output method's variant names, from its smallest tensor (every rank must lay out
    every variant's folder before any rank writes)."""
    p = d.p
    probe = min(p.merged, key=lambda n: (numel(p.shape(n)), p.names.index(n)))
    return sorted(d.compute(probe, prepass))
