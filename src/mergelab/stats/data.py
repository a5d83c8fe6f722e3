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

from ..errors import DataError, MergelabError

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class TensorBatches:
    """Re-iterable batches over in-memory tensors ``x`` (and ``y``)."""

    def __init__(self, x: Tensor, y: Tensor | None, batch_size: int, source: str | None = None):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.source = source  # the file or folder, for messages

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Any]:
        for s in range(0, len(self.x), self.batch_size):
            xb = self.x[s: s + self.batch_size]
            yield xb if self.y is None else (xb, self.y[s: s + self.batch_size])


class TextBatches:
    """Re-iterable tokenised batches (dicts) over a list of texts and labels."""

    def __init__(self, texts: list[str], labels: Tensor | None, tokenizer, batch_size: int,
                 max_length: int | None, source: str | None = None, max_positions: int | None = None):
        self.texts, self.labels, self.tok = texts, labels, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.source = source  # the file, for messages
        self.max_positions = max_positions

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
            raise DataError(f"data '{self.source}' text {start + i + 1}: {int(lengths[i])} tokens, more "
                                f"than the model's {self.max_positions} positions; shorten it or "
                                f"pass a max length to truncate")


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise DataError(f"batch size: expected a positive number, found {batch_size}")


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
        raise DataError(f"data '{p}': no such file or folder")
    if not p.is_dir():
        _regular(p)
    if p.is_dir():
        x, y = _image_folder(p, image_size, limit)
        if mean is not None or std is not None:
            m = torch.tensor(mean if mean is not None else [0.0] * 3).view(1, -1, 1, 1)
            s = torch.tensor(std if std is not None else [1.0] * 3).view(1, -1, 1, 1)
            x = (x - m) / s
        return TensorBatches(x, y, batch_size, str(p))
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _npz(p, batch_size, limit)
    if suffix == ".txt":
        rows = [{"text": t} for t in _read_lines(p)][:limit]
        text_column = text_column or "text"
    if suffix in (".csv", ".jsonl", ".txt"):
        rows = rows if suffix == ".txt" else _read_rows(p, suffix)[:limit]
        if not rows:
            raise DataError(f"data '{p}': no rows")
        cols = list(rows[0])
        col = text_column or next((c for c in ("text", "sentence", "content") if c in cols), None)
        if col is None or col not in cols:
            raise DataError(f"data '{p}': no text column '{text_column or 'text'}' "
                                f"(columns: {', '.join(cols)})")
        if tokenizer is None:
            raise DataError(f"data '{p}': text data needs a tokenizer (a Hugging Face model folder)")
        labels = None
        if label_column in cols:
            labels = _labels([r[label_column] for r in rows], label2id, p)
        return TextBatches([str(r[col]) for r in rows], labels, tokenizer, batch_size, max_length, str(p),
                           max_positions)
    raise DataError(f"data '{p}': expected an image folder, .npz, .csv, .jsonl or .txt, found '{suffix}'")


