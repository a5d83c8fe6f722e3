"""Checkpoint I/O: lazy readers and the sharded atomic writer.

The names are resolved lazily (PEP 562) so that the light submodules (``io.outputs``, the
output guard the command installs before it parses arguments) do not import torch.
"""
from __future__ import annotations

import importlib

# The weight files of a model folder, in the order the reader looks for them: (file name, kind,
# is an index).  Without any of them, a folder's single ``*.safetensors`` file.  Shared by the
# reader (io/reader.py) and the checksums started before torch is imported (io/prehash.py).
WEIGHT_FILES = (
    ("model.safetensors.index.json", "safetensors", True),
    ("model.safetensors", "safetensors", False),
    ("pytorch_model.bin.index.json", "torch", True),
    ("pytorch_model.bin", "torch", False),
)

_LAZY = {
    **dict.fromkeys(["Checkpoint", "LazyState", "SafetensorsFile", "load_state", "open_checkpoint"],
                    ".reader"),
    **dict.fromkeys(["DEFAULT_SHARD_SIZE", "AtomicFolder", "ShardedWriter", "TensorSpec", "copy_model_files",
                     "parse_dtype", "parse_size", "save_state", "sha256_file", "write_model_card"], ".writer"),
}

__all__ = ["Checkpoint", "LazyState", "SafetensorsFile", "load_state", "open_checkpoint", "DEFAULT_SHARD_SIZE",
           "AtomicFolder", "ShardedWriter", "TensorSpec", "copy_model_files", "parse_dtype", "parse_size",
           "save_state", "sha256_file", "write_model_card"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
