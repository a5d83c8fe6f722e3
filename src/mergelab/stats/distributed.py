"""Running the statistics passes under ``torchrun``.

Every pass calls :func:`shard` on its data and :func:`all_reduce_sum` on its float64 sums, so
the same script runs on one process or many::

    torchrun --nproc_per_node 2 my_stats.py      # gloo on CPU, nccl on GPU

* :func:`init` starts the process group from torchrun's environment (``WORLD_SIZE`` > 1);
  it is a no-op on a single process.  The CLI calls it; scripts call it once at the top.
* Sharding is by batch index: rank ``r`` of ``W`` processes batches ``r, r + W, r + 2W, ...``
  of the loader, so every rank must iterate the SAME loader (same order, same batches).
  Pass ``shard=False`` to a pass when your loader already yields each rank its own data.
  A batch index is owned by exactly one rank, so whatever the world size (and whether or not
  it divides the number of batches) no example is counted twice or dropped; a rank may own
  no batch at all (more processes than batches) and still takes part in the reductions.
* Sums (and counts) are float64 and all-reduced (:func:`all_reduce_sum`, one flat buffer per
  dtype and device); a rank that saw no data contributes zeros of the shape another rank
  reports (:func:`reduce_partial`).  Every rank ends with the full result; only rank 0
  writes files (:func:`is_writer`).  The result equals the single-process result to float64
  round-off (only the order of the additions differs).
* The process group times out after ``MERGELAB_DIST_TIMEOUT`` seconds (default 1800) in any
  collective, so a rank that died or hangs fails the run instead of blocking the others.
* A group that :func:`init` started is destroyed at exit (:func:`shutdown`, an ``atexit``
  handler), while the interpreter is still whole.  Left to the interpreter's teardown, gloo's
  C++ worker threads can outlive it and the process aborts ("terminate called without an
  active exception", SIGABRT) after its work is done, failing the whole torchrun job.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from ..errors import MergelabError


def init(backend: str | None = None) -> bool:
    """Start the process group from torchrun's environment; True if running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    atexit.register(shutdown)
    return True


def shutdown(wait_s: float = 30.0) -> None:
    """Destroy the default process group, if one exists (no-op otherwise; safe to call twice).

    :func:`init` registers this to run at exit.  The destruction runs on a helper thread and is
    waited for at most ``wait_s`` seconds, so a collective still in flight (a barrier left by
    Ctrl-C) cannot hold the exit forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - at exit: say it, the process ends anyway
            print(f"mergelab: destroying the process group at exit failed: {e}", file=sys.stderr)

    th = threading.Thread(target=destroy, name="mergelab-shutdown", daemon=True)
    th.start()
    th.join(wait_s)


def timeout_s() -> float:
    """Seconds a collective (a reduction, a barrier) waits for the other ranks."""
    return float(os.environ.get("MERGELAB_DIST_TIMEOUT", "1800"))


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """True on the process that writes output files (rank 0, or the only process)."""
    return rank_world()[0] == 0


def shard(data: Iterable[Any], n_batches: int | None = None, enabled: bool = True
          ) -> Iterator[tuple[int, Any]]:
    """Yield ``(batch_index, batch)`` for this rank's batches among the first ``n_batches``."""
    rank, world = rank_world() if enabled else (0, 1)
    for i, batch in enumerate(data):
        if n_batches is not None and i >= n_batches:
            break
        if i % world == rank:
            yield i, batch


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place (no-op on one process).

    Tensors are packed into one flat buffer per (dtype, device), so a pass with hundreds of
    small sums costs one collective per dtype, not one per tensor."""
    _, world = rank_world()
    if world == 1 or not tensors:
        return
    nccl = dist.get_backend() == "nccl"
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), ts in groups.items():
        flat = torch.cat([t.reshape(-1) for t in ts])
        if nccl and flat.device.type != "cuda":
            flat = flat.cuda()
        dist.all_reduce(flat)
        flat = flat.to(device)
        pos = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[pos: pos + n].view_as(t))
            pos += n


def reduce_partial(tensors: Sequence[torch.Tensor | None], device: torch.device | str = "cpu"
                   ) -> list[torch.Tensor | None]:
    """All-reduce partial sums of which this rank may lack some (``None``: it saw no data there).

    A missing sum becomes zeros of the shape and dtype another rank reports, on ``device``;
    one that no rank has stays ``None`` (on every rank, so callers raise the same error
    everywhere).  The present tensors are reduced in place; returns the completed list."""
    out = list(tensors)
    _, world = rank_world()
    if world == 1:
        return out
    meta = [None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in out]
    gathered: list[Any] = [None] * world            # every rank joins, missing sums or not
    dist.all_gather_object(gathered, meta)
    for i, t in enumerate(out):
        if t is None:
            known = next((g[i] for g in gathered if g[i] is not None), None)
            if known is not None:
                out[i] = torch.zeros(known[0], dtype=getattr(torch, known[1]), device=device)
    all_reduce_sum([t for t in out if t is not None])
    return out


def barrier() -> None:
    """Wait for every rank (no-op on one process); times out after :func:`timeout_s`.

    The wait runs on a helper thread while the main thread polls it, so a signal (SIGTERM
    from torchrun when another rank failed) is handled at once, not after the timeout.  A
    timeout or a lost peer is a :class:`~mergelab.errors.MergelabError` naming this rank."""
    rank, world = rank_world()
    if world == 1:
        return
    box: list[BaseException] = []

    def wait() -> None:
        try:
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            box.append(e)

    th = threading.Thread(target=wait, name="mergelab-barrier", daemon=True)
    th.start()
    while th.is_alive():
        th.join(0.1)
    if box:
        first = (str(box[0]).strip().splitlines() or [type(box[0]).__name__])[0]
        raise MergelabError(f"rank {rank}/{world}: waiting for the other ranks failed (a rank died, "
                            f"or none came within {timeout_s():g} s; MERGELAB_DIST_TIMEOUT): {first[:200]}")
