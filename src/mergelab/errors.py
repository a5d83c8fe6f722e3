"""One exception family for every user error.

A ``MergelabError`` carries one line that says what is wrong, where, and what was
expected versus found. The CLI prints it as ``error: <message>`` and exits with code 2;
library users catch it like any ``ValueError``.

Subclasses say which input was at fault (catch ``MergelabError`` to catch them all):

* :class:`CheckpointError`: a checkpoint file or folder (safetensors header, index file,
  ``.pt`` content, ``config.json``), or an in-memory state that is not ``name -> tensor``;
* :class:`RecipeError`: a merge recipe or an option of the API/CLI;
* :class:`DataError`: data for ``stats`` / ``align`` (files, labels, token ids, shapes).
"""
from __future__ import annotations


class MergelabError(ValueError):
    """A user error (bad input, bad recipe, bad checkpoint). Exit code 2 on the CLI."""

    exit_code = 2

    def __init__(self, message: str):
        # keep it to one line, whatever the caller passed
        super().__init__(" ".join(str(message).split()))


class CheckpointError(MergelabError):
    """A checkpoint (file, folder, index, header, ``.pt`` content, config) or a state dict is unusable."""


class RecipeError(MergelabError):
    """A recipe, or an argument of the API or CLI, is invalid."""


class DataError(MergelabError):
    """Data for a statistics or alignment pass does not fit the model."""


class DeviceError(MergelabError):
    """A device that this machine does not have (``cuda`` without CUDA, ``cuda:3`` of 2 GPUs)."""


__all__ = ["MergelabError", "CheckpointError", "RecipeError", "DataError", "DeviceError"]
