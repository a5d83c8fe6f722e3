"""The output folder(s): sharded writers (one per variant), the tensors that are not merged,
config/tokenizer files and the model card."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import MergelabError
from ..io.writer import ShardedWriter, TensorSpec, copy_model_files, write_model_card
from .sources import folder_of


class Outputs:
    """One :class:`ShardedWriter` per variant under ``tmp`` (``""``: ``tmp`` itself).

    Under torchrun (:mod:`mergelab.engine.ranks`) each rank writes the tensors ``only`` into
    the layout rank 0 created (``create=False`` on the others), with the ``variants`` known
    up front."""

    def __init__(self, plan: Any, tmp: Path, shard_size: int, *, only: set[str] | None = None,
                 create: bool = True, variants: list[str] | None = None,
                 copy_tokenizer: bool = True, model_card: bool = True):
        self.p = plan
        self.copy_tokenizer = copy_tokenizer
        self.model_card = model_card
        self.tmp = tmp
        self.size = shard_size
        self.only, self.create = only, create
        self.specs = [TensorSpec(n, plan.shape(n), plan.out_dtype[n]) for n in plan.names]
        self.writers: dict[str, ShardedWriter] = {}
        self.lock = threading.Lock()
        self.written = 0
        for v in (variants if variants is not None else [] if plan.method.multi_output else [""]):
            self.writer(v)

    def folder(self, variant: str) -> Path:
        return self.tmp / variant if variant else self.tmp

    def writer(self, variant: str) -> ShardedWriter:
        with self.lock:
            if variant not in self.writers:
                folder = self.folder(variant)
                folder.mkdir(exist_ok=True)
                self.writers[variant] = ShardedWriter(folder, self.specs, self.size, {"mergelab_version": __version__},
                                                      create=self.create, only=self.only)
            return self.writers[variant]

    def put(self, name: str, outs: dict[str, torch.Tensor], start: int | None) -> None:
        """The driver's result for one tensor (``start`` None) or for its rows from ``start``."""
        for variant, tensor in outs.items():
            w = self.writer(variant)
            if start is None:
                w.write(name, tensor)
            else:
                w.write_rows(name, start, tensor)
            with self.lock:
                self.written += tensor.numel() * tensor.element_size()

    @property
    def variants(self) -> list[str]:
        return sorted(self.writers)

    def finish(self, sums: dict, done=lambda: None, algorithm: str | None = None) -> None:
        """Copy the unmerged tensors, close the shards, add config files and the model card."""
        self.close(done)
        self.describe(sums, algorithm)

    def close(self, done=lambda: None) -> None:
        """Copy the unmerged tensors (of ``only``) and close the shards, without the index."""
        p = self.p
        if not self.writers:
            raise MergelabError(f"method '{p.method.name}': nothing to merge (no floating-point tensors)")
        for n in p.names:  # tensors that are not merged (integer buffers): from the reference model
            if n not in p.merged and (self.only is None or n in self.only):
                t = p.ref.ckpt.get(n)
                for w in self.writers.values():
                    w.write(n, t)
                    self.written += t.numel() * t.element_size()
                done()
        for w in self.writers.values():
            w.close(index=False)

    def describe(self, sums: dict, algorithm: str | None = None) -> None:
        """The index, the config/tokenizer files and the model card of every variant."""
        p = self.p
        for w in self.writers.values():
            w.write_index()
        stored = {p.out_dtype[n] for n in p.merged}
        cfg_dtype = stored.pop() if len(stored) == 1 else None
        r = p.recipe
        layers = getattr(r, "_layer_count", None)  # slices: the output's layer count
        for v in self.variants:
            copy_model_files(folder_of(p.base or p.experts[0]), self.folder(v), cfg_dtype, tokenizer=self.copy_tokenizer)
            if layers is not None:
                from ..slicing import patch_config
                patch_config(self.folder(v), layers)
            if getattr(r, "_vocab", None) is not None or r.chat_template is not None:
                from ..vocab import write_files
                write_files(self.folder(v), r, [f for f in map(folder_of, p.readers) if f is not None])
            if self.model_card:
                write_model_card(self.folder(v), recipe_yaml=getattr(r, "_card_yaml", None) or r.to_yaml(),
                                 version=__version__, inputs=sums, algorithm=algorithm or "sha256",
                                 extra=(f"Variant `{v}` of method `{p.method.name}`." if v else ""))

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
