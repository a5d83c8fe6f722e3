"""Tokenizer merging together with ``slices:`` (issue 13 items 2 and 3): frankenmerges and
per-slice merges with ``tokenizer_source`` / ``tokenizer:``, on tiny WordLevel tokenizers built
here (overlapping and disjoint vocabularies) and tiny Llama-shaped checkpoints.

The rule checked, written out in the test (mergekit's planning): the output vocabulary comes
from every model the recipe names; the embeddings are merged from the first slice's sources and
the LM head from the last slice's, each source's rows remapped to the output vocabulary with
its own tokenizer; a token a source lacks gets the default row among the sources of that
tensor (the base's row, else the only holder's, else the holders' mean, else zero)."""
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from _vocab_models import H, make_model, out_vocab, read
from core_helpers import nothing_written
from mergelab import merge
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.methods.basic import slerp_pair

E, HEAD = "model.embed_tokens.weight", "lm_head.weight"
LAYER_SUFFIX = "mlp.up_proj.weight"


def mapped(tensor_name, own, holders, vo, base=None, explicit=None, forced=()):
    """Output rows of one model ``own`` = (vocab, tensors) for ``tensor_name``; ``holders``: the
    models that supply the tensor to the merge (``own`` among them), ``base`` one of them or None;
    ``explicit``: {token: row} for tokens with a ``source``; ``forced``: tokens whose ``source``
    applies to every model."""
    explicit = explicit or {}
    rows = torch.zeros(max(vo.values()) + 1, H)
    for t, o in vo.items():
        v, ts = own
        if t in v and t not in forced:
            rows[o] = ts[tensor_name][v[t]]
        elif t in explicit:
            rows[o] = explicit[t]
        elif base is not None and t in base[0]:
            rows[o] = base[1][tensor_name][base[0][t]]
        else:
            hs = [x[tensor_name][hv[t]] for hv, x in holders if t in hv]
            rows[o] = sum(hs) / len(hs) if hs else torch.zeros(H)
    return rows


@pytest.fixture(params=["overlapping", "disjoint"])
def abc(request, tmp_path):
    if request.param == "overlapping":
        vocabs = (["a", "b", "c", "d", "e"], ["d", "c", "x", "y"], ["y", "a", "z"])
    else:
        vocabs = (["a", "b", "c"], ["p", "q"], ["u", "v", "w", "k"])
    specials = (["<s>"], ["<t>"], [])
    return [make_model(tmp_path / n, v, i + 1, special=s, layers=3)
            for i, (n, v, s) in enumerate(zip("abc", vocabs, specials))]


def test_frankenmerge_with_union_keeps_each_suppliers_rows(tmp_path, abc):
    """passthrough A[0:2] + B[1:3] with tokenizer_source union: the embeddings are A's (each of A's
    tokens keeps its row, B's other tokens have no row in the embeddings' only source: zero), the
    LM head is B's (likewise), the layers are stacked and renumbered."""
    (pa, va, ta), (pb, vb, tb), _ = abc
    rec = {"slices": [{"sources": [{"model": str(pa), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(pb), "layer_range": [1, 3]}]}],
           "merge_method": "passthrough", "tokenizer_source": "union"}
    merge(rec, tmp_path / "o", quiet=True)
    vo = out_vocab(tmp_path / "o")
    assert set(vo) == set(va) | set(vb) and all(vo[t] == i for t, i in va.items())
    got = read(tmp_path / "o")
    for t, o in vo.items():
        assert torch.equal(got[E][o], ta[E][va[t]] if t in va else torch.zeros(H)), t
        assert torch.equal(got[HEAD][o], tb[HEAD][vb[t]] if t in vb else torch.zeros(H)), t
    for o, (src, i) in enumerate([(ta, 0), (ta, 1), (tb, 1), (tb, 2)]):
        assert torch.equal(got[f"model.layers.{o}.{LAYER_SUFFIX}"], src[f"model.layers.{i}.{LAYER_SUFFIX}"])
    assert torch.equal(got["model.norm.weight"], tb["model.norm.weight"])
    assert set(got) == {E, HEAD, "model.norm.weight"} | {f"model.layers.{o}.{LAYER_SUFFIX}" for o in range(4)}
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["vocab_size"] == len(vo) == got[E].shape[0]
    assert cfg["bos_token_id"] == vo["b"]     # A's config (the first source's), its ids mapped


