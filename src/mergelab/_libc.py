"""The C library of this process, for the few calls Python does not wrap (``renameat2``,
``mallopt``). ``CDLL(None)`` opens the process's own symbols, libc's included, without
``ctypes.util.find_library`` (which imports subprocess machinery and runs ``ldconfig``)."""
from __future__ import annotations

from typing import Any

_libc: Any = None


def libc() -> Any:
    """The libc handle (``use_errno=True``), or ``None`` where it cannot be opened."""
    global _libc
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    return _libc or None


def get_errno() -> int:
    import ctypes

    return ctypes.get_errno()
