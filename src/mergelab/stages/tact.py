"""``tact:`` -- per-task corrections and folded per-task checkpoints, after the merge."""
from __future__ import annotations

from ..errors import MergelabError
from ..repair.pipeline import TactSection, check_data, check_single_output, resolved, run_tact
from ..device import resolve_device
from .registry import Stage, StageContext, register


def _check(section: TactSection, ctx: StageContext) -> None:
    check_single_output("tact", ctx.recipe, ctx.plan.method.multi_output)
    check_data("tact", ctx.recipe, [t.data for t in section.tasks.values()])
    resolve_device(section.device, "recipe: tact: device")
    if not section.tasks:
        raise MergelabError("recipe: tact: 'tasks' is empty")
    models = ctx.plan.models
    for task, t in section.tasks.items():
        if t.model not in models:
            raise MergelabError(f"recipe: tact: task '{task}': model '{t.model}' is not one of the recipe's "
                                f"models ({', '.join(models)})")


def _run(section: TactSection, ctx: StageContext) -> None:
    run_tact(resolved(ctx.recipe, section), ctx.folder, {k: v.ckpt for k, v in ctx.plan.models.items()},
             shard_size=ctx.shard_size, quiet=ctx.quiet, log=ctx.log,
             allow_nonfinite=ctx.recipe.allow_nonfinite)


def _inputs(section: TactSection) -> list[tuple[str, object]]:
    out = []
    for t, task in section.tasks.items():
        out += [(f"tasks.{t}.data", task.data), (f"tasks.{t}.model", task.model)]
    return out + [("model_code", section.model_code)]


STAGE = register(Stage("tact", TactSection, "after", _check, _run, order=20, inputs=_inputs))
