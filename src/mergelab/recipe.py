"""YAML merge recipes: a mergekit-compatible subset plus mergelab's own keys.

::

    models:
      - model: path/to/expert_a
        parameters: {weight: 0.6, density: 0.5}
      - model: path/to/expert_b
        parameters:
          weight: [{filter: mlp, value: 0.5}, {value: 1.0}]   # per-tensor rules
          density: [1.0, 0.5]                                 # gradient over layer depth
    merge_method: ties
    base_model: path/to/base
    parameters: {lambda: 1.0}
    dtype: bfloat16          # stored dtype (mergelab always computes in float32)
    seed: 0                  # mergelab: every random choice derives from it
    # weights: [0.6, 0.4]    # mergelab: one weight per entry of `models`
    align:                   # mergelab: permutation alignment before the merge (docs/align.md)
      method: weight         # weight | activation (needs data)
      reference: path/to/base            # default: base_model, else the first model
      model_code: mypkg.models:resnet20  # not needed for Hugging Face folders
      input_shape: [1, 3, 32, 32]        # example inputs for tracing

A parameter value, wherever it is (``parameters`` or ``models[i].parameters``), is a scalar,
a list of numbers (a gradient interpolated over layer depth, mergekit's semantics: layer
``i`` of ``L`` sits at ``t = i/(L-1)``; every tensor outside the layers (embeddings, final
norm, LM head) sits at ``t = 0``, as mergekit 0.1.5 plans them), or a
list of ``{filter, value}`` rules (the first rule whose ``filter`` is a substring of the
tensor name, or that has no filter / ``*``, applies).  Per-model values go in
``models[i].parameters`` (as in mergekit) or, for weights, in mergelab's ``weights`` list.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Optional, Union, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_validator

from .errors import MergelabError
from .stages import stages as _stages
from .stages.align import AlignSection, AlignTransfer  # noqa: F401  (re-exported)
from .repair.pipeline import RepairSection, TactSection, TactTask  # noqa: F401  (re-exported)

# mergekit keys we know and do not support: named in the error message
MERGEKIT_UNSUPPORTED = {
    "modules": "multi-module models", "merge_method_sequence": "method sequences",
}

Scalar = Union[bool, int, float, str]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[Union[int, float]]]


ParamValue = Union[Scalar, list[Union[int, float]], list[Rule], Rule]


def _none_is_empty(v: Any) -> Any:
    return {} if v is None else v


# a ``parameters`` mapping (recipe, model entry, slice, slice source): ``parameters:`` left empty
# in YAML (None) is an empty mapping.  An annotated type, not a shared base class, so the field
# keeps its place after ``model`` in dumps and error messages.
Params = Annotated[dict[str, ParamValue], BeforeValidator(_none_is_empty)]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    model: Any = Field(description="checkpoint path (or, from Python, a Checkpoint-like object)")
    parameters: Params = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One source of a slice: ``layer_range: [a, b]`` = the model's layers a..b-1."""
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    model: Any
    layer_range: tuple[int, int]
    parameters: Params = Field(default_factory=dict)


class SliceDef(BaseModel):
    """One output slice (mergekit's ``slices:`` entry); see slicing.py."""
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    parameters: Params = Field(default_factory=dict)


class TokenSourceSpec(BaseModel):
    """Where one token's embedding comes from: ``{kind: zero}`` or
    ``{kind: model_token, model: PATH, token: STR | token_id: INT}``."""
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    kind: str
    model: Any = None
    token: str | None = None
    token_id: int | None = None


class TokenSpec(BaseModel):
    """``tokenizer.tokens.<token>``: its embedding's source (a model path or a
    :class:`TokenSourceSpec`); ``force`` uses it for every model, not only those lacking it."""
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    source: Union[str, TokenSourceSpec, None] = None
    force: bool = False


