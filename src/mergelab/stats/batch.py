"""How a statistics pass reads a batch and a model's output.

A data loader is any iterable of batches (re-iterable if it is used twice).  A batch is

* a tensor ``x`` (inputs only);
* a tuple or list ``(x, y, ...)``: ``x`` the inputs, ``y`` the integer labels (extra items
  are ignored);
* a dict (Hugging Face style): every key except ``labels``/``label`` is passed to the model
  as a keyword (``input_ids``, ``attention_mask``, ...); ``labels`` (or ``label``) are the
  labels; ``attention_mask`` (1 = real token, 0 = padding) restricts token statistics to
  real tokens.

The model's logits are its output if that is a tensor, else ``output.logits``, else
``output["logits"]``, else ``output[0]``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MergelabError

_LABEL_KEYS = ("labels", "label")


def split_batch(batch: Any) -> tuple[Any, Tensor | None, Tensor | None]:
    """``(inputs, labels, attention_mask)`` of one batch (labels/mask may be None)."""
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        return inputs, labels, inputs.get("attention_mask")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (Tensor, dict)):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        mask = batch[0].get("attention_mask") if isinstance(batch[0], dict) else None
        return batch[0], labels, mask
    raise MergelabError(
        f"batch: expected a tensor, a tuple (x, y) or a dict of tensors, found {type(batch).__name__}")


def batch_len(inputs: Any) -> int:
    """Number of examples in ``inputs`` (size of the first dimension)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    for v in inputs.values():
        if isinstance(v, Tensor):
            return int(v.shape[0])
    raise MergelabError("batch: the input dict holds no tensor")


def take(inputs: Any, sl: slice) -> Any:
    """Rows ``sl`` of the inputs (tensor or dict of tensors)."""
    if isinstance(inputs, Tensor):
        return inputs[sl]
    return {k: (v[sl] if isinstance(v, Tensor) else v) for k, v in inputs.items()}


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run the model on inputs: a dict is passed as keywords, anything else positionally."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def logits_of(output: Any) -> Tensor:
    """The logits tensor of a model output (tensor, ``.logits``, ``["logits"]`` or ``[0]``)."""
    if isinstance(output, Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise MergelabError(
        f"model output: expected a tensor or an object with .logits, found {type(output).__name__}")
