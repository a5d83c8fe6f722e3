"""The memory-bound fixture shared by tests/test_memory_bound.py and benchmarks/memory_bound.py.

A base and three experts, each one 4096 x 4096 float32 tensor (64 MiB) plus two small ones;
per expert a float32 Fisher file and a Gram file (float64, as ``mergelab stats gram`` writes,
with row counts) and, for the float32-Gram RegMean case, a float32 Gram file.  A tiny twin of
the family (the same names, 8 x 8) is merged first in each child as a warm-up, so that the
baseline includes every module and pool the merge uses.

Each case is merged by ``tests/_mem_worker.py`` in a fresh child process, which prints its
peak resident memory (VmHWM) over the baseline (VmHWM reset to the resident memory after the
warm-up, torch and mergelab imported).  The bound of a case (docs/engine.md, "Memory"):

* ``blocks``: methods merged in row blocks (elementwise, with their prepasses streamed in
  blocks too): ``C`` whatever the tensor size;
* ``prepass``: row-block methods with a tensor prepass (TIES per tensor, SLERP, TALL masks,
  consensus), which keep the blocks the prepass read for the merge pass when the tensor's
  inputs total at most ``KEEP_BYTES`` (engine/driver.py): ``C + KEEP_BYTES`` per worker thread;
* ``whole``: ``(N + 2) x T + C``, N the tensors read for one merged tensor (models, base,
  statistics files), T the largest of them in the bytes the merge holds it in (float32 for a
  model's tensor, the stored dtype for a statistics tensor: the float64 Gram is 128 MiB here);
* RegMean with float32 Gram files: ``(N + 3) x T + C`` (its float64 Gram sum is 2 T).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelab.engine.driver import KEEP_BYTES

ROWS = COLS = 4096
MiB = 2**20
T32 = ROWS * COLS * 4            # the largest model tensor, float32 bytes (64 MiB)
T64 = ROWS * COLS * 8            # the float64 Gram of its input (128 MiB)
CONST = 48 * MiB                 # C: row blocks, chunk temporaries, the writer
EXPERTS = ("a", "b", "c")
WORKER = Path(__file__).with_name("_mem_worker.py")


def generate(root: Path, rows: int = ROWS, cols: int = COLS) -> Path:
    """The family under ``root`` (created); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(("base",) + EXPERTS):
        g = torch.Generator().manual_seed(i)
        s = {"big.weight": torch.randn(rows, cols, generator=g), "small.weight": torch.randn(64, 64, generator=g),
             "norm.weight": torch.randn(cols, generator=g)}
        (root / n).mkdir()
        save_file(s, str(root / n / "model.safetensors"), metadata={"format": "pt"})
        (root / n / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["Toy"]}))
        if n == "base":
            continue
        f = {k: torch.rand(v.shape, generator=g) for k, v in s.items()}
        save_file(f, str(root / f"fisher_{n}.safetensors"), metadata={"mergelab_kind": "fisher"})
        for dt, suffix in ((torch.float64, ""), (torch.float32, "32")):
            gr = {k: torch.eye(v.shape[1], dtype=dt) * (1 + i) for k, v in s.items() if v.dim() == 2}
            save_file(gr, str(root / f"gram{suffix}_{n}.safetensors"),
                      metadata={"mergelab_kind": "gram", **{f"count:{k}": "30" for k in gr}})
    return root


@dataclass(frozen=True)
class Case:
    id: str
    recipe: dict
    n: int            # tensors read for one merged tensor
    kind: str         # "blocks", "whole" or "whole+1" (RegMean with float32 Grams)
    t: int = T32      # the largest input tensor in bytes

    @property
    def bound(self) -> int:
        if self.kind == "blocks":
            return CONST
        if self.kind == "prepass":  # one worker thread in these cases
            return CONST + KEEP_BYTES
        return (self.n + (3 if self.kind == "whole+1" else 2)) * self.t + CONST

    def bound_text(self) -> str:
        if self.kind == "blocks":
            return "C"
        if self.kind == "prepass":
            return f"C + KEEP_BYTES ({KEEP_BYTES // MiB} MiB)"
        return f"({'N + 3' if self.kind == 'whole+1' else 'N + 2'}) T + C, T = {self.t // MiB} MiB"


def _recipe(root: Path, method: str, params: dict, base: bool = True, experts=EXPERTS, per_model=None) -> dict:
    r = {"models": [{"model": str(root / m), "parameters": (per_model(m) if per_model else {})} for m in experts],
         "merge_method": method, "parameters": params, "dtype": "float32", "seed": 3}
    if base:
        r["base_model"] = str(root / "base")
    return r


def cases(root: Path) -> list[Case]:
    fisher = lambda m: {"fisher": str(root / f"fisher_{m}.safetensors")}  # noqa: E731
    gram = lambda m: {"gram": str(root / f"gram_{m}.safetensors")}  # noqa: E731
    gram32 = lambda m: {"gram": str(root / f"gram32_{m}.safetensors")}  # noqa: E731
    R = lambda *a, **k: _recipe(root, *a, **k)  # noqa: E731
    return [
        Case("task_arithmetic", R("task_arithmetic", {"lambda": 0.8}), 4, "blocks"),
        Case("ties", R("ties", {"density": 0.5}), 4, "prepass"),
        Case("dare_ties", R("dare_ties", {"density": 0.5}), 4, "blocks"),
        Case("ties_global", R("ties", {"density": 0.5, "scope": "global"}), 4, "blocks"),
        Case("slerp", R("slerp", {"t": 0.3}, base=False, experts=("a", "b")), 2, "prepass"),
        Case("consensus", R("consensus", {"base_merge": "ties", "density": 0.5, "k": 2}), 4, "prepass"),
        Case("tall_masks", R("tall_masks", {"base_merge": "ties", "density": 0.5, "lambda": 0.4}), 4, "prepass"),
        Case("fisher", R("fisher", {"normalize": True}, base=False, per_model=fisher), 6, "blocks"),
        Case("regmean", R("regmean", {"alpha": 0.7, "normalize_gram": True}, base=False, per_model=gram),
             6, "whole", T64),
        Case("regmean_f32gram", R("regmean", {"alpha": 0.7}, base=False, per_model=gram32), 6, "whole+1"),
    ]


def measure(case: Case, root: Path, tiny: Path, tmp: Path, threads: int = 1) -> dict:
    """One fresh child: warm-up merge of the tiny twin, then the case.  Returns the worker's
    ``{"base", "peak", "extra"}`` (bytes)."""
    tmp.mkdir(parents=True, exist_ok=True)
    rp, wp = tmp / "recipe.json", tmp / "warm.json"
    rp.write_text(json.dumps(case.recipe))
    wp.write_text(json.dumps(json.loads(json.dumps(case.recipe).replace(str(root), str(tiny)))))
    p = subprocess.run([sys.executable, str(WORKER), str(rp), str(tmp / "out"), "--threads", str(threads),
                        "--warm-up", str(wp)], capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise RuntimeError(f"{case.id}: worker failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
