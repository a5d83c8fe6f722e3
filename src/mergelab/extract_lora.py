"""``extract_lora(base, tuned, out, rank)``: a PEFT LoRA adapter approximating ``tuned − base``.

Streamed tensor by tensor: for every 2-D floating ``*.weight`` that differs, the truncated
SVD of ``Δ = tuned − base`` (float64 on the CPU) gives ``B = U_k·√S_k`` and ``A = √S_k·V_kᵀ``,
so ``B·A`` is the best rank-k approximation of Δ (Eckart–Young) and its relative Frobenius
error is ``sqrt(Σ_{i>k} σ_i²) / sqrt(Σ σ_i²)``.  Embeddings (names like ``embed_tokens``,
``wte``) become PEFT's ``lora_embedding_A/B`` (Δᵀ factored).  ``lora_alpha = r`` so the
scale is 1; layers smaller than ``r`` keep their full rank, recorded in ``rank_pattern`` and
``alpha_pattern``.  Other tensors that differ (norms, biases) are stored whole: biases of
LoRA targets with ``bias: lora_only``, the rest as ``modules_to_save``.  The output folder
(``adapter_config.json``, ``adapter_model.safetensors``, ``lora_report.json``) is written
atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import MergelabError
from .io.lora import PREFIX
from .io.reader import open_checkpoint
from .io.writer import AtomicFolder
from .recipe import PRE_LAYERS


@dataclass
class LayerReport:
    name: str
    rank: int
    full_rank: int
    rel_error: float     # ||Δ − B·A||_F / ||Δ||_F
    delta_norm: float    # ||Δ||_F


@dataclass
class ExtractResult:
    out: Path
    layers: list[LayerReport] = field(default_factory=list)
    full: list[str] = field(default_factory=list)   # tensors stored whole


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """``(B, A, rel_error, k)``: the rank-k SVD factors of ``delta`` (k = min(rank, full rank))."""
    d = delta.double()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, S.numel())
    total = float(S.pow(2).sum())
    tail = float(S[k:].pow(2).sum())
    root = S[:k].sqrt()
    B = U[:, :k] * root
    A = root[:, None] * Vh[:k]
    return B, A, (tail / total) ** 0.5 if total > 0 else 0.0, k


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, rank: int, *,
                 force: bool = False, dtype: str | None = None, progress=None) -> ExtractResult:
    """Write a PEFT LoRA adapter of rank ``rank`` for ``tuned`` relative to ``base`` into ``out``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergelabError(f"--rank: expected a positive integer, found {rank!r}")
    b, t = open_checkpoint(base), open_checkpoint(tuned)
    for n in b.keys():
        if n not in t:
            raise MergelabError(f"tensor '{n}' is in {base} but missing from {tuned}")
        if tuple(b.shape(n)) != tuple(t.shape(n)):
            raise MergelabError(f"tensor '{n}' has shape {tuple(b.shape(n))} in {base} but {tuple(t.shape(n))} in {tuned}")
    extra = [n for n in t.keys() if n not in b]
    if extra:
        raise MergelabError(f"tensor '{extra[0]}' is in {tuned} but missing from {base}")
    from .io.writer import parse_dtype
    store = parse_dtype(dtype, "--dtype") if dtype else None
    atomic = AtomicFolder(out, force, inputs=[("BASE", base), ("TUNED", tuned)], option="-o")

    res = ExtractResult(Path(out).expanduser().absolute())
    tensors: dict[str, torch.Tensor] = {}
    targets, embeds, rank_pattern = [], [], {}
    changed_other: list[str] = []
    for n in b.keys():
        if not b.dtype(n).is_floating_point:
            continue
        wb, wt = b.get(n), t.get(n)
        if torch.equal(wb, wt):
            continue
        if wb.dim() != 2 or not n.endswith(".weight"):
            changed_other.append(n)
            continue
        delta = wt.double() - wb.double()
        mod = _module(n)
        emb = bool(PRE_LAYERS.search(mod))
        Bf, Af, err, k = factor(delta.T if emb else delta, rank)
        sd = store or wt.dtype
        if emb:
            tensors[f"{PREFIX}{mod}.lora_embedding_A"] = Af.to(sd).contiguous()
            tensors[f"{PREFIX}{mod}.lora_embedding_B"] = Bf.to(sd).contiguous()
            embeds.append(mod)
        else:
            tensors[f"{PREFIX}{mod}.lora_A.weight"] = Af.to(sd).contiguous()
            tensors[f"{PREFIX}{mod}.lora_B.weight"] = Bf.to(sd).contiguous()
        targets.append(mod)
        if k != rank:
            rank_pattern[mod] = k
        rep = LayerReport(n, k, min(delta.shape), err, float(delta.norm()))
        res.layers.append(rep)
        if progress is not None:
            progress(rep)
    tset = set(targets)
    bias_mode = "none"
    saved_modules: list[str] = []
    for n in changed_other:
        mod = _module(n)
        if mod in tset and n.endswith(".bias"):
            bias_mode = "lora_only"
        elif mod not in saved_modules:
            saved_modules.append(mod)
    if bias_mode == "lora_only":  # PEFT then stores (and loads) the bias of every LoRA target
        for mod in targets:
            if f"{mod}.bias" in t:
                tensors[f"{PREFIX}{mod}.bias"] = t.get(f"{mod}.bias")
                res.full.append(f"{mod}.bias")
    for mod in saved_modules:
        for n in t.keys():
            if _module(n) == mod:
                tensors[f"{PREFIX}{n}"] = t.get(n)
                res.full.append(n)
    if not tensors:
        raise MergelabError(f"{tuned}: no tensor differs from {base}: nothing to extract")

    cfg = {
        "peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": bias_mode,
        "target_modules": sorted(tset), "modules_to_save": saved_modules or None,
        "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),   # scale 1 everywhere
        "base_model_name_or_path": str(Path(base).expanduser().absolute()), "inference_mode": True,
        "init_lora_weights": True, "revision": None,
    }
    report = {"base": str(base), "tuned": str(tuned), "rank": rank, "mergelab_version": __version__,
              "layers": [vars(x) for x in res.layers], "stored_whole": res.full}
    from safetensors.torch import save_file
    with atomic as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return res
