import hashlib
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import core_helpers as H
from core_helpers import nothing_written, save_hf, toy_family
from mergelab.errors import MergelabError
from mergelab.io import open_checkpoint
from mergelab.merge import merge, tensor_seed


def _recipe(paths, method="_core_wsum", base=True, model_params=None, **extra):
    base_p, *experts = paths
    mp = model_params or [{} for _ in experts]
    r = {"models": [{"model": str(p), "parameters": q} for p, q in zip(experts, mp)], "merge_method": method}
    if base:
        r["base_model"] = str(base_p)
    r.update(extra)
    return r


def _read(folder):
    ck = open_checkpoint(folder)
    return {k: ck.get(k) for k in ck.keys()}


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_weighted_sum_matches_eager_computation(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path, shards=2)
    res = merge(_recipe(paths, model_params=[{"weight": 0.3}, {"weight": 0.7}]), tmp_path / "out",
                shard_size="300B", quiet=True)
    out = _read(res.outputs[0])
    assert set(out) == set(base)
    # eager reference: whole state dicts loaded with the upstream library, merged in float32
    ea = {}
    for f in sorted(paths[1].glob("*.safetensors")):
        ea.update(load_file(str(f)))
    eb = {}
    for f in sorted(paths[2].glob("*.safetensors")):
        eb.update(load_file(str(f)))
    for k in base:
        if base[k].is_floating_point():
            assert torch.equal(out[k], 0.3 * ea[k] + 0.7 * eb[k]), k
        else:
            assert torch.equal(out[k], base[k])  # integer buffers copied from the base
    assert (res.outputs[0] / "model.safetensors.index.json").is_file()
    card = (res.outputs[0] / "README.md").read_text()
    assert "merge_method: _core_wsum" in card and "mergelab 0.1.0" in card
    import blake3  # the default checksum (tests/test_checksums.py covers sha256 too)
    assert blake3.blake3((paths[1] / "model-00001-of-00002.safetensors").read_bytes()).hexdigest() in card
    assert (res.outputs[0] / "config.json").is_file() and (res.outputs[0] / "tokenizer_config.json").is_file()


def test_identity_weight_one_is_bit_exact(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path, dtype=torch.bfloat16)
    res = merge({"models": [{"model": str(paths[1])}], "merge_method": "_core_wsum"}, tmp_path / "o", quiet=True)
    out = _read(res.outputs[0])
    for k in a:
        assert out[k].dtype == a[k].dtype and torch.equal(out[k], a[k])


def test_same_recipe_twice_identical_bytes_and_threads_do_not_matter(tmp_path):
    paths, _ = toy_family(tmp_path)
    r = _recipe(paths, "_core_seeded", base=False, seed=7)
    r["models"] = r["models"][:1]
    d = [_digest(merge(r, tmp_path / f"o{i}", threads=t, quiet=True).outputs[0]) for i, t in enumerate((1, 1, 3))]
    assert d[0] == d[1] == d[2]
    other = _digest(merge({**r, "seed": 8}, tmp_path / "o9", quiet=True).outputs[0])
    assert other != d[0]


def test_per_tensor_seed_is_stable_and_distinct():
    assert tensor_seed(0, "a") == tensor_seed(0, "a")
    assert len({tensor_seed(0, "a"), tensor_seed(0, "b"), tensor_seed(1, "a")}) == 3


