"""Statistics of causal LMs (issue 13 item 6): Fisher per token against brute force, Gram
against XᵀX, the CLI from text to a merge, and the one-line errors."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from _causal_models import save_llm, texts, tiny_llama, word_tokenizer
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.stats import causal, diagonal_fisher, gram_matrices


def batch_of(strings, padding_side="right"):
    tok = word_tokenizer(padding_side)
    return dict(tok(strings, padding=True, return_tensors="pt"))


def real_rows(b, i):
    """Example i's token ids without padding (either side)."""
    return b["input_ids"][i][b["attention_mask"][i].bool()]


def brute_fisher(model, b, targets_of):
    """(1/N) Σ_n (∇ Σ_t log p(y_t | x_≤t))², one autograd call per sequence, padding cut off."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    n = len(b["input_ids"])
    for i in range(n):
        x = real_rows(b, i)[None]
        lp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
        ll = lp[torch.arange(x.shape[1] - 1), targets_of(i, x)].sum()
        for k, g in zip(params, torch.autograd.grad(ll, list(params.values()))):
            acc[k] += g.double() ** 2
    return {k: v / n for k, v in acc.items()}


def assert_close_dicts(got, want, rtol=1e-4):
    for k in want:
        scale = float(want[k].abs().max()) + 1e-12
        err = float((got[k].double() - want[k]).abs().max())
        assert err <= rtol * scale, (k, err, scale)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("backend", ["auto", "vmap"])
def test_empirical_fisher_equals_per_sequence_autograd(side, backend):
    m = tiny_llama(0)
    b = batch_of(texts(5, seed=1), side)
    assert (b["attention_mask"] == 0).any()               # padding present
    f = diagonal_fisher(m, [b], mode="empirical", backend=backend, progress=False)
    want = brute_fisher(m, b, lambda i, x: x[0, 1:])
    assert_close_dicts(f, want)
    assert f.n_examples == 5
    assert f.n_tokens == int(sum(b["attention_mask"][i].sum() - 1 for i in range(5)))
    # the tied LM head: one parameter, its gradient from both uses
    assert "lm_head.weight" not in f and "model.embed_tokens.weight" in f


def test_sampled_fisher_uses_seeded_model_draws_and_matches_brute_force():
    m = tiny_llama(1)
    b = batch_of(texts(4, seed=2))
    f = diagonal_fisher(m, [b], mode="sampled", seed=7, progress=False)
    with torch.no_grad():
        logits = m(**b).logits
    y = causal.sample_targets(logits, causal.next_token_targets(b), 7, 0)
    # the draw is reproducible and independent of the data labels
    assert torch.equal(y, causal.sample_targets(logits, causal.next_token_targets(b), 7, 0))
    assert not torch.equal(y, causal.next_token_targets(b))
    want = brute_fisher(m, b, lambda i, x: y[i][: x.shape[1] - 1])   # right padding: same positions
    assert_close_dicts(f, want)
    g = diagonal_fisher(m, [b], mode="sampled", seed=7, progress=False)
    assert all(torch.equal(f[k], g[k]) for k in f)


def test_expected_fisher_is_the_per_token_vocabulary_sum():
    m = tiny_llama(2, vocab=12)
    ids = torch.tensor([[5, 7, 3, 9], [4, 11, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    b = {"input_ids": ids, "attention_mask": mask}
    f = diagonal_fisher(m, [b], mode="expected", progress=False)
    params = dict(m.named_parameters())
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in range(2):
        x = ids[i][mask[i].bool()][None]
        lp = torch.log_softmax(m(input_ids=x).logits[0].float(), -1)
        for t in range(x.shape[1] - 1):                  # positions with a next token
            for v in range(12):
                gs = torch.autograd.grad(lp[t, v], list(params.values()), retain_graph=True)
                for k, g in zip(params, gs):
                    want[k] += lp[t, v].exp().item() * g.double() ** 2
    assert_close_dicts(f, {k: v / 2 for k, v in want.items()})


def test_expected_fisher_refused_above_the_vocabulary_threshold(monkeypatch):
    monkeypatch.setattr(causal, "EXPECTED_MAX_VOCAB", 20)
    b = batch_of(texts(2))
    with pytest.raises(MergelabError, match=r"vocabulary of 48 entries is more than 20") as e:
        diagonal_fisher(tiny_llama(0), [b], mode="expected", progress=False)
    assert "\n" not in str(e.value)


def test_gram_of_every_linear_is_masked_xtx():
    m = tiny_llama(3, tie=False)
    b = batch_of(texts(4, seed=3), "left")
    g = gram_matrices(m, [b], progress=False)
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert {f"{n}.weight" for n in linears} == set(g)                 # q/k/v/o, gate/up/down, lm_head
    assert any("k_proj" in n for n in g) and "lm_head.weight" in g
    seen = {}
    hs = [mod.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, a[0].detach()))
          for n, mod in linears.items()]
    with torch.no_grad():
        m(**b)
    for h in hs:
        h.remove()
    keep = b["attention_mask"].bool()
    for n, x in seen.items():
        rows = x[keep].double()                                        # real tokens only
        torch.testing.assert_close(g[f"{n}.weight"], rows.T @ rows, rtol=1e-9, atol=1e-9)
        assert g.counts[f"{n}.weight"] == int(keep.sum())


# ---------------------------------------------------------------- CLI

def invoke(args):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture
def two_llms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_llm(tmp_path / "a", 0)
    save_llm(tmp_path / "b", 1)
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts(6, seed=4)))
    (tmp_path / "t.txt").write_text("\n".join(texts(6, seed=5)) + "\n")
    return tmp_path


def test_cli_stats_to_recipe_to_merge(two_llms):
    import yaml
    from transformers import LlamaForCausalLM

    for m in ("a", "b"):
        code, out = invoke(["stats", "fisher", m, "--data", "t.jsonl", "-o", f"f_{m}.safetensors",
                            "--mode", "empirical", "--batch-size", "4", "--quiet"])
        assert code == 0, out
        assert "over 6 examples" in out and "summed over tokens, mean over sequences" in out
        code, out = invoke(["stats", "gram", m, "--data", "t.txt", "-o", f"g_{m}.safetensors",
                            "--batch-size", "4", "--quiet"])
        assert code == 0, out
    with safe_open("a/model.safetensors", "pt") as f:
        ckpt = set(f.keys())
    fa, ga = load_file("f_a.safetensors"), load_file("g_a.safetensors")
    assert set(fa) == ckpt                                  # every tensor, checkpoint names
    # tied lm_head: its Gram is stored under the one tensor the checkpoint holds
    assert "lm_head.weight" not in ga and "model.embed_tokens.weight" in ga and set(ga) <= ckpt
    with safe_open("f_a.safetensors", "pt") as f:
        assert f.metadata()["normalisation"] == "sum over tokens, mean over sequences"
    for method, kind, pre in (("fisher", "fisher", "f"), ("regmean", "gram", "g")):
        recipe = {"merge_method": method, "dtype": "float32",
                  "models": [{"model": "a", "parameters": {kind: f"{pre}_a.safetensors"}},
                             {"model": "b", "parameters": {kind: f"{pre}_b.safetensors"}}]}
        (two_llms / f"{method}.yaml").write_text(yaml.safe_dump(recipe))
        code, out = invoke(["merge", f"{method}.yaml", "-o", f"out_{method}"])
        assert code == 0, out
        merged = LlamaForCausalLM.from_pretrained(two_llms / f"out_{method}").eval()
        with torch.no_grad():
            assert torch.isfinite(merged(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    a, b = load_file("a/model.safetensors"), load_file("b/model.safetensors")
    out = load_file("out_fisher/model.safetensors")
    fb = load_file("f_b.safetensors")
    k = "model.layers.0.self_attn.k_proj.weight"             # Fisher-weighted average, per entry
    fa_, fb_ = fa[k].clamp_min(1e-6), fb[k].clamp_min(1e-6)
    torch.testing.assert_close(out[k], (fa_ * a[k] + fb_ * b[k]) / (fa_ + fb_), rtol=1e-4, atol=1e-6)
    out = load_file("out_regmean/model.safetensors")
    gb = load_file("g_b.safetensors")
    k = "model.layers.1.mlp.down_proj.weight"                # (Σ W G̃)(Σ G̃)⁻¹, alpha 0.9
    def shrink(g):
        return 0.9 * g + 0.1 * torch.diag(torch.diag(g))
    ta, tb = shrink(ga[k]), shrink(gb[k])
    want = (a[k].double() @ ta + b[k].double() @ tb) @ torch.linalg.inv(ta + tb)
    torch.testing.assert_close(out[k].double(), want, rtol=1e-4, atol=1e-5)


def test_cli_one_line_errors(two_llms, tmp_path):
    # a text longer than the model's positions
    (tmp_path / "long.txt").write_text("w1 w2\n" + " ".join(["w3"] * 40) + "\n")
    code, out = invoke(["stats", "fisher", "a", "--data", "long.txt", "-o", "x.safetensors",
                        "--mode", "empirical", "--quiet"])
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "40 tokens" in out and "32" in out and "long.txt" in out
    # a folder without a tokenizer
    tiny_llama(0).save_pretrained(tmp_path / "notok")
    code, out = invoke(["stats", "gram", "notok", "--data", "t.txt", "-o", "x.safetensors", "--quiet"])
    assert code == 2 and "text data needs a tokenizer" in out
    assert len(out.strip().splitlines()) == 1
    # a sequence model that is not causal, with text data
    from transformers import BertConfig, BertForMaskedLM
    BertForMaskedLM(BertConfig(vocab_size=48, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained("mlm")
    word_tokenizer().save_pretrained("mlm")
    code, out = invoke(["stats", "fisher", "mlm", "--data", "t.txt", "-o", "x.safetensors",
                        "--mode", "sampled", "--quiet"])
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "not a causal LM" in out
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- layer by layer

@pytest.mark.parametrize("tie", [True, False])
def test_layered_pass_equals_the_whole_model_pass(tmp_path, tie):
    from mergelab.io.models import load_model
    from mergelab.stats import activation_stats
    from mergelab.stats.layered import layered_stats

    folder = save_llm(tmp_path / "m", 4, tie=tie)
    model, tok = load_model(folder, progress=False)
    tok.padding_side = "left"
    batches = [dict(tok(texts(3, seed=s), padding=True, return_tensors="pt")) for s in range(3)]
    g, gl = gram_matrices(model, batches, progress=False), layered_stats(folder, batches, "gram")
    assert list(g) == list(gl) and g.counts == gl.counts
    for k in g:
        torch.testing.assert_close(gl[k], g[k], rtol=1e-6, atol=1e-9)
    a, al = activation_stats(model, batches, progress=False), layered_stats(folder, batches, "activations")
    assert a.sites == al.sites and "lm_head:input" in a.sites
    for s in a.sites:
        torch.testing.assert_close(al.mean[s], a.mean[s], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(al.std[s], a.std[s], rtol=1e-5, atol=1e-6)
        assert float(al.count[s]) == float(a.count[s])


def test_layered_skeleton_holds_no_parameter_storage(tmp_path):
    from mergelab.stats.layered import skeleton

    m = skeleton(save_llm(tmp_path / "m", 0))
    assert all(p.device.type == "meta" for p in m.parameters())
    assert all(b.device.type == "cpu" for b in m.buffers())          # rotary frequencies stay real


def test_cli_layered_gram_equals_whole_and_refuses_other_models(two_llms):
    code, out = invoke(["stats", "gram", "a", "--data", "t.txt", "-o", "whole.safetensors",
                        "--batch-size", "4", "--quiet"])
    assert code == 0, out
    code, out = invoke(["stats", "gram", "a", "--data", "t.txt", "-o", "lay.safetensors",
                        "--batch-size", "4", "--layered", "--quiet"])
    assert code == 0 and "layer by layer" in out, out
    w, lay = load_file("whole.safetensors"), load_file("lay.safetensors")
    assert set(w) == set(lay)
    for k in w:
        torch.testing.assert_close(lay[k], w[k], rtol=1e-6, atol=1e-9)
    code, out = invoke(["stats", "activations", "a", "--data", "t.txt", "-o", "act.safetensors",
                        "--layered", "--quiet"])
    assert code == 0, out
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=48, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained("enc")
    word_tokenizer().save_pretrained("enc")
    code, out = invoke(["stats", "gram", "enc", "--data", "t.txt", "-o", "x.safetensors", "--layered"])
    assert code == 2 and "is not a decoder-only LM" in out and len(out.strip().splitlines()) == 1, out


# ---------------------------------------------------------------- REPAIR / TACT on causal LMs

def _repair_recipe(folder, sites=None):
    import yaml
    r = {"merge_method": "linear", "dtype": "float32", "models": [{"model": "a"}, {"model": "b"}],
         "repair": {"data": "t.txt", **({"sites": sites} if sites else {})}}
    (folder / "r.yaml").write_text(yaml.safe_dump(r))


def test_repair_on_mlp_outputs_of_a_causal_lm(tmp_path, monkeypatch):
    """Sites = MLP outputs per token (padding masked); the folded shift needs the MLP bias."""
    from transformers import LlamaForCausalLM

    from mergelab.io.models import load_model
    from mergelab.stats import activation_stats

    monkeypatch.chdir(tmp_path)
    for name, seed in (("a", 0), ("b", 1)):
        save_llm(tmp_path / name, seed, mlp_bias=True)
    (tmp_path / "t.txt").write_text("\n".join(texts(8, seed=6)) + "\n")
    sites = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    _repair_recipe(tmp_path, sites)
    code, out = invoke(["merge", "r.yaml", "-o", "out", "--quiet"])
    assert code == 0, out
    merged, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # REPAIR's target: the mean of the experts' per-channel mean/std at each site
    tok = word_tokenizer()
    batch = [dict(tok(texts(8, seed=6), padding=True, return_tensors="pt"))]
    st = [activation_stats(load_model(tmp_path / n, progress=False)[0], batch, sites, progress=False)
          for n in ("a", "b")]
    got = activation_stats(merged.eval(), batch, sites, progress=False)
    for s in sites:
        torch.testing.assert_close(got.mean[s], (st[0].mean[s] + st[1].mean[s]) / 2, rtol=1e-3, atol=1e-4)


def test_repair_refuses_a_bias_the_architecture_lacks(two_llms):
    _repair_recipe(two_llms, ["model.layers.0.mlp.down_proj"])
    code, out = invoke(["merge", "r.yaml", "-o", "out", "--quiet"])
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "needs tensor 'model.layers.0.mlp.down_proj.bias'" in out and "LlamaForCausalLM" in out


def test_hooks_backend_on_a_causal_lm_equals_brute_force():
    """Linear and embedding parameters: the closed-form per-sequence gradients (one backward
    seeded with the next-token one-hots) agree with the autograd loop."""
    m = tiny_llama(5, tie=False)
    b = batch_of(texts(4, seed=8), "left")
    names = [n for n, p in m.named_parameters() if not n.endswith("norm.weight")]
    f = diagonal_fisher(m, [b], mode="empirical", params=names, backend="hooks", progress=False)
    assert f.backend == "hooks"
    want = brute_fisher(m, b, lambda i, x: x[0, 1:])
    assert_close_dicts(f, {k: want[k] for k in names})
    # every parameter: Llama's RMSNorm (not a closed-form kind) through the module's own code
    f = diagonal_fisher(m, [b], mode="empirical", progress=False)
    assert f.backend == "hooks" and any(k.endswith("norm.weight") for k in f)
    assert_close_dicts(f, want)
