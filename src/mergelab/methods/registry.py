"""The merge-method registry.

A merge method is a pure function over the tensors of ONE parameter name::

    @merge_method("ties", needs_base=True)
    def ties(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
             weight: Annotated[list[float], Range(None, None)] = 1.0,
             density: Annotated[list[float], Range(0, 1, lo_open=True)] = 1.0,
             lambda_: float = 1.0,
             majority: Literal["mass", "frequency"] = "mass") -> Tensor: ...

* ``tensors`` are the experts' tensors (float32, same shape), ``base`` the base model's
  tensor (or ``None`` when the recipe has no base and the method does not need one).
* Keyword-only parameters are the recipe parameters.  The decorator reads the signature:
  ``list[...]`` means per-model (one value per expert, given in ``models[i].parameters`` or
  as a global default), a scalar annotation means global.  ``Annotated[..., Range(...)]``
  bounds a number, ``Literal[...]`` restricts choices.  A trailing underscore is dropped in
  the recipe key (``lambda_`` is ``lambda`` in YAML).
* ``ctx`` (optional) is a :class:`TensorContext`: the tensor name, the per-tensor seed
  (``seeds.context_seed(recipe_seed, name)``; ``ctx.model_seed(i)`` per model), the
  result of the method's prepass, and per-model statistics tensors (Fisher, Gram) when the
  method declares ``stats=("fisher",)``.
* A method returns one tensor, or with ``multi_output=True`` a dict ``{variant: tensor}``
  (for example one masked model per task); the engine writes one folder per variant.
* ``prepass(params, stream)`` (optional) sees every ``(ctx, base, tensors)`` once before the
  merge, for whole-model quantities such as global top-k thresholds; its result is
  ``ctx.prepass``.
* ``elementwise=True`` promises that output entry j depends only on entry j of the inputs
  and of their statistics tensors of the same shape (given the parameters, ``ctx.prepass``
  and ``ctx.tensor_state``): the engine may then call the method on row blocks of a
  big tensor (``ctx.offset`` = flat index of the block's first entry, ``ctx.numel`` = the
  whole tensor's), so memory stays a constant whatever the model size.  Random choices must
  depend on the absolute entry index (see ``sparse.dare_keep``), not on the block.
* ``tensor_prepass(params, blocks)`` (optional, with ``elementwise``) computes a per-tensor
  state before the blocks of that tensor are merged (e.g. TIES' per-tensor top-k threshold):
  ``blocks()`` restarts a stream of ``(ctx, base_block, tensor_blocks)`` in order; the result
  is ``ctx.tensor_state``, and the blocks of one tensor are then merged in order, in one
  thread.  Called on a whole tensor (``ctx.tensor_state is None``), the method computes it.

Methods never open files; the engine feeds them (``mergelab.engine.driver``).  Methods run on
the device of their inputs (``ctx.device``): every tensor they create is made with
``*_like`` or ``device=`` the input's device, never a hard-coded CPU.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence, get_args, get_origin

from ..errors import MergelabError

_MISSING = inspect.Parameter.empty


@dataclass(frozen=True)
class Range:
    """Numeric bounds for a parameter; ``None`` means unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        if self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)):
            return False
        return True

    def __str__(self) -> str:
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open or self.lo is None else '['}{lo}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


@dataclass
class TensorContext:
    """What a method may know besides the tensors themselves."""

    name: str = ""
    seed: int = 0
    prepass: Any = None
    stats: dict[str, list[Any]] = field(default_factory=dict)  # kind -> per-model tensors
    model_names: Sequence[str] = ()
    offset: int = 0                 # flat index of the first entry when called on a row block
    numel: int | None = None        # entries of the whole tensor (None: the call sees all of it)
    tensor_state: Any = None        # the result of the method's tensor_prepass for this tensor
    device: Any = None              # the math device (where the inputs are; None: the inputs' device)

    def model_seed(self, index: int) -> int:
        """The seed of model ``index`` for this tensor (``seeds.tensor_seed(ctx.seed, name, index)``)."""
        from .seeds import tensor_seed

        return tensor_seed(self.seed, self.name, index)


