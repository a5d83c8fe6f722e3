"""Running the statistics passes under ``torchrun``.

Every pass calls :func:`shard` on its data and :func:`all_reduce_sum` on its float64 sums, so
the same script runs on one process or many::

    torchrun --nproc_per_node 2 my_stats.py      # gloo on CPU, nccl on GPU

* :func:`init` starts the process group from torchrun's environment (``WORLD_SIZE`` > 1);
  it is a no-op on a single process.  The CLI calls it; scripts call it once at the top.
* Sharding is by batch index: rank ``r`` of ``W`` processes batches ``r, r + W, r + 2W, ...``
  of the loader, so every rank must iterate the SAME loader (same order, same batches).
  Pass ``shard=False`` to a pass when your loader already yields each rank its own data.
* Sums (and counts) are all-reduced; every rank ends with the full result; only rank 0
  writes files (:func:`is_writer`).  The result equals the single-process result to float
  tolerance (the order of float64 additions differs).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist


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
    dist.init_process_group(backend=backend)
    return True


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


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place (no-op on one process)."""
    rank, world = rank_world()
    if world == 1:
        return
    backend = dist.get_backend()
    for t in tensors:
        if backend == "nccl" and t.device.type != "cuda":
            tmp = t.cuda()
            dist.all_reduce(tmp)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t)
