"""LoRA (issue 13 item 4): ``base+adapter`` inputs read as W + scale·B·A (checked against the
formula written here), merging adapters = merging the materialised fine-tunes, extract-lora
round trips (full rank reproduces the fine-tune; rank k's error is the SVD tail), PEFT's file
format, and the one-line errors."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from core_helpers import nothing_written, save_hf
from mergelab import merge
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.extract_lora import extract_lora
from mergelab.io import open_checkpoint
from mergelab.io.lora import open_with_lora

H, F, V, L = 8, 12, 16, 2
CFG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": L,
       "hidden_size": H, "vocab_size": V}
TARGETS = [f"model.layers.{i}.{m}" for i in range(L) for m in ("self_attn.q_proj", "mlp.up_proj")]


def base_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(V, H, generator=g)}
    for i in range(L):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(H, H, generator=g)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(F, H, generator=g)
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(H, generator=g)
    t["model.norm.weight"] = torch.randn(H, generator=g)
    t["lm_head.weight"] = torch.randn(V, H, generator=g)
    return t


def write_adapter(folder, base, seed, r=3, alpha=6.0, rslora=False, fan=False, modules=TARGETS, **cfg_extra):
    """A PEFT-format adapter written by hand (PEFT's documented names) and its factors."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, factors = {}, {}
    for m in modules:
        out, inp = base[f"{m}.weight"].shape
        if fan:
            out, inp = inp, out
        A, B = torch.randn(r, inp, generator=g) * 0.3, torch.randn(out, r, generator=g) * 0.3
        tensors[f"base_model.model.{m}.lora_A.weight"] = A
        tensors[f"base_model.model.{m}.lora_B.weight"] = B
        factors[m] = (A, B)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "fan_in_fan_out": fan,
           "target_modules": [m.rsplit(".", 1)[1] for m in modules], **cfg_extra}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder, factors


def materialise(base, factors, r=3, alpha=6.0, rslora=False, fan=False):
    """W + scale·B·A, written out independently of mergelab."""
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    out = dict(base)
    for m, (A, B) in factors.items():
        d = (B @ A) * scale
        out[f"{m}.weight"] = base[f"{m}.weight"] + (d.T if fan else d)
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = base_tensors()
    bpath = save_hf(tmp / "base", base, CFG)
    a_path, fa = write_adapter(tmp / "ad_a", base, 1)
    b_path, fb = write_adapter(tmp / "ad_b", base, 2, modules=TARGETS[:2])
    return tmp, base, bpath, (a_path, fa), (b_path, fb)


def read(folder):
    c = open_checkpoint(folder)
    return {n: c.get(n) for n in c.keys()}


@pytest.mark.parametrize("rslora,fan", [(False, False), (True, False), (False, True)])
def test_view_is_w_plus_scaled_ba_whole_and_by_rows(tmp_path, rslora, fan):
    base = base_tensors()
    if fan:  # GPT-2 Conv1D layout: weights stored (in, out)
        base = {k: (v.T.contiguous() if v.dim() == 2 and "layers" in k else v) for k, v in base.items()}
    bpath = save_hf(tmp_path / "b", base, CFG)
    ad, f = write_adapter(tmp_path / "ad", base, 5, r=4, alpha=3.0, rslora=rslora, fan=fan)
    want = materialise(base, f, r=4, alpha=3.0, rslora=rslora, fan=fan)
    view = open_with_lora(bpath, ad)
    assert sorted(view.keys()) == sorted(base)
    for n in base:
        assert view.shape(n) == tuple(base[n].shape)
        torch.testing.assert_close(view.get(n), want[n], rtol=1e-6, atol=1e-6)
        if base[n].dim():
            rows = torch.cat([view.get_rows(n, s, s + 3) for s in range(0, base[n].shape[0], 3)])
            torch.testing.assert_close(rows, want[n], rtol=1e-6, atol=1e-6)
    untouched = "model.norm.weight"
    assert torch.equal(view.get(untouched), base[untouched])


def test_rank_and_alpha_patterns(tmp_path):
    base = base_tensors()
    bpath = save_hf(tmp_path / "b", base, CFG)
    ad, f = write_adapter(tmp_path / "ad", base, 5, r=3, alpha=6.0, modules=TARGETS[:1])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(r=8, alpha_pattern={"q_proj": 1.5}, rank_pattern={"layers.0.self_attn.q_proj": 3})
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    A, B = f[TARGETS[0]]
    got = open_with_lora(bpath, ad).get(f"{TARGETS[0]}.weight")
    torch.testing.assert_close(got, base[f"{TARGETS[0]}.weight"] + B @ A * (1.5 / 3))


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"weight": 0.7}),
                                           ("ties", {"weight": 1.0, "density": 0.5})])
