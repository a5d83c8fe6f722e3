"""Per-channel activation statistics at sites: :func:`activation_stats` -> :class:`Stats`."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from safetensors.torch import load_file
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..device import placed, resolve_device
from ..errors import MergelabError
from ..io.outputs import save_safetensors
from . import distributed
from .batch import call_model, model_device, split_batch, to_device
from .moments import Moments, reduce_moments
from .sites import Site, hooked, probe_batch, resolve_sites


@contextlib.contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, BatchNorm uses its running statistics) and no autograd."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def data_pass(model: nn.Module, data: Iterable[Any], n_batches: int | None = None,
              shard: bool = True, progress: bool = True, desc: str = "stats"
              ) -> Iterator[tuple[Any, Tensor | None]]:
    """Iterate this rank's batches, yielding ``(inputs on the model's device, mask)``.

    The caller runs the model; this sets up the shard, the device and the progress bar."""
    device = model_device(model)
    total = n_batches if n_batches is not None else (len(data) if hasattr(data, "__len__") else None)
    bar = tqdm(distributed.shard(data, n_batches, shard), total=total, desc=desc,
               disable=not progress or not distributed.is_writer(), leave=False)
    for _, batch in bar:
        inputs, _, mask = split_batch(batch)
        yield to_device(inputs, device), (None if mask is None else mask.to(device))


@dataclass
class Stats:
    """Per-site channel statistics; ``sites`` in forward order."""

    sites: list[str]
    mean: dict[str, Tensor]           # float32 (C,)
    std: dict[str, Tensor]            # float32 (C,)
    count: dict[str, Tensor] = field(default_factory=dict)  # float64 scalar (rows seen)

    def save(self, path: str | Path) -> None:
        """Write the safetensors file (rank 0 only under torchrun)."""
        if not distributed.is_writer():
            return
        tensors = {}
        for s in self.sites:
            tensors[f"{s}.mean"] = self.mean[s].float().cpu().contiguous()
            tensors[f"{s}.std"] = self.std[s].float().cpu().contiguous()
            tensors[f"{s}.count"] = self.count.get(s, torch.tensor(float("nan"))).double().cpu().reshape(())
        save_safetensors(tensors, path, metadata={"mergelab_kind": "activation_stats",
                                                       "sites": json.dumps(self.sites)})

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("mergelab_kind") != "activation_stats":
            raise MergelabError(f"{path}: expected mergelab_kind 'activation_stats', "
                                f"found '{meta.get('mergelab_kind')}'")
        t = load_file(str(path))
        sites = json.loads(meta["sites"]) if "sites" in meta else \
            [k[: -len(".mean")] for k in t if k.endswith(".mean")]
        return cls(sites, {s: t[f"{s}.mean"] for s in sites}, {s: t[f"{s}.std"] for s in sites},
                   {s: t[f"{s}.count"] for s in sites})


def activation_stats(model: nn.Module, data: Iterable[Any], sites: Sequence[str | Site] | None = None,
                     *, head: str | None = "auto", n_batches: int | None = None, shard: bool = True,
                     progress: bool = True, device: str | torch.device | None = None) -> Stats:
    """Per-channel mean and std at each site over the data (exact float64 averages).

    ``sites`` default to :func:`~mergelab.stats.sites.discover_sites`; token tensors honour
    the batch's attention mask.  Under torchrun the sums are all-reduced over ranks.
    ``device``: where the pass runs (the model moves there for the pass and back after;
    default: where the model is); the statistics stay on that device."""
    dev = resolve_device(device, "activation_stats device")
    from .data import check_data
    check_data(model, data)  # one DataError line before the pass, not a traceback in it
    probe = None
    if sites is None:
        probe, data = probe_batch(model, data)
    site_list = resolve_sites(model, sites, head, probe)
    with placed(model, dev):
        return _moments_pass(model, data, site_list, n_batches, shard, progress)


def _moments_pass(model, data, site_list: list[Site], n_batches, shard, progress) -> Stats:
    moments = {s.name: Moments() for s in site_list}
    order: list[str] = []
    mask_box: list[Tensor | None] = [None]

    def fn(site, x, dim):
        if site.name not in order:
            order.append(site.name)
        moments[site.name].update_tensor(x, dim, mask_box[0])

    with eval_no_grad(model), hooked(model, site_list, fn):
        for inputs, mask in data_pass(model, data, n_batches, shard, progress, "activation stats"):
            mask_box[0] = mask
            call_model(model, inputs)
    return finish_moments(moments, site_list, order, model_device(model))


def finish_moments(moments: dict[str, Moments], site_list: list[Site], order: list[str],
                   device: torch.device | str = "cpu") -> Stats:
    """All-reduce the sums over ranks and turn them into a :class:`Stats`.

    Site order: the forward order this rank saw, then sites it did not see (a rank without
    batches); :func:`Stats.save` on rank 0 (which owns batch 0) writes rank 0's order."""
    reduce_moments([moments[s.name] for s in site_list], device)
    for s in site_list:
        if moments[s.name].sum is None:
            raise MergelabError(f"site '{s.name}' saw no data (never reached, or an empty loader)")
    names = order + [s.name for s in site_list if s.name not in order]
    return Stats(names, {n: moments[n].mean.float() for n in names},
                 {n: moments[n].std.float() for n in names},
                 {n: moments[n].count.clone() for n in names})
