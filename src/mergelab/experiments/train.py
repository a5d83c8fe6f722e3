"""Training, evaluation and the expert cache.

* :func:`train` - a plain seeded loop (SGD+momentum or AdamW, warm-up + cosine schedule,
  gradient clipping) over batches drawn by a ``sampler(generator, batch_size)``.
* :func:`array_sampler`, :func:`text_sampler` - batch samplers for image arrays and texts.
* :func:`evaluate` - accuracy and mean cross-entropy in fixed-size batches (eval mode).
* :class:`ExpertCache` - trained models stored as safetensors under a hash of their config,
  so a rerun only re-merges.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..progress import progress
from .determinism import one_thread

Sampler = Callable[[torch.Generator, int], tuple[Any, torch.Tensor]]


def array_sampler(x: np.ndarray, y: np.ndarray) -> Sampler:
    """Uniformly sampled minibatches (with replacement across steps) from arrays."""
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)

    def sample(g: torch.Generator, bs: int):
        idx = torch.randint(len(yt), (bs,), generator=g)
        return xt[idx], yt[idx]
    return sample


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def text_sampler(tokenizer, texts: list[str], labels: np.ndarray, max_len: int = 64) -> Sampler:
    yt = torch.as_tensor(labels)

    def sample(g: torch.Generator, bs: int):
        idx = torch.randint(len(yt), (bs,), generator=g)
        return tokenize(tokenizer, [texts[i] for i in idx.tolist()], max_len), yt[idx]
    return sample


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train(model: nn.Module, sampler: Sampler, *, steps: int, batch_size: int = 128, lr: float = 0.05,
          optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4, warmup: int = 0,
          clip: float | None = 10.0, seed: int = 0, trainable: Callable[[str], bool] | None = None,
          quiet: bool = False, desc: str = "train", frozen_bn: bool = False) -> list[float]:
    """Train in place; returns the per-step losses. Deterministic given ``seed``: batches come
    from a generator seeded with it, and the steps run on one intra-op thread whatever the
    caller's thread count (a reduction over 2 threads sums in another order than over 1).
    ``frozen_bn``: BatchNorms normalise with their running statistics and do not update them
    (their affine parameters still train), as when fine-tuning a pre-trained CNN on small
    batches; experts fine-tuned so share the foundation's statistics buffers."""
    with one_thread():
        params = [p for n, p in model.named_parameters() if trainable is None or trainable(n)]
        for n, p in model.named_parameters():
            p.requires_grad_(trainable is None or trainable(n))
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        elif optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        g = torch.Generator().manual_seed(seed)
        model.train()
        if frozen_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        losses = []
        for step in progress(range(steps), desc=desc, disable=quiet):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            xb, yb = sampler(g, batch_size)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            losses.append(loss.item())
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        return losses


def batches(x, y, batch_size: int = 128) -> Iterator[tuple[Any, torch.Tensor]]:
    """Fixed-order batches of arrays (``x`` an array, or a dict of equal-length tensors)."""
    n = len(y)
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        xb = {k: v[sl] for k, v in x.items()} if isinstance(x, dict) else torch.as_tensor(x[sl])
        yield xb, torch.as_tensor(y[sl])


def text_batches(tokenizer, texts: list[str], labels: np.ndarray, batch_size: int = 64,
                 max_len: int = 64) -> Iterator[tuple[dict, torch.Tensor]]:
    for i in range(0, len(texts), batch_size):
        yield tokenize(tokenizer, texts[i:i + batch_size], max_len), torch.as_tensor(labels[i:i + batch_size])


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[tuple[Any, torch.Tensor]]) -> dict[str, float]:
    """{"acc": accuracy, "loss": mean cross-entropy, "n": examples} in eval mode."""
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for xb, yb in data:
        out = model(xb)
        correct += int((out.argmax(-1) == yb).sum())
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        n += len(yb)
    model.train(was)
    return {"acc": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}


@torch.no_grad()
def reset_bn_stats(model: nn.Module, data: Iterable[tuple[Any, torch.Tensor]]) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over ``data``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for xb, _ in data:
        model(xb)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


# ----------------------------------------------------------------------------- cache

# 2: one-thread training with pinned CPU kernels (determinism.py); splits hashed by their bytes
CACHE_VERSION = 2


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of ``config``, the cache format version, the torch version and
    the CPU kernels in use (each changes the trained weights)."""
    blob = json.dumps({"v": CACHE_VERSION, "torch": torch.__version__,
                       "kernels": torch.backends.cpu.get_cpu_capability(), **config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ExpertCache:
    """Trained models keyed by a hash of their config: ``<root>/<hash>/{model.safetensors, config.json, info.json}``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, config: dict) -> Path:
        return self.root / config_hash(config)

    def get_or_train(self, config: dict, build: Callable[[], nn.Module],
                     fit: Callable[[nn.Module], dict]) -> tuple[nn.Module, dict]:
        """Return (model, info). On a miss, ``model = build(); info = fit(model)`` then store."""
        d = self.path(config)
        model = build()
        if (d / "model.safetensors").is_file() and (d / "info.json").is_file():
            model.load_state_dict(load_file(str(d / "model.safetensors")))
            model.eval()
            self.hits += 1
            return model, json.loads((d / "info.json").read_text())
        self.misses += 1
        info = fit(model) or {}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(config, sort_keys=True, indent=1, default=str))
            (tmp / "info.json").write_text(json.dumps(info, sort_keys=True, indent=1, default=str))
            if d.exists():
                shutil.rmtree(d)
            os.replace(tmp, d)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        model.eval()
        return model, info
