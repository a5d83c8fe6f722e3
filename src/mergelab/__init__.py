"""mergelab: merge neural networks.

The public API is re-exported here; see the README for each name.
"""
__version__ = "0.1.0"

from .errors import MergelabError  # noqa: E402

__all__ = ["MergelabError", "__version__"]