@dataclass(frozen=True)
class ParamSpec:
    name: str           # the recipe key
    arg: str            # the Python keyword
    per_model: bool
    kind: type          # float, int, bool or str
    default: Any = _MISSING
    range: Range | None = None
    choices: tuple | None = None

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def check(self, value: Any, where: str) -> Any:
        """Coerce and validate one scalar value; raise a one-line MergelabError."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise MergelabError(f"{where}: parameter '{self.name}' expects true/false, found {value!r}")
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MergelabError(f"{where}: parameter '{self.name}' expects a number, found {value!r}")
            if self.kind is int and float(value) != int(value):
                raise MergelabError(f"{where}: parameter '{self.name}' expects an integer, found {value!r}")
            value = self.kind(value)
            if value != value:
                raise MergelabError(f"{where}: parameter '{self.name}' is NaN")
            if self.range is not None and not self.range.contains(value):
                raise MergelabError(
                    f"{where}: parameter '{self.name}' must be in {self.range}, found {value:g}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise MergelabError(f"{where}: parameter '{self.name}' expects a string, found {value!r}")
            if self.choices is not None and value not in self.choices:
                raise MergelabError(
                    f"{where}: parameter '{self.name}' must be one of {', '.join(map(str, self.choices))}; found {value!r}")
            return value
        raise AssertionError(self.kind)


@dataclass
class MethodSpec:
    name: str
    fn: Callable[..., Any]
    needs_base: bool
    params: dict[str, ParamSpec]
    stats: tuple[str, ...] = ()
    multi_output: bool = False
    prepass: Callable[[dict, Iterable], Any] | None = None
    min_models: int = 1
    max_models: int | None = None
    doc: str = ""
    elementwise: bool = False
    tensor_prepass: Callable[[dict, Callable[[], Iterable]], Any] | None = None

    def resolve(self, global_params: dict[str, Any], model_params: Sequence[dict[str, Any]],
                where: str = "recipe") -> dict[str, Any]:
        """Validate recipe parameters (scalars) and return the keyword arguments.

        ``global_params``: the recipe's top-level ``parameters``; ``model_params``: each
        model's ``parameters``.  Per-model parameters become lists of length N (a global
        value is the default for every model); ``stats`` keys in per-model parameters are
        passed through untouched (the engine resolves them to files).
        """
        n = len(model_params)
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = (f"exactly {self.min_models}" if self.max_models == self.min_models
                    else f"at least {self.min_models}" if self.max_models is None
                    else f"{self.min_models} to {self.max_models}")
            raise MergelabError(f"{where}: method '{self.name}' takes {want} models, found {n}")
        for key in global_params:
            if key not in self.params:
                raise MergelabError(
                    f"{where}: unknown parameter '{key}' for method '{self.name}'"
                    f" (known: {', '.join(sorted(self.params)) or 'none'})")
        for i, mp in enumerate(model_params):
            for key in mp:
                if key in self.stats:
                    continue
                if key not in self.params:
                    raise MergelabError(
                        f"{where}: models[{i}]: unknown parameter '{key}' for method '{self.name}'"
                        f" (known: {', '.join(sorted(set(self.params) | set(self.stats))) or 'none'})")
                if not self.params[key].per_model:
                    raise MergelabError(
                        f"{where}: models[{i}]: parameter '{key}' of method '{self.name}' is global;"
                        " set it under the top-level 'parameters'")
            for key in self.stats:
                if key not in mp:
                    raise MergelabError(
                        f"{where}: models[{i}]: method '{self.name}' needs a '{key}' statistics file per model")
        kwargs: dict[str, Any] = {}
        for p in self.params.values():
            if p.per_model:
                if isinstance(global_params.get(p.name), list):
                    vals = global_params[p.name]
                    if len(vals) != n:
                        raise MergelabError(
                            f"{where}: parameter '{p.name}' has {len(vals)} values, expected {n} (one per model)")
                    vals = [p.check(v, where) for v in vals]
                else:
                    vals = []
                    for i, mp in enumerate(model_params):
                        v = mp.get(p.name, global_params.get(p.name, p.default))
                        if v is _MISSING:
                            raise MergelabError(f"{where}: models[{i}]: missing required parameter '{p.name}'")
                        vals.append(p.check(v, f"{where}: models[{i}]"))
                kwargs[p.arg] = vals
            else:
                v = global_params.get(p.name, p.default)
                if v is _MISSING:
                    raise MergelabError(f"{where}: method '{self.name}' needs parameter '{p.name}'")
                kwargs[p.arg] = p.check(v, where)
        return kwargs

    def __call__(self, tensors, base=None, ctx: TensorContext | None = None, **kwargs):
        if self.needs_base and base is None:
            raise MergelabError(f"method '{self.name}' needs a base_model")
        if self._takes_ctx:
            kwargs["ctx"] = ctx if ctx is not None else TensorContext()
        return self.fn(list(tensors), base, **kwargs)

    @property
    def _takes_ctx(self) -> bool:
        # called once per tensor or row block: inspect.signature is slow, so remember the
        # answer per function (a spec whose ``fn`` is replaced asks again)
        fn = self.fn
        cached = self.__dict__.get("_ctx_cache")
        if cached is None or cached[0] is not fn:
            cached = (fn, "ctx" in inspect.signature(fn).parameters)
            self.__dict__["_ctx_cache"] = cached
        return cached[1]


REGISTRY: dict[str, MethodSpec] = {}


def _param_from_annotation(pname: str, ann: Any, default: Any) -> ParamSpec:
    rng = None
    if get_origin(ann) is typing.Annotated:
        ann, *meta = get_args(ann)
        for m in meta:
            if isinstance(m, Range):
                rng = m
    per_model = False
    if get_origin(ann) in (list, Sequence, typing.Sequence) or ann is list:
        per_model = True
        (ann,) = get_args(ann) or (float,)
    choices = None
    if get_origin(ann) is Literal:
        choices = get_args(ann)
        ann = type(choices[0])
    if get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        ann = args[0]
    if ann not in (float, int, bool, str):
        raise TypeError(f"parameter {pname}: unsupported annotation {ann!r}")
    return ParamSpec(name=pname.rstrip("_"), arg=pname, per_model=per_model, kind=ann,
                     default=default, range=rng, choices=choices)


def merge_method(name: str | None = None, *, needs_base: bool = False, stats: tuple[str, ...] = (),
                 multi_output: bool = False, prepass: Callable | None = None,
                 min_models: int = 1, max_models: int | None = None, elementwise: bool = False,
                 tensor_prepass: Callable | None = None):
    """Register a per-tensor merge function; its keyword-only signature is the schema."""

    def wrap(fn: Callable) -> MethodSpec:
        mname = name or fn.__name__
        hints = typing.get_type_hints(fn, include_extras=True)
        params: dict[str, ParamSpec] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name == "ctx":
                continue
            spec = _param_from_annotation(p.name, hints.get(p.name, float), p.default)
            params[spec.name] = spec
        if mname in REGISTRY:
            raise ValueError(f"merge method {mname!r} registered twice")
        if tensor_prepass is not None and not elementwise:
            raise ValueError(f"merge method {mname!r}: tensor_prepass needs elementwise=True")
        ms = MethodSpec(name=mname, fn=fn, needs_base=needs_base, params=params, stats=tuple(stats),
                        multi_output=multi_output, prepass=prepass, min_models=min_models,
                        max_models=max_models, doc=inspect.getdoc(fn) or "",
                        elementwise=elementwise, tensor_prepass=tensor_prepass)
        REGISTRY[mname] = ms
        return ms

    return wrap


def get_method(name: str) -> MethodSpec:
    from . import _load_all  # noqa: F401  (registers the built-in methods)

    if name not in REGISTRY:
        raise MergelabError(f"unknown merge method '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]
