"""Which device a stage computes on: ``device=`` in the API, ``--device`` on the CLI, ``device:``
in a recipe's ``align``/``repair``/``tact`` section.

``None`` keeps the inputs where they are (a model's own device, a tensor's own device).
``"cpu"``, ``"cuda"`` or ``"cuda:N"`` move the work there; under ``torchrun`` a plain
``"cuda"`` means this process's GPU (``cuda:$LOCAL_RANK``).  A device the machine lacks is a
:class:`~mergelab.errors.DeviceError` (exit code 2 on the CLI), raised before any work.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from .errors import DeviceError


def resolve_device(device: str | torch.device | None, what: str = "device") -> torch.device | None:
    """The ``torch.device`` for ``device`` (None stays None), checked against this machine."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{what}: expected cpu, cuda or cuda:N, found {device!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise DeviceError(f"{what}: expected cpu, cuda or cuda:N, found {device!r}")
    if not torch.cuda.is_available():
        raise DeviceError(f"{what} '{device}': CUDA is not available on this machine "
                          f"(torch {torch.__version__}); use cpu")
    if dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if
                           int(os.environ.get("WORLD_SIZE", "1")) > 1 else torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise DeviceError(f"{what} '{device}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def module_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); cpu for an empty model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """Run a block with ``model`` on ``device`` and put it back where it was afterwards
    (nothing moves when ``device`` is None or already the model's device)."""
    if device is None:
        yield model
        return
    home = module_device(model)
    if home == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def to_device(obj: Any, device: torch.device | None) -> Any:
    """``obj`` (a tensor, or a dict / tuple / list of them) on ``device`` (None: unchanged)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
