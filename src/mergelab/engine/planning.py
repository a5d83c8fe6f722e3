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


# config.json fields that must agree between merged checkpoints (unless allow_crimes)
ARCH_FIELDS = ("architectures", "model_type")
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "n_embd", "n_layer", "n_head")


def check_configs(ref: Input, others: Sequence[Input], allow_crimes: bool, skip: tuple[str, ...] = ()) -> None:
    """Refuse checkpoints whose config.json disagree on the architecture (``architectures``,
    ``model_type``) or on a shape field, naming both models and the field, unless
    ``allow_crimes`` (mergekit's name).  Missing configs or fields are not compared."""
    rc = getattr(ref.ckpt, "config", None)
    if not isinstance(rc, dict):
        return
    for o in others:
        oc = getattr(o.ckpt, "config", None)
        if o.ckpt is ref.ckpt or not isinstance(oc, dict):
            continue
        for f in ARCH_FIELDS + SHAPE_FIELDS:
            if f in skip or f not in rc or f not in oc or rc[f] == oc[f]:
                continue
            if allow_crimes and f in ARCH_FIELDS:
                continue
            hint = (" (pass --allow-crimes / allow_crimes=True to merge different architectures)"
                    if f in ARCH_FIELDS else " (checkpoints of different shapes cannot be merged)")
            raise MergelabError(f"config.json field '{f}' differs: {rc[f]!r} in {ref.label} but {oc[f]!r}"
                                f" in {o.label}{hint}")


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


def _expand_slices(r: Recipe, inputs: Mapping | None, allow_crimes: bool,
                   cache: dict[str, Input]) -> tuple[Recipe, Mapping | None]:
    """mergekit's ``slices:``: a plain recipe over per-slot layer views (see slicing.py)."""
    from ..slicing import expand
    seen: dict[int, Input] = {}

    def opener(ref, where):
        inp = open_input(ref, r.resolve_path, where, inputs, cache)
        seen.setdefault(id(inp.ckpt), inp)
        return inp.ckpt

    r2, inputs = expand(r, inputs, opener)
    srcs = list(seen.values())
    # every source model, also of single-source slices (layer counts may differ: stacking;
    # vocabulary sizes too when a tokenizer merge gives every model the output vocabulary)
    skip = ("num_hidden_layers", "n_layer") + (("vocab_size",) if section_given(r) else ())
    check_configs(srcs[0], srcs[1:], allow_crimes, skip=skip)
    return r2, inputs


def section_given(r: Recipe) -> bool:
    return r.tokenizer is not None or r.tokenizer_source is not None


def _expand_vocab(r: Recipe, inputs: Mapping | None, refs: list, cache: dict[str, Input]) -> tuple[Recipe, Mapping | None]:
    """mergekit's tokenizer keys: every input read through a vocabulary view (see vocab/).
    ``refs``: the models the recipe as written names (``Recipe.model_refs``), opened through
    ``cache``, the cache the slices rewrite opened them with (its views read those objects)."""
    from ..vocab import expand, resolve_chat_template, section
    from .sources import folder_of

    def opener(ref, where):
        return open_input(ref, r.resolve_path, where, inputs, cache)

    if section(r) is not None:
        r, inputs = expand(r, inputs, opener, folder_of, refs)
    if r.chat_template is not None:   # checked now: a bad value writes nothing
        folders = [folder_of(opener(ref, where)) for where, ref in refs]
        r._chat_template = resolve_chat_template(r.chat_template, [f for f in folders if f is not None])
    return r, inputs


def plan(recipe: Any, *, dtype: str | None = None, inputs: Mapping | None = None,
         names: Sequence[str] | None = None, allow_crimes: bool = False) -> Plan:
    """Validate a recipe against its checkpoints and resolve every tensor's parameters.

    ``names`` (optional) restricts the merge to those tensors of the reference, in that order;
    ``allow_crimes`` merges checkpoints whose config.json name different architectures."""
    r = Recipe.load(recipe)
    method = get_method(r.merge_method)
    refs = r.model_refs()             # the models as written (slices: every source)
    opened: dict[str, Input] = {}     # shared: the vocabulary views follow the slot views' checkpoints
    if r.slices is not None:
        r, inputs = _expand_slices(r, inputs, allow_crimes, opened)
    if section_given(r) or r.chat_template is not None:
        r, inputs = _expand_vocab(r, inputs, refs, opened)
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
    check_configs(ref, experts + ([base] if base is not None else []), allow_crimes)
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
