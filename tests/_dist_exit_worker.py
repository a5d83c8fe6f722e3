"""Run by test_stats_distributed under torchrun: starts the group with ``distributed.init`` and
ends WITHOUT destroying it, as a user's script does.  An ``atexit`` check registered before
``init`` runs after mergelab's handler (atexit is last-in, first-out) and writes, per rank,
whether the group was still alive at that point."""
import atexit
import os
import pathlib
import sys

import torch
import torch.distributed as dist

from mergelab.stats import distributed

OUT = pathlib.Path(sys.argv[1])


def check() -> None:
    rank = int(os.environ["RANK"])
    (OUT / f"rank{rank}.txt").write_text("alive" if dist.is_initialized() else "destroyed")


if __name__ == "__main__":
    torch.set_num_threads(1)
    atexit.register(check)
    assert distributed.init()
    sums = [torch.full((64,), float(distributed.rank_world()[0]), dtype=torch.float64)]
    distributed.reduce_partial(sums)
    distributed.barrier()
    distributed.shutdown()          # a second call at exit is a no-op
    assert not dist.is_initialized()
    assert distributed.init()       # a second group in the same process is destroyed at exit too
    distributed.barrier()
