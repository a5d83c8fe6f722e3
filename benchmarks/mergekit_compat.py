"""Do mergekit recipes give the same tensors in mergelab as in mergekit-yaml?

    python benchmarks/mergekit_compat.py [--mergekit PATH_TO_mergekit-yaml] [--only NAME ...]
        [--settings float32,bfloat16] [--per-tensor] [--json OUT.json]

Builds tiny bf16 Llama checkpoints (4 layers, hidden 64, a word-level tokenizer each): a base,
two fine-tune-like variants ``a`` and ``b`` (base + small seeded deltas; ``b`` has a partly
different vocabulary), ``a2`` (``a``'s vocabulary, for the recipes without tokenizer merging)
and a PEFT LoRA adapter on the base.  Runs the same recipes through ``mergekit-yaml`` (all of
them in one process of mergekit's own Python, through its click entry point, to pay its import
once) and ``mergelab merge`` (in this process), and compares every output tensor.

Cases: one per merge method mergekit 0.1.5 registers (:data:`MK_METHODS`) and the recipe
features (weights / densities with gradients and filters, normalize, int8_mask, lambda, rescale,
slices, tokenizer_source, base+lora inputs, out_dtype), each under two compute settings:
``float32`` (``dtype: float32, out_dtype: bfloat16``: both tools compute in float32) and
``bfloat16`` (``dtype: bfloat16``: mergekit computes in bf16, mergelab in float32).

Deterministic cases: share of bit-identical elements and the largest difference in bf16 ulps,
per element (``|x − y| / ulp(max(|x|, |y|))``, ``ulp(v) = 2^(⌊log2 v⌋ − 7)``) and at the
tensor's scale (``ulp(max |x|)``).  Random cases (DARE, DELLA: mergekit draws from torch's
global generator, mergelab from seeded per-tensor generators) are compared by statistics of
``out − base`` per tensor: the kept fraction (share of entries that differ from the base), and
the mean and standard deviation of the merged delta; reported as the largest z-score of the
kept-fraction difference and the largest relative difference of the standard deviations.

The functions :func:`build_models`, :func:`cases`, :func:`run_mergekit`, :func:`run_mergelab`,
:func:`compare` are used by ``tests/test_mergekit_reference.py``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_throughput import find_mergekit, llama_config, llama_shapes  # noqa: E402

# mergekit 0.1.5's registry (merge_methods/registry.py: the static list + easy_define methods)
MK_METHODS = ("arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
              "della_linear", "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp",
              "passthrough", "ram", "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties")
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2)
SETTINGS = {"float32": {"dtype": "float32", "out_dtype": "bfloat16"}, "bfloat16": {"dtype": "bfloat16"}}

# the vocabularies: words w0..; b lacks some of the base's words and has its own
VOCAB_BASE = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(253)]
VOCAB_B = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(0, 253, 2)] + [f"v{i}" for i in range(60)]


def _row_seed(token: str, tensor: str, seed: int) -> int:
    h = hashlib.blake2b(f"{seed}/{tensor}/{token}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def make_model(folder: Path, vocab: list[str], seed: int, delta_of: int | None) -> Path:
    """A bf16 Llama checkpoint; vocabulary rows are seeded per token (shared tokens get the same
    base row); ``delta_of``: the seed of the base this is a fine-tune of (adds 0.1·base-scale noise)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    cfg = {**CFG, "vocab_size": len(vocab)}
    (folder / "config.json").write_text(json.dumps({**llama_config(cfg), "bos_token_id": 1, "eos_token_id": 2}))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}))
    out = {}
    bseed = delta_of if delta_of is not None else seed
    for k, (n, s) in enumerate(llama_shapes(cfg)):
        if n.endswith("norm.weight"):
            t = torch.ones(s)
        elif s[0] == len(vocab) and ("embed" in n or "lm_head" in n):
            t = torch.stack([torch.randn(s[1], generator=torch.Generator().manual_seed(_row_seed(w, n, bseed)))
                             for w in vocab]) * 0.02
        else:
            t = torch.randn(s, generator=torch.Generator().manual_seed(bseed * 100003 + k)) * 0.02
        if delta_of is not None:
            t += torch.randn(s, generator=torch.Generator().manual_seed(seed * 100003 + k)) * 0.002
        out[n] = t.to(torch.bfloat16)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def make_lora(folder: Path, base: Path, seed: int, r: int = 4, alpha: float = 8.0) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj of every layer) written in PEFT's file format."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    h, kv = CFG["hidden_size"], CFG["hidden_size"] // CFG["num_attention_heads"] * CFG["num_key_value_heads"]
    t = {}
    for i in range(CFG["num_hidden_layers"]):
        for m, out_dim in (("q_proj", h), ("v_proj", kv)):
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            t[p + ".lora_A.weight"] = (torch.randn(r, h, generator=g) * 0.05).to(torch.bfloat16)
            t[p + ".lora_B.weight"] = (torch.randn(out_dim, r, generator=g) * 0.05).to(torch.bfloat16)
    save_file(t, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": str(base), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True}))
    return folder


def build_models(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    m = {"base": make_model(root / "base", VOCAB_BASE, 0, None),
         "a": make_model(root / "a", VOCAB_BASE, 1, 0),
         "a2": make_model(root / "a2", VOCAB_BASE, 2, 0),
         "b": make_model(root / "b", VOCAB_B, 3, 0)}
    m["lora"] = make_lora(root / "lora", m["base"], 4)
    return m


def recipes(base: Path, a: Path, b: Path, dt: dict) -> dict[str, dict]:
    """The feature recipes on base, a, b (same vocabulary) and :func:`new_methods`."""
    A, B, O = str(a), str(b), str(base)
    return {
        "linear": {"models": [{"model": A, "parameters": {"weight": 0.3}},
                              {"model": B, "parameters": {"weight": [0.2, 0.9]}}],
                   "merge_method": "linear", **dt},
        "linear_nonorm": {"models": [{"model": A, "parameters": {"weight": 0.3}},
                                     {"model": B, "parameters": {"weight": 0.5}}],
                          "merge_method": "linear", "parameters": {"normalize": False}, **dt},
        "task_arithmetic": {"models": [{"model": A, "parameters": {"weight": 0.7}},
                                       {"model": B, "parameters": {"weight": [{"filter": "mlp", "value": 0.2},
                                                                              {"value": 0.5}]}}],
                            "merge_method": "task_arithmetic", "base_model": O,
                            "parameters": {"lambda": 0.8}, **dt},
        "task_arithmetic_norm": {"models": [{"model": A, "parameters": {"weight": 0.7}},
                                            {"model": B, "parameters": {"weight": 0.5}}],
                                 "merge_method": "task_arithmetic", "base_model": O,
                                 "parameters": {"normalize": True}, **dt},
        "ties": {"models": [{"model": A, "parameters": {"weight": 1.0, "density": 0.5}},
                            {"model": B, "parameters": {"weight": 0.6, "density": [0.3, 0.8]}}],
                 "merge_method": "ties", "base_model": O, "parameters": {"normalize": True}, **dt},
        "ties_int8_lambda": {"models": [{"model": A, "parameters": {"weight": 1.0, "density": 0.4}},
                                        {"model": B, "parameters": {"weight": 0.6, "density": 0.6}}],
                             "merge_method": "ties", "base_model": O,
                             "parameters": {"normalize": False, "int8_mask": True, "lambda": 1.3}, **dt},
        **new_methods(base, a, b, dt),
    }


def new_methods(base: Path, a: Path, b: Path, dt: dict) -> dict[str, dict]:
    """One recipe per method mergekit 0.1.5 has beyond linear/task_arithmetic/ties (and the
    random ones, dare_* and della*, compared by statistics)."""
    A, B, O = str(a), str(b), str(base)
    sparse = [{"model": A, "parameters": {"weight": 1.0, "density": 0.5}},
              {"model": B, "parameters": {"weight": 0.6, "density": 0.7}}]
    two = [{"model": A}, {"model": B}]
    return {
        "slerp": {"models": two, "merge_method": "slerp", "base_model": A,
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.3}]}, **dt},
        "breadcrumbs": {"models": sparse, "merge_method": "breadcrumbs", "base_model": O,
                        "parameters": {"gamma": 0.01}, **dt},
        "breadcrumbs_rescale": {"models": sparse, "merge_method": "breadcrumbs", "base_model": O,
                                "parameters": {"gamma": 0.05, "rescale": True}, **dt},
        "breadcrumbs_ties": {"models": sparse, "merge_method": "breadcrumbs_ties", "base_model": O,
                             "parameters": {"gamma": 0.02}, **dt},
        "dare_linear": {"models": sparse, "merge_method": "dare_linear", "base_model": O, **dt},
        "dare_linear_1": {"models": sparse[:1], "merge_method": "dare_linear", "base_model": O, **dt},
        "dare_linear_norescale": {"models": sparse[:1], "merge_method": "dare_linear", "base_model": O,
                                  "parameters": {"rescale": False}, **dt},
        "dare_ties": {"models": sparse, "merge_method": "dare_ties", "base_model": O, **dt},
        "della": {"models": sparse, "merge_method": "della", "base_model": O,
                  "parameters": {"epsilon": 0.1, "lambda": 1.0}, **dt},
        "della_linear": {"models": sparse, "merge_method": "della_linear", "base_model": O,
                         "parameters": {"epsilon": 0.1}, **dt},
        "della_linear_1": {"models": sparse[:1], "merge_method": "della_linear", "base_model": O,
                           "parameters": {"epsilon": 0.2}, **dt},
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


