"""A Checkpoint-like view whose vocabulary tensors (embeddings, LM head) have their rows
remapped to the output vocabulary; every other tensor is read unchanged.

Output row ``o`` of a vocabulary tensor is ``Σ_j w_j · ckpt_j[name][src_j]`` over a short list
of terms (held as flat sorted tensors): one term (weight 1) when the model has the token (an exact copy), the default
row(s) when it lacks it (the base model's row, the only model that has it, or the mean of
those that have it), none (zeros) for a token no model has; padding rows are the mean of the
other rows (mergekit's initialisation).  Rows are read in contiguous runs with
``get_rows``, so a row block costs only its rows.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Sequence

import torch


Table = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (out sorted, cid, src, w)


class VocabView:
    def __init__(self, ckpt: Any, tables: dict[str, Table], out_rows: int, ckpts: list,
                 config: dict | None, label: str, *, pad_from: int | None = None):
        """Output row ``out[i]`` of vocabulary tensor ``name`` receives
        ``w[i] · ckpts[cid[i]][name][src[i]]``, with ``(out, cid, src, w) = tables[name]``
        (``out`` sorted).  Tensors have their own tables because they may come from different
        models (``slices:``: embeddings from the first slice's sources, LM head from the last's).
        ``pad_from``: the rows from it on (``pad_to_multiple_of`` padding) are the mean of the
        rows before it, as mergekit initialises them (computed once per tensor, in row blocks)."""
        self.ckpt = ckpt
        self.out_rows = out_rows
        self.path = getattr(ckpt, "path", None)
        self.config = config
        self.label = label
        self._ckpts = list(ckpts)
        self._tables = {n: (o.long(), c.long(), s.long(), w.float()) for n, (o, c, s, w) in tables.items()}
        self.pad_from = pad_from if pad_from is not None and pad_from < out_rows else None
        self._means: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def vocab_names(self) -> set[str]:
        return set(self._tables)

    @classmethod
    def from_terms(cls, ckpt: Any, vocab_names: Sequence[str], out_rows: int,
                   terms: list[list[tuple[Any, int, float]]], config: dict | None, label: str,
                   *, pad_from: int | None = None) -> "VocabView":
        """``terms[o]``: the (checkpoint, source row, weight) terms of output row ``o`` (the same
        for every tensor of ``vocab_names``)."""
        ckpts: list = []
        idx: dict[int, int] = {}
        out, src, cid, w = [], [], [], []
        for o, ts in enumerate(terms):
            for c, r, wt in ts:
                if id(c) not in idx:
                    idx[id(c)] = len(ckpts)
                    ckpts.append(c)
                out.append(o)
                src.append(r)
                cid.append(idx[id(c)])
                w.append(wt)
        t = torch.tensor
        table = (t(out, dtype=torch.long), t(cid, dtype=torch.long), t(src, dtype=torch.long), t(w, dtype=torch.float32))
        return cls(ckpt, {n: table for n in vocab_names}, out_rows, ckpts, config, label, pad_from=pad_from)

    # -- the Checkpoint interface -------------------------------------------------------
    def keys(self) -> list[str]:
        return self.ckpt.keys()

    def __contains__(self, name) -> bool:
        return name in self.ckpt

    def __len__(self) -> int:
        return len(self.ckpt)

    def shape(self, name: str):
        s = tuple(self.ckpt.shape(name))
        return (self.out_rows,) + s[1:] if name in self._tables else s

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(name)

    @property
    def files(self) -> list[Path]:
        return list(getattr(self.ckpt, "files", []) or [])

    @property
    def metadata(self) -> dict:
        return dict(getattr(self.ckpt, "metadata", {}) or {})

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tables:
            return self.ckpt.get(name)
        return self._rows(name, 0, self.out_rows)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._tables:
            if hasattr(self.ckpt, "get_rows"):
                return self.ckpt.get_rows(name, start, stop)
            return self.ckpt.get(name)[start:stop]
        start, stop, _ = slice(start, stop).indices(self.out_rows)
        return self._rows(name, start, max(start, stop))

    def _rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        acc = self._mapped(name, start, stop)
        p = self.pad_from
        if p is not None and stop > p:
            acc[max(start, p) - start:] = self._mean(name)
        return acc.to(self.ckpt.dtype(name))

    def _mean(self, name: str) -> torch.Tensor:
        """The mean of the rows before ``pad_from`` (float64 sums over row blocks)."""
        with self._lock:
            if name not in self._means:
                tail = tuple(self.ckpt.shape(name))[1:]
                total = torch.zeros(tail, dtype=torch.float64)
                step = max(1, (16 << 20) // (4 * max(1, math.prod(tail))))
                for a in range(0, self.pad_from, step):
                    total += self._mapped(name, a, min(self.pad_from, a + step)).double().sum(0)
                self._means[name] = (total / self.pad_from).float()
            return self._means[name]

    def _mapped(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` from the terms alone (float32; padding rows zero)."""
        tail = tuple(self.ckpt.shape(name))[1:]
        acc = torch.zeros((stop - start,) + tail, dtype=torch.float32)
        t_out, t_cid, t_src, t_w = self._tables[name]
        lo = int(torch.searchsorted(t_out, torch.tensor(start)))
        hi = int(torch.searchsorted(t_out, torch.tensor(stop)))
        out, src, cid, w = t_out[lo:hi] - start, t_src[lo:hi], t_cid[lo:hi], t_w[lo:hi]
        for c in cid.unique().tolist():
            sel = cid == c
            o, s, wt = out[sel], src[sel], w[sel]
            rows = torch.unique(s)   # sorted; read in contiguous runs
            breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
            ck = self._ckpts[c]
            parts = []
            for a, b in zip([0] + breaks, breaks + [rows.numel()]):
                r0, r1 = int(rows[a]), int(rows[b - 1]) + 1
                parts.append(ck.get_rows(name, r0, r1) if hasattr(ck, "get_rows") else ck.get(name)[r0:r1])
            block = torch.cat(parts).float()
            pos = torch.searchsorted(rows, s)
            vals = block[pos]
            if bool((wt != 1).any()):
                vals = vals * wt.view((-1,) + (1,) * len(tail))
            acc.index_add_(0, o, vals)
        return acc

    def __repr__(self) -> str:
        return f"VocabView({self.label!r}, {self.out_rows} rows)"