def _read_lines(p: Path) -> list[str]:
    try:
        return [ln.rstrip("\r\n") for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise DataError(f"data '{p}': not UTF-8 text") from None


def _regular(p: Path) -> None:
    """Only regular files are read: a FIFO or device named like data would block the reader."""
    from ..io.reader import check_regular_file

    try:
        check_regular_file(p, "data file")
    except MergelabError as e:
        raise DataError(f"data '{p}': {str(e).removeprefix(f'{p}: ')}") from None


def _labels(values: list[Any], label2id: dict[str, int] | None, p: Path) -> Tensor:
    try:
        return torch.tensor([int(v) for v in values], dtype=torch.long)
    except (TypeError, ValueError):
        pass
    if label2id:
        bad = [v for v in values if str(v) not in label2id]
        if bad:
            raise DataError(f"data '{p}': label '{bad[0]}' is not in the model's labels "
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
                        raise DataError(f"data '{p}' line {i}: not JSON ({e.msg})") from None
        return rows
    except UnicodeDecodeError:
        raise DataError(f"data '{p}': not UTF-8 text") from None


def _npz(p: Path, batch_size: int, limit: int | None) -> TensorBatches:
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise DataError(f"data '{p}': not a readable .npz ({type(e).__name__})") from None
    if "x" not in z.files:
        raise DataError(f"data '{p}': expected an array named 'x', found {', '.join(z.files) or 'none'}")
    try:
        xa = np.asarray(z["x"])
        ya = np.asarray(z["y"]) if "y" in z.files else None
    except Exception as e:  # noqa: BLE001 - a damaged member, an object array
        raise DataError(f"data '{p}': cannot read its arrays ({type(e).__name__}: {str(e)[:120]})") from None
    if xa.dtype.kind not in "biuf" or xa.ndim < 1:
        raise DataError(f"data '{p}': x must be an array of numbers with one row per example, found dtype"
                        f" {xa.dtype} and shape {xa.shape}")
    x = torch.from_numpy(xa[:limit])
    x = x.float() if x.is_floating_point() else x.long()
    y = None
    if ya is not None:
        if ya.ndim != 1 or ya.dtype.kind not in "iu":
            raise DataError(f"data '{p}': y must be a 1-D array of integer class indices, found dtype {ya.dtype}"
                            f" and shape {ya.shape}")
        y = torch.from_numpy(ya[:limit]).long()
        if len(y) != len(x):
            raise DataError(f"data '{p}': x has {len(x)} rows, y has {len(y)}")
    if not len(x):
        raise DataError(f"data '{p}': no examples")
    return TensorBatches(x, y, batch_size, str(p))


def _image_folder(root: Path, image_size: int | None, limit: int | None) -> tuple[Tensor, Tensor]:
    from PIL import Image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"data '{root}': expected one sub-folder per class, found none")
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_EXT][:limit]
    if not files:
        raise DataError(f"data '{root}': no image files in the class folders")
    xs = []
    for f, _ in files:
        _regular(f)
        try:
            img = Image.open(f).convert("RGB")
        except Exception:  # noqa: BLE001
            raise DataError(f"data '{f}': not a readable image") from None
        if image_size is not None:
            img = img.resize((image_size, image_size), Image.BILINEAR)
        a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if xs and a.shape != xs[0].shape:
            raise DataError(f"data '{f}': image size {tuple(a.shape[1:])} differs from "
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


# ---------------------------------------------------------------- checks before a pass

def _takes_token_ids(model: nn.Module) -> bool | None:
    """True when ``forward`` names ``input_ids``; None when it cannot tell (``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "input_ids" in params:
        return True
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return False


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:240]


def check_data(model: nn.Module, data: Any, data_label: str | None = None, model_label: str = "the model") -> None:
    """Check that ``data`` fits ``model`` before a long pass: one :class:`DataError` line naming
    the data and what was expected.

    * float features for a model that takes token ids (``input_ids``) and text for one that
      does not;
    * token ids outside ``[0, vocab_size)`` or sequences longer than
      ``max_position_embeddings`` (every example of in-memory data; the first batch otherwise;
      for text data the ``max_length`` it is truncated to);
    * the model runs on the first batch (wrong feature count, channels, image size ...);
    * labels, where present and the output is ``(batch, classes)`` logits, are in
      ``[0, classes)`` (every example of in-memory data).

    One-shot iterators (``iter(data) is data``) are not checked: reading their first batch
    would take it from the pass."""
    from .batch import call_model, logits_of, split_batch

    if not isinstance(model, nn.Module):
        raise MergelabError(f"model: expected a torch.nn.Module, found {type(model).__name__}")
    if data_label is None:
        src = getattr(data, "source", None)
        data_label = f"data '{src}'" if src else "data"
    try:
        if iter(data) is data:
            return
    except TypeError:
        raise DataError(f"{data_label}: expected an iterable of batches, found {type(data).__name__}") from None
    first = next(iter(data), None)
    if first is None:
        raise DataError(f"{data_label}: no examples")
    inputs, labels, _ = split_batch(first)
    tokens = _takes_token_ids(model)
    cfg = getattr(model, "config", None)
    if tokens:
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
        if not isinstance(ids, Tensor):
            raise DataError(f"{data_label}: {model_label} takes token ids (input_ids), the batches hold none")
        if ids.is_floating_point():
            raise DataError(f"{data_label}: holds float features of shape {tuple(ids.shape)}, but {model_label}"
                            " takes integer token ids (input_ids)")
        vocab = getattr(cfg, "vocab_size", None)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(emb, nn.Embedding):
            vocab = emb.num_embeddings
        maxpos = getattr(cfg, "max_position_embeddings", None)
        every = data.x if isinstance(data, TensorBatches) else ids
        if isinstance(data, TextBatches) and isinstance(maxpos, int) and (
                data.max_length is None or data.max_length > maxpos):   # None: not truncated
            trunc = {} if data.max_length is None else {"truncation": True, "max_length": data.max_length}
            lens = data.tok(data.texts, **trunc)["input_ids"]
            long = next((i for i, t in enumerate(lens) if len(t) > maxpos), None)
            if long is not None:
                raise DataError(f"{data_label}: example {long} is {len(lens[long])} tokens long, more than the"
                                f" max_position_embeddings ({maxpos}) of {model_label}; pass --max-length {maxpos}"
                                " or less")
        if isinstance(maxpos, int) and every.dim() >= 2 and every.shape[-1] > maxpos:
            raise DataError(f"{data_label}: sequences of {every.shape[-1]} tokens, but {model_label} has"
                            f" max_position_embeddings {maxpos}")
        if isinstance(vocab, int) and every.numel():
            lo, hi = int(every.min()), int(every.max())
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                row = int((every == bad).reshape(len(every), -1).any(1).nonzero()[0])
                raise DataError(f"{data_label}: token id {bad} (example {row}) is outside 0..{vocab - 1}, the"
                                f" vocabulary of {model_label}")
    elif isinstance(data, TensorBatches) and data.x.is_floating_point() and not bool(torch.isfinite(data.x).all()):
        bad = int((~torch.isfinite(data.x)).reshape(len(data.x), -1).any(1).nonzero()[0])
        raise DataError(f"{data_label}: example {bad} holds NaN or Inf; statistics over it would be NaN")
    elif tokens is False and isinstance(inputs, dict) and "input_ids" in inputs:
        raise DataError(f"{data_label}: holds token ids (text), but {model_label} does not take input_ids")
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                out = call_model(model, inputs)
            finally:
                model.train(was)
    except MergelabError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the model raises on data it cannot take
        shape = (tuple(inputs.shape), str(inputs.dtype).removeprefix("torch.")) if isinstance(inputs, Tensor) else \
            {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, Tensor)}
        raise DataError(f"{data_label}: {model_label} cannot run on the first batch (inputs {shape}):"
                        f" {type(e).__name__}: {_first_line(e)}") from None
    if labels is None:
        return
    try:  # the label check needs class logits; a model without them (an encoder) has no labels to check
        logits = logits_of(out)
    except MergelabError:
        return
    if logits.dim() != 2:
        return
    n_cls = int(logits.shape[-1])
    every = data.y if isinstance(data, TensorBatches) else data.labels if isinstance(data, TextBatches) else labels
    if every is None or not every.numel():
        return
    if every.is_floating_point():
        raise DataError(f"{data_label}: labels are floats; expected integer class indices 0..{n_cls - 1}")
    lo, hi = int(every.min()), int(every.max())
    if lo < 0 or hi >= n_cls:
        bad = lo if lo < 0 else hi
        row = int((every.reshape(-1) == bad).nonzero()[0])
        raise DataError(f"{data_label}: label {bad} (example {row}) is outside 0..{n_cls - 1}:"
                        f" {model_label} has {n_cls} classes")
