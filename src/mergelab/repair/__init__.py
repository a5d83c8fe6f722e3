"""Variance-collapse repair: REPAIR (N-model targets) and TACT (per-task corrections)."""
from .correct import estimate_corrections
from .fold import can_fold, fold_correction
from .repair import repair, repair_target
from .tact import TaskConditionedModel, load_corrections, tact

__all__ = ["estimate_corrections", "can_fold", "fold_correction", "repair", "repair_target",
           "TaskConditionedModel", "load_corrections", "tact"]