def feature_recipes(m: dict[str, Path], dt: dict) -> dict[str, dict]:
    """Recipes that need the other models: slices, tokenizers, LoRA, out_dtype."""
    A, A2, B, O, L = (str(m[k]) for k in ("a", "a2", "b", "base", "lora"))
    return {
        "slices_passthrough": {"slices": [{"sources": [{"model": A, "layer_range": [0, 3]}]},
                                          {"sources": [{"model": A2, "layer_range": [1, 4]}]}],
                               "merge_method": "passthrough", **dt},
        "slices_slerp": {"slices": [{"sources": [{"model": A, "layer_range": [0, 2]}, {"model": A2, "layer_range": [0, 2]}]},
                                    {"sources": [{"model": A, "layer_range": [2, 4]}, {"model": A2, "layer_range": [1, 3]}]}],
                         "merge_method": "slerp", "base_model": A, "parameters": {"t": [0.0, 0.5, 1.0]}, **dt},
        "tokenizer_union": {"models": [{"model": A, "parameters": {"weight": 0.6}}, {"model": B, "parameters": {"weight": 0.4}}],
                            "merge_method": "linear", "tokenizer_source": "union", **dt},
        "tokenizer_union_ta": {"models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": B, "parameters": {"weight": 0.5}}],
                               "merge_method": "task_arithmetic", "base_model": O, "tokenizer_source": "union", **dt},
        "tokenizer_base": {"models": [{"model": A, "parameters": {"weight": 0.6}}, {"model": B, "parameters": {"weight": 0.4}}],
                           "merge_method": "linear", "base_model": A, "tokenizer_source": "base", **dt},
        "lora": {"models": [{"model": O + "+" + L, "parameters": {"weight": 0.5}}, {"model": A, "parameters": {"weight": 0.5}}],
                 "merge_method": "linear", **dt},
        "lora_ta": {"models": [{"model": O + "+" + L, "parameters": {"weight": 1.0}}, {"model": A, "parameters": {"weight": 0.5}}],
                    "merge_method": "task_arithmetic", "base_model": O, **dt},
        "out_dtype_float16": {"models": [{"model": A, "parameters": {"weight": 0.3}}, {"model": A2, "parameters": {"weight": 0.7}}],
                              "merge_method": "linear", **dt, "out_dtype": "float16"},
    }


