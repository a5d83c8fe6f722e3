"""Peak memory of each merge method over the import baseline (the table of docs/engine.md, "Memory").

    python benchmarks/memory_bound.py [METHOD ...]

Writes a base and three experts (one 4096 x 4096 float32 tensor = 64 MiB plus small ones),
their Fisher and Gram files, into a temporary folder (removed at the end), and merges each
method in a child (tests/_mem_worker.py) that prints VmHWM after the merge minus VmRSS after
importing torch and mergelab.  --threads 1.
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

R = C = 4096
WORKER = Path(__file__).resolve().parents[1] / "tests" / "_mem_worker.py"


def generate(root: Path) -> None:
    for i, n in enumerate(("base", "a", "b", "c")):
        g = torch.Generator().manual_seed(i)
        s = {"big.weight": torch.randn(R, C, generator=g), "small.weight": torch.randn(64, 64, generator=g),
             "norm.weight": torch.randn(C, generator=g)}
        (root / n).mkdir()
        save_file(s, str(root / n / "model.safetensors"), metadata={"format": "pt"})
        (root / n / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["Toy"]}))
        if n != "base":
            f = {k: torch.rand(v.shape, generator=g) for k, v in s.items()}
            save_file(f, str(root / f"fisher{n}.safetensors"), metadata={"mergelab_kind": "fisher"})
            gr = {k: torch.eye(v.shape[1]) for k, v in s.items() if v.dim() == 2}
            save_file(gr, str(root / f"gram{n}.safetensors"),
                      metadata={"mergelab_kind": "gram", **{f"count:{k}": "30" for k in gr}})


def cases(root: Path) -> dict:
    M = lambda n: str(root / n)  # noqa: E731
    ex = ["a", "b", "c"]

    def rec(method, params=None, base=True, mp=None, models=ex):
        r = {"models": [{"model": M(m), "parameters": (mp[i] if mp else {})} for i, m in enumerate(models)],
             "merge_method": method, "parameters": params or {}, "dtype": "float32"}
        if base:
            r["base_model"] = M("base")
        return r
    return {
        "task_arithmetic": rec("task_arithmetic", {"lambda": 0.8}),
        "ties": rec("ties", {"density": 0.5}),
        "dare_ties": rec("dare_ties", {"density": 0.5}),
        "ties_global": rec("ties", {"density": 0.5, "scope": "global"}),
        "slerp": rec("slerp", {"t": 0.3}, base=False, models=["a", "b"]),
        "tall_masks": rec("tall_masks", {"base_merge": "ties", "density": 0.5, "lambda": 0.4}),
        "consensus": rec("consensus", {"base_merge": "ties", "density": 0.5, "k": 2}),
        "fisher": rec("fisher", {"normalize": True}, base=False, mp=[{"fisher": M(f"fisher{m}.safetensors")} for m in ex]),
        "regmean": rec("regmean", {"alpha": 0.7}, base=False, mp=[{"gram": M(f"gram{m}.safetensors")} for m in ex]),
    }


def main() -> None:
    only = sys.argv[1:]
    root = Path(tempfile.mkdtemp(prefix="mergelab-mem-"))
    try:
        generate(root)
        for k, r in cases(root).items():
            if only and k not in only:
                continue
            (root / "r.json").write_text(json.dumps(r))
            shutil.rmtree(root / "out", ignore_errors=True)
            p = subprocess.run([sys.executable, str(WORKER), str(root / "r.json"), str(root / "out"), "--threads", "1"],
                               capture_output=True, text=True)
            if p.returncode:
                print(f"{k}: FAILED {p.stderr.strip().splitlines()[-1:]}")
                continue
            d = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{k:16s} baseline {d['base'] / 2**20:7.1f} MiB  peak over it {d['extra'] / 2**20:7.1f} MiB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
