"""Tiny causal LMs and a word-level tokenizer for the causal-LM statistics tests."""
from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(40)]


def tiny_llama(seed: int = 0, *, vocab: int = 48, tie: bool = True, positions: int = 32,
               mlp_bias: bool = False):
    """LlamaForCausalLM with GQA (4 query heads, 2 key/value heads), RMSNorm, rotary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                      mlp_bias=mlp_bias, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():                      # non-trivial norm weights (not all ones)
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def word_tokenizer(padding_side: str = "right"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>", padding_side=padding_side)


def texts(n: int, seed: int = 0, lo: int = 3, hi: int = 9) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi))) for _ in range(n)]


def save_llm(folder: Path, seed: int = 0, **kw) -> Path:
    folder = Path(folder)
    tiny_llama(seed, **kw).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
