"""The causal-LM Fisher streamed layer by layer (issue 13 item 6): equal to the whole-model
Fisher on Llama, Qwen2 and Mistral (GQA, rotary, RMSNorm, sliding window), tied and untied,
empirical and sampled; one stage's parameters resident at a time; the CLI into a merge."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from _causal_models import save_llm, texts, word_tokenizer
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.io.models import load_model
from mergelab.stats import diagonal_fisher
from mergelab.stats import layered as layered_mod
from mergelab.stats.layered_fisher import layered_fisher


def save_arch(folder, arch, seed=0, tie=True):
    """A tiny random decoder-only LM of ``arch`` with the word tokenizer: 4 query heads over 2
    key/value heads, rotary, RMSNorm with non-trivial weights; Qwen2 has q/k/v biases, Mistral
    a sliding window shorter than the texts."""
    import transformers

    common = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  tie_word_embeddings=tie, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    else:
        cfg = transformers.MistralConfig(**common, sliding_window=4, architectures=["MistralForCausalLM"])
    cls = getattr(transformers, cfg.architectures[0])
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    m.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def token_batches(tok, seeds=(0, 1, 2), n=3):
    return [dict(tok(texts(n, seed=s, lo=3, hi=12), padding=True, return_tensors="pt")) for s in seeds]


def assert_fisher_equal(got, want, rtol=1e-5):
    assert list(got) == list(want)
    for k in want:
        scale = float(want[k].double().abs().max())
        err = float((got[k].double() - want[k].double()).abs().max())
        assert err <= rtol * scale, (k, err, scale)


@pytest.mark.parametrize("mode", ["empirical", "sampled"])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("mistral", marks=pytest.mark.slow)])
def test_layered_fisher_equals_the_whole_model_fisher(tmp_path, arch, tie, mode):
    folder = save_arch(tmp_path / "m", arch, seed=1, tie=tie)
    model, _ = load_model(folder, progress=False)
    batches = token_batches(word_tokenizer("left"))
    assert any((b["attention_mask"] == 0).any() for b in batches)           # padding present
    want = diagonal_fisher(model, batches, mode=mode, seed=5, n_examples=8, progress=False)
    got = layered_fisher(folder, batches, mode=mode, seed=5, n_examples=8, chunk_size=2,
                         spill_dir=tmp_path)
    assert_fisher_equal(got, want)
    assert (got.n_examples, got.n_tokens, got.mode) == (want.n_examples, want.n_tokens, mode)
    assert got.n_examples == 8                                              # a batch cut short
    if tie:
        assert "lm_head.weight" not in got and f"model.embed_tokens.weight" in got
    assert list(tmp_path.glob("mergelab-fisher-*")) == []                   # spill removed
    assert all(torch.isfinite(v).all() for v in got.values())              # still readable


def test_sampled_layered_fisher_depends_on_the_seed_only(tmp_path, monkeypatch):
    from mergelab.stats import layered_fisher as lf

    folder = save_arch(tmp_path / "m", "llama", seed=2)
    batches = token_batches(word_tokenizer(), seeds=(3,))
    a = layered_fisher(folder, batches, mode="sampled", seed=1)
    monkeypatch.setattr(lf, "BLOCK", 100)      # Linear gradients in blocks of 1-3 output rows
    b = layered_fisher(folder, batches, mode="sampled", seed=1, chunk_size=1)
    c = layered_fisher(folder, batches, mode="sampled", seed=2)
    assert_fisher_equal(b, a, rtol=1e-6)                 # chunking: float rounding only
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_one_stage_resident_at_a_time(tmp_path, monkeypatch):
    """Every time the pass loads weights, the parameters holding storage (not ``meta``) are those
    of one stage: the embeddings, one decoder layer, or the final norm with the LM head."""
    folder = save_arch(tmp_path / "m", "qwen2", seed=3, tie=False)
    tok = word_tokenizer()
    seen: list[set[str]] = []
    old = layered_mod._Loader.loaded

    def loaded(self, prefix):
        cm = old(self, prefix)

        class Wrap:
            def __enter__(s):
                sub = cm.__enter__()
                seen.append({n for n, p in self.model.named_parameters(remove_duplicate=False)
                             if p.device.type != "meta"})
                return sub

            def __exit__(s, *exc):
                return cm.__exit__(*exc)
        return Wrap()
    monkeypatch.setattr(layered_mod._Loader, "loaded", loaded)
    layered_fisher(folder, token_batches(tok), mode="empirical")
    groups = [{"model.embed_tokens."}, {"model.norm.", "lm_head."}] + \
        [{f"model.layers.{i}."} for i in range(3)]
    total = {n for n, _ in load_model(folder, progress=False)[0].named_parameters()}
    assert len(seen) == 2 + 3 * 2 + 2                  # emb ×2, each layer ×2, norm and head
    for resident in seen:
        assert resident and resident < total
        assert any(all(any(n.startswith(g) for g in grp) for n in resident) for grp in groups), resident
    # each layer is read exactly twice (forward, then backward)
    for i in range(3):
        assert sum(any(n.startswith(f"model.layers.{i}.") for n in r) for r in seen) == 2


def test_layered_fisher_refusals(tmp_path):
    folder = save_arch(tmp_path / "m", "llama")
    batches = token_batches(word_tokenizer(), seeds=(0,))
    with pytest.raises(MergelabError, match="mode 'expected' is not streamed") as e:
        layered_fisher(folder, batches, mode="expected")
    assert "\n" not in str(e.value)
    with pytest.raises(MergelabError, match="spill folder"):
        layered_fisher(folder, batches, spill_dir=tmp_path / "nowhere")
    with pytest.raises(MergelabError, match="the data yielded no example"):
        layered_fisher(folder, [], mode="empirical")
    long = {"input_ids": torch.ones(1, 40, dtype=torch.long), "attention_mask": torch.ones(1, 40, dtype=torch.long)}
    with pytest.raises(MergelabError, match="40 tokens is longer than the model's 32 positions"):
        layered_fisher(folder, [long], mode="empirical")


# ---------------------------------------------------------------- CLI

def invoke(args):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    return r.exit_code, r.output


def test_cli_layered_fisher_into_a_fisher_merge(tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)
    save_arch(tmp_path / "a", "mistral", seed=0)
    save_arch(tmp_path / "b", "mistral", seed=1)
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts(7, seed=4, hi=12)))
    for m in ("a", "b"):
        code, out = invoke(["stats", "fisher", m, "--data", "t.jsonl", "-o", f"lay_{m}.safetensors",
                            "--mode", "sampled", "--seed", "3", "--batch-size", "3", "--layered",
                            "--chunk-size", "2", "--quiet"])
        assert code == 0, out
        assert "over 7 examples" in out and "layer by layer" in out
    code, out = invoke(["stats", "fisher", "a", "--data", "t.jsonl", "-o", "whole_a.safetensors",
                        "--mode", "sampled", "--seed", "3", "--batch-size", "3", "--quiet"])
    assert code == 0, out
    whole, lay = load_file("whole_a.safetensors"), load_file("lay_a.safetensors")
    with safe_open("a/model.safetensors", "pt") as f:
        assert set(lay) == set(f.keys())                          # checkpoint names, tied head once
    assert_fisher_equal({k: lay[k] for k in whole}, whole)
    assert all(float(v.sum()) > 0 for v in lay.values())        # texts were tokenised and used
    with safe_open("lay_a.safetensors", "pt") as f:
        md = f.metadata()
    assert md["mergelab_kind"] == "fisher" and md["normalisation"] == "sum over tokens, mean over sequences"
    assert md["mode"] == "sampled" and md["n_examples"] == "7"
    recipe = {"merge_method": "fisher", "dtype": "float32",
              "models": [{"model": "a", "parameters": {"fisher": "lay_a.safetensors"}},
                         {"model": "b", "parameters": {"fisher": "lay_b.safetensors"}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, out = invoke(["merge", "r.yaml", "-o", "out", "--quiet"])
    assert code == 0, out
    a, b, o = load_file("a/model.safetensors"), load_file("b/model.safetensors"), load_file("out/model.safetensors")
    fa, fb = lay, load_file("lay_b.safetensors")
    for k in ("model.layers.1.self_attn.k_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        wa, wb = fa[k].clamp_min(1e-6), fb[k].clamp_min(1e-6)
        torch.testing.assert_close(o[k], (wa * a[k] + wb * b[k]) / (wa + wb), rtol=1e-4, atol=1e-6)


def test_cli_layered_fisher_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_llm(tmp_path / "a", 0)
    (tmp_path / "t.txt").write_text("\n".join(texts(4, seed=1)) + "\n")
    for args, msg in ((["--mode", "expected", "--layered"], "mode 'expected' is not streamed"),
                      (["--mode", "empirical", "--chunk-size", "2"], "add --layered"),
                      (["--mode", "empirical", "--layered", "--backend", "vmap"], "backend 'vmap'"),
                      (["--mode", "empirical", "--layered", "--spill-dir", "nowhere"], "spill folder")):
        code, out = invoke(["stats", "fisher", "a", "--data", "t.txt", "-o", "x.safetensors", "--quiet", *args])
        assert code == 2 and msg in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "x.safetensors").exists()
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=48, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained("enc")
    word_tokenizer().save_pretrained("enc")
    code, out = invoke(["stats", "fisher", "enc", "--data", "t.txt", "-o", "x.safetensors",
                        "--mode", "empirical", "--layered"])
    assert code == 2 and "is not a decoder-only LM" in out and len(out.strip().splitlines()) == 1, out


def test_a_parameter_used_outside_its_module_is_refused(tmp_path, monkeypatch):
    """The hooks see module calls only: a weight also used directly (``F.linear(x, w)``) would
    lose part of its gradient.  The first batch of every stage checks the per-sequence
    gradients' sum against autograd's batch gradient and refuses in one line."""
    import torch.nn.functional as F
    from transformers.models.llama import modeling_llama

    folder = save_arch(tmp_path / "m", "llama")

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * F.linear(x, self.up_proj.weight))
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)
    with pytest.raises(MergelabError, match=r"model.layers.2.mlp.up_proj.weight.*used outside") as e:
        layered_fisher(folder, token_batches(word_tokenizer(), seeds=(0,)), mode="empirical")
    assert "\n" not in str(e.value)
