"""Applying permutations: to a state dict, lazily to a checkpoint, and to/from disk.

Permutation files are safetensors with one int64 index vector per group (new index i takes
old index ``v[i]``) and metadata ``{"mergelab_kind": "permutation"}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import MergelabError
from .spec import Permutation, PermutationSpec, expr_vector


def permute_tensor(spec: PermutationSpec, name: str, t: torch.Tensor, perm: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One tensor of a state, permuted as ``spec`` says (unchanged if the spec does not touch it)."""
    rules = spec.axes.get(name)
    if not rules:
        return t
    by_axis: dict[int, list] = {}
    for r in rules:
        by_axis.setdefault(r.axis, []).append(r)
    for axis, rs in sorted(by_axis.items()):
        if axis >= t.dim():
            raise MergelabError(f"permute: tensor {name!r} has {t.dim()} axes; the spec permutes axis {axis}")
        rs.sort(key=lambda r: r.start)
        if len(rs) == 1 and rs[0].start == 0 and rs[0].length == t.shape[axis]:
            idx = expr_vector(rs[0].expr, perm)
        else:
            idx = torch.arange(t.shape[axis])
            for r in rs:
                idx[r.start:r.start + r.length] = expr_vector(r.expr, perm) + r.start
        if len(idx) != t.shape[axis]:
            raise MergelabError(f"permute: tensor {name!r} axis {axis} has size {t.shape[axis]}; "
                                f"the permutation gives {len(idx)} indices")
        t = t.index_select(axis, idx.to(t.device))
    return t


def permute(spec: PermutationSpec, state: Mapping[str, torch.Tensor], permutation: Mapping[str, torch.Tensor]) -> dict:
    """A new state with every tensor permuted (function-preserving); the input is not modified."""
    from ..io.validate import check_state

    check_state(state, "permute")
    perm = spec.check(permutation)
    missing = [n for n in spec.axes if n not in state]
    if missing:
        raise MergelabError(f"permute: state has no tensor {missing[0]!r} that the spec permutes "
                            f"({len(missing)} missing)")
    return {k: permute_tensor(spec, k, v, perm) for k, v in state.items()}


def invert(spec: PermutationSpec, permutation: Mapping[str, torch.Tensor]) -> Permutation:
    """The inverse permutation (for the flat within-head vectors too)."""
    perm = spec.check(permutation)
    return Permutation({k: torch.argsort(v) for k, v in perm.items()})


def compose(spec: PermutationSpec, first: Mapping, then: Mapping) -> Permutation:
    """Permutation equal to applying ``first`` and then ``then``."""
    a, b = spec.check(first), spec.check(then)
    return Permutation({k: a[k][b[k]] for k in a})


def rename_spec(spec: PermutationSpec, names: Mapping[str, str]) -> PermutationSpec:
    """The spec in a checkpoint's tensor names: ``names`` maps the model's parameter names to
    the checkpoint's (:func:`mergelab.io.models.checkpoint_names`).  Tied parameters (two model
    names, one checkpoint tensor) keep one entry: permuting the stored tensor permutes both.
    Names not in ``names`` stay as they are."""
    axes: dict = {}
    for n, rules in spec.axes.items():
        f = names.get(n, n)
        if f in axes:
            if [(r.axis, r.start, r.length, r.expr) for r in axes[f]] != \
                    [(r.axis, r.start, r.length, r.expr) for r in rules]:
                raise MergelabError(f"tied tensors {n!r} and its twin (stored as {f!r}) are permuted "
                                    "differently by the spec")
            continue
        axes[f] = rules
    frozen = {}
    for k, why in spec.frozen.items():
        n, _, ax = k.rpartition(":")
        frozen[f"{names.get(n, n)}:{ax}" if n else k] = why
    return PermutationSpec(dict(spec.groups), axes, frozen, list(spec.unknown_ops), spec.trace)


