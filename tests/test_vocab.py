"""Tokenizer merging (issue 13 item 3): tokenizer_source / tokenizer: {source, tokens,
pad_to_multiple_of} / chat_template on tiny WordLevel tokenizers built here, with overlapping
and disjoint vocabularies; embedding and LM-head rows checked against the per-token rule
written in the test."""
import json

import pytest
import torch
from click.testing import CliRunner
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from core_helpers import nothing_written
from mergelab import merge
from mergelab.cli import main
from mergelab.errors import MergelabError
from _vocab_models import H, make_model, out_vocab, read


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture
def ab(tmp_path):
    a = make_model(tmp_path / "a", ["a", "b", "c", "d", "e"], 1, special=["<s>"])
    b = make_model(tmp_path / "b", ["d", "c", "x", "y"], 2, special=["<t>"])
    return a, b


def linear(*paths, weights=None, **extra):
    weights = weights or [1.0] * len(paths)
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": w}}
                                                 for p, w in zip(paths, weights)], **extra}


def test_union_holds_every_token_and_rows_follow_the_rule(tmp_path, ab):
    (pa, va, ta), (pb, vb, tb) = ab
    merge(linear(pa, pb, weights=[0.25, 0.75], tokenizer_source="union"), tmp_path / "o", quiet=True)
    vo = out_vocab(tmp_path / "o")
    assert set(va) | set(vb) <= set(vo)
    assert all(vo[t] == i for t, i in va.items())           # the first model's ids are kept
    got = read(tmp_path / "o")
    for n in VOCAB_TENSORS:
        assert got[n].shape == (len(vo), H)
        for t, o in vo.items():
            ra = ta[n][va[t]] if t in va else None
            rb = tb[n][vb[t]] if t in vb else None
            ra = rb if ra is None else ra                  # a model lacking a token: the only holder's row
            rb = ra if rb is None else rb
            torch.testing.assert_close(got[n][o], 0.25 * ra + 0.75 * rb)
    # tensors inside the layers are never remapped, even with vocab_size rows
    torch.testing.assert_close(got["model.layers.0.mlp.up_proj.weight"],
                               0.25 * ta["model.layers.0.mlp.up_proj.weight"] + 0.75 * tb["model.layers.0.mlp.up_proj.weight"])
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["vocab_size"] == len(vo) and cfg["bos_token_id"] == vo["b"]
    tc = json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())
    dec = {v["content"]: v["special"] for v in tc["added_tokens_decoder"].values()}
    assert dec["<s>"] and dec["<t>"] and not dec["x"]
    enc = Tokenizer.from_file(str(tmp_path / "o" / "tokenizer.json")).encode("a x <t> d").ids
    assert enc == [vo["a"], vo["x"], vo["<t>"], vo["d"]]


def test_merged_with_itself_every_row_is_preserved(tmp_path, ab):
    (pa, va, ta), (pb, vb, tb) = ab
    merge(linear(pa, pa, tokenizer_source="union"), tmp_path / "o", quiet=True)
    got = read(tmp_path / "o")
    for n in ta:
        assert torch.equal(got[n], ta[n])
    # the other model's tokens, merged with itself under its own and a foreign tokenizer
    merge(linear(pb, pb, tokenizer_source=str(pa)), tmp_path / "o2", quiet=True)
    vo = out_vocab(tmp_path / "o2")
    assert vo == va
    got = read(tmp_path / "o2")
    for t in set(va) & set(vb):
        assert torch.equal(got["lm_head.weight"][vo[t]], tb["lm_head.weight"][vb[t]])
    for t in set(va) - set(vb):   # no model has it: zero
        assert torch.equal(got["lm_head.weight"][vo[t]], torch.zeros(H))


def test_disjoint_vocabularies_with_a_base(tmp_path):
    pa, va, ta = make_model(tmp_path / "a", ["p", "q", "r"], 1)
    pb, vb, tb = make_model(tmp_path / "b", ["u", "v"], 2)
    pc, vc, tc_ = make_model(tmp_path / "c", ["v", "w", "p"], 3)
    rec = {"merge_method": "task_arithmetic", "base_model": str(pa),
           "models": [{"model": str(pb), "parameters": {"weight": 1.0}}, {"model": str(pc), "parameters": {"weight": 1.0}}],
           "tokenizer": {"source": "union"}}
    merge(rec, tmp_path / "o", quiet=True)
    vo = out_vocab(tmp_path / "o")
    assert set(vo) == set(va) | set(vb) | set(vc)
    got = read(tmp_path / "o")
    n = "model.embed_tokens.weight"

    def row(t, vocab, tens):
        if t in vocab:
            return tens[n][vocab[t]]
        if t in va:                                          # the base has it
            return ta[n][va[t]]
        holders = [x[n][v[t]] for v, x in ((vb, tb), (vc, tc_)) if t in v]
        return sum(holders) / len(holders)                  # else the mean of the holders
    for t, o in vo.items():
        base_r, b_r, c_r = row(t, va, ta), row(t, vb, tb), row(t, vc, tc_)
        torch.testing.assert_close(got[n][o], base_r + (b_r - base_r) + (c_r - base_r))


