"""Variance-collapse repair: REPAIR (N-model targets) and TACT (per-task corrections).

The names resolve lazily (see ``mergelab._lazy``): the recipe reads the ``repair:``/``tact:``
section schemas from :mod:`mergelab.repair.pipeline` without loading the statistics passes.
"""
from __future__ import annotations

from .._lazy import lazy_names

__all__ = ["estimate_corrections", "can_fold", "fold_correction", "repair", "repair_target",
           "TaskConditionedModel", "load_corrections", "tact"]

lazy_names(__name__, {
    "estimate_corrections": ".correct", "can_fold": ".fold", "fold_correction": ".fold",
    "repair": ".repair", "repair_target": ".repair",
    "TaskConditionedModel": ".tact", "load_corrections": ".tact", "tact": ".tact",
})
