"""Diagonal Fisher information with per-example gradients from ``torch.func``.

    F = (1/N) Σ_n E_y[(∇_θ log p_θ(y | x_n))²]

* ``mode="expected"`` (default, the Fisher-merging paper's choice): the exact expectation
  over the model's predictive distribution, Σ_y p(y|x) g_y², with all C per-class gradients of
  an example from one ``jacrev`` (C backward passes' worth of work per example);
* ``mode="sampled"``: one label per example drawn from p(y|x), with a generator seeded by
  ``(seed, batch index)``, so the draw does not depend on the number of processes;
* ``mode="empirical"``: the true labels of the batch.

Per-example gradients are ``vmap`` over ``grad``/``jacrev`` of a ``functional_call``, in chunks
of ``chunk_size`` gradient rows, never a Python loop over examples.  The model runs in eval
mode.  Logits must be ``(batch, classes)``.  Sums are float64; the result is float32.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from tqdm.auto import tqdm

from ..errors import MergelabError
from . import distributed
from .activations import eval_no_grad
from .batch import batch_len, call_model, logits_of, model_device, split_batch, take, to_device

MODES = ("expected", "sampled", "empirical")


class Fisher(dict):
    """``{parameter name: diagonal Fisher (float32, same shape)}`` with ``.mode``, ``.n_examples``."""

    def __init__(self, tensors: dict[str, Tensor], mode: str, n_examples: int):
        super().__init__(tensors)
        self.mode, self.n_examples = mode, n_examples

    def save(self, path: str | Path) -> None:
        if not distributed.is_writer():
            return
        save_file({k: v.contiguous() for k, v in self.items()}, str(path),
                  metadata={"mergelab_kind": "fisher", "mode": self.mode,
                            "n_examples": str(self.n_examples)})


def sample_labels(logits: Tensor, seed: int, batch_index: int) -> Tensor:
    """Labels drawn from softmax(logits) with a generator seeded by (seed, batch index)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(batch_index))
    probs = torch.softmax(logits.detach().double().cpu(), -1)
    return torch.multinomial(probs, 1, generator=g)[:, 0].to(logits.device)


