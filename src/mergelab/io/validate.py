"""What counts as a tensor mergelab can read, merge and store.

One rule for checkpoints on disk (``.pt`` content, see :mod:`mergelab.io.reader`) and for
in-memory states given to the Python API (``save_state``, ``fisher_merge``,
``regmean_merge``, ``permute``): a ``Mapping`` from string names to dense, real-valued
``torch.Tensor`` objects on a real device, of a dtype safetensors can store.  Anything else
is refused with one :class:`~mergelab.errors.CheckpointError` line naming the entry.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError

# dtypes a safetensors file can hold (kept in step with reader.ST_DTYPES)
STORABLE = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
            torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
            torch.uint32, torch.uint64}


def describe(x: Any) -> str:
    """A short human name for a value's type: 'an int (3)', 'a list', 'a str'."""
    if isinstance(x, bool) or x is None:
        return repr(x)
    name = type(x).__name__
    if isinstance(x, (int, float)):
        return f"{'an' if name == 'int' else 'a'} {name} ({x!r})"
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def tensor_problem(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be merged or stored, or None when it can."""
    if t.is_nested:
        return "a nested tensor"
    if t.layout != torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor (only dense tensors are supported)"
    if t.is_quantized:
        return f"a quantized tensor ({str(t.dtype).removeprefix('torch.')}); dequantize it first"
    if t.device.type == "meta":
        return "a meta tensor (it has a shape but no values)"
    if t.is_complex():
        return f"a complex tensor ({str(t.dtype).removeprefix('torch.')})"
    if t.dtype not in STORABLE:
        return f"a tensor of dtype {str(t.dtype).removeprefix('torch.')}, which safetensors cannot store"
    return None


def check_tensor(name: str, t: Any, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{where}: '{name}' is {describe(t)}, expected a tensor")
    bad = tensor_problem(t)
    if bad:
        raise CheckpointError(f"{where}: '{name}' is {bad}")
    return t


def check_state(state: Any, where: str, *, values: bool = True) -> None:
    """``state`` is a ``Mapping[str, Tensor]`` of usable tensors (checks every value unless
    ``values=False``, for lazy mappings whose values are read later and checked there)."""
    if not isinstance(state, Mapping) and not all(hasattr(state, m) for m in ("keys", "__getitem__")):
        raise CheckpointError(f"{where}: expected a state dict (name -> tensor), found {describe(state)}")
    for k in state.keys():
        if not isinstance(k, str):
            raise CheckpointError(f"{where}: key {k!r} is {describe(k)}, expected a string name")
        if values:
            check_tensor(k, state[k], where)


def check_states(states: Any, where: str, *, same: bool = False) -> None:
    """A sequence of states (the merge functions' inputs); with ``same``, every state has
    the names and shapes of ``states[0]``."""
    if isinstance(states, Mapping) or not hasattr(states, "__len__"):
        raise CheckpointError(f"{where}: expected a list of state dicts, found {describe(states)}")
    for i, s in enumerate(states):
        check_state(s, f"{where}: states[{i}]")
    if not same or not states:
        return
    ref = states[0]
    for i, s in enumerate(states[1:], 1):
        for n in ref.keys():
            if n not in s:
                raise CheckpointError(f"{where}: tensor '{n}' is in states[0] but missing from states[{i}]")
            if tuple(s[n].shape) != tuple(ref[n].shape):
                raise CheckpointError(f"{where}: tensor '{n}' has shape {tuple(ref[n].shape)} in states[0] but"
                                      f" {tuple(s[n].shape)} in states[{i}]")
