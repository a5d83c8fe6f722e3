"""Gram matrices XᵀX of every linear layer's input, for RegMean.

File format (COMMON.md): key = the linear layer's weight name, value = the unnormalised float64
sum XᵀX over all input rows (d_in × d_in); metadata ``count:<weight name>`` = number of rows.
Token inputs ``(N, T, d_in)`` honour the attention mask (padding rows are skipped).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..device import placed, resolve_device
from ..errors import MergelabError
from ..io.outputs import save_safetensors
from . import distributed
from .activations import data_pass, eval_no_grad
from .batch import call_model, model_device
from .moments import channel_rows
from .sites import Site, find_head, hooked


class Grams(dict):
    """``{weight name: XᵀX (float64)}`` with ``.counts`` ``{weight name: rows}``."""

    def __init__(self, grams: dict[str, Tensor], counts: dict[str, int]):
        super().__init__(grams)
        self.counts = counts

    def save(self, path: str | Path) -> None:
        if not distributed.is_writer():
            return
        meta = {"mergelab_kind": "gram"}
        meta.update({f"count:{k}": str(int(v)) for k, v in self.counts.items()})
        save_safetensors({k: v.cpu().contiguous() for k, v in self.items()}, path, metadata=meta)


def gram_matrices(model: nn.Module, data: Iterable[Any], layers: Sequence[str] | None = None, *,
                  exclude_head: str | None = None, n_batches: int | None = None, shard: bool = True,
                  progress: bool = True, device: str | torch.device | None = None) -> Grams:
    """XᵀX of the inputs of each nn.Linear (``layers``: module names; default all linears,
    minus the module named by ``exclude_head``).  ``device``: where the pass runs (see
    :func:`~mergelab.stats.activation_stats`); the matrices stay on that device."""
    dev = resolve_device(device, "gram_matrices device")
    from .data import check_data
    check_data(model, data)  # one DataError line before the pass, not a traceback in it
    with placed(model, dev):
        return _gram_pass(model, data, layers, exclude_head, n_batches, shard, progress)


def _gram_pass(model, data, layers, exclude_head, n_batches, shard, progress) -> Grams:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        head = find_head(model, exclude_head) if exclude_head else None
        layers = [n for n in linears if n != head]
    for n in layers:
        if n not in linears:
            raise MergelabError(f"gram: '{n}' is not an nn.Linear module of the model")
    if not layers:
        raise MergelabError("gram: the model has no nn.Linear layer")
    sums: dict[str, Tensor] = {}
    counts = {n: torch.zeros((), dtype=torch.float64) for n in layers}   # on the cpu (a few scalars)
    mask_box: list[Tensor | None] = [None]

    def fn(site, x, dim):
        rows = channel_rows(x, -1, mask_box[0]).to(torch.float64)
        g = rows.T @ rows
        if site.module in sums:
            sums[site.module] += g
        else:
            sums[site.module] = g
        counts[site.module] += rows.shape[0]

    sites = [Site(n, "input", channel_dim=-1) for n in layers]
    with eval_no_grad(model), hooked(model, sites, fn):
        for inputs, mask in data_pass(model, data, n_batches, shard, progress, "gram"):
            mask_box[0] = mask
            call_model(model, inputs)
    reduced = distributed.reduce_partial([sums.get(n) for n in layers], model_device(model))
    distributed.all_reduce_sum([counts[n] for n in layers])
    for n, g in zip(layers, reduced):
        if g is None:
            raise MergelabError(f"gram: layer '{n}' saw no data")
        sums[n] = g
    return Grams({f"{n}.weight": sums[n] for n in layers},
                 {f"{n}.weight": int(counts[n].item()) for n in layers})