class PermutedCheckpoint:
    """A checkpoint reader that permutes each tensor as it is read.

    Wraps anything with the Checkpoint interface (``keys/shape/dtype/get/config/path``,
    ``__contains__``, ``__len__``) or a plain mapping; only the tensor asked for is read.
    ``names`` (model parameter name -> checkpoint tensor name, see
    :func:`mergelab.io.models.checkpoint_names`) translates a spec traced on the model to a
    checkpoint written with other (legacy) names or with tied tensors stored once.
    """

    def __init__(self, checkpoint, spec: PermutationSpec, permutation: Mapping[str, torch.Tensor],
                 names: Mapping[str, str] | None = None):
        self.checkpoint = checkpoint
        if names is not None:
            spec = rename_spec(spec, names)
        self.spec = spec
        self.permutation = spec.check(permutation)
        missing = [n for n in spec.axes if n not in checkpoint]
        if missing:
            raise MergelabError(f"PermutedCheckpoint: checkpoint {self.path} has no tensor {missing[0]!r} "
                                f"that the spec permutes")

    def keys(self) -> list[str]:
        return list(self.checkpoint.keys())

    def shape(self, name: str) -> tuple:
        if hasattr(self.checkpoint, "shape"):
            return tuple(self.checkpoint.shape(name))
        return tuple(self.checkpoint[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if hasattr(self.checkpoint, "dtype"):
            return self.checkpoint.dtype(name)
        return self.checkpoint[name].dtype

    def get(self, name: str) -> torch.Tensor:
        t = self.checkpoint.get(name) if hasattr(self.checkpoint, "get") else self.checkpoint[name]
        if t is None:
            raise MergelabError(f"PermutedCheckpoint: no tensor {name!r} in {self.path}")
        return permute_tensor(self.spec, name, t, self.permutation)

    __getitem__ = get

    def __contains__(self, name) -> bool:
        return name in self.checkpoint

    def __len__(self) -> int:
        return len(self.checkpoint)

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        for k in self.keys():
            yield k, self.get(k)

    @property
    def config(self):
        return getattr(self.checkpoint, "config", None)

    @property
    def path(self):
        return getattr(self.checkpoint, "path", None)

    @property
    def files(self):
        """The underlying files (the merge engine records their checksums)."""
        return getattr(self.checkpoint, "files", None)

    @property
    def metadata(self):
        return getattr(self.checkpoint, "metadata", None)


def save_permutation(permutation: Mapping[str, torch.Tensor], path, spec: PermutationSpec | None = None) -> Path:
    """Write ``{group: int64 vector}`` as safetensors (atomically)."""
    from ..io.outputs import save_safetensors
    perm = spec.check(permutation) if spec is not None else permutation
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors({k: torch.as_tensor(v).to(torch.int64).contiguous() for k, v in perm.items()}, path,
                            {"mergelab_kind": "permutation"})


def load_permutation(path, spec: PermutationSpec | None = None) -> Permutation:
    """Read a permutation file; with ``spec``, check it fits (names, sizes, head consistency)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise MergelabError(f"load_permutation: no file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            kind = (f.metadata() or {}).get("mergelab_kind")
            if kind != "permutation":
                raise MergelabError(f"load_permutation: {path} is not a permutation file "
                                    f"(mergelab_kind={kind!r}, expected 'permutation')")
            perm = Permutation({k: f.get_tensor(k) for k in f.keys()})
    except MergelabError:
        raise
    except Exception as e:
        raise MergelabError(f"load_permutation: cannot read {path} as safetensors: {e}") from e
    for k, v in perm.items():
        if v.dtype != torch.int64 or v.dim() != 1:
            raise MergelabError(f"load_permutation: {path}: group {k!r} is {v.dtype} with shape "
                                f"{tuple(v.shape)}; expected a 1-D int64 vector")
    return spec.check(perm, where=str(path)) if spec is not None else perm
