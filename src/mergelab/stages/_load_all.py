"""Import every stage module of this package (each registers one stage)."""
import importlib
import pkgutil

from . import __path__ as _path

for _m in pkgutil.iter_modules(_path):
    if not _m.name.startswith("_") and _m.name != "registry":
        importlib.import_module(f"{__package__}.{_m.name}")
