"""Jobs: the merged tensors cut into work items, run by worker threads under a byte budget.

A job is a whole tensor, or (elementwise methods, readers with ``get_rows``) a range of row
blocks of a big tensor, each block read, merged and written at its offset on its own, so
peak memory is a constant whatever the model size.  A FIFO byte budget admits a job only
while the jobs in flight fit in the footprint of the single largest job: about
(number of inputs + 2) x the largest block or whole tensor (float32).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from .driver import Driver, numel


@dataclass(frozen=True)
class Job:
    name: str
    rows: int | None                    # rows per block, None: the whole tensor in one call
    span: tuple[int, int] | None        # the rows this job covers (None: all, in order)
    cost: int                           # float32 bytes in flight


class Budget:
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


def make_jobs(d: Driver) -> list[Job]:
    p = d.p
    n_in = len({id(i.ckpt) for i in p.readers}) + sum(len(v) for v in p.stats.values())  # statistics are inputs too
    jobs: list[Job] = []
    for n in p.names:
        if n not in p.merged:
            continue
        shape = p.shape(n)
        rows = d.rows_per_block(n)
        if rows is None:
            jobs.append(Job(n, None, None, (n_in + 2) * 4 * numel(shape)))
            continue
        c = (n_in + 2) * 4 * rows * numel(shape[1:])
        if p.method.tensor_prepass is not None:  # a per-tensor state: all blocks in order, one job
            jobs.append(Job(n, rows, None, c))
        else:
            jobs += [Job(n, rows, (a, min(a + rows, shape[0])), c) for a in range(0, shape[0], rows)]
    return jobs


def budget_for(jobs: list[Job], nthreads: int) -> Budget:
    """The largest whole tensor runs alone; blocks (all about the same size) run one per worker."""
    whole = [j.cost for j in jobs if j.rows is None]
    blocks = [j.cost for j in jobs if j.rows is not None]
    return Budget(max(max(whole, default=1), nthreads * max(blocks, default=0)))


Sink = Callable[[str, dict[str, torch.Tensor], "int | None"], None]  # (name, {variant: t}, first row or None)


def run_job(d: Driver, job: Job, prepass, put: Sink) -> None:
    if job.rows is None:
        put(job.name, d.compute(job.name, prepass), None)
        return
    state = d.tensor_state(job.name, job.rows)
    a0, a1 = job.span if job.span is not None else (0, d.p.shape(job.name)[0])
    for a in range(a0, a1, job.rows):
        b = min(a + job.rows, a1)
        put(job.name, d.compute(job.name, prepass, (a, b), state), a)


def run_jobs(d: Driver, jobs: list[Job], prepass, put: Sink, nthreads: int, done: Callable[[], None]) -> None:
    """Every job on ``nthreads`` worker threads, admitted in order by the byte budget."""
    budget = budget_for(jobs, nthreads)

    def work(i: int, job: Job) -> None:
        if not budget.acquire(i, job.cost):
            return
        try:
            run_job(d, job, prepass, put)
        except BaseException:
            budget.halt()
            raise
        finally:
            budget.release(job.cost)
        done()

    with ThreadPoolExecutor(nthreads) as pool:
        futs = [pool.submit(work, i, j) for i, j in enumerate(jobs)]
        try:
            for f in futs:
                f.result()
        except BaseException:
            budget.halt()
            for f in futs:
                f.cancel()
            raise
