"""Helpers for the core tests: small HF-style checkpoints and test-only merge methods.

The checkpoints are written with the upstream ``safetensors`` library (independent of our
writer); the methods are registered under names starting with ``_core_`` so they never
collide with the built-in ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
from safetensors.torch import save_file

from mergelab.methods.registry import REGISTRY, Range, merge_method


def save_hf(folder, tensors: dict, config: dict | None = None, shards: int = 1) -> Path:
    """An HF model folder: config.json + model.safetensors (or ``shards`` shards + index)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy", "num_hidden_layers": 2}))
    (folder / "tokenizer_config.json").write_text("{}")
    names = list(tensors)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
        return folder
    per = -(-len(names) // shards)
    wm = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(folder / fn))
        wm.update({k: fn for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return folder


def toy_tensors(seed: int = 0, dtype=torch.float32, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {
        "embed.weight": torch.randn(11, 8, generator=g),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g),
        "layers.0.mlp.weight": torch.randn(16, 8, generator=g),
        "layers.0.mlp.bias": torch.randn(16, generator=g),
        "layers.1.attn.weight": torch.randn(8, 8, generator=g),
        "layers.1.mlp.weight": torch.randn(16, 8, generator=g),
        "layers.1.mlp.bias": torch.randn(16, generator=g),
        "norm.weight": torch.randn(8, generator=g),
    }
    t = {k: (v * scale).to(dtype) for k, v in t.items()}
    t["position_ids"] = torch.arange(5, dtype=torch.int64)
    return t


def variant(base: dict, seed: int, eps: float = 0.01) -> dict:
    """A fine-tune-like copy: base + seeded small deltas on floating tensors."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + eps * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


def toy_family(tmp, shards=1, dtype=torch.float32):
    """A base and two experts as HF folders under ``tmp``; returns (paths, tensors)."""
    base = toy_tensors(0, dtype)
    a, b = variant(base, 1), variant(base, 2)
    paths = [save_hf(Path(tmp) / n, t, shards=shards) for n, t in (("base", base), ("a", a), ("b", b))]
    return paths, (base, a, b)


def nothing_written(out) -> bool:
    out = Path(out)
    siblings = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.mergelab-")]
    return not out.exists() and not siblings


# ---------------------------------------------------------------- test-only merge methods
CALLS = {"count": 0, "fail_at": -1, "prepass_seen": []}


def _register():
    if "_core_wsum" in REGISTRY:
        return

    @merge_method("_core_wsum")
    def _core_wsum(tensors, base, *, weight: list[float] = 1.0, normalize: bool = False):
        out = sum(w * t for w, t in zip(weight, tensors))
        return out / sum(weight) if normalize else out

    @merge_method("_core_ta", needs_base=True)
    def _core_ta(tensors, base, *, weight: list[float] = 1.0,
                 density: Annotated[list[float], Range(0, 1, lo_open=True)] = 1.0, lambda_: float = 1.0):
        return base + lambda_ * sum(w * (t - base) for w, t in zip(weight, tensors))

    @merge_method("_core_boom")
    def _core_boom(tensors, base, *, fail_at: int = 3):
        CALLS["count"] += 1
        if CALLS["count"] == fail_at:
            raise RuntimeError("boom on purpose")
        return tensors[0]

    @merge_method("_core_seeded")
    def _core_seeded(tensors, base, *, ctx):
        g = torch.Generator().manual_seed(ctx.seed)
        return tensors[0] + torch.rand(tensors[0].shape, generator=g)

    def _scale_prepass(params, stream):
        m = 0.0
        for _ in range(2):  # the stream is re-iterable: a prepass may take several passes
            for ctx, base, tensors in stream:
                CALLS["prepass_seen"].append(ctx.name)
                m = max(m, float(tensors[0].abs().max()))
        return m

    @merge_method("_core_globalscale", prepass=_scale_prepass)
    def _core_globalscale(tensors, base, *, ctx):
        return tensors[0] / ctx.prepass

    @merge_method("_core_multi", needs_base=True, multi_output=True)
    def _core_multi(tensors, base, *, ctx):
        return {f"task{i}": base + (t - base) * 2 for i, t in enumerate(tensors)}

    @merge_method("_core_fisher", stats=("fisher",))
    def _core_fisher(tensors, base, *, ctx):
        f = ctx.stats["fisher"]
        num = sum(fi * t for fi, t in zip(f, tensors))
        return num / sum(f)


_register()
