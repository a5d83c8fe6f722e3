"""One exception type for every user error.

A ``MergelabError`` carries one line that says what is wrong, where, and what was
expected versus found. The CLI prints it as ``error: <message>`` and exits with code 2;
library users catch it like any ``ValueError``.
"""
from __future__ import annotations


class MergelabError(ValueError):
    """A user error (bad input, bad recipe, bad checkpoint). Exit code 2 on the CLI."""

    exit_code = 2

    def __init__(self, message: str):
        # keep it to one line, whatever the caller passed
        super().__init__(" ".join(str(message).split()))


class DeviceError(MergelabError):
    """A device that this machine does not have (``cuda`` without CUDA, ``cuda:3`` of 2 GPUs)."""