def test_passthrough_of_one_model_with_its_own_union_is_the_model(tmp_path, abc):
    (pa, va, ta), _, _ = abc
    rec = {"slices": [{"sources": [{"model": str(pa), "layer_range": [0, 3]}]}],
           "merge_method": "passthrough", "tokenizer": {"source": "union"}}
    merge(rec, tmp_path / "o", quiet=True)
    got = read(tmp_path / "o")
    assert set(got) == set(ta) and all(torch.equal(got[n], ta[n]) for n in ta)
    assert out_vocab(tmp_path / "o") == va


def test_frankenmerge_explicit_token_source_outside_the_suppliers(tmp_path, abc):
    """tokens.<t>.source may name a model that does not supply the tensor: its row of the same
    tensor is read (mergekit refuses this; here it fills B's tokens into A's embeddings)."""
    (pa, va, ta), (pb, vb, tb), _ = abc
    t_b = next(t for t in vb if t not in va)
    rec = {"slices": [{"sources": [{"model": str(pa), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(pb), "layer_range": [1, 3]}]}],
           "merge_method": "passthrough",
           "tokenizer": {"source": "union", "tokens": {t_b: {"source": str(pb)}}}}
    merge(rec, tmp_path / "o", quiet=True)
    vo, got = out_vocab(tmp_path / "o"), read(tmp_path / "o")
    assert torch.equal(got[E][vo[t_b]], tb[E][vb[t_b]])
    assert torch.equal(got[HEAD][vo[t_b]], tb[HEAD][vb[t_b]])


def test_per_slice_slerp_with_union_and_token_sources(tmp_path, abc):
    """slerp per slice, base A: slice 1 = {A, B}, slice 2 = {A, C}. The embeddings are merged from
    A and B at the first slice's t = 0, the LM head from A and C at the last slice's t = 1, each
    with defaults among its own sources; forced and model_token rows as given."""
    (pa, va, ta), (pb, vb, tb), (pc, vc, tc) = abc
    forced_tok = sorted(va)[1]
    new_tok = "<new>"
    c_tok = sorted(vc)[0]
    rec = {"slices": [{"sources": [{"model": str(pa), "layer_range": [0, 2]}, {"model": str(pb), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(pa), "layer_range": [2, 3]}, {"model": str(pc), "layer_range": [1, 2]}]}],
           "merge_method": "slerp", "base_model": str(pa), "parameters": {"t": [0.3, 0.8]},
           "tokenizer": {"source": "union", "tokens": {
               forced_tok: {"source": str(pa), "force": True},
               new_tok: {"source": {"kind": "model_token", "model": str(pc), "token": c_tok}}}}}
    merge(rec, tmp_path / "o", quiet=True)
    vo = out_vocab(tmp_path / "o")
    assert set(vo) == set(va) | set(vb) | set(vc) | {new_tok}
    assert all(vo[t] == i for t, i in va.items())
    got = read(tmp_path / "o")
    for n, (other_v, other_t), t in ((E, (vb, tb), 0.3), (HEAD, (vc, tc), 0.8)):
        explicit = {forced_tok: ta[n][va[forced_tok]], new_tok: tc[n][vc[c_tok]]}
        holders = [(va, ta), (other_v, other_t)]
        ra = mapped(n, (va, ta), holders, vo, base=(va, ta), explicit=explicit, forced={forced_tok})
        rb = mapped(n, (other_v, other_t), holders, vo, base=(va, ta), explicit=explicit, forced={forced_tok})
        torch.testing.assert_close(got[n], slerp_pair(t, ra, rb), rtol=1e-6, atol=1e-6)
    # layer 2 of the output = slice 2's only layer: A's layer 2 and C's layer 1 at t = 1 (its own gradient end)
    k = f"model.layers.2.{LAYER_SUFFIX}"
    torch.testing.assert_close(got[k], slerp_pair(0.8, ta[f"model.layers.2.{LAYER_SUFFIX}"], tc[f"model.layers.1.{LAYER_SUFFIX}"]),
                               rtol=1e-6, atol=1e-6)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["vocab_size"] == len(vo)


