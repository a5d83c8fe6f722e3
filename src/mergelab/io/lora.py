"""PEFT LoRA adapters: read one applied to its base model lazily (``base+adapter`` inputs).

A PEFT adapter folder holds ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ``use_rslora``, ``fan_in_fan_out``, optional ``rank_pattern`` /
``alpha_pattern``) and ``adapter_model.safetensors`` (or ``adapter_model.bin``) with, per
targeted module ``M`` of the base model,

* ``base_model.model.M.lora_A.weight`` (r, in) and ``base_model.model.M.lora_B.weight`` (out, r)
  for a linear layer: ``W' = W + scale · B·A`` (transposed when ``fan_in_fan_out``: GPT-2's
  Conv1D stores W as (in, out));
* ``base_model.model.M.lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (dim, r) for an
  embedding: ``W' = W + scale · (B·A)ᵀ``;
* ``base_model.model.M.weight`` / ``.bias`` for full tensors (``modules_to_save``, trained
  biases): they replace the base's.

``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).  :class:`LoraCheckpoint`
is a Checkpoint-like view: each ``get``/``get_rows`` reads the base tensor (or its rows) and
the two small factors and adds the product in float32, so no whole model is ever built.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import MergelabError
from .reader import open_checkpoint

PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json switches that change the update formula: refused, not ignored
_REFUSED = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms"}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module name or its suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_adapter_config(folder: Path) -> dict:
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise MergelabError(f"{folder}: not a PEFT adapter (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
        assert isinstance(cfg, dict)
    except (OSError, ValueError, AssertionError):
        raise MergelabError(f"{cfg_path}: not a valid JSON object") from None
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise MergelabError(f"{cfg_path}: adapter type '{ptype}' is not supported (only LORA)")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise MergelabError(f"{cfg_path}: {what} adapters ({key}: true) are not supported (only plain LoRA)")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise MergelabError(f"{cfg_path}: '{key}' must be a positive number, found {cfg.get(key)!r}")
    return cfg


class LoraCheckpoint:
    """``base`` with the PEFT LoRA adapter in ``adapter`` applied, read tensor by tensor."""

    def __init__(self, base: Any, adapter: str | Path, label: str | None = None):
        self.base = base
        self.adapter_path = Path(adapter)
        folder = self.adapter_path
        if not folder.is_dir():
            raise MergelabError(f"{folder}: LoRA adapter folder not found")
        self.adapter_config = cfg = read_adapter_config(folder)
        wfile = next((folder / f for f in ADAPTER_FILES if (folder / f).is_file()), None)
        if wfile is None:
            raise MergelabError(f"{folder}: no adapter weights (expected {' or '.join(ADAPTER_FILES)})")
        self.weights = open_checkpoint(wfile)
        self.path = getattr(base, "path", None)
        self.config = getattr(base, "config", None)
        self.label = label or f"{getattr(base, 'path', 'base')}+{folder}"
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self._lora: dict[str, tuple[str, str, float, bool]] = {}   # base tensor -> (A, B, scale, transposed)
        self._full: dict[str, str] = {}                            # base tensor -> adapter tensor
        self._parse(wfile)

    def _parse(self, wfile: Path) -> None:
        cfg = self.adapter_config
        factors: dict[str, dict[str, str]] = {}
        for n in self.weights.keys():
            if not n.startswith(PREFIX):
                raise MergelabError(f"{wfile}: tensor '{n}' does not start with '{PREFIX}' (not a PEFT LoRA file)")
            rest = n[len(PREFIX):]
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?", rest)
            if m:
                factors.setdefault(m.group(1), {})[m.group(2)] = n
                continue
            if "lora_" in rest or "magnitude" in rest:
                raise MergelabError(f"{wfile}: tensor '{n}' is not a plain LoRA factor (unsupported adapter variant)")
            rest = rest.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            if rest not in self.base:
                raise MergelabError(f"{wfile}: tensor '{n}' replaces '{rest}', which is not in the base model {self.path}")
            if tuple(self.weights.shape(n)) != tuple(self.base.shape(rest)):
                raise MergelabError(f"{wfile}: tensor '{n}' has shape {tuple(self.weights.shape(n))} but '{rest}'"
                                    f" in the base model has {tuple(self.base.shape(rest))}")
            self._full[rest] = n
        for module, f in factors.items():
            emb = "lora_embedding_A" in f or "lora_embedding_B" in f
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            if a_key not in f or b_key not in f:
                missing = a_key if a_key not in f else b_key
                raise MergelabError(f"{wfile}: module '{module}' has no {missing} tensor")
            target = f"{module}.weight"
            if target not in self.base:
                raise MergelabError(f"{wfile}: LoRA target '{target}' is not in the base model {self.path}")
            A, B = f[a_key], f[b_key]
            sa, sb, sw = tuple(self.weights.shape(A)), tuple(self.weights.shape(B)), tuple(self.base.shape(target))
            if len(sa) != 2 or len(sb) != 2 or len(sw) != 2:
                raise MergelabError(f"{wfile}: module '{module}': only 2-D (linear, embedding) LoRA is supported,"
                                    f" found A {sa}, B {sb}, weight {sw}")
            transposed = emb or self.fan_in_fan_out
            want = (sw[1], sw[0]) if transposed else sw
            if sa[0] != sb[1] or (sb[0], sa[1]) != want:
                raise MergelabError(f"{wfile}: module '{module}': B·A has shape {(sb[0], sa[1])} (A {sa}, B {sb})"
                                    f" but '{target}' in the base model has shape {sw}")
            r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
            if sa[0] != r:
                raise MergelabError(f"{wfile}: module '{module}': factors of rank {sa[0]} but adapter_config.json says r = {r}")
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self._lora[target] = (A, B, float(scale), transposed)
        if not self._lora and not self._full:
            raise MergelabError(f"{wfile}: the adapter holds no LoRA tensors")

    # -- the Checkpoint interface -------------------------------------------------------
    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, name: str):
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    @property
    def metadata(self) -> dict:
        return dict(getattr(self.base, "metadata", {}) or {})

    @property
    def files(self) -> list[Path]:
        return list(getattr(self.base, "files", []) or []) + list(self.weights.files)

    @property
    def targets(self) -> list[str]:
        """The base tensors the adapter changes."""
        return list(self._lora) + list(self._full)

    def _delta(self, name: str, start: int | None, stop: int | None) -> torch.Tensor:
        A_key, B_key, scale, transposed = self._lora[name]
        A = self.weights.get(A_key).float()
        B = self.weights.get(B_key).float()
        if start is None:
            d = B @ A
            return (d.T if transposed else d) * scale
        # rows start:stop of the delta only: B[rows]·A, or (A[:, rows])ᵀ·Bᵀ when transposed
        d = A[:, start:stop].T @ B.T if transposed else B[start:stop] @ A
        return d * scale

    def get(self, name: str) -> torch.Tensor:
        if name in self._full:
            return self.weights.get(self._full[name])
        w = self.base.get(name)
        if name not in self._lora:
            return w
        return (w.float() + self._delta(name, None, None)).to(w.dtype)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self._full:
            return self.weights.get(self._full[name])[start:stop]
        w = self.base.get_rows(name, start, stop) if hasattr(self.base, "get_rows") else self.base.get(name)[start:stop]
        if name not in self._lora:
            return w
        n = self.base.shape(name)[0]
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(start, stop)
        return (w.float() + self._delta(name, start, stop)).to(w.dtype)

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.label!r}, {len(self._lora)} LoRA targets)"


def split_lora_ref(ref: str) -> tuple[str, str] | None:
    """mergekit's ``base+adapter`` model reference split in two (None when not of that form).

    A path that exists as given is never split (folder names may contain '+')."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    base, adapter = ref.rsplit("+", 1)
    if not base or not adapter:
        return None
    return base, adapter


def open_with_lora(base: str | Path, adapter: str | Path) -> LoraCheckpoint:
    """``base`` (any checkpoint path) with the PEFT adapter folder ``adapter`` applied."""
    if not Path(base).exists():
        raise MergelabError(f"{base}: no such file or folder (base model of '{base}+{adapter}')")
    return LoraCheckpoint(open_checkpoint(base), adapter, label=f"{base}+{adapter}")
