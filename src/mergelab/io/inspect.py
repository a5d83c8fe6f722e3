"""``mergelab inspect``: what a checkpoint holds, and how far each tensor is from a base."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from ..errors import MergelabError
from .reader import open_checkpoint


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    l2: float | None = None        # ||x - base||
    rel_l2: float | None = None    # ||x - base|| / ||base||
    cosine: float | None = None    # <x, base> / (||x|| ||base||)


@dataclass
class Report:
    path: str
    against: str | None
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict:
        return {"path": self.path, "against": self.against, "n_params": self.n_params, "nbytes": self.nbytes,
                "tensors": [asdict(t) for t in self.tensors]}

    def format(self) -> str:
        rows = [f"{self.path}: {len(self.tensors)} tensors, {self.n_params:,} parameters, {self.nbytes / 1e6:.1f} MB"]
        head = f"{'tensor':<48} {'dtype':<9} {'shape':<18}"
        if self.against:
            head += f" {'L2 diff':>11} {'rel L2':>9} {'cosine':>9}"
            rows.append(f"distance to {self.against}")
        rows.append(head)
        for t in self.tensors:
            line = f"{t.name:<48} {t.dtype:<9} {'x'.join(map(str, t.shape)) or 'scalar':<18}"
            if self.against:
                line += (f" {t.l2:>11.4g} {t.rel_l2:>9.3g} {t.cosine:>9.6f}" if t.l2 is not None else f" {'-':>11} {'-':>9} {'-':>9}")
            rows.append(line)
        return "\n".join(rows)


def inspect_checkpoint(path: str | os.PathLike, against: str | os.PathLike | None = None) -> Report:
    """Tensors, dtypes, parameter count and size; with ``against``, per-tensor L2 / relative L2 /
    cosine of the difference to that base (float64 reductions, one tensor at a time)."""
    ck = open_checkpoint(path)
    base = open_checkpoint(against) if against is not None else None
    rep = Report(str(path), str(against) if against is not None else None)
    for n in ck.keys():
        shape, dt = tuple(ck.shape(n)), ck.dtype(n)
        numel = 1
        for s in shape:
            numel *= s
        info = TensorInfo(n, str(dt).removeprefix("torch."), shape, numel, numel * dt.itemsize)
        if base is not None and dt.is_floating_point:
            if n not in base:
                raise MergelabError(f"tensor '{n}' is in {path} but missing from {against}")
            if tuple(base.shape(n)) != shape:
                raise MergelabError(f"tensor '{n}' has shape {shape} in {path} but {tuple(base.shape(n))} in {against}")
            x = ck.get(n).to(torch.float64).reshape(-1)
            b = base.get(n).to(torch.float64).reshape(-1)
            nb, nx = float(b.norm()), float(x.norm())
            info.l2 = float((x - b).norm())
            info.rel_l2 = info.l2 / nb if nb > 0 else float("inf") if info.l2 > 0 else 0.0
            info.cosine = float(x @ b) / (nx * nb) if nx > 0 and nb > 0 else float("nan")
        rep.tensors.append(info)
    return rep
