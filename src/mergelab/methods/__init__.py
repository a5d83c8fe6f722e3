"""Merge methods: pure per-tensor functions, registered by :func:`merge_method`."""
from .registry import REGISTRY, MethodSpec, Range, TensorContext, get_method, merge_method
from . import _load_all  # noqa: F401  registers the built-in methods

__all__ = ["REGISTRY", "MethodSpec", "Range", "TensorContext", "get_method", "merge_method"]
