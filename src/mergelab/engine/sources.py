"""Where the engine reads tensors from: checkpoints on disk or state dicts in memory.

Both are "Checkpoint-like": ``keys()``, ``shape(name)``, ``dtype(name)``, ``get(name)``,
``name in ckpt``, optionally ``get_rows(name, start, stop)`` (row blocks) and ``metadata``.
:class:`StateCheckpoint` wraps an in-memory ``{name: tensor}`` so that ``merge_states`` and
``merge`` feed the same driver the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import MergelabError
from ..io.lora import open_with_lora, split_lora_ref
from ..io.reader import checkpoint_exists, open_checkpoint


@dataclass
class Input:
    label: str            # how messages (and multi-output variants) name it
    ckpt: Any             # a Checkpoint or Checkpoint-like object


class StateCheckpoint:
    """A Checkpoint-like view of an in-memory state dict (tensors are not copied)."""

    def __init__(self, state: Mapping[str, Any], label: str = "state", metadata: Mapping[str, str] | None = None):
        for k, v in state.items():
            if not isinstance(v, torch.Tensor):
                raise MergelabError(f"{label}: '{k}' is a {type(v).__name__}, expected a tensor")
        self.state = state
        self.label = label
        self.path = None
        self.config = None
        self.metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].detach()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.state[name].detach()[start:stop]

    def __contains__(self, name) -> bool:
        return name in self.state

    def __len__(self) -> int:
        return len(self.state)

    @property
    def device(self) -> torch.device:
        return next((v.device for v in self.state.values()), torch.device("cpu"))


def open_input(ref: Any, resolve, where: str, inputs: Mapping | None, cache: dict) -> Input:
    """A recipe model reference (path, name in ``inputs``, or Checkpoint-like object) opened once."""
    if inputs and isinstance(ref, str) and ref in inputs:
        ref = inputs[ref]
    if isinstance(ref, Mapping):
        ref = StateCheckpoint(ref, where)
    if not isinstance(ref, (str, os.PathLike)):
        for m in ("keys", "shape", "dtype", "get"):
            if not hasattr(ref, m):
                raise MergelabError(f"{where}: expected a checkpoint path, found {type(ref).__name__}")
        label = getattr(ref, "label", None) or getattr(ref, "path", None) or where
        return Input(str(label), ref)
    lora = split_lora_ref(str(ref))
    if lora is not None:  # mergekit's `base+adapter`: the PEFT adapter applied while reading
        base, adapter = (resolve(x) for x in lora)
        key = f"{Path(base).absolute()}+{Path(adapter).absolute()}"
        if key not in cache:
            cache[key] = Input(f"{base}+{adapter}", open_with_lora(base, adapter))
        return cache[key]
    path = resolve(ref)
    key = str(Path(path).absolute())
    if key not in cache:
        if not checkpoint_exists(path):
            raise MergelabError(f"{where}: {path}: no such file or folder")
        cache[key] = Input(str(path), open_checkpoint(path))
    return cache[key]


def folder_of(inp: Input) -> Path | None:
    """The folder of a checkpoint on disk (None for in-memory inputs)."""
    path = getattr(inp.ckpt, "path", None)
    if path is None:
        return None
    path = Path(path)
    return path if path.is_dir() else path.parent
