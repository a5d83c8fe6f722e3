"""Expected diagonal Fisher of the ImageNet EfficientNet-Lite0 (TF "SAME"-padded convs) at
32 px, hooks backend vs vmap backend, 1 thread (a benchmark, never a test).

    python benchmarks/fisher_lite0.py [--examples 64] [--repeat 2]

Prints CPU seconds (best of ``--repeat``, after a warm-up call) and the largest relative
difference between the two backends' Fishers.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from mergelab.experiments import zoo
from mergelab.stats import diagonal_fisher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = zoo.efficientnet_lite0(5, 32, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(a.examples, 1, 28, 28, generator=g), torch.randint(0, 5, (a.examples,), generator=g))]
    out = {}
    for backend in ("hooks", "vmap"):
        diagonal_fisher(m, [(data[0][0][:2], data[0][1][:2])], backend=backend, progress=False)  # warm-up
        best = float("inf")
        for _ in range(a.repeat):
            t = time.process_time()
            f = diagonal_fisher(m, data, mode="expected", backend=backend, progress=False)
            best = min(best, time.process_time() - t)
        out[backend] = (best, f)
        print(f"{backend}: {best:.2f} CPU s for {a.examples} examples ({f.backend})", flush=True)
    fh, fv = out["hooks"][1], out["vmap"][1]
    rel = max(float((fh[k] - fv[k]).abs().max() / fv[k].abs().max().clamp_min(1e-30)) for k in fv)
    print(f"vmap / hooks: {out['vmap'][0] / out['hooks'][0]:.1f}x; max relative difference {rel:.1e}; "
          f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
