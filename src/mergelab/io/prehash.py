"""Input checksums started before torch is imported (the ``merge`` and ``mergekit-yaml`` commands).

Importing torch takes the command's first 1.5-3 s on one core while the others idle; the
input checksums (:mod:`mergelab.io.checksums`) need no torch.  :func:`start` reads the
recipe with plain YAML, guesses the weight files of every model it names, the way
:func:`mergelab.io.reader.open_checkpoint` will pick them, and hashes them on background
threads while the import runs.  The merge then :func:`take`\\ s a started hash only for a
file the plan really reads, with the same algorithm, and only while ``os.stat`` still finds
the same file (device, inode, size, modification time); anything else is hashed as before.
A guess that fails (a recipe the real parser will refuse, a path that does not exist, a
non-regular file, an unknown layout) just starts nothing: errors come from the merge itself,
so this never changes what a command prints or returns, only when its hashing happens.

The threads are daemons, and a hash nobody took stops at its next 16 MiB window once
:func:`discard` is called, so a command that fails on its recipe exits at once instead of
finishing the hashes.
"""
from __future__ import annotations

import json
import os
import stat
import threading
from concurrent.futures import Future
from pathlib import Path

from . import WEIGHT_FILES
from .checksums import Cancelled, file_digest

_LOCK = threading.Lock()
_STARTED: dict[str, tuple[tuple, str, Future]] = {}   # realpath -> (stat identity, algorithm, digest), not yet taken
_STOPS: dict[int, threading.Event] = {}                # id(future) -> its stop event, while it may run


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _regular(p: Path) -> bool:
    return _identity(str(p)) is not None


def _index_files(folder: Path, index: Path) -> list[Path]:
    with open(index, "rb") as f:
        wm = json.load(f)["weight_map"]
    names = list(dict.fromkeys(wm.values()))
    if not names or not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
                            for n in names):
        return []
    return [folder / n for n in names]


def weight_files(ref: Path) -> list[Path]:
    """The weight files :func:`~mergelab.io.reader.open_checkpoint` would read for ``ref`` (a
    folder or a file), or [] when that is not plain (it then decides, and errs, itself)."""
    if ref.is_dir():
        for fn, _kind, is_index in WEIGHT_FILES:
            f = ref / fn
            if f.exists():
                if not _regular(f):
                    return []
                return _index_files(ref, f) if is_index else [f]
        sts = sorted(ref.glob("*.safetensors"))
        return sts if len(sts) == 1 else []
    if ref.name.endswith(".index.json"):
        return _index_files(ref.parent, ref) if _regular(ref) else []
    if ref.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin"):
        return [ref]
    return []


def recipe_models(recipe: str | os.PathLike) -> list[Path]:
    """The model paths a recipe file names (``base_model``, ``models[].model``,
    ``slices[].sources[].model``), resolved as :meth:`mergelab.recipe.Recipe.resolve_path`
    does (as given, else beside the recipe); references with ``+`` (LoRA) or ``@`` (a
    sub-dict) are left to the merge."""
    import yaml

    rp = Path(recipe)
    if not _regular(rp):
        return []
    with open(rp, "rb") as f:
        data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(data, dict):
        return []
    refs = [data.get("base_model")]
    refs += [m.get("model") for m in data.get("models") or [] if isinstance(m, dict)]
    for s in data.get("slices") or []:
        if isinstance(s, dict):
            refs += [src.get("model") for src in s.get("sources") or [] if isinstance(src, dict)]
    out = []
    for r in refs:
        if not isinstance(r, str) or not r or "+" in r or "@" in r:
            continue
        p = Path(r).expanduser()
        if not p.exists() and not p.is_absolute() and (rp.parent / p).exists():
            p = rp.parent / p
        out.append(p)
    return out


def start(recipe: str | os.PathLike, algorithm: str | None, threads: int | None = None) -> int:
    """Start hashing the weight files of the models ``recipe`` names with ``algorithm``
    (None: nothing) on ``threads - 1`` daemon threads, at least one (default ``threads``: the
    cores, at most 4; the import of torch takes the other core), largest file first.  Under
    torchrun only rank 0 hashes.  Returns the number of files started; never raises."""
    if algorithm is None or os.environ.get("RANK", "0") != "0":
        return 0
    try:
        files: dict[str, tuple[Path, tuple]] = {}
        for m in recipe_models(recipe):
            for f in weight_files(m):
                key = os.path.realpath(f)
                ident = _identity(key)
                if ident is not None and key not in files:
                    files[key] = (f, ident)
    except Exception:  # noqa: BLE001  (a guess: the merge reports the real problem)
        return 0
    if not files:
        return 0
    order = sorted(files, key=lambda k: -files[k][1][2])
    todo = []
    with _LOCK:
        for k in order:
            if k not in _STARTED:
                fut: Future = Future()
                _STARTED[k] = (files[k][1], algorithm, fut)
                _STOPS[id(fut)] = threading.Event()
                todo.append((k, fut))
    if not todo:  # all started by an earlier call
        return 0
    queue = list(reversed(todo))  # pop() takes the largest first

    def work() -> None:
        while True:
            with _LOCK:
                if not queue:
                    return
                path, fut = queue.pop()
                stop = _STOPS.get(id(fut))
            if stop is None or stop.is_set() or not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(file_digest(path, algorithm, stop=stop))
            except BaseException as e:  # noqa: BLE001  (handed to whoever takes it)
                fut.set_exception(e)
            finally:
                with _LOCK:
                    _STOPS.pop(id(fut), None)

    # the cores the import leaves idle: one fewer than the merge's threads (at least one)
    n = max(1, min((threads or min(4, os.cpu_count() or 1)) - 1, len(todo)))
    for i in range(n):
        threading.Thread(target=work, name=f"mergelab-prehash-{i}", daemon=True).start()
    return len(todo)


def take(path: str | os.PathLike, algorithm: str) -> Future | None:
    """The started digest of ``path`` if it was started with ``algorithm`` and ``os.stat``
    still finds the same file; None otherwise (the caller hashes it itself)."""
    key = os.path.realpath(path)
    with _LOCK:
        got = _STARTED.pop(key, None)
    if got is None:
        return None
    ident, algo, fut = got
    if algo != algorithm or _identity(key) != ident:
        _stop(fut)
        return None
    return fut


def _stop(fut: Future) -> None:
    with _LOCK:
        ev = _STOPS.pop(id(fut), None)
    if ev is not None:
        ev.set()
    fut.cancel()


def discard(everything: bool = False) -> None:
    """Stop every started hash nobody took (a running one at its next 16 MiB window) and
    forget them; ``everything``: the taken ones too (their takers then see
    :class:`~mergelab.io.checksums.Cancelled` and hash the file themselves)."""
    with _LOCK:
        futs = [f for _i, _a, f in _STARTED.values()]
        _STARTED.clear()
        if everything:
            evs = list(_STOPS.values())
            _STOPS.clear()
            for ev in evs:
                ev.set()
    for f in futs:
        _stop(f)


__all__ = ["start", "take", "discard", "recipe_models", "weight_files"]
