"""Tiny Llama-shaped checkpoints with their own WordLevel tokenizers (tests of tokenizer merging)."""
import json

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from core_helpers import save_hf
from mergelab.io import open_checkpoint

H = 4


def make_model(folder, tokens, seed, special=(), layers=1, tied=False, extra_rows=0):
    """A tiny Llama-shaped checkpoint whose vocabulary is ``tokens`` (ids in that order)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=tokens[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tok.add_special_tokens([AddedToken(s, special=True) for s in special])
    V = tok.get_vocab_size(with_added_tokens=True) + extra_rows
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(V, H, generator=g)}
    for i in range(layers):
        t[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(6, H, generator=g)  # may have V rows: inside a layer
    t["model.norm.weight"] = torch.randn(H, generator=g)
    if not tied:
        t["lm_head.weight"] = torch.randn(V, H, generator=g)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
           "hidden_size": H, "vocab_size": V, "bos_token_id": vocab.get("b", 0), "tie_word_embeddings": tied}
    save_hf(folder, t, cfg)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": f"tmpl-{tokens[0]} {{{{ x }}}}"}))
    return folder, tok.get_vocab(with_added_tokens=True), t


def read(folder):
    c = open_checkpoint(folder)
    return {n: c.get(n) for n in c.keys()}


def out_vocab(folder):
    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
