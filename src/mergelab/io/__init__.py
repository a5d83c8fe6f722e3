"""Checkpoint I/O: lazy readers and the sharded atomic writer."""
from .reader import Checkpoint, LazyState, SafetensorsFile, load_state, open_checkpoint
from .writer import (DEFAULT_SHARD_SIZE, AtomicFolder, ShardedWriter, TensorSpec, copy_model_files,
                     parse_dtype, parse_size, save_state, sha256_file, write_model_card)

__all__ = ["Checkpoint", "LazyState", "SafetensorsFile", "load_state", "open_checkpoint", "DEFAULT_SHARD_SIZE",
           "AtomicFolder", "ShardedWriter", "TensorSpec", "copy_model_files", "parse_dtype", "parse_size",
           "save_state", "sha256_file", "write_model_card"]
