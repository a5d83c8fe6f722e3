"""Run by test_stats_distributed under torchrun: starts the group with ``distributed.init``,
reduces, waits at a barrier and ends.  ``implicit``: it never destroys its group, as a user's
script does; ``explicit``: it calls ``distributed.shutdown()`` itself, and the one at exit has
nothing left to do.  An ``atexit`` check registered before ``init`` runs after mergelab's
handler (atexit is last-in, first-out) and writes, per rank, whether the group was still
alive at that point."""
import atexit
import os
import pathlib
import sys

import torch
import torch.distributed as dist

from mergelab.stats import distributed

OUT, MODE = pathlib.Path(sys.argv[1]), sys.argv[2]


def check() -> None:
    (OUT / f"rank{os.environ['RANK']}.txt").write_text("alive" if dist.is_initialized() else "destroyed")


if __name__ == "__main__":
    torch.set_num_threads(1)
    atexit.register(check)
    assert distributed.init()
    sums = [torch.full((64,), float(distributed.rank_world()[0]), dtype=torch.float64)]
    distributed.reduce_partial(sums)
    assert float(sums[0][0]) == sum(range(distributed.rank_world()[1]))
    distributed.barrier()
    if MODE == "explicit":
        distributed.shutdown()
        assert not dist.is_initialized()
        distributed.shutdown()      # nothing left: a no-op
