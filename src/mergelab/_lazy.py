"""Lazy package attributes (PEP 562), shared by the packages whose public names need torch.

``lazy_names(__name__, {"name": ".module", ...})`` makes each name resolve on first use by
importing its defining module, so importing the package itself costs nothing. A public
function may share its name with a submodule (``mergelab.merge``, ``mergelab.repair.tact``):
importing that submodule makes Python bind it on the package, and the package then keeps the
function instead, as it did when the names were imported eagerly.
"""
from __future__ import annotations

import importlib
import sys
import types


class _LazyPackage(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if (name in self.__dict__.get("_LAZY", ()) and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}"):
            return
        super().__setattr__(name, value)


def lazy_names(package: str, names: dict[str, str]) -> None:
    """Install ``__getattr__``/``__dir__`` on ``package`` resolving ``names`` (public name ->
    defining module, relative to ``package``) on first use."""
    mod = sys.modules[package]
    ns = mod.__dict__
    ns["_LAZY"] = names

    def __getattr__(name: str):
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        from ._startup import quiet_interrupt

        with quiet_interrupt():  # the mergelab command: Ctrl-C while torch loads exits quietly
            value = getattr(importlib.import_module(where, package), name)
        ns[name] = value  # later look-ups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(ns) | set(ns.get("__all__", ())))

    ns["__getattr__"] = __getattr__
    ns["__dir__"] = __dir__
    mod.__class__ = _LazyPackage