def cases(m: dict[str, Path], settings=("float32", "bfloat16")) -> dict[str, dict]:
    """``{"NAME@SETTING": recipe}`` for every case (see the module doc)."""
    out = {}
    for s in settings:
        dt = SETTINGS[s]
        rs = {**recipes(m["base"], m["a"], m["a2"], dt), **feature_recipes(m, dt)}
        for name, r in rs.items():
            out[f"{name}@{s}"] = r
        # mergelab's tie_break: argsort (mergekit's own choice among equal magnitudes / variances
        # at a cut) on mergekit's recipes: a mergelab-only parameter, added by run()
        for name in ("ties", "ties_int8_lambda", "breadcrumbs", "breadcrumbs_rescale", "breadcrumbs_ties", "sce"):
            out[f"{name}+argsort@{s}"] = rs[name]
    return out


ML_EXTRA = {"+argsort": {"tie_break": "argsort"}}


def is_random(recipe: dict) -> bool:
    return recipe.get("merge_method") in RANDOM_METHODS


_MK_DRIVER = r"""
import json, sys, traceback
from mergekit.scripts.run_yaml import main
jobs = json.load(open(sys.argv[1]))
res = {}
for name, args in jobs:
    try:
        main.main(args, standalone_mode=False)
        res[name] = None
    except BaseException as e:
        res[name] = (traceback.format_exception_only(type(e), e)[-1].strip() or type(e).__name__)
json.dump(res, open(sys.argv[2], "w"))
"""


