"""Planning: a recipe validated against its checkpoints, every tensor's parameters resolved.

Everything that can be checked before work starts is checked here (recipe, parameters for
every tensor, files, names, shapes, stages), so a user error writes nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import MergelabError
from ..io.writer import parse_dtype
from ..methods.registry import MethodSpec, get_method
from ..recipe import Recipe
from . import stages
from .params import resolve_kwargs
from .sources import Input, open_input


@dataclass
class Plan:
    recipe: Recipe
    method: MethodSpec
    base: Input | None
    experts: list[Input]
    stats: dict[str, list[Input]]            # kind -> per-expert statistics source
    names: list[str]                          # every tensor, in output order
    merged: set[str]                          # names that go through the method (floating point)
    kwargs: dict[str, dict]                   # name -> resolved keyword params
    out_dtype: dict[str, torch.dtype]
    ref: Input
    models: dict[str, Input] = field(default_factory=dict)  # recipe models[].model -> input as read

    @property
    def readers(self) -> list[Input]:
        return ([self.base] if self.base is not None else []) + self.experts

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ref.ckpt.shape(name))


def _same_input(a: Any, b: Any, recipe: Recipe) -> bool:
    if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
        return Path(recipe.resolve_path(a)).absolute() == Path(recipe.resolve_path(b)).absolute()
    return a is b


def _fmt_shape(s) -> str:
    return str(tuple(int(x) for x in s))


def check_compatible(ref: Input, others: Sequence[Input], names: Sequence[str] | None = None) -> None:
    """Every input holds the reference's tensor names with the reference's shapes (only the
    tensors ``names`` when given: the others may differ, e.g. task heads)."""
    rkeys = ref.ckpt.keys() if names is None else list(names)
    rset = set(rkeys)
    for o in others:
        if o.ckpt is ref.ckpt:
            continue
        for n in rkeys:
            if n not in o.ckpt:
                raise MergelabError(f"tensor '{n}' is in {ref.label} but missing from {o.label}")
        if names is None:
            for n in o.ckpt.keys():
                if n not in rset:
                    raise MergelabError(f"tensor '{n}' is in {o.label} but missing from {ref.label}")
        for n in rkeys:
            a, b = tuple(ref.ckpt.shape(n)), tuple(o.ckpt.shape(n))
            if a != b:
                raise MergelabError(
                    f"tensor '{n}' has shape {_fmt_shape(a)} in {ref.label} but {_fmt_shape(b)} in {o.label}")


def _check_weights(r: Recipe) -> None:
    if r.weights is None:  # mergelab's per-model weight list: one value per entry of `models`
        return
    if len(r.weights) != len(r.models):
        raise MergelabError(
            f"recipe: 'weights' has {len(r.weights)} values but 'models' has {len(r.models)} entries"
            " (weight list of the wrong length)")
    for i, m in enumerate(r.models):
        if "weight" in m.parameters:
            raise MergelabError(f"recipe: models[{i}]: weight given twice (in 'weights' and in its parameters)")


def _open_stats(r: Recipe, method: MethodSpec, entries, inputs) -> tuple[dict[str, list[Input]], list[dict]]:
    """Per-model statistics sources, and each model's parameters without them."""
    stats: dict[str, list[Input]] = {k: [] for k in method.stats}
    model_params = []
    for i, m in entries:
        p = dict(m.parameters)
        if r.weights is not None:
            p["weight"] = r.weights[i]
        for kind in method.stats:
            if kind not in p:
                raise MergelabError(
                    f"recipe: models[{i}]: method '{method.name}' needs a '{kind}' statistics file per model")
            src = p.pop(kind)
            if not isinstance(src, str) and not hasattr(src, "get"):
                raise MergelabError(f"recipe: models[{i}]: '{kind}' must be the path of a statistics file")
            st = open_input(src, r.resolve_path, f"models[{i}].parameters.{kind}", inputs, {})
            found = (getattr(st.ckpt, "metadata", None) or {}).get("mergelab_kind")
            if found is not None and found != kind:
                raise MergelabError(f"{st.label}: statistics file of kind '{found}', expected '{kind}'")
            stats[kind].append(st)
            p[kind] = f"<{kind}>"  # resolve() expects the key and passes it over
        model_params.append(p)
    return stats, model_params


def plan(recipe: Any, *, dtype: str | None = None, inputs: Mapping | None = None,
         names: Sequence[str] | None = None) -> Plan:
    """Validate a recipe against its checkpoints and resolve every tensor's parameters.

    ``names`` (optional) restricts the merge to those tensors of the reference, in that order."""
    r = Recipe.load(recipe)
    method = get_method(r.merge_method)
    inputs = stages.before_merge(r, inputs)   # align: the models it moves are read through permuted views
    if not r.models:
        raise MergelabError("recipe: 'models' is empty")
    cache: dict[str, Input] = {}
    base = open_input(r.base_model, r.resolve_path, "base_model", inputs, cache) if r.base_model is not None else None
    if method.needs_base and base is None:
        raise MergelabError(f"recipe: method '{method.name}' needs a base_model")
    _check_weights(r)
    entries = list(enumerate(r.models))
    if method.needs_base:  # mergekit: the base listed among the models is not an expert
        entries = [(i, m) for i, m in entries if not _same_input(m.model, r.base_model, r)]
    experts = [open_input(m.model, r.resolve_path, f"models[{i}].model", inputs, cache) for i, m in entries]
    stats, model_params = _open_stats(r, method, entries, inputs)

    ref = base if base is not None else experts[0] if experts else None
    if ref is None:
        raise MergelabError("recipe: no model to merge besides the base_model")
    if names is not None:
        missing = [n for n in names if n not in ref.ckpt]
        if missing:
            raise MergelabError(f"tensor '{missing[0]}' is not in {ref.label}")
    check_compatible(ref, experts + ([base] if base is not None else []), names)
    all_names = ref.ckpt.keys() if names is None else list(names)
    merged = {n for n in all_names if ref.ckpt.dtype(n).is_floating_point}

    forced = (parse_dtype(dtype, "--dtype") or parse_dtype(r.out_dtype, "recipe: out_dtype")
              or parse_dtype(r.dtype, "recipe: dtype"))
    out_dtype = {n: (forced if (forced is not None and n in merged) else ref.ckpt.dtype(n)) for n in all_names}
    kwargs = resolve_kwargs(method, dict(r.parameters), model_params, [n for n in all_names if n in merged], ref.ckpt)
    if not experts:
        method.resolve({}, [], where="recipe")  # raises the method's "takes at least N models"
    models = {str(m.model): open_input(m.model, r.resolve_path, f"models[{i}].model", inputs, cache)
              for i, m in enumerate(r.models) if isinstance(m.model, (str, os.PathLike))}
    p = Plan(r, method, base, experts, stats, list(all_names), merged, kwargs, out_dtype, ref, models)
    stages.check(p)
    return p
