"""Causal language models (``*ForCausalLM``) in the statistics passes.

The objective of one sequence is its log-likelihood under teacher forcing, summed over the
tokens that have a next token:

    log p(x_n) = Σ_t m_t · log p_θ(y_t | x_≤t),   y_t = x_{t+1},   m_t = mask_t · mask_{t+1}

(padding, on either side, and the last position are masked).  Targets are a ``(B, T)`` integer
tensor with :data:`IGNORE` (-100, Hugging Face's convention) where ``m_t = 0``.

Fisher modes on a causal LM (:func:`mergelab.stats.diagonal_fisher`), all normalised the same
way, **summed over the tokens of a sequence and averaged over sequences**:

* ``empirical``: ``(1/N) Σ_n (∇ Σ_t m_t log p(x_{t+1} | x_≤t))²``: one backward per batch
  (hooks backend) or one per-sequence gradient (vmap);
* ``sampled``: the same with ``y_t`` drawn from ``p_θ(· | x_≤t)`` at every position (a generator
  seeded by ``(seed, batch index)``).  Given the data prefixes the draws are independent and
  ``E[∇ log p(y_t)] = 0``, so the cross terms between tokens vanish in expectation: it is an
  unbiased estimate of the expected Fisher below, at the cost of the empirical one;
* ``expected``: ``(1/N) Σ_n Σ_t m_t Σ_v p_tv (∇ log p_tv)²``: every token's gradient for every
  vocabulary entry, i.e. ``T·V`` gradient rows per sequence (one Jacobian per sequence through
  ``torch.func``).  Refused above :data:`EXPECTED_MAX_VOCAB` vocabulary entries.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MergelabError

IGNORE = -100
EXPECTED_MAX_VOCAB = 1024


def _causal_class_names() -> set[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return set()
    return {v for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if isinstance(v, str)}


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM: a ``*ForCausalLM`` class, or a class transformers registers for
    causal language modelling (``GPT2LMHeadModel``, ...)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in _causal_class_names()


def next_token_targets(inputs: Any) -> Tensor:
    """``(B, T)`` next-token targets of a batch dict with ``input_ids`` (and ``attention_mask``):
    ``y_t = x_{t+1}`` where both positions are real tokens, else :data:`IGNORE`."""
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise MergelabError("causal LM statistics: expected batches of token ids (a dict with "
                            "'input_ids', from text data), found "
                            f"{type(inputs).__name__ if not isinstance(inputs, dict) else ', '.join(inputs)}")
    ids = inputs["input_ids"].long()
    mask = inputs.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    y = torch.full_like(ids, IGNORE)
    ok = keep[:, 1:] & keep[:, :-1]
    y[:, :-1] = torch.where(ok, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
    return y


def sample_targets(logits: Tensor, targets: Tensor, seed: int, batch_index: int) -> Tensor:
    """Next tokens drawn from softmax(logits) at every position where ``targets`` has one,
    with a generator seeded by ``(seed, batch index)`` (as the classifier's sampled labels)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(batch_index))
    probs = torch.softmax(logits.detach().double().cpu(), -1)
    b, t, v = probs.shape
    draw = torch.multinomial(probs.reshape(b * t, v), 1, generator=g).view(b, t)
    out = torch.where(targets.cpu() == IGNORE, torch.full_like(draw, IGNORE), draw)
    return out.to(targets.device)


def target_seed(logp: Tensor, y: Tensor) -> Tensor:
    """The backward seed of ``Σ_t log p(y_t)``: one-hot at ``y_t`` where it is not ignored
    (works for ``(B, C)`` labels and ``(B, T, V)`` token targets alike)."""
    valid = (y != IGNORE)
    seed = torch.zeros_like(logp).scatter_(-1, y.clamp(min=0).unsqueeze(-1), 1.0)
    return seed * valid.unsqueeze(-1).to(seed.dtype)


def gather_logp(lp: Tensor, y: Tensor) -> Tensor:
    """``Σ log p(y)`` over the non-ignored targets (``lp``: ``(C,)`` or ``(T, V)``)."""
    valid = (y != IGNORE)
    picked = lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid.to(picked.dtype)).sum()


def check_expected(vocab: int) -> None:
    if vocab > EXPECTED_MAX_VOCAB:
        raise MergelabError(
            f"fisher mode 'expected' on a causal LM: vocabulary of {vocab} entries is more than "
            f"{EXPECTED_MAX_VOCAB} (it costs {vocab} gradient rows per token); use mode 'sampled' "
            f"(unbiased for it) or 'empirical'")


def max_positions(model: nn.Module) -> int | None:
    return config_positions(getattr(model, "config", None))


def config_positions(cfg: Any) -> int | None:
    """The position limit a config declares (None if it declares none)."""
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def prepare_tokenizer(tok: Any, where: str) -> Any:
    """A causal LM tokenizer that can pad a batch: its pad token, else its EOS token (padding is
    masked, so which token pads does not matter)."""
    if getattr(tok, "pad_token", None) is None:
        eos = getattr(tok, "eos_token", None)
        if eos is None:
            raise MergelabError(f"{where}: the tokenizer has neither a pad token nor an EOS token "
                                f"to pad batches with")
        tok.pad_token = eos
    return tok
