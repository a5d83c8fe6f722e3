"""Per-tensor cost of each merge method on one large tensor (no I/O).

Also times a straightforward stack-and-argsort TIES (the way mergekit computes it) on the same
inputs in the same run, so the ratio is meaningful on a busy machine.

    python benchmarks/methods_per_tensor.py [--rows 4096] [--cols 4096] [--threads 2]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from mergelab.methods import TensorContext, get_method


def stacked_ties(tensors, base, density):
    """Dense reference: trim by a full argsort per model, stack, elect, disjoint mean."""
    deltas = []
    for t in tensors:
        d = t - base
        k = int(density * d.numel())
        mask = torch.zeros(d.numel())
        mask[torch.argsort(d.abs().flatten(), descending=True)[:k]] = 1
        deltas.append(d * mask.view_as(d))
    deltas = torch.stack(deltas)
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = deltas.sign() == majority
    num = (deltas * agree).sum(0)
    den = agree.sum(0).clamp_min(1)
    return base + num / den


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(a.rows, a.cols, generator=g)
    xs = [base + 0.01 * torch.randn(a.rows, a.cols, generator=g) for _ in range(3)]
    mib = base.numel() * 4 / 2**20
    print(f"one tensor {a.rows}x{a.cols} float32 = {mib:.0f} MiB; 3 models + base; {a.threads} threads")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runs = [("linear", {}), ("task_arithmetic", {"lambda": 0.5}), ("ties", {"density": 0.2}),
            ("dare_ties", {"density": 0.2}), ("consensus", {}), ("slerp", {"t": 0.5})]
    for name, gp in runs:
        spec = get_method(name)
        ts = xs[:2] if name == "slerp" else xs
        kw = spec.resolve(gp, [{} for _ in ts])
        t0 = time.perf_counter()
        spec(ts, base, ctx=TensorContext(name="w", seed=0), **kw)
        print(f"{name:16s} {1000 * (time.perf_counter() - t0):9.0f} ms")
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    stacked_ties(xs, base, 0.2)
    print(f"{'stacked argsort TIES':16s} {1000 * (time.perf_counter() - t0):9.0f} ms (reference, same run)")
    print(f"peak RSS growth, our methods: {(rss1 - rss0) / 1024:.0f} MiB; after the stacked reference:"
          f" {(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
