"""The stage protocol: recipe sections that run before or after the merge.

A stage is one module of this package that registers one :class:`Stage`:

* ``key``: the recipe key (``align:``, ``repair:``, ``tact:``);
* ``schema``: the pydantic model of its section (unknown keys are errors); :mod:`mergelab.recipe`
  adds one optional field per registered stage;
* ``phase``: ``"before"`` (runs while the merge is planned; returns the model references it
  replaces, e.g. permuted views) or ``"after"`` (runs on the merged folder, inside the
  merge's atomic output folder, so a failing stage leaves nothing behind); ``order`` sorts
  stages of one phase;
* ``check(section, ctx)``: what can be checked before any work (raises ``MergelabError``);
* ``run(section, ctx)``: the work;
* ``inputs(section)``: ``(label, value)`` of every file or folder the section reads (models,
  data, ``model_code``), so that no output can be one of them (:meth:`Recipe.input_paths`).

Adding a stage is adding one file here (every module of the package is imported).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal


@dataclass
class StageContext:
    """What a stage sees.  ``recipe``: the loaded Recipe; ``inputs``: model references the merge
    reads through other objects (before); ``plan``: the engine's plan (``experts``, ``models``,
    ``method``; check and after); ``folder``: the merged model (after)."""

    recipe: Any
    inputs: dict = field(default_factory=dict)
    plan: Any = None
    folder: Path | None = None
    shard_size: Any = "5GB"
    quiet: bool = False
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class Stage:
    key: str
    schema: type
    phase: Literal["before", "after"]
    check: Callable[[Any, StageContext], None]
    run: Callable[[Any, StageContext], Any]
    order: int = 0
    inputs: Callable[[Any], list[tuple[str, Any]]] = lambda section: []


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if not stage.key.isidentifier() or stage.key.startswith("_"):
        raise ValueError(f"recipe stage key {stage.key!r}: expected an identifier not starting with '_'")
    if stage.key in STAGES:
        raise ValueError(f"recipe stage {stage.key!r} registered twice")
    STAGES[stage.key] = stage
    return stage


def stages(phase: str | None = None) -> list[Stage]:
    """Registered stages (of one phase), in run order."""
    from . import _load_all  # noqa: F401

    out = [s for s in STAGES.values() if phase is None or s.phase == phase]
    return sorted(out, key=lambda s: (s.phase != "before", s.order, s.key))
