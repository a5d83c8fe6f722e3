"""A merge under ``torchrun``: the tensors split across processes by bytes, one output.

``torchrun --nproc-per-node N -m mergelab merge RECIPE -o OUT`` (or ``merge()`` called in each
process of a torchrun job) runs N processes that:

1. all plan the recipe (headers only) and run the method's whole-model prepass themselves (a
   global TIES threshold reads every tensor on every rank: same inputs, same result);
2. take their share of the tensors: a deterministic greedy partition by stored bytes
   (largest first, each to the least-loaded rank, ties to the lower rank), so every rank
   computes the same split without talking;
3. rank 0 creates the temporary sibling folder of ``OUT`` and lays out every shard (the same
   headers and sizes as one process would); after a barrier the other ranks open those
   files and each writes its tensors at their offsets (a shared filesystem is required when
   the ranks are on several machines);
4. after a barrier rank 0 writes the index, the config files and the model card; the
   after-merge stages (repair, tact) then run on every rank, their calibration sharded
   across ranks, rank 0 writing; after a last barrier rank 0 renames the folder to ``OUT``.

The output is byte-identical to the single-process merge.  Failure: a rank that raises exits
non-zero and torchrun stops the others with SIGTERM; every rank turns SIGTERM into an
exception and removes the temporary folder on the way out, so nothing is left behind (a
rank that hangs makes the others' barrier time out after ``MERGELAB_DIST_TIMEOUT`` seconds).
"""
from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist

from ..errors import MergelabError
from ..io.writer import AtomicFolder
from ..stats import distributed


def partition(names: Sequence[str], nbytes: dict[str, int], world: int) -> list[list[str]]:
    """``world`` lists of names (each in the order of ``names``) with balanced byte totals:
    largest first, each to the rank with the fewest bytes so far (ties: the lower rank)."""
    load = [0] * world
    owner: dict[str, int] = {}
    order = sorted(range(len(names)), key=lambda i: (-nbytes[names[i]], i))
    for i in order:
        r = min(range(world), key=lambda k: (load[k], k))
        owner[names[i]] = r
        load[r] += nbytes[names[i]]
    return [[n for n in names if owner[n] == r] for r in range(world)]


class Team:
    """This process's place in the merge: ``rank``, ``world``, ``lead`` (rank 0)."""

    def __init__(self) -> None:
        distributed.init()
        self.rank, self.world = distributed.rank_world()
        self.lead = self.rank == 0

    def barrier(self) -> None:
        distributed.barrier()

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def folder(self, out, force: bool) -> "SharedFolder":
        """The atomic output folder, checked on rank 0 before any work; the same error on every rank."""
        atomic, err = None, None
        if self.lead:
            try:
                atomic = AtomicFolder(out, force, option="-o")
            except MergelabError as e:
                err = str(e)
        err = self.share(err)
        if err is not None:
            raise MergelabError(err)
        return SharedFolder(self, atomic)


class _Terminated(SystemExit):
    """SIGTERM (torchrun stopping the job because another rank failed)."""


def _on_sigterm(signum, frame):
    raise _Terminated(128 + signum)


class SharedFolder:
    """``with team.folder(out, force) as tmp:`` -- rank 0's temporary folder, the same path on
    every rank; removed by any rank that fails; renamed to ``out`` by rank 0 after a barrier."""

    def __init__(self, team: Team, atomic: AtomicFolder | None):
        self.team, self.atomic = team, atomic
        self.tmp: Path | None = None
        self._old = None

    def __enter__(self) -> Path:
        t = self.team
        if t.world == 1:
            self.tmp = self.atomic.__enter__()
            return self.tmp
        self._old = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            self.tmp = Path(t.share(str(self.atomic.__enter__()) if t.lead else None))
        except BaseException:
            self._restore()
            raise
        return self.tmp

    def _restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def __exit__(self, exc_type, exc, tb):
        t = self.team
        try:
            if t.world > 1:
                if exc_type is None:
                    try:
                        t.barrier()        # every rank's tensors and stages are done
                    except BaseException:
                        shutil.rmtree(self.tmp, ignore_errors=True)
                        raise
                else:
                    shutil.rmtree(self.tmp, ignore_errors=True)
            if self.atomic is not None:
                return self.atomic.__exit__(exc_type, exc, tb)
            return False
        finally:
            self._restore()
