"""mergekit's ``slices:``: layer slicing, stacking (frankenmerges) and per-slice merges.

::

    slices:
      - sources:
          - {model: path/to/a, layer_range: [0, 16]}
      - sources:
          - {model: path/to/b, layer_range: [8, 24]}
    merge_method: passthrough

The output has the slices' layers one after the other (renumbered from 0, the config's layer
count updated).  A slice with several sources (each with the same number of layers) merges
its sources layer by layer with ``merge_method``; parameter gradients run over the slice's
layers (``t = i/(n − 1)``, 1 for a one-layer slice), as in mergekit.  Tensors outside the
layers come from the first slice's sources (embeddings) or the last slice's (the rest: final
norm, LM head), both at t = 0 (as mergekit 0.1.5 plans them).  Parameters: a source's ``parameters`` win over its
slice's, which win over the recipe's.

A slices recipe is rewritten into a plain ``models:`` recipe over *slot views*: slot j is a
Checkpoint-like view whose output layer o reads the j-th source of o's slice (the base model's
source is slot 0 when ``base_model`` is set), so the engine streams it like any checkpoint.
Every slice must therefore have the same number of sources.  A slot view names the model it
reads each tensor from (``origin``): tokenizer merging (vocab/) remaps each vocabulary tensor
with that model's tokenizer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import MergelabError
from .recipe import _LAYER, _UNSET, PRE_LAYERS as _PRE, ModelEntry, Recipe, Rule, evaluate, layer_index
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def num_layers(ckpt) -> int:
    cfg = getattr(ckpt, "config", None) or {}
    for k in LAYER_KEYS:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    idx = [i for i in (layer_index(n) for n in ckpt.keys()) if i is not None]
    return max(idx) + 1 if idx else 0


def renumber(name: str, new: int) -> str:
    """``name`` with its layer index replaced by ``new``."""
    m = _LAYER.search(name)
    return name[:m.start(1)] + str(new) + name[m.end(1):]


class SlotView:
    """A Checkpoint-like view: output tensor name -> (checkpoint, tensor name there)."""

    def __init__(self, path: Path, mapping: dict[str, tuple[Any, str]], config: dict | None):
        self.path = path
        self._map = mapping
        self.config = config
        self._ckpts = {id(c): c for c, _ in mapping.values()}

    def keys(self) -> list[str]:
        return list(self._map)

    def origin(self, name: str) -> tuple[Any, str]:
        """The checkpoint this view reads ``name`` from, and its name there (vocab/ uses it:
        each tensor's rows follow the vocabulary of the model that supplies it)."""
        return self._map[name]

    def __contains__(self, name) -> bool:
        return name in self._map

    def __len__(self) -> int:
        return len(self._map)

    def shape(self, name: str):
        c, n = self._map[name]
        return c.shape(n)

    def dtype(self, name: str) -> torch.dtype:
        c, n = self._map[name]
        return c.dtype(n)

    def get(self, name: str) -> torch.Tensor:
        c, n = self._map[name]
        return c.get(n)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        c, n = self._map[name]
        if callable(getattr(c, "get_rows", None)):
            return c.get_rows(n, start, stop)
        return c.get(n)[start:stop]

    @property
    def files(self) -> list[Path]:
        out: list[Path] = []
        for c in self._ckpts.values():
            for f in getattr(c, "files", None) or []:
                if f not in out:
                    out.append(f)
        return out


def _where(i: int, j: int | None = None) -> str:
    return f"recipe: slices[{i}]" + (f".sources[{j}]" if j is not None else "")


def expand(r: Recipe, inputs: dict | None, open_input) -> tuple[Recipe, dict]:
    """The plain recipe and the slot views (``{name: view}``) equivalent to a ``slices:`` recipe.

    ``open_input(ref, where)`` opens a model reference (a path or a name in ``inputs``) and
    returns its checkpoint."""
    if r.models:
        raise MergelabError("recipe: give either 'models' or 'slices', not both")
    if r.weights is not None:
        raise MergelabError("recipe: 'weights' cannot be used with 'slices' (give weights in the sources' parameters)")
    if r.repair is not None or r.tact is not None or r.align is not None:
        raise MergelabError("recipe: 'slices' cannot be combined with align, repair or tact yet")
    if not r.slices:
        raise MergelabError("recipe: 'slices' is empty")
    slices = r.slices
    k = len(slices[0].sources)
    ckpts: list[list[Any]] = []
    for i, s in enumerate(slices):
        if len(s.sources) != k:
            raise MergelabError(
                f"{_where(i)}: has {len(s.sources)} sources but slices[0] has {k}; slices with different numbers"
                " of sources are not supported")
        row = []
        lengths = set()
        for j, src in enumerate(s.sources):
            c = open_input(src.model, f"{_where(i, j)}.model")
            a, b = src.layer_range
            L = num_layers(c)
            if not 0 <= a < b <= L:
                raise MergelabError(f"{_where(i, j)}: layer_range [{a}, {b}] is outside the model's layers 0..{L}")
            lengths.add(b - a)
            row.append(c)
        if len(lengths) != 1:
            raise MergelabError(f"{_where(i)}: all sources of a slice must have the same number of layers,"
                                f" found {sorted(lengths)}")
        ckpts.append(row)

    # the base model's source is slot 0 of every slice
    order = [list(range(k)) for _ in slices]
    if r.base_model is not None:
        base_ck = open_input(r.base_model, "base_model")
        for i, row in enumerate(ckpts):
            hits = [j for j, c in enumerate(row) if c is base_ck]
            if not hits:
                raise MergelabError(f"{_where(i)}: no source is the base_model {r.base_model}")
            order[i] = [hits[0]] + [j for j in range(k) if j != hits[0]]

    mappings: list[dict[str, tuple[Any, str]]] = [{} for _ in range(k)]
    # per output name: (slice index, t, source parameter dicts per slot, source names per slot)
    where: dict[str, tuple[int, float, list[dict], list[str]]] = {}

    def pre_post(i: int, t: float, pre: bool):
        for slot in range(k):
            j = order[i][slot]
            c = ckpts[i][j]
            for n in c.keys():
                if layer_index(n) is None and bool(_PRE.search(n)) == pre:
                    mappings[slot][n] = (c, n)
                    where.setdefault(n, (i, t, [], []))
                    where[n][2].append(slices[i].sources[j].parameters)
                    where[n][3].append(n)

    pre_post(0, 0.0, True)
    out_layer = 0
    for i, s in enumerate(slices):
        a0 = s.sources[0].layer_range
        n_layers = a0[1] - a0[0]
        for off in range(n_layers):
            t = off / (n_layers - 1) if n_layers > 1 else 1.0
            for slot in range(k):
                j = order[i][slot]
                src, c = s.sources[j], ckpts[i][j]
                li = src.layer_range[0] + off
                for n in c.keys():
                    if layer_index(n) == li:
                        on = renumber(n, out_layer)
                        mappings[slot][on] = (c, n)
                        where.setdefault(on, (i, t, [], []))
                        where[on][2].append(src.parameters)
                        where[on][3].append(n)
            out_layer += 1
    pre_post(len(slices) - 1, 0.0, False)  # mergekit: post weights at t = 0 too

    # parameters: concrete values per output tensor, as exact-name filter rules
    gkeys = set(r.parameters) | {p for s in slices for p in s.parameters}
    mkeys = {p for s in slices for src in s.sources for p in src.parameters}
    glob: dict[str, list[Rule]] = {p: [] for p in gkeys}
    per: list[dict[str, list[Rule]]] = [{p: [] for p in mkeys} for _ in range(k)]
    for on, (i, t, params, names) in where.items():
        for p in gkeys:
            v = slices[i].parameters.get(p, r.parameters.get(p))
            if v is not None:
                val = evaluate(v, on, t)
                if val is not _UNSET:
                    glob[p].append(Rule(filter=on, value=val))
        for slot, (sp, sn) in enumerate(zip(params, names)):
            for p in mkeys:
                if p in sp:
                    val = evaluate(sp[p], sn, t)
                    if val is not _UNSET:
                        per[slot][p].append(Rule(filter=on, value=val))

    def rules(lst: list[Rule]) -> list[Rule]:
        # longest filter first: a name's own rule wins over a shorter name it contains
        return sorted(lst, key=lambda x: -len(x.filter))

    views = {}
    for slot in range(k):
        first = ckpts[0][order[0][slot]]
        cfg = getattr(first, "config", None)
        cfg = None if cfg is None else set_layer_count(dict(cfg), out_layer)
        path = Path(getattr(first, "path", f"slot{slot}"))
        views[f"__slices_slot_{slot}"] = SlotView(path, mappings[slot], cfg)
    models = [ModelEntry(model=f"__slices_slot_{slot}",
                         parameters={p: rules(v) for p, v in per[slot].items() if v}) for slot in range(k)]
    new = r.model_copy(update={
        "slices": None, "models": models,
        "base_model": "__slices_slot_0" if r.base_model is not None else None,
        "parameters": {p: rules(v) for p, v in glob.items() if v},
    })
    new._base_dir = getattr(r, "_base_dir", None)
    new._card_yaml = r.to_yaml()
    new._layer_count = out_layer
    return new, {**(inputs or {}), **views}


def set_layer_count(cfg: dict, n: int) -> dict:
    keys = [k for k in LAYER_KEYS if isinstance(cfg.get(k), int)] or ["num_hidden_layers"]
    for k in keys:
        cfg[k] = n
    return cfg


def patch_config(folder: str | os.PathLike, n: int) -> None:
    """Set the layer count in ``folder``/config.json (after the config was copied)."""
    p = Path(folder) / "config.json"
    if not p.is_file():
        return
    try:
        cfg = json.loads(p.read_text())
    except ValueError:
        return
    if isinstance(cfg, dict):
        p.write_text(json.dumps(set_layer_count(cfg, n), indent=2) + "\n")
