"""Backward-compatible home of ``merge`` and ``plan``: the engine lives in :mod:`mergelab.engine`."""
from .engine import MergeResult, merge, plan, tensor_seed
from .engine.driver import DEFAULT_BLOCK_SIZE, Driver
from .io.finite import nonfinite as _nonfinite  # noqa: F401

__all__ = ["merge", "plan", "MergeResult", "tensor_seed", "Driver", "DEFAULT_BLOCK_SIZE"]
