"""Weight-matching speed: mergelab vs the `rebasin` package (PyPI), same model pairs.

    python benchmarks/align_speed.py [--rebasin-python /work/venvs/rebasin/bin/python] [--threads 2]

Pairs: ResNet-20 (width x4, 1x1 shortcut convs, BN) and VGG-11 (full width, BN), two
independently initialised models each, 32x32 inputs.  mergelab: seconds for the spec
(trace + self-test) and for weight matching to convergence (sweeps counted).  rebasin:
seconds for PermutationCoordinateDescent(...) construction + .rebasin(), run in a separate
interpreter (its own venv, torch 2.13.0 shared) with a time limit.  Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

PAIRS = {
    "resnet20x4": "ResNet20(width=4)",
    "vgg11": "vgg11(width=8, norm='bn', size=32)",
}

REBASIN = r"""
import json, sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from align_models import *
from rebasin import PermutationCoordinateDescent
torch.manual_seed(0); a = {make}.eval()
torch.manual_seed(1); b = {make}.eval()
x = torch.randn(2, 3, 32, 32)
t = time.perf_counter()
pcd = PermutationCoordinateDescent(a, b, x)
pcd.rebasin()
print(json.dumps({{"seconds": time.perf_counter() - t}}))
"""


def run_mergelab(make: str):
    from align_models import ResNet20, vgg11  # noqa: F401
    from mergelab.align.matching import weight_matching
    from mergelab.align.spec import permutation_spec
    torch.manual_seed(0)
    a = eval(make).eval()
    torch.manual_seed(1)
    b = eval(make).eval()
    x = torch.randn(2, 3, 32, 32)
    t = time.perf_counter()
    spec = permutation_spec(a, x)
    t_spec = time.perf_counter() - t
    t = time.perf_counter()
    p = weight_matching(spec, a.state_dict(), b.state_dict())
    t_wm = time.perf_counter() - t
    params = sum(v.numel() for v in a.parameters())
    return dict(groups=len(spec.groups), spec_s=t_spec, match_s=t_wm, sweeps=len(p.history) - 1, params=params)


def run_rebasin(python: str, make: str, threads: int, limit: float):
    code = REBASIN.format(tests=str(ROOT / "tests"), threads=threads, make=make)
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return f"> {limit:.0f} s (stopped)"
    if r.returncode != 0:
        return "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:80]
    return json.loads(r.stdout.strip().splitlines()[-1])["seconds"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rebasin-python", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=float, default=600)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, make in PAIRS.items():
        m = run_mergelab(make)
        rb = run_rebasin(args.rebasin_python, make, args.threads, args.limit) if args.rebasin_python else "not run"
        rows.append((name, m, rb))
    print("| pair | params | groups | mergelab spec (s) | mergelab weight matching (s) | sweeps | rebasin (s) | speed-up (matching) | speed-up (spec+matching) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m, rb in rows:
        if isinstance(rb, float):
            s1, s2 = f"{rb / m['match_s']:.1f}x", f"{rb / (m['spec_s'] + m['match_s']):.1f}x"
            rbs = f"{rb:.2f}"
        else:
            s1 = s2 = "-"
            rbs = rb
        print(f"| {name} | {m['params'] / 1e6:.2f}M | {m['groups']} | {m['spec_s']:.2f} | {m['match_s']:.2f} | "
              f"{m['sweeps']} | {rbs} | {s1} | {s2} |")


if __name__ == "__main__":
    main()
