"""``merge(recipe, out)``: plan -> jobs -> output -> stages.

Worker threads overlap reading, computing and writing; an error or Ctrl-C during the merge
removes the temporary output folder (nothing is written before every check passed).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import MergelabError
from ..io.writer import DEFAULT_SHARD_SIZE, AtomicFolder, TensorSpec, check_shard_size, parse_size, sha256_file
from . import stages
from .driver import DEFAULT_BLOCK_SIZE, Driver
from .jobs import make_jobs, run_jobs
from .output import Outputs
from .planning import Plan, plan


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
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 64 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _Checksums:
    """SHA-256 of every input file, on a background thread while the merge runs."""

    def __init__(self, p: Plan, enabled: bool):
        files = {}
        for inp in p.readers + [s for v in p.stats.values() for s in v]:
            fl = getattr(inp.ckpt, "files", None)
            if fl:
                files[inp.label] = list(fl)
        self.pool = ThreadPoolExecutor(1) if enabled and files else None
        self.fut = self.pool.submit(lambda: {lab: {f.name: sha256_file(f) for f in fl} for lab, fl in files.items()}) \
            if self.pool else None

    def result(self) -> dict:
        return self.fut.result() if self.fut is not None else {}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _threads(threads: int | None) -> int:
    n = threads if threads else min(4, os.cpu_count() or 1)
    if n < 1:
        raise MergelabError(f"--threads: expected a positive number, found {threads}")
    return n


def merge(recipe: Any, out: str | os.PathLike, *, force: bool = False, dtype: str | None = None,
          shard_size: int | str | None = None, device: str | None = None, threads: int | None = None,
          quiet: bool = False, allow_nonfinite: bool | None = None, inputs: dict | None = None,
          checksums: bool = True, block_size: int | str | None = None, allow_crimes: bool = False,
          seed: int | None = None, copy_tokenizer: bool = True, model_card: bool = True) -> MergeResult:
    """Run a merge recipe (a YAML path, YAML text, dict or :class:`Recipe`) into the folder ``out``.

    ``dtype`` overrides the recipe's stored dtype; ``shard_size`` like ``"5GB"``; ``device``
    the math device (``cpu``, ``cuda``, ``cuda:1``; default the recipe's ``device:``, else
    cpu; reading and writing stay streamed through the CPU); ``threads`` worker threads
    (default: all cores, at most 4); ``inputs`` maps model names used in the recipe to
    Checkpoint-like objects (e.g. lazily permuted views).  ``block_size``: float32 bytes of
    one input's row block for elementwise methods (default ``1MiB``); the output does not
    depend on it.  Multi-output methods write one sub-folder of ``out`` per variant.
    ``allow_crimes`` merges checkpoints of different architectures (config.json
    ``architectures``/``model_type``); ``seed`` overrides the recipe's ``seed``;
    ``copy_tokenizer=False`` copies the config files but no tokenizer files;
    ``model_card=False`` writes no README.md.
    """
    t0 = time.perf_counter()
    p = plan(recipe, dtype=dtype, inputs=inputs, allow_crimes=allow_crimes)
    r = p.recipe
    if seed is not None and int(seed) != r.seed:  # --random-seed: recorded in the model card too
        extra = {k: getattr(r, k) for k in ("_base_dir", "_card_yaml", "_layer_count", "_vocab", "_chat_template") if hasattr(r, k)}
        r = p.recipe = r.model_copy(update={"seed": int(seed)})
        for k, v in extra.items():
            setattr(r, k, v)
    allow = r.allow_nonfinite if allow_nonfinite is None else allow_nonfinite
    size = parse_size(shard_size if shard_size is not None else DEFAULT_SHARD_SIZE)
    check_shard_size([TensorSpec(n, p.shape(n), p.out_dtype[n]) for n in p.names], size)
    nthreads = _threads(threads)
    block_bytes = parse_size(block_size if block_size is not None else DEFAULT_BLOCK_SIZE)
    d = Driver(p, device=device or r.device or "cpu", storage="cpu", seed=r.seed, allow_nonfinite=allow,
               block_bytes=block_bytes)
    atomic = AtomicFolder(out, force)  # refuses an existing output before any work
    if d.blockable:
        tune_malloc()
    jobs = make_jobs(d)
    sums = _Checksums(p, checksums)
    old_threads = torch.get_num_threads()
    # blocks are small: the worker threads use the cores, one intra-op thread each
    torch.set_num_threads(1 if d.blockable else max(1, min(nthreads, os.cpu_count() or 1)))
    bar = tqdm(total=len(jobs) + len(p.names) - len(p.merged), disable=quiet, unit="job",
               desc=f"merge {p.method.name}", leave=False)
    outs = None
    try:
        with atomic as tmp:
            outs = Outputs(p, tmp, size, copy_tokenizer=copy_tokenizer, model_card=model_card)
            run_jobs(d, jobs, d.prepass(), outs.put, nthreads, lambda: bar.update(1))
            outs.finish(sums.result(), lambda: bar.update(1))
            stages.after_merge(p, tmp, shard_size=size, quiet=quiet)
    finally:
        if outs is not None:
            outs.abort()
        bar.close()
        torch.set_num_threads(old_threads)
        sums.close()
    outp = Path(out).expanduser().absolute()
    return MergeResult(outputs=[outp / v if v else outp for v in outs.variants], tensors=len(p.names),
                       bytes_read=d.bytes_read, bytes_written=outs.written,
                       seconds=time.perf_counter() - t0, method=p.method.name, variants=[v for v in outs.variants if v])