def test_dtype_stored_and_compute_in_float32(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    res = merge(_recipe(paths, model_params=[{"weight": 0.5}, {"weight": 0.5}], dtype="bfloat16"),
                tmp_path / "o", quiet=True)
    out = _read(res.outputs[0])
    k = "layers.0.mlp.weight"
    assert out[k].dtype == torch.bfloat16
    assert torch.equal(out[k], (0.5 * a[k] + 0.5 * b[k]).to(torch.bfloat16))
    res2 = merge(_recipe(paths, dtype="bfloat16"), tmp_path / "o2", dtype="float16", quiet=True)
    assert _read(res2.outputs[0])[k].dtype == torch.float16  # the CLI/API dtype wins


def test_base_listed_among_models_is_not_an_expert(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    r = _recipe(paths, "_core_ta", model_params=[{}, {}], parameters={"lambda": 0.5})
    r["models"].insert(0, {"model": str(paths[0])})  # mergekit style: base in the list, no params
    out = _read(merge(r, tmp_path / "o", quiet=True).outputs[0])
    k = "embed.weight"
    assert torch.allclose(out[k], base[k] + 0.5 * ((a[k] - base[k]) + (b[k] - base[k])), atol=0, rtol=0)


def test_gradient_and_filter_parameters_per_tensor(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    mp = [{"weight": [0.0, 1.0]}, {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.0}]}]
    out = _read(merge(_recipe(paths, model_params=mp), tmp_path / "o", quiet=True).outputs[0])
    # 2 layers (config num_hidden_layers=2): layer 0 at t=0, layer 1 at t=1; embeddings at 0
    assert torch.equal(out["layers.0.attn.weight"], 0.0 * a["layers.0.attn.weight"] + 0.0 * b["layers.0.attn.weight"])
    assert torch.equal(out["layers.1.attn.weight"], 1.0 * a["layers.1.attn.weight"] + 0.0 * b["layers.1.attn.weight"])
    assert torch.equal(out["layers.1.mlp.weight"], 1.0 * a["layers.1.mlp.weight"] + 2.0 * b["layers.1.mlp.weight"])
    assert torch.equal(out["embed.weight"], 0.0 * a["embed.weight"] + 0.0 * b["embed.weight"])
    # after the layers (mergekit 0.1.5's post weights, planned with a ConfigReader at t = 0): t = 0
    assert torch.equal(out["norm.weight"], 0.0 * a["norm.weight"] + 0.0 * b["norm.weight"])


def test_top_level_list_is_a_depth_gradient_and_weights_is_per_model(tmp_path):
    """mergekit: a list under the top-level parameters is a gradient over depth (for every
    model), not one value per model; mergelab's `weights` key gives one weight per model."""
    paths, (base, a, b) = toy_family(tmp_path)
    top = _read(merge(_recipe(paths, parameters={"weight": [0.0, 1.0]}), tmp_path / "top", quiet=True).outputs[0])
    each = _read(merge(_recipe(paths, model_params=[{"weight": [0.0, 1.0]}] * 2), tmp_path / "each",
                       quiet=True).outputs[0])
    for k in top:
        assert torch.equal(top[k], each[k]), k
    k = "layers.1.attn.weight"  # t = 1: weight 1 for both models
    assert torch.equal(top[k], 1.0 * a[k] + 1.0 * b[k])
    assert torch.equal(top["layers.0.attn.weight"], 0.0 * a["layers.0.attn.weight"] + 0.0 * b["layers.0.attn.weight"])
    w = _read(merge({**_recipe(paths), "weights": [0.3, 0.7]}, tmp_path / "w", quiet=True).outputs[0])
    m = _read(merge(_recipe(paths, model_params=[{"weight": 0.3}, {"weight": 0.7}]), tmp_path / "m",
                    quiet=True).outputs[0])
    assert all(torch.equal(w[k], m[k]) for k in w)
    assert torch.equal(w["embed.weight"], 0.3 * a["embed.weight"] + 0.7 * b["embed.weight"])


def test_prepass_sees_every_tensor_once_before_merge(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    H.CALLS["prepass_seen"].clear()
    out = _read(merge({"models": [{"model": str(paths[1])}], "merge_method": "_core_globalscale"},
                      tmp_path / "o", quiet=True).outputs[0])
    floats = [k for k in a if a[k].is_floating_point()]
    assert sorted(H.CALLS["prepass_seen"]) == sorted(floats * 2)  # read twice: the stream is re-iterable
    m = max(float(a[k].abs().max()) for k in floats)
    assert all(torch.equal(out[k], a[k] / m) for k in floats)


def test_multi_output_writes_one_folder_per_variant(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    res = merge(_recipe(paths, "_core_multi"), tmp_path / "o", quiet=True)
    assert sorted(p.name for p in res.outputs) == ["task0", "task1"]
    for p, e in zip(sorted(res.outputs), (a, b)):
        out = _read(p)
        assert torch.equal(out["embed.weight"], base["embed.weight"] + (e["embed.weight"] - base["embed.weight"]) * 2)
        assert torch.equal(out["position_ids"], base["position_ids"])
        assert (p / "README.md").is_file() and (p / "config.json").is_file()


def test_statistics_files_reach_the_method(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    fis = []
    for i, e in enumerate((a, b)):
        f = {k: (v.float() ** 2 + i) for k, v in e.items() if v.is_floating_point()}
        save_file(f, str(tmp_path / f"fisher{i}.safetensors"), metadata={"mergelab_kind": "fisher"})
        fis.append(f)
    r = _recipe(paths, "_core_fisher", base=False,
                model_params=[{"fisher": str(tmp_path / "fisher0.safetensors")},
                              {"fisher": str(tmp_path / "fisher1.safetensors")}])
    out = _read(merge(r, tmp_path / "o", quiet=True).outputs[0])
    k = "layers.0.mlp.weight"
    assert torch.allclose(out[k], (fis[0][k] * a[k] + fis[1][k] * b[k]) / (fis[0][k] + fis[1][k]))
    save_file({"x": torch.ones(1)}, str(tmp_path / "g.safetensors"), metadata={"mergelab_kind": "gram"})
    r["models"][0]["parameters"]["fisher"] = str(tmp_path / "g.safetensors")
    with pytest.raises(MergelabError, match="kind 'gram', expected 'fisher'"):
        merge(r, tmp_path / "o2", quiet=True)
    assert nothing_written(tmp_path / "o2")


# ------------------------------------------------------------------ errors: one line, nothing written
def _err(tmp_path, recipe, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(MergelabError, match=match) as e:
        merge(recipe, out, quiet=True, **kw)
    assert "\n" not in str(e.value)
    assert nothing_written(out)
    return str(e.value)


def test_error_shapes_differ_names_tensor_and_shapes(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    bad = dict(b)
    bad["layers.1.mlp.weight"] = torch.zeros(16, 9)
    save_hf(tmp_path / "bad", bad)
    msg = _err(tmp_path, _recipe([paths[0], paths[1], tmp_path / "bad"]), "layers.1.mlp.weight")
    assert "(16, 8)" in msg and "(16, 9)" in msg


def test_error_names_differ(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    bad = {k: v for k, v in b.items() if k != "norm.weight"}
    save_hf(tmp_path / "bad", bad)
    _err(tmp_path, _recipe([paths[0], paths[1], tmp_path / "bad"]), "tensor 'norm.weight' is in .* but missing from")


def test_error_parameters(tmp_path):
    paths, _ = toy_family(tmp_path)
    _err(tmp_path, _recipe(paths, "no_such_method"), "unknown merge method 'no_such_method'")
    _err(tmp_path, _recipe(paths, parameters={"bogus": 1}), "unknown parameter 'bogus'")
    _err(tmp_path, {**_recipe(paths), "weights": [1, 2, 3]}, r"'weights' has 3 values .* \(weight list of the wrong length\)")
    _err(tmp_path, {**_recipe(paths, model_params=[{"weight": 1}, {}]), "weights": [1, 2]}, r"models\[0\]: weight given twice")
    _err(tmp_path, _recipe(paths, "_core_ta", model_params=[{"density": 0}, {}]), r"must be in \(0, 1\]")
    _err(tmp_path, _recipe(paths, "_core_ta", model_params=[{}, {"density": 1.5}]), r"must be in \(0, 1\]")
    # a per-tensor rule that is out of range for one tensor only is caught before any work
    rule = [{"filter": "layers.1.mlp", "value": 2.0}, {"value": 0.5}]
    _err(tmp_path, _recipe(paths, "_core_ta", model_params=[{"density": rule}, {}]), "layers.1.mlp")
    _err(tmp_path, {"models": [{"model": str(paths[1])}], "merge_method": "_core_ta"}, "needs a base_model")


def test_error_missing_inputs(tmp_path):
    paths, _ = toy_family(tmp_path)
    _err(tmp_path, _recipe([paths[0], paths[1], tmp_path / "missing"]), "no such file or folder")


def test_error_nonfinite_input_and_allow(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    bad = dict(b)
    bad["layers.0.attn.weight"] = bad["layers.0.attn.weight"].clone()
    bad["layers.0.attn.weight"][2, 3] = math.nan
    save_hf(tmp_path / "nan", bad)
    r = _recipe([paths[0], paths[1], tmp_path / "nan"])
    _err(tmp_path, r, "tensor 'layers.0.attn.weight' holds NaN or Inf")
    out = _read(merge(r, tmp_path / "ok", quiet=True, allow_nonfinite=True).outputs[0])
    assert torch.isnan(out["layers.0.attn.weight"][2, 3])
    assert _read(merge({**r, "allow_nonfinite": True}, tmp_path / "ok2", quiet=True).outputs[0]).keys() == out.keys()


def test_error_existing_output_refused_unless_force(tmp_path):
    paths, _ = toy_family(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("precious")
    with pytest.raises(MergelabError, match="exists and is not empty"):
        merge(_recipe(paths), out, quiet=True)
    assert (out / "old.txt").read_text() == "precious"
    merge(_recipe(paths), out, quiet=True, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("threads", [1, 2])
def test_exception_mid_merge_leaves_no_partial_output(tmp_path, threads):
    paths, _ = toy_family(tmp_path)
    H.CALLS["count"] = 0
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom on purpose"):
        merge({"models": [{"model": str(paths[1])}], "merge_method": "_core_boom", "parameters": {"fail_at": 4}},
              out, quiet=True, threads=threads)
    assert H.CALLS["count"] >= 4
    assert nothing_written(out)


def test_bounded_memory_budget_serialises_large_tensors(tmp_path):
    """The FIFO byte budget: while the largest tensor is in flight, no other tensor is."""
    import threading
    import time

    from mergelab.methods.registry import REGISTRY, merge_method

    inflight, overlaps, small_overlap = set(), [], []
    lock = threading.Lock()
    if "_core_probe" in REGISTRY:
        del REGISTRY["_core_probe"]

    @merge_method("_core_probe")
    def _core_probe(tensors, base, *, ctx):
        with lock:
            inflight.add(ctx.name)
            overlaps.append(len(inflight) if "big" in inflight else 0)
            small_overlap.append(len(inflight))
        time.sleep(0.02)
        with lock:
            inflight.discard(ctx.name)
        return tensors[0]

    t = {f"s{i}": torch.ones(10) for i in range(8)}
    t["big"] = torch.ones(1000, 100)
    t.update({f"z{i}": torch.ones(10) for i in range(8)})
    save_hf(tmp_path / "m", t)
    merge({"models": [{"model": str(tmp_path / "m")}], "merge_method": "_core_probe"}, tmp_path / "o",
          quiet=True, threads=4)
    del REGISTRY["_core_probe"]
    assert max(overlaps) == 1          # the big tensor ran alone
    assert max(small_overlap) > 1      # small tensors did run concurrently


def test_nonfinite_check_is_exact():
    from mergelab.merge import _nonfinite

    assert not _nonfinite(torch.tensor([3e38, 3e38]))  # the sum overflows, the values are finite
    assert _nonfinite(torch.tensor([1.0, math.nan])) and _nonfinite(torch.tensor([math.inf, -math.inf]))
    assert not _nonfinite(torch.zeros(0))