def mergekit_python(mk: str) -> str:
    """The interpreter of mergekit-yaml's own environment (its shebang)."""
    first = Path(mk).read_text(errors="replace").splitlines()[0]
    if first.startswith("#!") and Path(first[2:].split()[0]).is_file():
        return first[2:].split()[0]
    sib = Path(mk).parent / "python"
    if sib.is_file():
        return str(sib)
    raise SystemExit(f"cannot find the Python of {mk}")


def run_mergekit(mk: str, jobs: dict[str, tuple[Path, Path]], root: Path, seed: int = 0) -> dict[str, str | None]:
    """Run ``mergekit-yaml RECIPE OUT`` for every job in one mergekit process; name -> error or None."""
    spec = [[name, [str(rp), str(out), "--no-cuda", "--no-copy-tokenizer", "--random-seed", str(seed),
                    "--lora-merge-cache", str(root / "mk-lora-cache"), "--quiet"]]
            for name, (rp, out) in jobs.items()]
    jf, rf = root / "mk-jobs.json", root / "mk-results.json"
    jf.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([mergekit_python(mk), "-c", _MK_DRIVER, str(jf), str(rf)], capture_output=True, text=True, env=env)
    if not rf.is_file():
        raise SystemExit(f"mergekit driver failed: {p.stderr.strip()[-2000:]}")
    return json.loads(rf.read_text())


def run_mergelab(recipe_path: Path, out: Path, seed: int = 0) -> str | None:
    """``mergelab merge RECIPE -o OUT`` in this process; the error line or None."""
    from mergelab.cli import main

    try:
        main.main(["merge", str(recipe_path), "-o", str(out), "--quiet", "--force", "--no-copy-tokenizer",
                   "--random-seed", str(seed), "--no-write-model-card"], standalone_mode=False)
    except SystemExit as e:
        return None if not e.code else f"exit {e.code}"
    except Exception as e:  # noqa: BLE001  (reported, not hidden)
        return f"{type(e).__name__}: {e}"
    return None


