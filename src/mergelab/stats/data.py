"""Models and data for the ``mergelab stats`` command, from local files only.

Data (:func:`load_data`), by what ``path`` is:

* a folder: ImageFolder style, ``path/<class>/<image>`` (png, jpg, jpeg, bmp, gif, webp);
  classes in sorted order are labels 0..K-1; images become float RGB tensors in [0, 1],
  resized to ``image_size`` if given, then ``(x - mean) / std`` if given; batches ``(x, y)``;
* ``.npz``: array ``x`` (float -> float32, integer -> int64) and optional ``y``; batches
  ``(x, y)`` or ``x``;
* ``.csv`` / ``.jsonl``: a text column (``text_column``, default the first of ``text``,
  ``sentence``, ``content``) and an optional label column (``label``); tokenised per batch with
  the model's tokenizer (padding, truncation to ``max_length``); batches are dicts with
  ``input_ids``, ``attention_mask`` (...) and ``labels``.  String labels are mapped through the
  model's ``config.label2id`` when it has them, else in sorted order.  With ``max_length=None``
  texts are not truncated, and a text longer than ``max_positions`` tokens (the model's
  position limit) is an error naming its row;
* ``.txt``: one text per non-empty line (no labels).

Models: :func:`mergelab.io.models.load_model` (re-exported here).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MergelabError

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class TensorBatches:
    """Re-iterable batches over in-memory tensors ``x`` (and ``y``)."""

    def __init__(self, x: Tensor, y: Tensor | None, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Any]:
        for s in range(0, len(self.x), self.batch_size):
            xb = self.x[s: s + self.batch_size]
            yield xb if self.y is None else (xb, self.y[s: s + self.batch_size])


class TextBatches:
    """Re-iterable tokenised batches (dicts) over a list of texts and labels."""

    def __init__(self, texts: list[str], labels: Tensor | None, tokenizer, batch_size: int,
                 max_length: int | None, max_positions: int | None = None, where: str = "data"):
        self.texts, self.labels, self.tok = texts, labels, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.max_positions, self.where = max_positions, where

    def __len__(self) -> int:
        return (len(self.texts) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        for s in range(0, len(self.texts), self.batch_size):
            if self.max_length is None:
                enc = dict(self.tok(self.texts[s: s + self.batch_size], padding=True,
                                    return_tensors="pt"))
                self._check_length(enc, s)
            else:
                enc = dict(self.tok(self.texts[s: s + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt"))
            if self.labels is not None:
                enc["labels"] = self.labels[s: s + self.batch_size]
            yield enc


    def _check_length(self, enc: dict, start: int) -> None:
        if self.max_positions is None:
            return
        mask = enc.get("attention_mask")
        lengths = mask.sum(1) if mask is not None else torch.full((len(enc["input_ids"]),),
                                                                  enc["input_ids"].shape[1])
        over = (lengths > self.max_positions).nonzero()
        if len(over):
            i = int(over[0, 0])
            raise MergelabError(f"{self.where} text {start + i + 1}: {int(lengths[i])} tokens, more "
                                f"than the model's {self.max_positions} positions; shorten it or "
                                f"pass a max length to truncate")


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise MergelabError(f"batch size: expected a positive number, found {batch_size}")


def load_data(path: str | Path, *, batch_size: int = 32, tokenizer: Any = None,
              text_column: str | None = None, label_column: str = "label",
              label2id: dict[str, int] | None = None, max_length: int | None = 128,
              max_positions: int | None = None,
              image_size: int | None = None, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, limit: int | None = None):
    """Batches from a local file or folder (see the module docstring)."""
    _check_batch_size(batch_size)
    p = Path(path)
    if not p.exists():
        raise MergelabError(f"data '{p}': no such file or folder")
    if p.is_dir():
        x, y = _image_folder(p, image_size, limit)
        if mean is not None or std is not None:
            m = torch.tensor(mean if mean is not None else [0.0] * 3).view(1, -1, 1, 1)
            s = torch.tensor(std if std is not None else [1.0] * 3).view(1, -1, 1, 1)
            x = (x - m) / s
        return TensorBatches(x, y, batch_size)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _npz(p, batch_size, limit)
    if suffix == ".txt":
        rows = [{"text": t} for t in _read_lines(p)][:limit]
        text_column = text_column or "text"
    if suffix in (".csv", ".jsonl", ".txt"):
        rows = rows if suffix == ".txt" else _read_rows(p, suffix)[:limit]
        if not rows:
            raise MergelabError(f"data '{p}': no rows")
        cols = list(rows[0])
        col = text_column or next((c for c in ("text", "sentence", "content") if c in cols), None)
        if col is None or col not in cols:
            raise MergelabError(f"data '{p}': no text column '{text_column or 'text'}' "
                                f"(columns: {', '.join(cols)})")
        if tokenizer is None:
            raise MergelabError(f"data '{p}': text data needs a tokenizer (a Hugging Face model folder)")
        labels = None
        if label_column in cols:
            labels = _labels([r[label_column] for r in rows], label2id, p)
        return TextBatches([str(r[col]) for r in rows], labels, tokenizer, batch_size, max_length,
                           max_positions, f"data '{p}'")
    raise MergelabError(f"data '{p}': expected an image folder, .npz, .csv, .jsonl or .txt, "
                        f"found '{suffix}'")


def _read_lines(p: Path) -> list[str]:
    try:
        return [ln.rstrip("\r\n") for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise MergelabError(f"data '{p}': not UTF-8 text") from None


def _labels(values: list[Any], label2id: dict[str, int] | None, p: Path) -> Tensor:
    try:
        return torch.tensor([int(v) for v in values], dtype=torch.long)
    except (TypeError, ValueError):
        pass
    if label2id:
        bad = [v for v in values if str(v) not in label2id]
        if bad:
            raise MergelabError(f"data '{p}': label '{bad[0]}' is not in the model's labels "
                                f"({', '.join(label2id)})")
        return torch.tensor([label2id[str(v)] for v in values], dtype=torch.long)
    names = sorted({str(v) for v in values})
    return torch.tensor([names.index(str(v)) for v in values], dtype=torch.long)


def _read_rows(p: Path, suffix: str) -> list[dict]:
    try:
        if suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        rows = []
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise MergelabError(f"data '{p}' line {i}: not JSON ({e.msg})") from None
        return rows
    except UnicodeDecodeError:
        raise MergelabError(f"data '{p}': not UTF-8 text") from None


def _npz(p: Path, batch_size: int, limit: int | None) -> TensorBatches:
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise MergelabError(f"data '{p}': not a readable .npz ({type(e).__name__})") from None
    if "x" not in z.files:
        raise MergelabError(f"data '{p}': expected an array named 'x', found {', '.join(z.files) or 'none'}")
    x = torch.from_numpy(np.asarray(z["x"])[:limit])
    x = x.float() if x.is_floating_point() else x.long()
    y = torch.from_numpy(np.asarray(z["y"])[:limit]).long() if "y" in z.files else None
    if y is not None and len(y) != len(x):
        raise MergelabError(f"data '{p}': x has {len(x)} rows, y has {len(y)}")
    return TensorBatches(x, y, batch_size)


def _image_folder(root: Path, image_size: int | None, limit: int | None) -> tuple[Tensor, Tensor]:
    from PIL import Image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise MergelabError(f"data '{root}': expected one sub-folder per class, found none")
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_EXT][:limit]
    if not files:
        raise MergelabError(f"data '{root}': no image files in the class folders")
    xs = []
    for f, _ in files:
        try:
            img = Image.open(f).convert("RGB")
        except Exception:  # noqa: BLE001
            raise MergelabError(f"data '{f}': not a readable image") from None
        if image_size is not None:
            img = img.resize((image_size, image_size), Image.BILINEAR)
        a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if xs and a.shape != xs[0].shape:
            raise MergelabError(f"data '{f}': image size {tuple(a.shape[1:])} differs from "
                                f"{tuple(xs[0].shape[1:])}; pass an image size")
        xs.append(a)
    return torch.stack(xs), torch.tensor([i for _, i in files], dtype=torch.long)


# ---------------------------------------------------------------- models

def model_label2id(model: nn.Module) -> dict[str, int] | None:
    """The model's own label names (HF ``config.label2id``), unless they are the LABEL_i defaults."""
    l2i = getattr(getattr(model, "config", None), "label2id", None)
    if not l2i or all(re.fullmatch(r"LABEL_\d+", k) for k in l2i):
        return None
    return dict(l2i)