def test_pad_to_multiple_of_and_tied_embeddings(tmp_path):
    pa, va, ta = make_model(tmp_path / "a", ["a", "b", "c"], 1, tied=True)
    pb, vb, tb = make_model(tmp_path / "b", ["c", "z"], 2, tied=True)
    merge(linear(pa, pb, tokenizer={"source": "union", "pad_to_multiple_of": 8}), tmp_path / "o", quiet=True)
    got = read(tmp_path / "o")
    assert set(got) == set(ta)
    assert got["model.embed_tokens.weight"].shape == (8, H)
    e = got["model.embed_tokens.weight"]
    n_tok = len(out_vocab(tmp_path / "o"))
    # padding rows: the mean of the real rows (mergekit's initialisation; linear keeps it)
    torch.testing.assert_close(e[n_tok:], e[:n_tok].mean(0).expand(8 - n_tok, H))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 8


def test_padded_embedding_rows_beyond_the_tokenizer(tmp_path):
    # a model whose embedding has more rows than its tokenizer has tokens (vocab padded)
    pa, va, ta = make_model(tmp_path / "a", ["a", "b"], 1, extra_rows=2)
    pb, vb, tb = make_model(tmp_path / "b", ["b", "k"], 2)
    merge(linear(pa, pb, tokenizer_source="union"), tmp_path / "o", quiet=True)
    vo = out_vocab(tmp_path / "o")
    got = read(tmp_path / "o")
    assert got["lm_head.weight"].shape == (len(vo), H) and len(vo) == 3


def test_tokens_sources_force_zero_and_model_token(tmp_path, ab):
    (pa, va, ta), (pb, vb, tb) = ab
    rec = linear(pa, pb, weights=[0.5, 0.5], tokenizer={
        "source": "union",
        "tokens": {"c": {"source": str(pb), "force": True},
                   "x": {"source": {"kind": "zero"}},
                   "e": {"source": {"kind": "model_token", "model": str(pb), "token": "y"}},
                   "<new>": {"source": {"kind": "model_token", "model": str(pa), "token_id": 0}}}})
    merge(rec, tmp_path / "o", quiet=True)
    vo = out_vocab(tmp_path / "o")
    got = read(tmp_path / "o")["model.embed_tokens.weight"]
    n = "model.embed_tokens.weight"
    torch.testing.assert_close(got[vo["c"]], tb[n][vb["c"]])                       # forced for both models
    torch.testing.assert_close(got[vo["x"]], 0.5 * tb[n][vb["x"]])                 # a lacks x: zero for a
    torch.testing.assert_close(got[vo["e"]], 0.5 * ta[n][va["e"]] + 0.5 * tb[n][vb["y"]])
    assert "<new>" in vo
    torch.testing.assert_close(got[vo["<new>"]], ta[n][0])