def _unsqueeze(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.unsqueeze(0)
    return {k: (v.unsqueeze(0) if isinstance(v, Tensor) else v) for k, v in inputs.items()}


@contextlib.contextmanager
def _vmap_compatible(model: nn.Module):
    """Make Hugging Face models (top-level or wrapped) run under vmap for the pass.

    * Their mask builders may skip the mask after checking ``padding_mask.all()``, a
      data-dependent branch vmap rejects: for the pass, always build the mask (same result).
    * PyTorch has no vmap rule for the fused SDPA backward on CPU (it falls back to a slow
      per-example loop); "eager" attention computes the same thing with plain ops."""
    configs = []
    seen = set()
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen and getattr(c, "_attn_implementation", None) == "sdpa":
            seen.add(id(c))
            configs.append(c)
    mu = sys.modules.get("transformers.masking_utils")
    patched = {}
    if mu is not None:
        for name in ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa"):
            if hasattr(mu, name):
                patched[name] = getattr(mu, name)
                setattr(mu, name, lambda *a, **k: False)
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"
        for name, f in patched.items():
            setattr(mu, name, f)


def diagonal_fisher(model: nn.Module, data: Iterable[Any],
                    mode: Literal["expected", "sampled", "empirical"] = "expected",
                    n_examples: int | None = None, seed: int = 0, *,
                    params: Sequence[str] | None = None, chunk_size: int = 64,
                    shard: bool = True, progress: bool = True) -> Fisher:
    """Diagonal Fisher of every trainable parameter (or of ``params``), over at most
    ``n_examples`` examples of ``data`` (all by default).  See the module docstring."""
    if mode not in MODES:
        raise MergelabError(f"fisher mode: expected one of {', '.join(MODES)}, found '{mode}'")
    if n_examples is not None and n_examples <= 0:
        raise MergelabError(f"fisher n_examples: expected a positive number, found {n_examples}")
    all_params = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in all_params.items() if p.requires_grad]
    else:
        names = list(params)
        bad = [n for n in names if n not in all_params]
        if bad:
            raise MergelabError(f"fisher params: model has no parameter '{bad[0]}'")
    if not names:
        raise MergelabError("fisher: the model has no trainable parameter")
    device = model_device(model)
    train = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in train}
    frozen.update(dict(model.named_buffers()))

    def logp(p: dict[str, Tensor], inputs: Any) -> Tensor:
        x = _unsqueeze(inputs)
        if isinstance(x, dict):
            out = functional_call(model, {**frozen, **p}, args=(), kwargs=x)
        else:
            out = functional_call(model, {**frozen, **p}, (x,))
        return torch.log_softmax(logits_of(out)[0].float(), -1)

    def logp_y(p, inputs, y):
        return logp(p, inputs).gather(0, y.reshape(1))[0]

    def logp_aux(p, inputs):
        lp = logp(p, inputs)
        return lp, lp.detach()

    sums = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in train.items()}
    seen = torch.zeros((), dtype=torch.float64)
    rank, world = distributed.rank_world() if shard else (0, 1)
    offset = 0
    bar = tqdm(total=n_examples, desc=f"fisher ({mode})", unit="ex", leave=False,
               disable=not progress or not distributed.is_writer())
    with eval_no_grad(model), _vmap_compatible(model):
        for i, batch in enumerate(data):
            if n_examples is not None and offset >= n_examples:
                break
            inputs, labels, _ = split_batch(batch)
            b = batch_len(inputs)
            keep = b if n_examples is None else min(b, n_examples - offset)
            offset += b
            if i % world != rank:
                continue
            inputs = to_device(take(inputs, slice(0, keep)), device)
            if mode == "empirical":
                if labels is None:
                    raise MergelabError("fisher mode 'empirical' needs labels in the batch, found none")
                y = labels[:keep].to(device).long()
            elif mode == "sampled":
                y = sample_labels(logits_of(call_model(model, inputs)), seed, i)
            with torch.enable_grad():
                _accumulate(sums, logp_y, logp_aux, train, inputs, None if mode == "expected" else y,
                            keep, chunk_size, lambda x: call_model(model, take(x, slice(0, 1))))
            seen += keep
            bar.update(keep)
    bar.close()
    distributed.all_reduce_sum(list(sums.values()) + [seen])
    if seen.item() == 0:
        raise MergelabError("fisher: the data yielded no example")
    return Fisher({n: (s / seen).float() for n, s in sums.items()}, mode, int(seen.item()))


def _accumulate(sums, logp_y, logp_aux, train, inputs, y, n, chunk_size, call_model_one):
    if y is not None:
        per_grad = vmap(grad(logp_y), in_dims=(None, 0, 0))
        for s in range(0, n, chunk_size):
            sl = slice(s, min(n, s + chunk_size))
            g = per_grad(train, take(inputs, sl), y[sl])
            for k, v in g.items():
                sums[k] += v.detach().square().sum(0, dtype=torch.float64)
        return
    per_jac = vmap(jacrev(logp_aux, has_aux=True), in_dims=(None, 0))
    with torch.no_grad():
        n_classes = logits_of(call_model_one(inputs)).shape[-1]
    step = max(1, chunk_size // n_classes)              # gradient rows per chunk: B*C <= chunk_size
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        jac, lp = per_jac(train, take(inputs, sl))
        if lp.ndim != 2:
            raise MergelabError(f"fisher: expected logits of shape (batch, classes), found "
                                f"{tuple(lp.shape)[1:]} per example")
        p = lp.exp()                                    # (B, C)
        for k, v in jac.items():                        # v: (B, C, *shape)
            w = p.view(p.shape + (1,) * (v.ndim - 2))
            sums[k] += (v.detach().square() * w).sum((0, 1), dtype=torch.float64)
