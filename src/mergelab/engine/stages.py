"""The engine's side of the recipe stages (:mod:`mergelab.stages`): run the ``before`` stages
while planning, check every stage before any work, run the ``after`` stages on the merged
folder inside the atomic output folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..stages import StageContext, stages
from ..stats import distributed


def _sections(recipe, phase: str | None = None):
    for s in stages(phase):
        sec = getattr(recipe, s.key, None)
        if sec is not None:
            yield s, sec


def before_merge(recipe, inputs: Mapping | None) -> dict:
    """Model references the merge reads through other objects (e.g. aligned views)."""
    inputs = dict(inputs or {})
    for s, sec in _sections(recipe, "before"):
        inputs.update(s.run(sec, StageContext(recipe, inputs=inputs)) or {})
    return inputs


def check(plan: Any) -> None:
    for s, sec in _sections(plan.recipe):
        s.check(sec, StageContext(plan.recipe, plan=plan))


def after_merge(plan: Any, folder: Path, *, shard_size: Any, quiet: bool) -> None:
    log = (lambda s: None) if quiet else print
    for s, sec in _sections(plan.recipe, "after"):
        s.run(sec, StageContext(plan.recipe, plan=plan, folder=folder, shard_size=shard_size, quiet=quiet, log=log))
        distributed.barrier()   # under torchrun: rank 0 wrote this stage's files before the next reads