def _ulp(v: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |v| (2^-133 at 0)."""
    a = v.abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def compare_tensors(x: torch.Tensor, y: torch.Tensor) -> dict:
    """mergekit's x against mergelab's y (same dtype)."""
    n = x.numel()
    if x.dtype == y.dtype and x.element_size() in (2, 4):
        iv = torch.int16 if x.element_size() == 2 else torch.int32
        same = int((x.view(iv) == y.view(iv)).sum())
    else:
        same = int((x == y).sum())
    fx, fy = x.double(), y.double()
    d = (fx - fy).abs()
    elem = d / _ulp(torch.maximum(fx.abs(), fy.abs()))
    elem[d == 0] = 0
    scale = float(fx.abs().max()) if n else 0.0
    tens = d / float(_ulp(torch.tensor(scale)))
    return {"n": n, "same": same, "ulp": float(elem.max()) if n else 0.0, "ulp_tensor": float(tens.max()) if n else 0.0}


def delta_stats(out: torch.Tensor, base: torch.Tensor) -> dict:
    d = out.double() - base.double()
    m2 = float((d * d).mean())
    return {"n": d.numel(), "kept": float((d != 0).double().mean()), "mean": float(d.mean()), "std": float(d.std()),
            "kurt": float((d ** 4).mean()) / m2 ** 2 if m2 > 0 else 0.0}


def compare(mk_dir: Path, ml_dir: Path, base_dir: Path | None = None, per_tensor: bool = False) -> dict:
    """Compare two output folders; with ``base_dir``, statistics of ``out − base`` (random methods)."""
    from mergelab.io import open_checkpoint

    x, y = open_checkpoint(mk_dir), open_checkpoint(ml_dir)
    kx, ky = set(x.keys()), set(y.keys())
    res = {"missing_in_mergelab": sorted(kx - ky), "extra_in_mergelab": sorted(ky - kx), "tensors": {}}
    bs = open_checkpoint(base_dir) if base_dir is not None else None
    perm = _vocab_permutation(Path(mk_dir), Path(ml_dir))
    vsize = json.loads((Path(ml_dir) / "config.json").read_text()).get("vocab_size") if perm is not None else None
    res["vocab_ids_equal"] = perm is None
    for k in sorted(kx & ky):
        tx, ty = x.get(k), y.get(k)
        if perm is not None and tx.dim() >= 1 and tx.shape[0] == vsize and ("embed" in k or "lm_head" in k):
            tx = tx[perm]  # mergekit's rows in mergelab's token order (compared per token)
        r = {"dtype": (str(tx.dtype), str(ty.dtype)), "shape": (list(tx.shape), list(ty.shape))}
        if tx.shape == ty.shape:
            r.update(compare_tensors(tx, ty))
            if bs is not None and k in bs.keys() and bs.get(k).shape == tx.shape:
                b = bs.get(k)
                r["mk"], r["ml"] = delta_stats(tx, b), delta_stats(ty, b)
        res["tensors"][k] = r
    for name in ("config.json",):
        try:
            cx = json.loads((Path(mk_dir) / name).read_text())
            cy = json.loads((Path(ml_dir) / name).read_text())
            res["config_differs"] = sorted(f for f in ("num_hidden_layers", "vocab_size")
                                           if cx.get(f) != cy.get(f))
        except OSError:
            res["config_differs"] = ["(missing)"]
    tok = [Path(d) / "tokenizer.json" for d in (mk_dir, ml_dir)]
    if all(t.is_file() for t in tok):
        from tokenizers import Tokenizer
        vx, vy = (Tokenizer.from_file(str(t)).get_vocab(with_added_tokens=True) for t in tok)
        res["vocab_equal"] = set(vx) == set(vy)
    return res


def _vocab_permutation(mk_dir: Path, ml_dir: Path) -> torch.Tensor | None:
    """When both outputs hold the same tokens under different ids: for each of mergelab's ids,
    mergekit's id of the same token (None when the ids agree or there is no tokenizer).
    mergekit's union tokenizer adds the new tokens in the order of a hash map (the Rust
    tokenizer's ``get_vocab()``), so its ids are not reproducible; rows are compared per token."""
    tok = [d / "tokenizer.json" for d in (mk_dir, ml_dir)]
    if not all(t.is_file() for t in tok):
        return None
    from tokenizers import Tokenizer

    vx, vy = (Tokenizer.from_file(str(t)).get_vocab(with_added_tokens=True) for t in tok)
    if vx == vy or set(vx) != set(vy):
        return None
    order = sorted(vy, key=vy.get)
    if [vy[t] for t in order] != list(range(len(order))):
        return None
    return torch.tensor([vx[t] for t in order])


def summarize(res: dict, random: bool) -> dict:
    ts = [t for t in res["tensors"].values() if "n" in t]
    n = sum(t["n"] for t in ts)
    s = {"tensors": len(res["tensors"]), "elements": n, "identical": sum(t["same"] for t in ts) / n if n else 0.0,
         "ulp": max((t["ulp"] for t in ts), default=0.0), "ulp_tensor": max((t["ulp_tensor"] for t in ts), default=0.0),
         "structure_ok": (not res["missing_in_mergelab"] and not res["extra_in_mergelab"]
                          and all(t["shape"][0] == t["shape"][1] and t["dtype"][0] == t["dtype"][1]
                                  for t in res["tensors"].values())
                          and not res.get("config_differs") and res.get("vocab_equal", True))}
    if random:
        # per tensor of >= 1024 entries: z-scores of the differences (two independent samples)
        z, sz, mz, ratios = 0.0, 0.0, 0.0, []
        for t in ts:
            if "mk" not in t or t["n"] < 1024:
                continue
            a, b = t["mk"], t["ml"]
            p = (a["kept"] + b["kept"]) / 2
            if 0 < p < 1:
                z = max(z, abs(a["kept"] - b["kept"]) / math.sqrt(2 * p * (1 - p) / t["n"]))
            if a["std"] > 0:
                r = b["std"] / a["std"]
                ratios.append(r)
                se = math.sqrt(max(a["kurt"] - 1, 1e-12) / (4 * t["n"])) * math.sqrt(2)  # relative s.e. of a std
                sz = max(sz, abs(r - 1) / se)
                mz = max(mz, abs(b["mean"] - a["mean"]) / (a["std"] / math.sqrt(t["n"]) * math.sqrt(2)))
        s.update(kept_z=z, std_z=sz, mean_z=mz, tensors_compared=len(ratios),
                 std_ratio=sum(ratios) / len(ratios) if ratios else float("nan"))
    return s


def run(mk: str, root: Path, names: list[str] | None = None, settings=("float32", "bfloat16"),
        per_tensor: bool = False, keep: bool = False) -> dict[str, dict]:
    """Build the models under ``root``, run every case in both tools, return name -> summary
    (or {"error": ...}).  ``keep``: keep the outputs, and reuse mergekit's outputs already there."""
    m = {k: root / "models" / k for k in ("base", "a", "a2", "b", "lora")}
    if not (keep and all(p.is_dir() for p in m.values())):
        shutil.rmtree(root / "models", ignore_errors=True)
        shutil.rmtree(root / "mk", ignore_errors=True)
        m = build_models(root / "models")
    (root / "ml").mkdir(parents=True, exist_ok=True)
    cs = cases(m, settings)
    if names:
        cs = {k: v for k, v in cs.items() if k in names or k.split("@")[0] in names}
    jobs = {}
    for name, r in cs.items():
        rp = root / f"{name.replace('@', '.')}.yaml"
        rp.write_text(yaml.safe_dump(r))
        jobs[name] = (rp, root / "mk" / name.replace("@", "."))
    ml_recipe = {}
    for name, (rp, _) in jobs.items():
        extra = {k: v for tag, e in ML_EXTRA.items() if tag in name for k, v in e.items()}
        if extra:
            rl = rp.with_suffix(".mergelab.yaml")
            rl.write_text(yaml.safe_dump({**cs[name], "parameters": {**cs[name].get("parameters", {}), **extra}}))
            ml_recipe[name] = rl
    todo = {k: v for k, v in jobs.items() if not (keep and (v[1] / "config.json").is_file())}
    mk_err = run_mergekit(mk, todo, root) if todo else {}
    out = {}
    for name, (rp, mko) in jobs.items():
        mlo = root / "ml" / name.replace("@", ".")
        ml_err = run_mergelab(ml_recipe.get(name, rp), mlo)
        if mk_err.get(name) or ml_err:
            out[name] = {"error": {"mergekit": mk_err.get(name), "mergelab": ml_err}}
            continue
        rnd = is_random(cs[name])
        res = compare(mko, mlo, m["base"] if rnd else None)
        out[name] = summarize(res, rnd)
        if per_tensor:
            out[name]["per_tensor"] = res["tensors"]
        if not keep:
            shutil.rmtree(mlo, ignore_errors=True)
            shutil.rmtree(mko, ignore_errors=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="run only these cases (NAME or NAME@SETTING)")
    ap.add_argument("--settings", default="float32,bfloat16")
    ap.add_argument("--per-tensor", action="store_true", help="print every tensor's numbers")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = ap.parse_args(argv)
    mk = find_mergekit(args.mergekit)
    if mk is None:
        raise SystemExit("mergekit-yaml not found (--mergekit, $MERGEKIT_YAML or PATH)")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mergelab-compat-"))
    try:
        res = run(mk, root, args.only, tuple(args.settings.split(",")), args.per_tensor, bool(args.keep))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("| case | compute | elements | bit-identical | max ulps (element) | max ulps (tensor scale) | structure | random: max z of kept / std / mean; mean std ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in res.items():
        case, setting = name.split("@")
        if "error" in s:
            print(f"| {case} | {setting} | error | mergekit: {s['error']['mergekit']} | mergelab: {s['error']['mergelab']} | | | |")
            continue
        rnd = (f"{s['kept_z']:.2f} / {s['std_z']:.2f} / {s['mean_z']:.2f}; {s['std_ratio']:.4f}"
               if "kept_z" in s else "")
        print(f"| {case} | {setting} | {s['elements']} | {s['identical']:.4%} | {s['ulp']:.3g} | {s['ulp_tensor']:.3g} |"
              f" {'ok' if s['structure_ok'] else 'DIFFERS'} | {rnd} |", flush=True)
        if args.per_tensor:
            for k, t in s["per_tensor"].items():
                if t.get("same", 0) != t.get("n", -1):
                    print(f"    {k}: {t}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
