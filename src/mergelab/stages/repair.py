"""``repair:`` -- REPAIR folded into the merged weights, after the merge (docs/core.md)."""
from __future__ import annotations

from ..repair.pipeline import RepairSection, check_data, check_single_output, resolved, run_repair
from ..device import resolve_device
from .registry import Stage, StageContext, register


def _check(section: RepairSection, ctx: StageContext) -> None:
    check_single_output("repair", ctx.recipe, ctx.plan.method.multi_output)
    check_data("repair", ctx.recipe, [section.data])
    resolve_device(section.device, "recipe: repair: device")


def _run(section: RepairSection, ctx: StageContext) -> None:
    run_repair(resolved(ctx.recipe, section), ctx.folder, [(e.label, e.ckpt) for e in ctx.plan.experts],
               shard_size=ctx.shard_size, quiet=ctx.quiet, log=ctx.log,
               allow_nonfinite=ctx.recipe.allow_nonfinite)


def _inputs(section: RepairSection) -> list[tuple[str, object]]:
    return [("data", section.data), ("model_code", section.model_code)]


STAGE = register(Stage("repair", RepairSection, "after", _check, _run, order=10, inputs=_inputs))