def test_chat_template(tmp_path, ab):
    (pa, va, ta), (pb, vb, tb) = ab
    merge(linear(pa, pa, chat_template="chatml"), tmp_path / "o", quiet=True)
    tc = json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"]
    merge(linear(pb, pa, pa, chat_template="auto", tokenizer_source="base"), tmp_path / "o2", quiet=True)
    tc = json.loads((tmp_path / "o2" / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == "tmpl-a {{ x }}"
    assert out_vocab(tmp_path / "o2") == vb


@pytest.mark.parametrize("extra,msg", [
    ({"tokenizer_source": "nowhere"}, "not base, union or a model folder"),
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "both given"),
    ({"chat_template": "vicuna"}, "chat_template 'vicuna'"),
    ({"tokenizer": {"source": "union", "tokens": {"zz": {"source": {"kind": "model_token", "model": "a"}}}}},
     "exactly one of"),
    ({"tokenizer": {"source": "union", "tokens": {"zz": {"source": {"kind": "other"}}}}}, "unknown kind"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, ab, extra, msg):
    (pa, va, ta), (pb, vb, tb) = ab
    import yaml
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(linear(pa, pb, **extra)))
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error:") and msg in r.output, r.output
    assert r.output.count("\n") == 1 and nothing_written(tmp_path / "o")


def test_missing_tokenizer_json_is_one_line(tmp_path, ab):
    (pa, va, ta), (pb, vb, tb) = ab
    (pb / "tokenizer.json").unlink()
    with pytest.raises(MergelabError, match="has no tokenizer.json"):
        merge(linear(pa, pb, tokenizer_source="union"), tmp_path / "o", quiet=True)


def test_row_blocks_equal_whole_tensors(tmp_path, ab):
    (pa, va, ta), (pb, vb, tb) = ab
    rec = linear(pa, pb, weights=[0.3, 0.7], tokenizer={"source": "union", "pad_to_multiple_of": 4})
    merge(rec, tmp_path / "whole", quiet=True)
    merge(rec, tmp_path / "rows", quiet=True, block_size=2 * H * 4)   # two rows per block
    x, y = read(tmp_path / "whole"), read(tmp_path / "rows")
    for n in x:
        assert torch.equal(x[n], y[n])


@pytest.mark.slow
def test_transformers_loads_the_union_merge(tmp_path):
    """A union merge of two tiny Llamas with different vocabularies loads in transformers; with
    the first model merged with itself, its logits over its own tokens are unchanged."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def mk(name, toks, seed):
        torch.manual_seed(seed)
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token=toks[0]))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.add_special_tokens([AddedToken("<s>", special=True)])
        cfg = LlamaConfig(vocab_size=len(toks) + 1, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, bos_token_id=len(toks))
        m = LlamaForCausalLM(cfg).eval()
        m.save_pretrained(tmp_path / name)
        tok.save(str(tmp_path / name / "tokenizer.json"))
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
        return m

    a = mk("a", ["[UNK]", "x", "y", "z"], 0)
    mk("b", ["[UNK]", "z", "w", "v", "u"], 1)
    merge(linear(tmp_path / "a", tmp_path / "b", tokenizer_source="union"), tmp_path / "ab", quiet=True)
    m = LlamaForCausalLM.from_pretrained(tmp_path / "ab")
    tok = AutoTokenizer.from_pretrained(tmp_path / "ab")
    assert m.config.vocab_size == 8 and m.config.bos_token_id == tok.convert_tokens_to_ids("<s>") == 4
    assert tok("x w <s>").input_ids == [1, 5, 4]
    merge(linear(tmp_path / "a", tmp_path / "a", tmp_path / "b", weights=[0.5, 0.5, 0.0],
                 tokenizer_source="union"), tmp_path / "aa", quiet=True)
    m = LlamaForCausalLM.from_pretrained(tmp_path / "aa").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits[..., :5], a(ids).logits, rtol=1e-5, atol=1e-5)


from hypothesis import given, settings, strategies as st  # noqa: E402

from mergelab.engine.sources import StateCheckpoint  # noqa: E402
from mergelab.vocab import VocabView  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_vocab_view_rows_match_brute_force(data):
    """Random row plans (copies, means, zeros, from several checkpoints, padding rows): every row
    range equals the sum written out term by term."""
    n_src = data.draw(st.integers(1, 3))
    rows_src = [data.draw(st.integers(1, 9)) for _ in range(n_src)]
    srcs = [StateCheckpoint({"e": torch.randn(r, 3), "other": torch.randn(2)}) for r in rows_src]
    out_rows = data.draw(st.integers(1, 12))
    terms = []
    for _ in range(out_rows):
        k = data.draw(st.integers(0, 3))
        picks = [data.draw(st.integers(0, n_src - 1)) for _ in range(k)]
        terms.append([(srcs[c], data.draw(st.integers(0, rows_src[c] - 1)), 1.0 / k) for c in picks])
    pad_from = data.draw(st.one_of(st.none(), st.integers(1, out_rows)))
    v = VocabView.from_terms(srcs[0], ["e"], out_rows, terms, None, "v", pad_from=pad_from)
    want = torch.stack([sum((c.get("e")[r] * w for c, r, w in ts), torch.zeros(3)) for ts in terms])
    if pad_from is not None:          # padding rows: the mean of the rows before them
        want[pad_from:] = want[:pad_from].mean(0)
    torch.testing.assert_close(v.get("e"), want)
    s = data.draw(st.integers(0, out_rows))
    e = data.draw(st.integers(s, out_rows))
    torch.testing.assert_close(v.get_rows("e", s, e), want[s:e])
    assert v.shape("e") == (out_rows, 3) and torch.equal(v.get("other"), srcs[0].get("other"))


def test_union_over_a_lora_input(tmp_path, ab):
    """A ``base+adapter`` input (its tokenizer is the base's) in a union merge: rows of the
    adapted model, LoRA on the embedding included, follow the same rule."""
    from safetensors.torch import save_file

    (pa, va, ta), (pb, vb, tb) = ab
    n = "model.embed_tokens.weight"
    A, B = torch.randn(2, ta[n].shape[0]), torch.randn(H, 2)     # PEFT's lora_embedding_A/B
    (tmp_path / "ad").mkdir()
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": A,
               "base_model.model.model.embed_tokens.lora_embedding_B": B}, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    merge(linear(f"{pa}+{tmp_path / 'ad'}", pb, weights=[0.5, 0.5], tokenizer_source="union"), tmp_path / "o", quiet=True)
    emb_a = ta[n] + (B @ A).T
    vo = out_vocab(tmp_path / "o")
    got = read(tmp_path / "o")[n]
    for t, o in vo.items():
        ra = emb_a[va[t]] if t in va else tb[n][vb[t]]
        rb = tb[n][vb[t]] if t in vb else emb_a[va[t]]
        torch.testing.assert_close(got[o], 0.5 * ra + 0.5 * rb)
