"""Wall time of a small merge and of a statistics pass with 1, 2 and 3 processes (a
benchmark, never a test).

Generates 3 float32 checkpoints of ``--tensors`` tensors of ``--dim`` x ``--dim`` and an
``.npz`` of ``--examples`` vectors for a small MLP, then times, round-robin over
``--repeat`` rounds (fair under changing load):

* ``mergelab merge`` (linear) with 1 process, and ``torchrun --nproc-per-node N -m mergelab
  merge`` with N = 2, 3 (every output checked byte-identical to the 1-process one);
* ``mergelab stats activations`` the same way.

Each number is a whole command's wall time (interpreter start, torchrun's rendezvous,
import, work), median over the rounds, plus the merge's own seconds from rank 0's summary.

    python benchmarks/distributed_speed.py [--tensors 24] [--dim 1024] [--examples 20000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

MLP_CODE = """
from torch import nn

def make():
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
"""


def _cmd(n: int, *args) -> list[str]:
    if n == 1:
        return [sys.executable, "-m", "mergelab", *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "-m", "mergelab", *map(str, args)]


def _run(cmd: list[str], cwd: Path, threads: int) -> tuple[float, str]:
    t = time.perf_counter()
    src = str(Path(__file__).resolve().parents[1] / "src")    # this tree's mergelab in every process
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads),
                            "PYTHONPATH": os.pathsep.join([src, str(cwd), os.environ.get("PYTHONPATH", "")])})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return wall, r.stdout


def _same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=24)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mergelab-dist-bench-"))
    try:
        g = torch.Generator().manual_seed(0)
        paths = []
        for i in range(3):
            p = root / f"e{i}.safetensors"
            save_file({f"t{k}": torch.randn(a.dim, a.dim, generator=g) for k in range(a.tensors)}, str(p))
            paths.append(p)
        (root / "r.yaml").write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n" for p in paths))
        (root / "mlp_code.py").write_text(MLP_CODE)
        rng = np.random.default_rng(0)
        np.savez(root / "d.npz", x=rng.normal(size=(a.examples, 64)).astype(np.float32))
        torch.manual_seed(0)
        ns: dict = {}
        exec(MLP_CODE, ns)
        save_file({k: v.contiguous() for k, v in ns["make"]().state_dict().items()}, str(root / "mlp.safetensors"))
        gb = 3 * a.tensors * a.dim * a.dim * 4 / 1e9
        print(f"inputs: 3 x {a.tensors} x {a.dim}x{a.dim} float32 ({gb:.2f} GB read); stats: {a.examples} "
              f"examples through a 64-512-512-10 MLP; OMP_NUM_THREADS={a.threads}; {os.cpu_count()} cores; "
              f"load {os.getloadavg()[0]:.1f}")
        merge_wall = {n: [] for n in (1, 2, 3)}
        merge_self = {n: [] for n in (1, 2, 3)}
        stats_wall = {n: [] for n in (1, 2, 3)}
        for rnd in range(a.repeat):
            for n in (1, 2, 3):
                out = root / f"out{n}"
                shutil.rmtree(out, ignore_errors=True)
                wall, so = _run(_cmd(n, "merge", root / "r.yaml", "-o", out, "--threads", "1"), root, a.threads)
                merge_wall[n].append(wall)
                m = re.search(r"in ([0-9.]+) s", so)
                merge_self[n].append(float(m.group(1)) if m else float("nan"))
                if n > 1 and not _same_tree(root / "out1", out):
                    raise SystemExit(f"{n} processes: output differs from 1 process")
                wall, _ = _run(_cmd(n, "stats", "activations", root / "mlp.safetensors", "--model-code",
                                    "mlp_code:make", "--data", root / "d.npz", "-o", root / f"act{n}.safetensors",
                                    "--batch-size", "256", "--quiet"), root, a.threads)
                stats_wall[n].append(wall)
            print(f"round {rnd + 1}: load {os.getloadavg()[0]:.1f}", flush=True)
        print("processes | merge wall s | merge (rank 0 summary) s | stats activations wall s")
        for n in (1, 2, 3):
            print(f"{n} | {statistics.median(merge_wall[n]):.2f} | {statistics.median(merge_self[n]):.2f} | "
                  f"{statistics.median(stats_wall[n]):.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