def test_one_full_slice_with_a_tokenizer_equals_the_models_recipe(tmp_path, abc):
    (pa, _, _), (pb, _, _), _ = abc
    tok = {"source": "union", "pad_to_multiple_of": 4, "tokens": {"<x>": {"source": {"kind": "zero"}}}}
    r1 = {"slices": [{"sources": [{"model": str(pa), "layer_range": [0, 3]},
                                  {"model": str(pb), "layer_range": [0, 3], "parameters": {"weight": 0.3}}]}],
          "merge_method": "ties", "base_model": str(pa), "tokenizer": tok}
    r2 = {"models": [{"model": str(pa)}, {"model": str(pb), "parameters": {"weight": 0.3}}],
          "merge_method": "ties", "base_model": str(pa), "tokenizer": tok}
    merge(r1, tmp_path / "1", quiet=True)
    merge(r2, tmp_path / "2", quiet=True)
    o1, o2 = read(tmp_path / "1"), read(tmp_path / "2")
    assert set(o1) == set(o2) and all(torch.equal(o1[k], o2[k]) for k in o1)
    assert (tmp_path / "1" / "tokenizer.json").read_text() == (tmp_path / "2" / "tokenizer.json").read_text()
    assert json.loads((tmp_path / "1" / "config.json").read_text()) == json.loads((tmp_path / "2" / "config.json").read_text())


def test_pad_to_multiple_of_and_chat_template_with_slices(tmp_path, abc):
    """pad_to_multiple_of pads the stacked model's rows (with the mean of each source's remapped
    rows, mergekit's initialisation); chat_template auto counts every
    source named in the slices (B twice, A once: B's template)."""
    (pa, va, ta), (pb, vb, tb), _ = abc
    rec = {"slices": [{"sources": [{"model": str(pa), "layer_range": [0, 1]}]},
                      {"sources": [{"model": str(pb), "layer_range": [0, 1]}]},
                      {"sources": [{"model": str(pb), "layer_range": [2, 3]}]}],
           "merge_method": "passthrough", "tokenizer": {"source": "union", "pad_to_multiple_of": 16},
           "chat_template": "auto"}
    merge(rec, tmp_path / "o", quiet=True)
    vo, got = out_vocab(tmp_path / "o"), read(tmp_path / "o")
    n_tok = max(vo.values()) + 1
    assert got[E].shape == got[HEAD].shape == (16, H) and n_tok <= 16
    want_e = torch.stack([ta[E][va[t]] if t in va else torch.zeros(H) for t in sorted(vo, key=vo.get)]).mean(0)
    want_h = torch.stack([tb[HEAD][vb[t]] if t in vb else torch.zeros(H) for t in sorted(vo, key=vo.get)]).mean(0)
    torch.testing.assert_close(got[E][n_tok:], want_e.expand(16 - n_tok, H))
    torch.testing.assert_close(got[HEAD][n_tok:], want_h.expand(16 - n_tok, H))
    assert torch.equal(got[E][:n_tok][[vo[t] for t in va]], ta[E][list(va.values())])
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["vocab_size"] == 16 and cfg["num_hidden_layers"] == 3
    tc = json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == f"tmpl-{min(vb, key=vb.get)} {{{{ x }}}}"
    # chat_template alone (no tokenizer merge) with slices: D once, B twice (same vocab_size): B's
    pd, _, _ = make_model(tmp_path / "d", [f"w{i}" for i in range(len(vb) - 1)], 7, special=["<u>"], layers=3)
    rec.pop("tokenizer")
    rec["slices"][0]["sources"][0]["model"] = str(pd)
    merge(rec, tmp_path / "o2", quiet=True)
    tc = json.loads((tmp_path / "o2" / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == f"tmpl-{min(vb, key=vb.get)} {{{{ x }}}}"
    assert out_vocab(tmp_path / "o2") == out_vocab(pd)     # the first source's tokenizer, copied


def test_cli_frankenmerge_with_union(tmp_path, abc):
    (pa, va, ta), (pb, vb, tb), _ = abc
    rec = {"slices": [{"sources": [{"model": "a", "layer_range": [0, 3]}]},
                      {"sources": [{"model": "b", "layer_range": [0, 3]}]}],
           "merge_method": "passthrough", "tokenizer_source": "union", "dtype": "float32"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))   # paths relative to the recipe
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    vo, got = out_vocab(tmp_path / "o"), read(tmp_path / "o")
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["vocab_size"] == len(vo) == got[HEAD].shape[0]
    assert all(torch.equal(got[E][vo[t]], ta[E][i]) for t, i in va.items())
    assert all(torch.equal(got[HEAD][vo[t]], tb[HEAD][i]) for t, i in vb.items())
    assert "tokenizer_source: union" in (tmp_path / "o" / "README.md").read_text()   # the recipe as written


def test_errors_with_slices_are_one_line_and_write_nothing(tmp_path, abc):
    (pa, va, ta), (pb, vb, tb), _ = abc
    pt, _, _ = make_model(tmp_path / "tied", ["a", "q"], 9, layers=3, tied=True)
    base = {"slices": [{"sources": [{"model": str(pa), "layer_range": [0, 2]}]},
                       {"sources": [{"model": str(pb), "layer_range": [1, 3]}]}], "merge_method": "passthrough"}
    cases = [
        ({"tokenizer": {"source": "union", "tokens": {"q": {"source": str(pt)}}}}, "has no vocabulary tensor 'lm_head.weight'"),
        ({"tokenizer_source": str(tmp_path / "nowhere")}, "not base, union or a model folder"),
    ]
    for extra, msg in cases:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**base, **extra}))
        r = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o")])
        assert r.exit_code == 2 and r.output.startswith("error:") and msg in r.output, r.output
        assert r.output.count("\n") == 1 and nothing_written(tmp_path / "o")
    (pb / "tokenizer.json").unlink()     # a slice source without a tokenizer
    with pytest.raises(MergelabError, match="slices\\[1\\].sources\\[0\\].model: .* has no tokenizer.json"):
        merge({**base, "tokenizer_source": "union"}, tmp_path / "o", quiet=True)
    assert nothing_written(tmp_path / "o")


