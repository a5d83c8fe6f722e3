"""``align:`` -- permutation alignment before the merge (docs/align.md)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .registry import Stage, StageContext, register


class AlignTransfer(BaseModel):
    """Non-local pipeline: ``foundation_b`` is matched to the reference and its permutation is
    applied to every expert fine-tuned from it."""
    model_config = ConfigDict(extra="forbid")
    foundation_b: str
    experts: list[str] = Field(min_length=1)


class AlignSection(BaseModel):
    """``align:`` -- permutation alignment run before the merge (see docs/align.md)."""
    model_config = ConfigDict(extra="forbid")
    method: Literal["weight", "activation"] = "weight"
    reference: str | None = None        # default: base_model, else the first model
    model_code: str | None = None       # MODULE:FACTORY for checkpoints that are not HF folders
    input_shape: list[int] | None = None
    data: str | None = None             # activation matching: a local data file or folder
    batch_size: int = Field(32, gt=0)
    max_iter: int = Field(100, gt=0)
    transfer: AlignTransfer | None = None
    device: str | None = None           # cpu, cuda or cuda:N (default: cpu)


def _check(section: AlignSection, ctx: StageContext) -> None:
    pass  # everything (the device too) is checked while it runs, before the merge writes anything


def _run(section: AlignSection, ctx: StageContext) -> dict:
    """The models the merge must read aligned: ``{reference as written: permuted view}``."""
    from ..align.pipeline import recipe_inputs

    return recipe_inputs(ctx.recipe, ctx.inputs)


def _inputs(a: AlignSection) -> list[tuple[str, object]]:
    out = [(k, getattr(a, k)) for k in ("reference", "data", "model_code") if getattr(a, k) is not None]
    if a.transfer is not None:
        out.append(("transfer.foundation_b", a.transfer.foundation_b))
        out += [(f"transfer.experts[{j}]", e) for j, e in enumerate(a.transfer.experts)]
    return out


STAGE = register(Stage("align", AlignSection, "before", _check, _run, inputs=_inputs))