def test_recipe_with_adapters_equals_merging_materialised_finetunes(tmp_path, fam, method, params):
    tmp, base, bpath, (a_path, fa), (b_path, fb) = fam
    ta = save_hf(tmp_path / "ta", materialise(base, fa), CFG)
    tb = save_hf(tmp_path / "tb", materialise(base, fb), CFG)

    def recipe(a, b):
        return {"merge_method": method, "base_model": str(bpath),
                "models": [{"model": str(a), "parameters": params}, {"model": str(b), "parameters": params}]}

    merge(recipe(f"{bpath}+{a_path}", f"{bpath}+{b_path}"), tmp_path / "viaLora", quiet=True)
    merge(recipe(ta, tb), tmp_path / "viaFull", quiet=True)
    x, y = read(tmp_path / "viaLora"), read(tmp_path / "viaFull")
    assert x.keys() == y.keys()
    for n in x:
        torch.testing.assert_close(x[n], y[n], rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "viaLora" / "config.json").read_text())["vocab_size"] == V


def test_recipe_yaml_relative_base_plus_adapter(tmp_path, fam):
    tmp, base, bpath, (a_path, fa), _ = fam
    (tmp / "r.yaml").write_text("merge_method: linear\nmodels:\n  - model: base+ad_a\n    parameters: {weight: 1.0}\n")
    res = CliRunner().invoke(main, ["merge", str(tmp / "r.yaml"), "-o", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    want = materialise(base, fa)
    got = read(tmp_path / "o")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ extract-lora
def finetune(base, seed, names=None, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    out = dict(base)
    for n in names or [f"{m}.weight" for m in TARGETS]:
        out[n] = base[n] + torch.randn(base[n].shape, generator=g) * scale
    return out


def test_extract_full_rank_reproduces_the_finetune(tmp_path, fam):
    tmp, base, bpath, *_ = fam
    names = [f"{m}.weight" for m in TARGETS] + ["model.embed_tokens.weight", "lm_head.weight"]
    tuned = finetune(base, 7, names)
    tuned["model.norm.weight"] = base["model.norm.weight"] + 0.5   # a norm: stored whole
    tpath = save_hf(tmp_path / "tuned", tuned, CFG)
    res = extract_lora(bpath, tpath, tmp_path / "ad", rank=F)
    assert all(x.rel_error < 1e-6 for x in res.layers)
    assert res.full == ["model.norm.weight"]
    view = open_with_lora(bpath, tmp_path / "ad")
    for n in tuned:
        torch.testing.assert_close(view.get(n), tuned[n], rtol=1e-5, atol=1e-5)
    # PEFT's documented layout
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == F and cfg["lora_alpha"] == F
    assert set(cfg["target_modules"]) == {n[:-len(".weight")] for n in names}
    assert cfg["modules_to_save"] == ["model.norm"]
    st = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    m = TARGETS[0]
    assert st[f"base_model.model.{m}.lora_A.weight"].shape == (H, H)       # q_proj: rank capped at 8
    assert st[f"base_model.model.{m}.lora_B.weight"].shape == (H, H)
    assert st["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (H, V)
    assert st["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (H, H)
    assert "base_model.model.model.norm.weight" in st
    report = json.loads((tmp_path / "ad" / "lora_report.json").read_text())
    assert len(report["layers"]) == len(names)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_extract_rank_k_error_is_the_svd_tail(tmp_path, fam, k):
    tmp, base, bpath, *_ = fam
    tuned = finetune(base, 11)
    tpath = save_hf(tmp_path / "tuned", tuned, CFG)
    res = extract_lora(bpath, tpath, tmp_path / "ad", rank=k)
    view = open_with_lora(bpath, tmp_path / "ad")
    for rep in res.layers:
        d = (tuned[rep.name] - base[rep.name]).double()
        s = torch.linalg.svdvals(d)
        tail = float(s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt())
        assert rep.rank == k and rep.rel_error == pytest.approx(tail, rel=1e-6)
        got = (view.get(rep.name).double() - base[rep.name].double())
        assert float((got - d).norm() / d.norm()) == pytest.approx(tail, rel=1e-4)


def test_extract_cli_prints_errors_and_refuses_overlap(tmp_path, fam):
    tmp, base, bpath, *_ = fam
    tpath = save_hf(tmp_path / "tuned", finetune(base, 3), CFG)
    r = CliRunner().invoke(main, ["extract-lora", str(bpath), str(tpath), "-o", str(tmp_path / "ad"), "--rank", "2"])
    assert r.exit_code == 0, r.output
    assert "rel. error" in r.output and "model.layers.0.mlp.up_proj.weight" in r.output
    r = CliRunner().invoke(main, ["extract-lora", str(bpath), str(tpath), "-o", str(tpath), "--rank", "2", "--force"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "is the input TUNED" in r.output
    r = CliRunner().invoke(main, ["extract-lora", str(bpath), str(bpath), "-o", str(tmp_path / "x"), "--rank", "2"])
    assert r.exit_code == 2 and "nothing to extract" in r.output and nothing_written(tmp_path / "x")
    r = CliRunner().invoke(main, ["extract-lora", str(bpath), str(tpath), "-o", str(tmp_path / "y"), "--rank", "0"])
    assert r.exit_code == 2 and "--rank" in r.output


# ------------------------------------------------------------------------ errors
def _err(bpath, ad):
    with pytest.raises(MergelabError) as e:
        open_with_lora(bpath, ad)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_are_one_line(tmp_path, fam):
    tmp, base, bpath, *_ = fam
    (tmp_path / "noconf").mkdir()
    assert "no adapter_config.json" in _err(bpath, tmp_path / "noconf")
    ad, _ = write_adapter(tmp_path / "dora", base, 1, use_dora=True)
    assert "DoRA" in _err(bpath, ad)
    ad, _ = write_adapter(tmp_path / "ia3", base, 1)
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 3, "lora_alpha": 3}))
    assert "IA3" in _err(bpath, ad)
    other = {k.replace("q_proj", "k_proj"): v for k, v in base.items()}
    ad, _ = write_adapter(tmp_path / "miss", other, 1, modules=["model.layers.0.self_attn.k_proj"])
    assert "not in the base model" in _err(bpath, ad)
    wrong = dict(base)
    wrong["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(H + 1, H)
    ad, _ = write_adapter(tmp_path / "shape", wrong, 1, modules=TARGETS[:1])
    assert "shape" in _err(bpath, ad)
    ad, _ = write_adapter(tmp_path / "rank", base, 1, r=3)
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    assert "rank 3" in _err(bpath, ad)
    # through a recipe: one error line, nothing written
    (tmp_path / "r.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {bpath}+{tmp_path / 'dora'}\n")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error:") and "DoRA" in r.output
    assert r.output.count("\n") == 1 and nothing_written(tmp_path / "o")


@pytest.mark.slow
def test_peft_loads_the_extracted_adapter(tmp_path):
    """PEFT itself applies our adapter to a tiny Llama and reproduces the fine-tune's logits."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    tuned = LlamaForCausalLM(cfg).eval()
    sd = {k: v + 0.05 * torch.randn_like(v) if (v.dim() == 2 and "embed" not in k) else v
          for k, v in base.state_dict().items()}
    tuned.load_state_dict(sd)
    tuned.save_pretrained(tmp_path / "tuned")
    extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "ad", rank=64)
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "ad")).eval()
    x = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, tuned(x).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(x).logits, tuned(x).logits, atol=1e-3)
    # and our own reader applies it the same way
    view = open_with_lora(tmp_path / "base", tmp_path / "ad")
    for n, v in sd.items():
        if n in view:
            torch.testing.assert_close(view.get(n), v, rtol=1e-5, atol=1e-5)


def test_lora_row_blocks_equal_whole_tensors(tmp_path, fam):
    tmp, base, bpath, (a_path, fa), (b_path, fb) = fam
    rec = {"merge_method": "task_arithmetic", "base_model": str(bpath),
           "models": [{"model": f"{bpath}+{a_path}", "parameters": {"weight": 0.5}},
                      {"model": f"{bpath}+{b_path}", "parameters": {"weight": 0.5}}]}
    merge(rec, tmp_path / "whole", quiet=True)
    merge(rec, tmp_path / "rows", quiet=True, block_size=3 * H * 4)
    x, y = read(tmp_path / "whole"), read(tmp_path / "rows")
    for n in x:
        torch.testing.assert_close(x[n], y[n], rtol=1e-6, atol=1e-6)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(1, 9), r=st.integers(1, 4), fan=st.booleans(),
       rs=st.booleans(), data=st.data())
def test_lora_rows_match_the_formula(tmp_path_factory, out, inp, r, fan, rs, data):
    tmp = tmp_path_factory.mktemp("hyp")
    shape = (inp, out) if fan else (out, inp)
    base = {"lin.weight": torch.randn(shape), "lin.bias": torch.randn(shape[0])}
    bpath = save_hf(tmp / "b", base, {"model_type": "toy"})
    A, B = torch.randn(r, inp), torch.randn(out, r)
    (tmp / "ad").mkdir()
    save_file({"base_model.model.lin.lora_A.weight": A, "base_model.model.lin.lora_B.weight": B},
              str(tmp / "ad" / "adapter_model.safetensors"))
    (tmp / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2.5, "use_rslora": rs, "fan_in_fan_out": fan}))
    d = B @ A * (2.5 / (math.sqrt(r) if rs else r))
    want = base["lin.weight"] + (d.T if fan else d)
    v = open_with_lora(bpath, tmp / "ad")
    torch.testing.assert_close(v.get("lin.weight"), want, rtol=1e-5, atol=1e-5)
    s = data.draw(st.integers(0, shape[0]))
    e = data.draw(st.integers(s, shape[0]))
    torch.testing.assert_close(v.get_rows("lin.weight", s, e), want[s:e], rtol=1e-5, atol=1e-5)
    assert torch.equal(v.get("lin.bias"), base["lin.bias"])


def test_slices_read_a_lora_input(tmp_path, fam):
    tmp, base, bpath, (a_path, fa), _ = fam
    rec = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": f"{bpath}+{a_path}", "layer_range": [0, L]}]}]}
    merge(rec, tmp_path / "o", quiet=True)
    want, got = materialise(base, fa), read(tmp_path / "o")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6)


def test_output_over_the_adapter_or_its_base_is_refused(tmp_path, fam):
    tmp, base, bpath, (a_path, fa), _ = fam
    rec = {"merge_method": "linear", "models": [{"model": f"{bpath}+{a_path}"}]}
    for out in (a_path, bpath):
        with pytest.raises(MergelabError, match="is the input models\\[0\\].model"):
            merge(rec, out, force=True, quiet=True)
    assert (a_path / "adapter_config.json").is_file() and (bpath / "model.safetensors").is_file()


def test_extract_biases_and_dtype(tmp_path):
    """A changed bias of a LoRA target is stored with PEFT's bias: lora_only; --dtype sets the
    factors' dtype; the result applied again reproduces the fine-tune (bf16 factors: loosely)."""
    g = torch.Generator().manual_seed(0)
    base = {"a.lin.weight": torch.randn(6, 5, generator=g), "a.lin.bias": torch.randn(6, generator=g),
            "b.lin.weight": torch.randn(4, 6, generator=g), "b.lin.bias": torch.randn(4, generator=g)}
    tuned = dict(base)
    tuned["a.lin.weight"] = base["a.lin.weight"] + 0.1 * torch.randn(6, 5, generator=g)
    tuned["b.lin.weight"] = base["b.lin.weight"] + 0.1 * torch.randn(4, 6, generator=g)
    tuned["a.lin.bias"] = base["a.lin.bias"] + 1.0
    bp, tp = save_hf(tmp_path / "b", base, {"model_type": "toy"}), save_hf(tmp_path / "t", tuned, {"model_type": "toy"})
    r = CliRunner().invoke(main, ["extract-lora", str(bp), str(tp), "-o", str(tmp_path / "ad"), "-r", "8",
                                  "--dtype", "bfloat16", "-q"])
    assert r.exit_code == 0 and r.output == "", r.output
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["bias"] == "lora_only" and cfg["modules_to_save"] is None
    assert cfg["rank_pattern"] == {"a.lin": 5, "b.lin": 4} == cfg["alpha_pattern"]
    st = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert st["base_model.model.a.lin.lora_A.weight"].dtype == torch.bfloat16
    assert {"base_model.model.a.lin.bias", "base_model.model.b.lin.bias"} <= set(st)
    v = open_with_lora(bp, tmp_path / "ad")
    for n in tuned:
        torch.testing.assert_close(v.get(n), tuned[n], rtol=0, atol=3e-2 if "weight" in n else 0)