class TokenizerSection(BaseModel):
    """mergekit's ``tokenizer:`` (see vocab/ and docs/llm.md)."""
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    source: str = "base"                     # base | union | model path (``model:PATH`` too)
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1)

    @field_validator("tokens", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return {} if v is None else {k: ({} if x is None else x) for k, x in v.items()}


class _RecipeCore(BaseModel):
    """A merge recipe (pydantic, unknown keys are errors); the stage sections (``align:``,
    ``repair:``, ``tact:``, ...) are added from the stage registry (:mod:`mergelab.stages`)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceDef] | None = None  # mergekit's layer slicing (slicing.py); instead of models
    merge_method: str
    base_model: Any = None
    parameters: Params = Field(default_factory=dict)
    dtype: str | None = None          # stored dtype (mergekit: compute dtype; we compute in float32)
    out_dtype: str | None = None      # stored dtype, wins over dtype
    # mergelab's own keys
    seed: int = 0
    weights: list[float] | None = None  # one weight per entry of `models` (sets its `weight`)
    allow_nonfinite: bool = False
    name: str | None = None           # a label for the model card
    device: str | None = None         # math device (cpu, cuda, cuda:1); --device / device= win
    # mergekit's tokenizer keys (vocab/): the output vocabulary and the rows of embeddings/LM head
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, src: "str | os.PathLike | dict | Recipe") -> "Recipe":  # noqa: F821
        """From a YAML path, a YAML string, a dict or a Recipe; relative model paths are
        resolved against the recipe file's folder when they do not exist from the cwd."""
        if isinstance(src, _RecipeCore):
            return src
        base_dir = source = None
        if not isinstance(src, (str, os.PathLike, dict)):
            from .errors import RecipeError
            raise RecipeError(f"recipe: expected a YAML path, YAML text, a dict or a Recipe, found "
                                f"{type(src).__name__}")
        if isinstance(src, dict):
            data = src
        else:
            text = None
            p = Path(src) if not (isinstance(src, str) and "\n" in src) else None
            if p is not None:
                if not p.is_file():
                    raise MergelabError(f"{p}: recipe file not found")
                text = p.read_text()
                base_dir = p.resolve().parent
                source = p
            else:
                text = src
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                at = f" at line {mark.line + 1}" if mark else ""
                raise MergelabError(f"{p or 'recipe'}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
            if not isinstance(data, dict):
                raise MergelabError(f"{p or 'recipe'}: expected a mapping at the top level, found {type(data).__name__}")
        where = str(src) if base_dir is not None else "recipe"
        for key in data:
            if key in MERGEKIT_UNSUPPORTED:
                raise MergelabError(
                    f"{where}: mergekit key '{key}' ({MERGEKIT_UNSUPPORTED[key]}) is not supported by mergelab")
        try:
            r = cls.model_validate(data)
        except ValidationError as e:
            raise MergelabError(f"{where}: {_one_line(e)}") from None
        r._base_dir = base_dir
        r._source = source
        return r

    def resolve_path(self, p: Any) -> Any:
        """A model reference as given, or a path made absolute (cwd first, then the recipe's folder)."""
        if not isinstance(p, (str, os.PathLike)):
            return p
        from .io.reader import checkpoint_exists  # path@key selects a sub-dict: see io/reader.py

        path = Path(p).expanduser()
        if checkpoint_exists(path) or path.is_absolute():
            return path
        bd = getattr(self, "_base_dir", None)
        if bd is not None and checkpoint_exists(bd / path):
            return bd / path
        return path

    def model_refs(self) -> list[tuple[str, Any]]:
        """``(where, reference)`` of every model the recipe names, in recipe order: the
        ``base_model`` first, then ``models[i].model`` or ``slices[i].sources[j].model``
        (mergekit's referenced models; a model named twice is listed twice)."""
        out = [("base_model", self.base_model)] if self.base_model is not None else []
        out += [(f"models[{i}].model", m.model) for i, m in enumerate(self.models)]
        for i, s in enumerate(self.slices or []):
            out += [(f"slices[{i}].sources[{j}].model", src.model) for j, src in enumerate(s.sources)]
        return out

    def input_paths(self, inputs: dict | None = None) -> list[tuple[str, Any]]:
        """``(label, path)`` of every file or folder the recipe reads: the recipe file, models,
        statistics files and other path-valued parameters, and the align/repair/tact inputs
        (data, model code).  Objects given in ``inputs`` count by their ``path``."""
        from .io.outputs import model_code_path

        out: list[tuple[str, Any]] = []
        bd = getattr(self, "_base_dir", None)
        src = getattr(self, "_source", None)
        if src is not None:
            out.append(("the recipe", src))

        def ref(label: str, v: Any, must_exist: bool = False) -> None:
            if isinstance(v, str) and inputs and v in inputs:
                v = inputs[v]
            if not isinstance(v, (str, os.PathLike)):
                v = getattr(v, "path", None)
                if v is None:
                    return
            p = self.resolve_path(v)
            if must_exist and not Path(p).exists():
                return
            if isinstance(v, str) and not Path(p).exists():
                from .io.lora import split_lora_ref
                parts = split_lora_ref(v)
                if parts is not None:  # `base+adapter`: both are read
                    out.extend((f"{label} ({what})", self.resolve_path(x)) for what, x in zip(("base", "adapter"), parts))
                    return
            out.append((label, p))

        def params(prefix: str, ps: dict) -> None:
            for k, v in ps.items():
                vals = v if isinstance(v, list) else [v]
                for x in vals:
                    x = getattr(x, "value", x)
                    if isinstance(x, str):  # a statistics file, or any value naming an existing path
                        ref(f"{prefix}.{k}", x, must_exist=True)

        def code(label: str, mc: str | None) -> None:
            p = model_code_path(mc)
            if p is None and mc and bd is not None:
                p = model_code_path(str(bd / mc)) if ":" in mc else None
            if p is not None:
                out.append((label, p))

        if self.base_model is not None:
            ref("base_model", self.base_model)
        for i, m in enumerate(self.models):
            ref(f"models[{i}].model", m.model)
            params(f"models[{i}].parameters", m.parameters)
        params("parameters", self.parameters)
        for sl_i, sl in enumerate(self.slices or []):
            for j, src in enumerate(sl.sources):
                ref(f"slices[{sl_i}].sources[{j}].model", src.model)
                params(f"slices[{sl_i}].sources[{j}].parameters", src.parameters)
            params(f"slices[{sl_i}].parameters", sl.parameters)
        tok = self.tokenizer
        src = self.tokenizer_source if self.tokenizer_source is not None else (tok.source if tok else None)
        if src not in (None, "base", "union"):
            ref("tokenizer.source", src[len("model:"):] if src.startswith("model:") else src, must_exist=True)
        for t, spec in (tok.tokens.items() if tok else ()):
            s = spec.source
            ref(f"tokenizer.tokens.{t}.source", s if isinstance(s, str) else getattr(s, "model", None), must_exist=True)
        for st in _stages():  # each stage names what its section reads
            section = getattr(self, st.key, None)
            if section is None:
                continue
            for label, v in st.inputs(section):
                if v is None:
                    continue
                if label.endswith("model_code"):
                    code(f"{st.key}.{label}", v)
                else:
                    ref(f"{st.key}.{label}", v)
        return out

    def to_yaml(self) -> str:
        d = self.model_dump(exclude_none=True, exclude_defaults=False, mode="python")

        def clean(x):
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items() if not (k == "filter" and v is None)}
            if isinstance(x, list):
                return [clean(v) for v in x]
            if isinstance(x, (str, int, float, bool)) or x is None:
                return x
            return str(getattr(x, "path", x))

        return yaml.safe_dump(clean(d), sort_keys=False)


def recipe_model() -> type:
    """The Recipe class: the core keys plus one optional section per registered stage."""
    cls = create_model("Recipe", __base__=_RecipeCore, __module__=__name__,
                       **{s.key: (Optional[s.schema], None) for s in _stages()})
    cls.__doc__ = _RecipeCore.__doc__
    return cls


Recipe = recipe_model()
_SECTIONS = {s.key: s.schema for s in _stages()}


def _model_at(cls, loc) -> Any:
    """The pydantic model class a validation error's ``loc`` path points into."""
    for part in loc:
        f = getattr(cls, "model_fields", {}).get(part) if isinstance(part, str) else None
        if f is None:
            continue  # a dict key (a task name) or a list index
        ann = f.annotation
        for _ in range(4):  # unwrap Optional / list / dict down to a model
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                break
            args = [a for a in get_args(ann) if a is not type(None)]
            if not args:
                break
            ann = args[-1]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
    return cls


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("list[", "union[", "Rule", "bool", "int", "float", "str")))
    if err["type"] == "extra_forbidden" and err["loc"][0] in _SECTIONS:
        where = err["loc"][:-1]
        cls = _model_at(Recipe, where)
        return (f"unknown key '{err['loc'][-1]}' in '{'.'.join(map(str, where))}' (supported: "
                + ", ".join(cls.model_fields) + ")")
    if err["type"] == "extra_forbidden":
        return f"unknown key '{err['loc'][-1]}'" + (f" in '{'.'.join(map(str, err['loc'][:-1]))}'" if len(err["loc"]) > 1 else "") + \
            f" (supported: {', '.join(Recipe.model_fields)})"
    if err["type"] == "missing":
        return f"missing key '{loc}'"
    return f"'{loc}': {err['msg']}"