def _mergekit_yaml():
    from _mergekit import find_mergekit
    return find_mergekit()


@pytest.mark.slow
@pytest.mark.skipif(_mergekit_yaml() is None, reason="mergekit-yaml not installed")
def test_rows_match_mergekit_token_by_token(tmp_path):
    """mergekit-yaml and mergelab on the same slices + tokenizer recipes (real tiny Llamas): every
    tensor equal, the vocabulary tensors compared token by token (mergekit orders the union's
    added tokens by a set's iteration order, so ids may differ).  Constant ``t``: mergekit 0.1.5
    plans the weights after the layers at t = 0 of a gradient, mergelab at t = 1."""
    import os
    import subprocess

    from safetensors.torch import load_file
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    def mk(name, toks, seed, special):
        torch.manual_seed(seed)
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token=toks[0]))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.add_special_tokens([AddedToken(s, special=True) for s in special])
        n = tok.get_vocab_size(with_added_tokens=True)
        cfg = LlamaConfig(vocab_size=n, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                          num_key_value_heads=1, tie_word_embeddings=False, bos_token_id=n - 1)
        LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
        tok.save(str(tmp_path / name / "tokenizer.json"))
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": special[0], "tokenizer_class": "PreTrainedTokenizerFast"}))
        return str(tmp_path / name)

    a = mk("a", ["[UNK]", "a", "b", "c", "d"], 0, ["<s>"])
    b = mk("b", ["[UNK]", "d", "c", "x", "y"], 1, ["<t>"])
    c = mk("c", ["[UNK]", "y", "a", "z"], 2, ["<s>"])
    recipes = {
        "franken": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                               {"sources": [{"model": b, "layer_range": [1, 3]}]}],
                    "merge_method": "passthrough", "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
                    "dtype": "float32"},
        "slerp": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]},
                             {"sources": [{"model": a, "layer_range": [2, 3]}, {"model": c, "layer_range": [1, 2]}]}],
                  "merge_method": "slerp", "base_model": a, "parameters": {"t": 0.4}, "dtype": "float32",
                  "tokenizer": {"source": "union", "tokens": {"b": {"source": a, "force": True}}}},
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name, rec in recipes.items():
        rp = tmp_path / f"{name}.yaml"
        rp.write_text(yaml.safe_dump(rec, sort_keys=False))
        p = subprocess.run([_mergekit_yaml(), str(rp), str(tmp_path / f"mk_{name}")], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        merge(str(rp), tmp_path / f"ml_{name}", quiet=True)
        x, y = (load_file(str(tmp_path / f"{w}_{name}" / "model.safetensors")) for w in ("mk", "ml"))
        vx, vy = out_vocab(tmp_path / f"mk_{name}"), out_vocab(tmp_path / f"ml_{name}")
        assert set(vx) == set(vy) and set(x) == set(y)
        cx = json.loads((tmp_path / f"mk_{name}" / "config.json").read_text())
        cy = json.loads((tmp_path / f"ml_{name}" / "config.json").read_text())
        assert (cx["num_hidden_layers"], cx["vocab_size"]) == (cy["num_hidden_layers"], cy["vocab_size"])
        for n in x:
            if n in (E, HEAD):
                toks = sorted(vx)
                torch.testing.assert_close(x[n][[vx[t] for t in toks]], y[n][[vy[t] for t in toks]], rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(x[n][len(vx):], y[n][len(vy):], rtol=1e-6, atol=1e-6)   # padding rows
            else:
                torch.testing.assert_close(x[n], y[n], rtol=1e-6, atol=1e-6)
