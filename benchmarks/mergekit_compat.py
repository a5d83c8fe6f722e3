"""Do mergekit recipes give the same tensors in mergelab as in mergekit?

    python benchmarks/mergekit_compat.py [--mergekit PATH_TO_mergekit-yaml] [--size tiny]

Builds a small bf16 Llama base and two fine-tune-like variants, runs the same recipes
(linear, task_arithmetic, ties; weights, densities, gradients and filter rules; and one recipe
per method mergekit 0.1.5 adds: breadcrumbs[_ties], della[_linear], sce, model_stock, nuslerp,
multislerp, karcher, nearswap, arcee_fusion, ram, ramplus_tl, passthrough) through
``mergekit-yaml`` and ``mergelab merge``, and compares every output tensor: the share of
bit-identical elements, and the largest difference in units of one bfloat16 ulp at the
tensor's scale (2^(floor(log2 max|x|) - 7)).  Two compute settings: ``dtype: float32, out_dtype: bfloat16`` (both compute
in float32: expect bit-equality up to float summation order) and ``dtype: bfloat16``
(mergekit computes in bf16, mergelab in float32: differences are bf16 rounding).
``ties+argsort`` runs mergekit's recipe in mergelab with ``tie_break: argsort`` (mergekit's
own choice among equal magnitudes at the trim threshold) added to its parameters.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_throughput import find_mergekit, generate  # noqa: E402


def recipes(base: Path, a: Path, b: Path, dt: dict) -> dict[str, dict]:
    return {
        "linear": {"models": [{"model": str(a), "parameters": {"weight": 0.3}},
                              {"model": str(b), "parameters": {"weight": [0.2, 0.9]}}],
                   "merge_method": "linear", **dt},
        "task_arithmetic": {"models": [{"model": str(a), "parameters": {"weight": 0.7}},
                                       {"model": str(b), "parameters": {"weight": [{"filter": "mlp", "value": 0.2},
                                                                                  {"value": 0.5}]}}],
                            "merge_method": "task_arithmetic", "base_model": str(base),
                            "parameters": {"lambda": 0.8}, **dt},
        "ties": {"models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                            {"model": str(b), "parameters": {"weight": 0.6, "density": [0.3, 0.8]}}],
                 "merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True}, **dt},
        **new_methods(base, a, b, dt),
    }


# della / della_linear draw random masks (mergekit: torch's global generator, mergelab: seeded per
# tensor): their outputs are not expected to match element by element; they are run to check that
# both tools accept the recipe, and reported apart.
RANDOM = {"della", "della_linear"}


def new_methods(base: Path, a: Path, b: Path, dt: dict) -> dict[str, dict]:
    """One recipe per method mergekit 0.1.5 has beyond linear/task_arithmetic/ties/dare."""
    A, B, O = str(a), str(b), str(base)
    sparse = [{"model": A, "parameters": {"weight": 1.0, "density": 0.5}},
              {"model": B, "parameters": {"weight": 0.6, "density": 0.7}}]
    two = [{"model": A}, {"model": B}]
    return {
        "breadcrumbs": {"models": sparse, "merge_method": "breadcrumbs", "base_model": O,
                        "parameters": {"gamma": 0.01}, **dt},
        "breadcrumbs_ties": {"models": sparse, "merge_method": "breadcrumbs_ties", "base_model": O,
                             "parameters": {"gamma": 0.02}, **dt},
        "della": {"models": sparse, "merge_method": "della", "base_model": O,
                  "parameters": {"epsilon": 0.1, "lambda": 1.0}, **dt},
        "della_linear": {"models": sparse, "merge_method": "della_linear", "base_model": O,
                         "parameters": {"epsilon": 0.1}, **dt},
        "sce": {"models": two, "merge_method": "sce", "base_model": O, "parameters": {"select_topk": 0.5}, **dt},
        "model_stock": {"models": two, "merge_method": "model_stock", "base_model": O, **dt},
        "nuslerp": {"models": [{"model": A, "parameters": {"weight": 0.3}}, {"model": B, "parameters": {"weight": 0.7}}],
                    "merge_method": "nuslerp", **dt},
        "nuslerp_base_rows": {"models": [{"model": A, "parameters": {"weight": 0.5}},
                                         {"model": B, "parameters": {"weight": 0.5}}],
                              "merge_method": "nuslerp", "base_model": O,
                              "parameters": {"nuslerp_flatten": False}, **dt},
        "multislerp": {"models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": B, "parameters": {"weight": 2.0}}],
                       "merge_method": "multislerp", "base_model": O, **dt},
        "karcher": {"models": two, "merge_method": "karcher", **dt},
        "nearswap": {"models": [{"model": A}], "merge_method": "nearswap", "base_model": O,
                     "parameters": {"t": 0.0001}, **dt},
        "arcee_fusion": {"models": [{"model": A}], "merge_method": "arcee_fusion", "base_model": O, **dt},
        "ram": {"models": two, "merge_method": "ram", "base_model": O, **dt},
        "ramplus_tl": {"models": two, "merge_method": "ramplus_tl", "base_model": O, **dt},
        "passthrough": {"models": [{"model": A, "parameters": {"scale": 0.5}}], "merge_method": "passthrough", **dt},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", default=None)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--only", nargs="*", default=None, help="run only these recipe names")
    args = ap.parse_args(argv)
    mk = find_mergekit(args.mergekit)
    if mk is None:
        raise SystemExit("mergekit-yaml not found (--mergekit, $MERGEKIT_YAML or PATH)")
    from mergelab.io import open_checkpoint

    root = Path(tempfile.mkdtemp(prefix="mergelab-compat-"))
    try:
        base = generate(root / "base", args.size, 0, None)
        a = generate(root / "a", args.size, 1, 0)
        b = generate(root / "b", args.size, 2, 0)
        print("| method | compute dtype | tensors | elements | bit-identical | max diff (tensor-scale bf16 ulps) | elements > 1 such ulp |")
        print("|---|---|---|---|---|---|---|")
        for label, dt in (("float32", {"dtype": "float32", "out_dtype": "bfloat16"}), ("bfloat16", {"dtype": "bfloat16"})):
            rs = recipes(base, a, b, dt)
            rs["ties+argsort"] = rs["ties"]
            if args.only:
                rs = {k: v for k, v in rs.items() if k in args.only}
            for name, r in rs.items():
                rp = root / f"{name}.yaml"
                rp.write_text(yaml.safe_dump(r))
                rl = root / f"{name}.mergelab.yaml"
                extra = {"tie_break": "argsort"} if name == "ties+argsort" else {}
                rl.write_text(yaml.safe_dump({**r, "parameters": {**r.get("parameters", {}), **extra}}))
                for tool, cmd in (("mk", [mk, str(rp), str(root / "mk"), "--quiet", "--no-cuda", "--no-copy-tokenizer"]),
                                  ("ml", [sys.executable, "-m", "mergelab", "merge", str(rl), "-o", str(root / "ml"),
                                          "--quiet", "--force"])):
                    shutil.rmtree(root / tool, ignore_errors=True)
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    if p.returncode != 0:
                        raise SystemExit(f"{tool} failed on {name}: {p.stderr.strip().splitlines()[-1:]}")
                x, y = open_checkpoint(root / "mk"), open_checkpoint(root / "ml")
                assert set(x.keys()) == set(y.keys())
                n = same = big = 0
                worst = 0
                for k in x.keys():
                    tx, ty = x.get(k), y.get(k)
                    assert tx.dtype == ty.dtype == torch.bfloat16, (k, tx.dtype, ty.dtype)
                    n += tx.numel()
                    same += int((tx.view(torch.int16) == ty.view(torch.int16)).sum())
                    fx, fy = tx.float(), ty.float()
                    scale = float(fx.abs().max())
                    ulp = 2.0 ** (torch.tensor(scale).log2().floor().item() - 7) if scale > 0 else 2.0 ** -133
                    d = (fx - fy).abs() / ulp
                    big += int((d > 1).sum())
                    worst = max(worst, float(d.max()))
                tag = f"{name} (random: distribution only)" if name in RANDOM else name
                print(f"| {tag} | {label} | {len(x)} | {n} | {same / n:.4%} | {worst:.3g} | {big} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