# ------------------------------------------------------------------ per-tensor parameter values
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|block|encoder\.layer|decoder\.layer)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


# tensors before the layers (embeddings); every other tensor outside the layers comes after them
PRE_LAYERS = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|tok_embeddings)")


def layer_t(name: str, num_layers: int | None) -> float:
    """mergekit's depth coordinate: ``i/(L-1)`` for layer tensors (1 if L == 1); 0 outside the
    layers, before them (embeddings) and after them (final norm, LM head) alike: mergekit
    0.1.5's ``plan_module`` plans its pre- and post-layer weights with a ``ConfigReader`` at
    ``t = 0`` (a gradient's first value reaches the LM head, not its last)."""
    i = layer_index(name)
    if i is None or not num_layers:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


_UNSET = object()


def evaluate(value: Any, name: str, t: float) -> Any:
    """Resolve one recipe parameter value for the tensor ``name`` at depth ``t``.

    Returns ``_UNSET`` when a list of rules has no rule that applies.
    """
    if isinstance(value, Rule):
        value = [value]
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        if not value:
            return _UNSET
        if all(isinstance(v, Rule) for v in value):
            for rule in value:
                if rule.filter is None or rule.filter == "*" or rule.filter in name:
                    return evaluate(rule.value, name, t)
            return _UNSET
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            scaled = t * (len(value) - 1)
            i0 = int(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * value[i0] + frac * value[i1]
    raise MergelabError(f"parameter value {value!r} is neither a scalar, a gradient nor a list of rules")


def tensor_params(params: dict[str, Any], name: str, t: float) -> dict[str, Any]:
    """All parameters of one level (global or one model) resolved for one tensor."""
    out = {}
    for k, v in params.items():
        r = evaluate(v, name, t)
        if r is not _UNSET:
            out[k] = r
    return out


def is_static(params: dict[str, Any]) -> bool:
    """True when no value depends on the tensor (only scalars)."""
    return all(isinstance(v, (bool, int, float, str)) for v in params.values())


def load_recipe(src) -> Recipe:
    return Recipe.load(src)
