"""Where a run writes: checked before any work, locked for the whole run, cleaned up on signals.

Every command that writes goes through :class:`Output`:

* :meth:`Output.__init__` refuses, with one line, an output path that is an input, contains
  one or lies inside one (resolved paths and ``st_dev``/``st_ino``, so symlinks, ``..`` and
  hard links are seen through), a dangling or looping symlink, an existing file where a
  folder is expected (or the reverse), a missing parent, and an existing non-empty folder
  without ``force``.
* ``with Output(...)`` takes an exclusive, non-blocking ``fcntl.flock`` on a lock file beside
  the output (``.<name>.mergelab-lock``): a second run on the same output fails at once.
  Holding the lock proves that no live run writes this output, so the temporary siblings
  (``.<name>.mergelab-tmp-*``) a killed run left are removed then; an interrupted final
  rename (``.<name>.mergelab-old-*``) is rolled back.  The lock file is removed on exit.
* :func:`install_signal_handlers` turns SIGTERM and SIGHUP into the same exception as
  Ctrl-C (:class:`Interrupted`, a ``KeyboardInterrupt``), so every ``with`` block on the way
  out removes its temporary files.

Temporary names: ``.<name>.mergelab-tmp-XXXXXXXX`` beside the output (a folder for folder
outputs, a file for file outputs), renamed into place at the end.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import string
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import MergelabError

TMP = "mergelab-tmp"
OLD = "mergelab-old"
LOCK = "mergelab-lock"
_ALNUM = string.ascii_lowercase + string.digits


# ------------------------------------------------------------------ signals
class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP: raised in the main thread; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_interrupting = False
_pending: int | None = None   # the first handled signal of this command, even if its exception was lost
_hooked = False
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _handler(signum, frame):
    global _interrupting, _pending
    if _pending is None:
        _pending = int(signum)
    if _interrupting:  # a second signal while the first one unwinds: let the cleanup finish
        return
    _interrupting = True
    raise Interrupted(signum)


def _unraisable(u) -> None:
    """Python runs the handler wherever the main thread is, also inside a ``__del__``, a weakref
    finaliser or an atexit callback, where the raised :class:`Interrupted` is printed as
    "Exception ignored" and dropped. Drop it silently instead: the signal stays recorded in
    ``_pending`` (no commit happens after it, the command exits 128 + signum) and the next
    signal raises again."""
    global _interrupting
    if isinstance(u.exc_value, Interrupted):
        _interrupting = False
        return
    _previous_unraisablehook(u)


_previous_unraisablehook = sys.unraisablehook


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` once (main thread only)."""
    global _interrupting, _pending, _hooked, _previous_unraisablehook
    if threading.current_thread() is not threading.main_thread():
        return
    _interrupting, _pending = False, None
    if not _hooked:
        _previous_unraisablehook, sys.unraisablehook, _hooked = sys.unraisablehook, _unraisable, True
    for s in HANDLED_SIGNALS:
        signal.signal(s, _handler)


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` if a handled signal arrived and its exception was lost."""
    if _pending is not None:
        raise Interrupted(_pending)


@contextmanager
def signals_blocked() -> Iterator[None]:
    """Defer the handled signals (main thread) over a few renames that must not be split; a
    signal that arrived before (even one whose exception was lost) prevents them."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS) if main else None
    try:
        raise_if_interrupted()
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------ paths
def _resolve(p: Path, option: str) -> Path:
    try:
        return p.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise MergelabError(f"{option} {p}: cannot resolve the path ({e})") from None


def _ident(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(p: Path) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of ``p`` (if it exists) and of every existing folder above it."""
    out = []
    for q in [p, *p.parents]:
        i = _ident(q)
        if i is not None:
            out.append(i)
    return out


def model_code_path(model_code: str | None) -> Path | None:
    """The file behind ``MODULE:FACTORY`` when it is one (``path/x.py`` or a module in the cwd)."""
    if not model_code or ":" not in str(model_code):
        return None
    mod = str(model_code).rpartition(":")[0]
    cand = Path(mod) if mod.endswith(".py") else Path(mod.replace(".", os.sep) + ".py")
    return cand if cand.exists() else None


def check_not_input(option: str, out: str | os.PathLike, inputs: Iterable[tuple[str, Any]], *,
                    contains: bool = True, inside: bool = True, shown: Any = None) -> None:
    """Refuse ``out`` when it is one of ``inputs`` (``(label, path)``), lies inside one
    (``inside``), or (``contains``: the output replaces a whole folder) contains one.

    Paths are compared resolved and by ``(st_dev, st_ino)``, so symlinks, relative paths and
    hard links naming the same file are caught."""
    o = Path(out).expanduser()
    ro = _resolve(o, option)
    out = out if shown is None else shown
    o_chain = _chain(ro)
    o_id = _ident(ro)
    for label, path in inputs:
        if path is None or not isinstance(path, (str, os.PathLike)):
            continue
        p = Path(path).expanduser()
        try:
            rp = p.resolve()
        except (RuntimeError, OSError):
            continue
        p_id = _ident(rp)
        named = f"{label} ({p})" if str(p) != label else label
        if rp == ro or (p_id is not None and p_id == o_id):
            raise MergelabError(f"{option} {out}: is the input {named}; refusing to write over an input")
        if inside and (rp in ro.parents or (p_id is not None and p_id in o_chain[1 if o_id else 0:])):
            raise MergelabError(f"{option} {out}: lies inside the input {named}; write the output elsewhere")
        if contains and (ro in rp.parents or (o_id is not None and o_id in _chain(rp)[1 if p_id else 0:])):
            raise MergelabError(f"{option} {out}: contains the input {named}; replacing it would delete that input")


def free_bytes(folder: str | os.PathLike) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def os_error(option: str, out: Path, e: OSError, doing: str = "writing") -> MergelabError:
    """One line for an OS error met while writing the output."""
    why = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"no space left on the device of {out.parent}"
    elif e.errno == errno.EFBIG:
        why = "file too large (file size limit of this process or file system)"
    return MergelabError(f"{option} {out}: {why} while {doing} the output; nothing was written")


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                errno.ENAMETOOLONG, errno.EMLINK, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY,
                errno.EXDEV, errno.ELOOP}


def as_os_error(e: BaseException) -> OSError | None:
    """The OS error behind ``e`` when it is a write failure: an ``OSError`` with one of
    :data:`WRITE_ERRNOS`, or a safetensors error that wraps one (``... (os error 28)``)."""
    if isinstance(e, OSError):
        return e if e.errno in WRITE_ERRNOS else None
    m = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    if m and int(m.group(1)) in WRITE_ERRNOS:
        n = int(m.group(1))
        return OSError(n, os.strerror(n))
    return None


# ------------------------------------------------------------------ rename without replacing
def _renameat2():
    from .._libc import libc

    return getattr(libc(), "renameat2", None)  # glibc >= 2.28


# outputs put in place by this process (the final renames), so an interrupt that arrives after
# one is reported as such and not as "temporary output removed"
COMMITTED: list[Path] = []


def rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with ``FileExistsError`` when ``dst`` exists (even an
    empty folder, which plain ``rename`` would silently replace)."""
    f = _renameat2()
    if f is not None:
        AT_FDCWD, RENAME_NOREPLACE = -100, 1
        if f(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        from .._libc import get_errno

        err = get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # the file system lacks the flag: fall back
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


# ------------------------------------------------------------------ the lock
_held: dict[str, list] = {}   # lock path -> [fd, count]: re-entrant within one process
_held_lock = threading.Lock()


def _acquire(lock: Path, option: str, out: Path) -> bool:
    """Take the lock; False if this process already held it (then nothing to release)."""
    key = str(lock)
    with _held_lock:
        if key in _held:
            _held[key][1] += 1
            return False
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise MergelabError(f"{option} {out}: cannot create files in {out.parent} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MergelabError(f"{option} {out}: another mergelab run holds the output (lock {lock}); "
                                "wait for it to finish or choose another output") from None
        except BaseException:
            os.close(fd)
            raise
        # the holder before us may have unlinked the file after we opened it: retry on a stale inode
        if _ident(lock) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            break
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    with _held_lock:
        _held[key] = [fd, 1]
    return True


def _release(lock: Path) -> None:
    key = str(lock)
    with _held_lock:
        ent = _held.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] > 0:
            return
        del _held[key]
    try:
        os.unlink(lock)  # while still holding it: a waiter that opened it retries on the new file
    except OSError:
        pass
    os.close(ent[0])


def _random_suffix(n: int) -> str:
    """``n`` uniform characters of ``_ALNUM`` from ``os.urandom`` (rejection sampling; the
    ``secrets`` module would cost an import on every command's start-up)."""
    out: list[str] = []
    limit = 256 - 256 % len(_ALNUM)
    while len(out) < n:
        out += [_ALNUM[b % len(_ALNUM)] for b in os.urandom(n) if b < limit]
    return "".join(out[:n])


def sibling(out: Path, kind: str) -> Path:
    """A fresh ``.<name>.<kind>-XXXXXXXX`` path beside ``out`` (not created)."""
    while True:
        p = out.parent / f".{out.name}.{kind}-{_random_suffix(8)}"
        if not os.path.lexists(p):
            return p


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by a killed run (call with the lock held).

    An interrupted replacement (the old output moved aside, the new one not yet in place) is
    rolled back: the old output goes back to ``out``."""
    pat = re.compile(rf"^\.{re.escape(out.name)}\.({TMP}|{OLD})-[a-z0-9_]{{8}}$")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pat.match(p.name)
        if not m:
            continue
        if m.group(1) == OLD and (p / "old").exists() and not os.path.lexists(out):
            try:
                os.rename(p / "old", out)
            except OSError:
                pass
        _remove(p)
        removed.append(p)
    return removed


def _nonempty(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return next(it, None) is not None
    except OSError:  # unreadable: count it as holding something
        return True


# ------------------------------------------------------------------ the output
class Output:
    """One output path of a run: ``kind`` ``"folder"`` or ``"file"``.

    ``replaces``: the run replaces the whole path (a merge output folder, a statistics file),
    so it must not contain an input and an existing non-empty folder needs ``force``;
    otherwise (``align -o``, ``reproduce --out``) the run adds files inside the folder.
    ``inputs``: ``(label, path)`` pairs the run reads.
    """

    def __init__(self, path: str | os.PathLike, *, kind: str = "folder", option: str = "-o",
                 force: bool = False, inputs: Iterable[tuple[str, Any]] = (), replaces: bool = True,
                 parents: bool = False):
        self.option, self.kind, self.force, self.replaces = option, kind, force, replaces
        self.parents = parents
        if not isinstance(path, (str, os.PathLike)):
            raise MergelabError(f"{option}: expected an output path, found {type(path).__name__}")
        given = Path(path).expanduser()
        if str(path) == "" or given.name in ("", ".", ".."):
            given = _resolve(given.absolute(), option)
        given = given.absolute()
        if given.is_symlink():
            try:
                target = given.resolve(strict=True)
            except FileNotFoundError:
                raise MergelabError(f"{option} {path}: is a symbolic link to {os.readlink(given)}, which does "
                                    "not exist (dangling link)") from None
            except (RuntimeError, OSError) as e:
                raise MergelabError(f"{option} {path}: is a symbolic link that cannot be followed ({e})") from None
            given = target  # write where the link points
        self.path = Path(os.path.normpath(given))
        self.given = path
        out = self.path
        top = out.parent
        while parents and not os.path.lexists(top) and top != top.parent:
            top = top.parent  # created on entering; what exists must be a writable folder
        if parents and top.is_dir():
            if not os.access(top, os.W_OK | os.X_OK):
                raise MergelabError(f"{option} {path}: cannot create folders in {top} (permission denied)")
        elif not out.parent.is_dir():
            what = "does not exist" if not os.path.lexists(out.parent) else "is not a folder"
            raise MergelabError(f"{option} {path}: the parent folder {out.parent} {what}")
        check_not_input(option, out, inputs, contains=replaces and kind == "folder", shown=path)
        if os.path.lexists(out):
            if kind == "folder" and not out.is_dir():
                raise MergelabError(f"{option} {path}: exists and is not a folder (expected an output folder)")
            if kind == "file" and out.is_dir():
                raise MergelabError(f"{option} {path}: is a folder (expected an output file)")
            if kind == "file" and not out.is_file():  # never rename over /dev/null, a FIFO, a socket
                raise MergelabError(f"{option} {path}: exists and is not a regular file (a device, FIFO or "
                                    "socket); give a file path")
        if kind == "folder" and replaces and out.is_dir() and not force and _nonempty(out):
            raise MergelabError(f"{option} {path}: output folder exists and is not empty (use --force to replace it)")
        if out.parent.is_dir() and not os.access(out.parent, os.W_OK | os.X_OK):
            raise MergelabError(f"{option} {path}: cannot create files in {out.parent} (permission denied)")
        self.lock = out.parent / f".{out.name}.{LOCK}"
        self._mine = False
        self._made: list[Path] = []
        self._had: set[str] | None = None
        self.existed = os.path.lexists(out) and not (out.is_dir() and not _nonempty(out))

    # -- the lock for the whole run
    def __enter__(self) -> "Output":
        self._made = []  # folders this run created (parents, then the output folder): gone on failure
        if self.parents and not self.path.parent.is_dir():
            self._made = [q for q in [self.path.parent, *self.path.parent.parents] if not os.path.lexists(q)]
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._unmake()
                raise os_error(self.option, self.path, e, "creating the folders of") from None
        try:
            self._mine = _acquire(self.lock, self.option, self.path)
        except BaseException:
            self._unmake()
            raise
        try:
            if self._mine:
                clean_stale(self.path)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self._had = None  # names in an existing folder the run adds files into
        if self.kind == "folder" and not self.replaces:
            if not os.path.lexists(self.path):
                self._made.insert(0, self.path)  # the run adds files into a folder it creates
            elif self.path.is_dir():
                self._had = set(os.listdir(self.path))
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self._mine:  # a failed run: what it added goes (the lock kept others out)
            if self._made and self._made[0] == self.path:
                _remove(self.path)
            elif self._had is not None and self.path.is_dir():
                for n in set(os.listdir(self.path)) - self._had:
                    _remove(self.path / n)
        _release(self.lock)
        self._mine = False
        if exc_type is not None:
            self._unmake()
        self._made = []
        return False

    def _unmake(self) -> None:
        """Remove the folders this run created, deepest first, while they are empty."""
        for q in self._made:
            try:
                os.rmdir(q)
            except FileNotFoundError:
                continue
            except OSError:
                break  # not empty (another run's files): leave it and what holds it
        self._made = []

    # -- checks with numbers known after planning
    def check_space(self, nbytes: int) -> None:
        """Refuse before the work when the planned ``nbytes`` do not fit on the output's device."""
        try:
            free = free_bytes(self.path.parent)
        except OSError:
            return
        if nbytes > free:
            raise MergelabError(f"{self.option} {self.given}: the output needs about {_mb(nbytes)} but only "
                                f"{_mb(free)} are free on the device of {self.path.parent}")

    def check_not_replaced(self) -> None:
        """Before the final rename: a folder that appeared meanwhile is replaced only with ``force``."""
        out = self.path
        if self.force or not os.path.lexists(out):
            return
        if out.is_dir() and not _nonempty(out):
            return
        if not self.existed:
            raise MergelabError(f"{self.option} {self.given}: appeared while this run was writing it "
                                "(another program?); use --force to replace it")


@contextmanager
def atomic_file(path: str | os.PathLike, *, option: str = "-o") -> Iterator[Path]:
    """``with atomic_file(p) as tmp:`` write ``tmp``; renamed over ``p`` on success, removed on
    any error or signal.  OS errors (no space, read-only) become one-line errors."""
    out = Path(path).absolute()
    tmp = sibling(out, TMP)
    try:
        yield tmp
        with signals_blocked():
            os.replace(tmp, out)
            COMMITTED.append(out)
    except BaseException as e:
        _remove(tmp)
        oe = as_os_error(e)
        if oe is not None:
            raise os_error(option, out, oe) from None
        raise


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None, *,
                     option: str = "-o") -> Path:
    """A safetensors file written atomically (temporary sibling, then rename), its bytes a
    function of its content only (:func:`mergelab.io.writer.save_tensors`)."""
    from .writer import save_tensors

    with atomic_file(path, option=option) as tmp:
        save_tensors(tensors, tmp, metadata=metadata)
    return Path(path)


__all__ = ["Output", "Interrupted", "install_signal_handlers", "signals_blocked", "raise_if_interrupted", "check_not_input",
           "clean_stale", "atomic_file", "rename_noreplace", "os_error", "model_code_path", "free_bytes",
           "sibling", "WRITE_ERRNOS", "as_os_error", "save_safetensors"]
