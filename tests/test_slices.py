"""mergekit's ``slices:`` (issue 13 item 2): passthrough round trip, frankenmerge stacking with
renumbered layers and the config's layer count, per-slice merges with slice-relative
gradients, parameter precedence, and the clear errors."""
import json

import pytest
import torch

from core_helpers import nothing_written, save_hf
from mergelab import merge
from mergelab.errors import MergelabError
from mergelab.io import open_checkpoint
from mergelab.methods.basic import slerp_pair

L = 4


def four_layers(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(10, 6, generator=g)}
    for i in range(L):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(6, 6, generator=g)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(12, 6, generator=g)
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(6, generator=g)
    t["model.norm.weight"] = torch.randn(6, generator=g)
    t["lm_head.weight"] = torch.randn(10, 6, generator=g)
    return t


CFG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": L, "hidden_size": 6}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slices")
    ts = [four_layers(s) for s in (0, 1)]
    return [save_hf(tmp / n, t, CFG) for n, t in zip("ab", ts)], ts


def read(out):
    c = open_checkpoint(out)
    return {k: c.get(k) for k in c.keys()}, json.loads((out / "config.json").read_text())


def test_passthrough_of_all_layers_returns_the_model(tmp_path, models):
    (a, _), (ta, _) = models
    r = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, L]}]}], "merge_method": "passthrough"}
    out, cfg = read(merge(r, tmp_path / "o", quiet=True).outputs[0])
    assert set(out) == set(ta) and all(torch.equal(out[k], ta[k]) for k in ta)
    assert cfg["num_hidden_layers"] == L


def test_frankenmerge_stacks_and_renumbers(tmp_path, models):
    (a, b), (ta, tb) = models
    r = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                    {"sources": [{"model": str(b), "layer_range": [1, 4]}]}],
         "merge_method": "passthrough"}
    res = merge(r, tmp_path / "o", quiet=True)
    out, cfg = read(res.outputs[0])
    assert cfg["num_hidden_layers"] == 6
    want = {"model.embed_tokens.weight": ta["model.embed_tokens.weight"],   # first slice's source
            "model.norm.weight": tb["model.norm.weight"], "lm_head.weight": tb["lm_head.weight"]}  # last slice's
    for o in range(6):
        src, i = (ta, o) if o < 3 else (tb, o - 3 + 1)
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            want[f"model.layers.{o}.{suffix}"] = src[f"model.layers.{i}.{suffix}"]
    assert set(out) == set(want)
    for k in want:
        assert torch.equal(out[k], want[k]), k
    assert "slices:" in (res.outputs[0] / "README.md").read_text()  # the recipe as written


def test_per_slice_slerp_uses_slice_relative_gradients(tmp_path, models):
    (a, b), (ta, tb) = models
    r = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(a), "layer_range": [2, 4]}, {"model": str(b), "layer_range": [2, 4]}],
                     "parameters": {"t": [0.2, 0.6]}}],
         "merge_method": "slerp", "base_model": str(a), "parameters": {"t": [0.0, 1.0]}}
    out, cfg = read(merge(r, tmp_path / "o", quiet=True).outputs[0])
    assert cfg["num_hidden_layers"] == L
    # slice 1: t = 0 at its first layer, 1 at its last; slice 2 (own gradient): 0.2 then 0.6
    ts = {0: 0.0, 1: 1.0, 2: 0.2, 3: 0.6}
    for i, t in ts.items():
        k = f"model.layers.{i}.mlp.up_proj.weight"
        assert torch.allclose(out[k], slerp_pair(t, ta[k], tb[k]), atol=1e-6), (i, t)
    # pre weights at t = 0 of the first slice; post weights at t = 0 of the last slice (mergekit
    # 0.1.5 plans both with t = 0; the last slice's own parameters apply: its gradient's first value)
    assert torch.equal(out["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    k = "lm_head.weight"
    assert torch.allclose(out[k], slerp_pair(0.2, ta[k], tb[k]), atol=1e-6)


def test_one_full_slice_equals_the_models_recipe(tmp_path, models):
    (a, b), _ = models
    srcs = [{"model": str(a), "layer_range": [0, L]},
            {"model": str(b), "layer_range": [0, L], "parameters": {"weight": 0.3, "density": 0.5}}]
    r1 = {"slices": [{"sources": srcs}], "merge_method": "ties", "base_model": str(a), "parameters": {"lambda": 0.8}}
    r2 = {"models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 0.3, "density": 0.5}}],
          "merge_method": "ties", "base_model": str(a), "parameters": {"lambda": 0.8}}
    o1, _ = read(merge(r1, tmp_path / "1", quiet=True).outputs[0])
    o2, _ = read(merge(r2, tmp_path / "2", quiet=True).outputs[0])
    assert set(o1) == set(o2) and all(torch.equal(o1[k], o2[k]) for k in o1)


def test_source_parameters_win_over_slice_and_recipe(tmp_path, models):
    (a, b), (ta, tb) = models
    r = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, L], "parameters": {"weight": 3.0}},
                                 {"model": str(b), "layer_range": [0, L]}],
                     "parameters": {"weight": 1.0}}],
         "merge_method": "linear", "parameters": {"weight": 5.0, "normalize": False}}
    out, _ = read(merge(r, tmp_path / "o", quiet=True).outputs[0])
    k = "model.layers.2.self_attn.q_proj.weight"
    assert torch.allclose(out[k], 3.0 * ta[k] + 1.0 * tb[k], atol=1e-6)


@pytest.mark.parametrize("slices, match", [
    ([{"sources": [{"layer_range": [0, 2]}, {"layer_range": [0, 3]}]}], "same number of layers"),
    ([{"sources": [{"layer_range": [2, 6]}]}], r"layer_range \[2, 6\] is outside"),
    ([{"sources": [{"layer_range": [0, 2]}]}, {"sources": [{"layer_range": [2, 4]}, {"layer_range": [2, 4]}]}],
     "different numbers of sources"),
])
def test_slice_errors(tmp_path, models, slices, match):
    (a, _), _ = models
    for s in slices:
        for src in s["sources"]:
            src["model"] = str(a)
    with pytest.raises(MergelabError, match=match):
        merge({"slices": slices, "merge_method": "linear"}, tmp_path / "o", quiet=True)
    assert nothing_written(tmp_path / "o")


def test_base_model_must_be_a_source_and_models_exclusive(tmp_path, models):
    (a, b), _ = models
    r = {"slices": [{"sources": [{"model": str(b), "layer_range": [0, L]}]}], "merge_method": "task_arithmetic",
         "base_model": str(a)}
    with pytest.raises(MergelabError, match="no source is the base_model"):
        merge(r, tmp_path / "o", quiet=True)
    r = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, L]}]}], "models": [{"model": str(a)}],
         "merge_method": "linear"}
    with pytest.raises(MergelabError, match="either 'models' or 'slices'"):
        merge(r, tmp_path / "o", quiet=True)


def test_stacking_different_architectures_needs_allow_crimes(tmp_path, models):
    (a, _), (ta, _) = models
    b = save_hf(tmp_path / "m", four_layers(3), {**CFG, "model_type": "mistral", "num_hidden_layers": 4})
    r = {"slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                    {"sources": [{"model": str(b), "layer_range": [2, 4]}]}], "merge_method": "passthrough"}
    with pytest.raises(MergelabError, match="'model_type' differs.*allow-crimes"):
        merge(r, tmp_path / "o", quiet=True)
    out, cfg = read(merge(r, tmp_path / "o", quiet=True, allow_crimes=True).outputs[0])
    assert cfg["num_hidden_layers"] == 4
