"""Recipe stages (align, repair, tact, ...): one module per stage, one protocol (registry.py)."""
from .registry import STAGES, Stage, StageContext, register, stages

__all__ = ["STAGES", "Stage", "StageContext", "register", "stages"]
