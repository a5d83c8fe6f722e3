"""mergekit users' paths through the CLI: every new method run from a recipe on tiny HF-style
checkpoints (the engine's output equals the registered method called on the inputs, also
when elementwise methods are streamed in row blocks), the architecture refusal and
``--allow-crimes``, and each mergekit-yaml flag."""
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from core_helpers import nothing_written, save_hf, toy_family, toy_tensors, variant
from mergelab.cli import main
from mergelab.io import open_checkpoint
from mergelab.engine import context_seed
from mergelab.merge import plan
from mergelab.methods import TensorContext

SPARSE = {"weight": 1.0, "density": 0.5}


def recipes(base, a, b):
    B, A, C = str(base), str(a), str(b)
    two = [{"model": A, "parameters": SPARSE}, {"model": C, "parameters": {**SPARSE, "weight": 0.6}}]
    return {
        "breadcrumbs": {"models": two, "merge_method": "breadcrumbs", "base_model": B,
                        "parameters": {"gamma": 0.1}},
        "breadcrumbs_ties": {"models": two, "merge_method": "breadcrumbs_ties", "base_model": B,
                             "parameters": {"gamma": 0.05, "normalize": True}},
        "della": {"models": two, "merge_method": "della", "base_model": B, "parameters": {"epsilon": 0.1, "lambda": 0.9}},
        "della_linear": {"models": two, "merge_method": "della_linear", "base_model": B,
                         "parameters": {"epsilon": 0.2}},
        "sce": {"models": [{"model": A}, {"model": C}], "merge_method": "sce", "base_model": B,
                "parameters": {"select_topk": 0.5}},
        "model_stock": {"models": [{"model": B}, {"model": A}, {"model": C}], "merge_method": "model_stock",
                        "base_model": B},
        "nuslerp": {"models": [{"model": A, "parameters": {"weight": 0.4}}, {"model": C, "parameters": {"weight": 0.6}}],
                    "merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False}},
        "multislerp": {"models": [{"model": A, "parameters": {"weight": 1.0}}, {"model": C, "parameters": {"weight": 2.0}}],
                       "merge_method": "multislerp", "base_model": B},
        "karcher": {"models": [{"model": A}, {"model": C}], "merge_method": "karcher"},
        "nearswap": {"models": [{"model": B}, {"model": A}], "merge_method": "nearswap", "base_model": B,
                     "parameters": {"t": 0.005}},
        "arcee_fusion": {"models": [{"model": B}, {"model": A}], "merge_method": "arcee_fusion", "base_model": B},
        "ram": {"models": [{"model": A}, {"model": C}], "merge_method": "ram", "base_model": B,
                "parameters": {"epsilon": 0.005}},
        "ramplus_tl": {"models": [{"model": A}, {"model": C}], "merge_method": "ramplus_tl", "base_model": B,
                       "parameters": {"epsilon": 0.005, "r": 0.5}},
        "passthrough": {"models": [{"model": A, "parameters": {"scale": [{"filter": "mlp", "value": 0.5},
                                                                         {"value": 1.0}]}}],
                        "merge_method": "passthrough"},
    }


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fam")
    paths, _ = toy_family(tmp)
    return paths


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write(tmp_path, recipe, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


@pytest.mark.parametrize("method", list(recipes("b", "a", "c")))
@pytest.mark.parametrize("block", ["1MiB", "64B"])
def test_recipe_runs_and_equals_the_method(tmp_path, fam, method, block):
    recipe = {**recipes(*fam)[method], "seed": 5}
    rp = write(tmp_path, recipe)
    out = tmp_path / "out"
    r = cli("merge", rp, "-o", out, "--block-size", block, "-q")
    assert r.exit_code == 0, r.output
    p = plan(str(rp))
    got = open_checkpoint(out)
    base = p.base.ckpt if p.base is not None else None
    for n in p.names:
        if n not in p.merged:
            assert torch.equal(got.get(n), p.ref.ckpt.get(n))
            continue
        ts = [e.ckpt.get(n).float() for e in p.experts]
        b = base.get(n).float() if base is not None else None
        want = p.method(ts, b, ctx=TensorContext(name=n, seed=context_seed(5, n)), **p.kwargs[n])
        assert torch.equal(got.get(n), want), (method, n)


# ------------------------------------------------------------------ architecture checks

def _arch_pair(tmp_path, cfg_b):
    t = toy_tensors(0)
    a = save_hf(tmp_path / "llama", t, {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8})
    b = save_hf(tmp_path / "mistral", variant(t, 1), cfg_b)
    return a, b


def test_architecture_mismatch_is_refused_unless_allow_crimes(tmp_path):
    a, b = _arch_pair(tmp_path, {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 8})
    rp = write(tmp_path, {"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "linear"})
    out = tmp_path / "out"
    r = cli("merge", rp, "-o", out)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "architectures" in lines[0] and "llama" in lines[0] and "mistral" in lines[0] and "--allow-crimes" in lines[0]
    assert nothing_written(out)
    r = cli("merge", rp, "-o", out, "--allow-crimes", "-q")
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file()


def test_shape_fields_are_refused_even_with_allow_crimes(tmp_path):
    a, b = _arch_pair(tmp_path, {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16})
    rp = write(tmp_path, {"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "linear"})
    r = cli("merge", rp, "-o", tmp_path / "out", "--allow-crimes")
    assert r.exit_code == 2 and "'hidden_size'" in r.stderr and "8" in r.stderr and "16" in r.stderr


def test_allow_crimes_from_python(tmp_path):
    from mergelab import merge
    from mergelab.errors import MergelabError

    a, b = _arch_pair(tmp_path, {"model_type": "mistral", "hidden_size": 8})
    rec = {"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "linear"}
    with pytest.raises(MergelabError, match="model_type"):
        merge(rec, tmp_path / "o1", quiet=True)
    merge(rec, tmp_path / "o2", quiet=True, allow_crimes=True)


# ------------------------------------------------------------------ mergekit-yaml flags

def _della(fam, tmp_path, seed=None):
    r = {**recipes(*fam)["della"]}
    if seed is not None:
        r["seed"] = seed
    return write(tmp_path, r, f"della{seed}.yaml")


def test_random_seed_overrides_the_recipe_seed(tmp_path, fam):
    outs = {}
    for tag, args in (("cli7", ["--random-seed", "7"]), ("cli8", ["--random-seed", "8"]), ("recipe7", [])):
        rp = _della(fam, tmp_path, seed=7 if tag == "recipe7" else 0)
        out = tmp_path / tag
        r = cli("merge", rp, "-o", out, "-q", *args)
        assert r.exit_code == 0, r.output
        outs[tag] = (out / "model.safetensors").read_bytes()
    assert outs["cli7"] == outs["recipe7"] and outs["cli7"] != outs["cli8"]
    assert "seed: 7" in (tmp_path / "cli7" / "README.md").read_text()


def test_out_shard_size_uses_mergekit_units(tmp_path, fam):
    rp = write(tmp_path, recipes(*fam)["karcher"])
    r = cli("merge", rp, "-o", tmp_path / "small", "--out-shard-size", "1K", "-q")
    assert r.exit_code == 0, r.output
    wm = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(wm.values())) > 1
    r = cli("merge", rp, "-o", tmp_path / "big", "--out-shard-size", "5B", "-q")
    assert r.exit_code == 0 and (tmp_path / "big" / "model.safetensors").is_file()
    for bad in ("5GB", "1.5B", "x"):
        r = cli("merge", rp, "-o", tmp_path / "bad", "--out-shard-size", bad)
        assert r.exit_code == 2 and "--out-shard-size" in r.stderr and nothing_written(tmp_path / "bad")
    r = cli("merge", rp, "-o", tmp_path / "bad", "--out-shard-size", "5B", "--shard-size", "5GB")
    assert r.exit_code == 2 and "both" in r.stderr


def test_shard_size_5B_is_not_silently_five_bytes(tmp_path, fam):
    rp = write(tmp_path, recipes(*fam)["karcher"])
    r = cli("merge", rp, "-o", tmp_path / "o", "--shard-size", "5B")
    assert r.exit_code == 2 and "smaller than every tensor" in r.stderr and "5GB" in r.stderr
    assert nothing_written(tmp_path / "o")
    for bad in ("5XB", "5 bytes", "GB"):
        r = cli("merge", rp, "-o", tmp_path / "o", "--shard-size", bad)
        assert r.exit_code == 2 and "--shard-size" in r.stderr
    for ok in ("2kib", "1KB", "1mb", "5gb", "1GiB"):
        r = cli("merge", rp, "-o", tmp_path / ok, "--shard-size", ok, "-q")
        assert r.exit_code == 0, (ok, r.output)


def test_copy_tokenizer_model_card_and_lazy_unpickle(tmp_path, fam):
    rp = write(tmp_path, recipes(*fam)["ram"])
    r = cli("merge", rp, "-o", tmp_path / "a", "-q", "--lazy-unpickle")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "tokenizer_config.json").is_file() and (tmp_path / "a" / "README.md").is_file()
    r = cli("merge", rp, "-o", tmp_path / "b", "-q", "--no-copy-tokenizer", "--no-write-model-card",
            "--no-lazy-unpickle")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "b" / "config.json").is_file()
    assert not (tmp_path / "b" / "tokenizer_config.json").exists() and not (tmp_path / "b" / "README.md").exists()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_cuda_flag(tmp_path, fam):
    rp = write(tmp_path, recipes(*fam)["ram"])
    r = cli("merge", rp, "-o", tmp_path / "n", "-q", "--no-cuda")
    assert r.exit_code == 0, r.output
    r = cli("merge", rp, "-o", tmp_path / "x", "--cuda", "--device", "cpu")
    assert r.exit_code == 2 and "contradicts" in r.stderr
    if not torch.cuda.is_available():
        r = cli("merge", rp, "-o", tmp_path / "c", "--cuda")
        assert r.exit_code == 2 and "CUDA is not available" in r.stderr and nothing_written(tmp_path / "c")


def test_mergekit_yaml_command_line(tmp_path, fam):
    rp = write(tmp_path, recipes(*fam)["breadcrumbs"])
    out = tmp_path / "mk"
    r = cli("mergekit-yaml", rp, out, "--no-cuda", "--copy-tokenizer", "--lazy-unpickle", "--allow-crimes",
            "--out-shard-size", "5B", "--random-seed", "0", "--write-model-card", "--quiet")
    assert r.exit_code == 0, r.output
    r2 = cli("merge", rp, "-o", tmp_path / "ml", "-q")
    assert r2.exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ml" / "model.safetensors").read_bytes()
