"""Lazy checkpoint readers: one tensor at a time, never a whole-model load.

Supported inputs
* a Hugging Face model folder: ``model.safetensors``, a sharded
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``;
* a single ``.safetensors`` file;
* a PyTorch ``.pt`` / ``.bin`` state dict, loaded only with ``torch.load(weights_only=True)``;
  nested dicts are read with dotted names (``{"encoder": {"w": t}}`` -> ``encoder.w``).

``path@key`` (or ``select="key"``) reads only the sub-dict ``key`` (dotted for deeper ones:
``ckpt.pt@model.encoder``), with the prefix removed from the names; it applies to every
format (for safetensors it selects the names under ``key.``).  A path that exists as
written is never split, so a file named ``a@b.pt`` is read as itself.

Everything is validated before any tensor memory is allocated (see docs/reliability.md,
"Inputs"): only regular files are opened (a FIFO or device never blocks the reader),
safetensors headers are checked entry by entry with Python integers, index files may only
name shards inside the model folder and must agree with the shards, and ``.pt`` content
must be real-valued dense tensors.  Every failure is one :class:`CheckpointError` line.

Safetensors files are read with our own header parser and ``os.pread`` straight into the
tensor's memory: no mmap, so resident memory holds only the tensors in use, and the
read releases the GIL (threads overlap reading with computing).
"""
from __future__ import annotations

import json
import os
import stat
import struct
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import torch

from ..errors import CheckpointError
from . import WEIGHT_FILES
from .validate import check_tensor, describe

# safetensors dtype code <-> torch dtype
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024

_FILE_KINDS = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP, EACCES, ENOTDIR, ENAMETOOLONG ...
        raise CheckpointError(f"{path}: cannot access ({e.strerror})") from None
    except ValueError as e:  # embedded NUL byte
        raise CheckpointError(f"{path!r}: not a usable path ({e})") from None


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is a regular file (symlinks followed); else one CheckpointError line.
    Never opens it, so a FIFO or a device cannot block."""
    p = Path(path)
    st = _stat(p)
    if st is None:
        raise CheckpointError(f"{p}: no such {what}")
    bad = _not_regular(st.st_mode)
    if bad:
        raise CheckpointError(f"{p}: expected a regular {what}, found {bad}")
    return p


def open_regular(path: str | os.PathLike, what: str = "file") -> int:
    """A read-only descriptor of a regular file. Opened non-blocking and checked with fstat,
    so a FIFO or device swapped in after a stat is refused instead of hanging."""
    p = Path(path)
    check_regular_file(p, what)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such {what}") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot open ({e.strerror})") from None
    bad = _not_regular(os.fstat(fd).st_mode)
    if bad:
        os.close(fd)
        raise CheckpointError(f"{p}: expected a regular {what}, found {bad}")
    return fd


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _is_int(x) -> bool:
    return type(x) is int  # not bool, not float


def _parse_header_json(raw: bytes, where: str) -> dict:
    if raw[:1] != b"{":  # the format: the header starts with '{' (and may end in space padding)
        raise CheckpointError(f"{where}: corrupted safetensors file (the header does not start with '{{')")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: corrupted safetensors file (header is not UTF-8 text)") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as d:
        raise CheckpointError(f"{where}: corrupted safetensors file (header names '{d.args[0]}' twice)") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where}: corrupted safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{where}: corrupted safetensors file (header is a JSON {type(header).__name__}, expected an object)")
    return header


def parse_safetensors_header(header: dict, data_len: int, where: str
                             ) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], dict[str, str]]:
    """Validate a decoded safetensors header against ``data_len`` bytes of data: every entry an
    object with a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets``
    ``[begin, end]`` inside the data with ``end - begin == prod(shape) * itemsize`` (Python
    integers: no overflow), ranges covering the data exactly without overlap, and
    ``__metadata__`` a string -> string map.  Returns ``(entries, metadata)``."""
    meta = header.get("__metadata__")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{where}: corrupted safetensors file (__metadata__ must map strings to strings)")
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        bad = f"{where}: corrupted safetensors file (tensor '{name}'"
        if not isinstance(e, dict):
            raise CheckpointError(f"{bad}: header entry is a JSON {type(e).__name__}, expected an object)")
        for k in ("dtype", "shape", "data_offsets"):
            if k not in e:
                raise CheckpointError(f"{bad}: header entry has no '{k}')")
        code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str) or code not in ST_DTYPES:
            raise CheckpointError(f"{bad}: dtype {code!r} is not one of {', '.join(ST_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise CheckpointError(f"{bad}: shape {shape!r} is not a list of non-negative integers)")
        if any(s >= 1 << 63 for s in shape):  # torch sizes are int64 (even for an empty tensor)
            raise CheckpointError(f"{bad}: shape {shape!r} has a dimension of 2^63 or more)")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(x) for x in offs)
                and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{bad}: data_offsets {offs!r} is not [begin, end] with 0 <= begin <= end)")
        b, end = offs
        dt = ST_DTYPES[code]
        numel = 1
        for s in shape:
            numel *= s  # Python ints: no overflow
        if end - b != numel * dt.itemsize:
            raise CheckpointError(f"{bad}: shape {tuple(shape)} and dtype {code} need {numel * dt.itemsize} bytes,"
                                  f" data_offsets span {end - b})")
        if end > data_len:
            raise CheckpointError(f"{where}: truncated or corrupted safetensors file (tensor '{name}':"
                                  f" data_offsets [{b}, {end}] run past the {data_len} data bytes of the file)")
        entries[name] = (dt, tuple(shape), b, end)
    pos = 0
    for name, (_, _, b, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if b < pos:
            raise CheckpointError(f"{where}: corrupted safetensors file (tensor '{name}' overlaps another tensor's"
                                  f" bytes at offset {b})")
        if b > pos:
            raise CheckpointError(f"{where}: corrupted safetensors file (bytes {pos}..{b} belong to no tensor)")
        pos = end
    if pos != data_len:
        raise CheckpointError(f"{where}: truncated or corrupted safetensors file (the header describes {pos} data"
                              f" bytes, the file has {data_len})")
    return entries, dict(meta)


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and validated eagerly, data read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = None
        self._fd = open_regular(self.path, "safetensors file")
        try:
            self.entries, self.metadata, self._data_start = self._parse_header()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _parse_header(self):
        size = os.fstat(self._fd).st_size
        where = f"{self.path}"
        if size < 8:
            raise CheckpointError(f"{where}: truncated or corrupted safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", self._read_exact(0, 8))
        if n > _MAX_HEADER and 8 + n <= size:
            raise CheckpointError(f"{where}: corrupted safetensors file (header length {n} bytes is more than the"
                                  f" format's limit of {_MAX_HEADER})")
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{where}: truncated or corrupted safetensors file (header length {n} bytes, file has {size})")
        header = _parse_header_json(self._read_exact(8, n), where)
        entries, meta = parse_safetensors_header(header, size - 8 - n, where)
        return entries, meta, 8 + n

    def _read_exact(self, offset: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = os.pread(self._fd, n - len(out), offset + len(out))
            if not b:
                raise CheckpointError(f"{self.path}: truncated while reading the header")
            out += b
        return bytes(out)

    def read(self, name: str) -> torch.Tensor:
        dt, shape, b, end = self.entries[name]
        return self._pread(name, b, end - b).view(dt).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` along axis 0: one contiguous byte range of the file."""
        dt, shape, b, end = self.entries[name]
        if not shape:
            raise CheckpointError(f"{self.path}: tensor '{name}' is 0-dimensional: it has no rows")
        start, stop, _ = slice(start, stop).indices(shape[0])
        stop = max(start, stop)
        row = (end - b) // shape[0] if shape[0] else 0
        return self._pread(name, b + start * row, (stop - start) * row).view(dt).reshape((stop - start,) + shape[1:])

    def _pread(self, name: str, b: int, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            got = 0
            while got < nbytes:  # pread may return short counts for huge reads
                k = os.preadv(self._fd, [view[got:]], self._data_start + b + got)
                if k <= 0:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor '{name}'")
                got += k
        return buf

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ------------------------------------------------------------------ PyTorch files
def flatten_state(obj: Mapping, where: str) -> tuple[dict[str, object], dict[str, object]]:
    """``(tensors, others)``: every leaf of a nested mapping under its dotted name.

    ``tensors`` holds the ``torch.Tensor`` leaves, ``others`` every other leaf (numbers,
    strings, lists, ``None``; non-string keys are reported there too).  Two paths that give
    the same dotted name (``{"a": {"b": x}, "a.b": y}``) are an error."""
    tensors: dict[str, object] = {}
    others: dict[str, object] = {}
    stack = [("", obj)]
    while stack:
        prefix, m = stack.pop()
        for k, v in m.items():
            if not isinstance(k, str):
                others[f"{prefix}{k!r}"] = v
                continue
            name = prefix + k
            if isinstance(v, Mapping):
                stack.append((name + ".", v))
            elif name in tensors or name in others:
                raise CheckpointError(f"{where}: two entries are both named '{name}' once nested dicts are"
                                      " joined with dots")
            elif isinstance(v, torch.Tensor):
                tensors[name] = v
            else:
                others[name] = v
    return tensors, others


def _under(name: str, select: str | None) -> bool:
    return select is None or name.startswith(select + ".")


def _all_tensor_subdicts(obj: Mapping) -> list[str]:
    """Top-level keys whose value is a (nested) dict of tensors only: what ``@key`` may pick."""
    out = []
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, Mapping):
            try:
                t, o = flatten_state(v, "")
            except CheckpointError:
                continue
            if t and not o:
                out.append(k)
    return out


def _torch_load(path: Path, select: str | None = None) -> dict[str, torch.Tensor]:
    """Weights-only load of a PyTorch file -> ``{dotted name: tensor}`` (with ``select``: only
    the names under ``select.``, kept whole).  Refused, one line each: anything that is not a
    mapping; a non-tensor leaf where the tensors are read (the message names it and suggests
    ``@key`` for the sub-dicts that hold only tensors); a tensor that is not dense and real."""
    check_regular_file(path, "PyTorch file")
    try:
        with warnings.catch_warnings():  # deprecation chatter is not the user's business
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # UnpicklingError for unsafe pickles, others for garbage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: not a weights-only PyTorch state dict ({first[:200]})") from None
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {describe(obj)}")
    tensors, others = flatten_state(obj, str(path))
    bad = [n for n in others if _under(n, select)]
    if bad:
        where = f"{path}@{select}" if select else str(path)
        picks = [k for k in _all_tensor_subdicts(obj if select is None else _subdict(obj, select))]
        hint = ("; to read only a sub-dict of tensors, name it: "
                + ", ".join(f"{path}@{select + '.' if select else ''}{k}" for k in picks[:3])) if picks else ""
        raise CheckpointError(f"{where}: '{bad[0]}' is {describe(others[bad[0]])}, not a tensor "
                              f"({len(bad)} non-tensor entr{'y' if len(bad) == 1 else 'ies'}){hint}")
    out = {n: t for n, t in tensors.items() if _under(n, select)}
    if select is not None and not out:
        what = "a tensor, not a sub-dict of tensors" if select in tensors else "not a sub-dict of tensors"
        tops = [str(k) for k in obj.keys()]
        raise CheckpointError(f"{path}@{select}: '{select}' is {what} (top-level keys: "
                              f"{', '.join(tops[:8])}{', ...' if len(tops) > 8 else ''})")
    for n, t in out.items():
        check_tensor(n, t, str(path))
    return out


def _subdict(obj: Mapping, select: str) -> Mapping:
    """The nested mapping at the dotted ``select`` (matching dotted keys too), or {}."""
    cur: Mapping = obj
    rest = select
    while rest:
        for k, v in cur.items():
            if isinstance(k, str) and isinstance(v, Mapping) and (rest == k or rest.startswith(k + ".")):
                cur, rest = v, rest[len(k) + 1:]
                break
        else:
            return {}
    return cur


# ------------------------------------------------------------------ checkpoints
class Checkpoint:
    """A lazily read checkpoint: ``name -> tensor``, one tensor per :meth:`get`.

    ``files`` maps every stored tensor name to its file.  With ``index`` (the index file the
    map came from) every shard must hold exactly the tensors the index gives it.  With
    ``select`` only the names under ``select.`` are visible, without that prefix.
    Thread-safe: several threads may :meth:`get` at once.
    """

    def __init__(self, path: Path, files: dict[str, str], config: dict | None, kind: str,
                 select: str | None = None, index: Path | None = None, opened: dict | None = None):
        self.path = path
        self.config = config
        self.kind = kind                   # "safetensors" or "torch"
        self.select = select
        self._open: dict[str, object] = dict(opened or {})
        self._lock = threading.Lock()
        meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        label = str(index) if index is not None else str(path)
        for f in dict.fromkeys(files.values()):
            h = self._handle(f)
            for name, (dt, shape) in self._entries(h).items():
                owner = files.get(name)
                if owner == f:
                    meta[name] = (dt, shape)
                elif index is not None and owner is None:
                    raise CheckpointError(f"{label}: shard {Path(f).name} holds tensor '{name}', which the index"
                                          " does not list")
                elif index is not None:
                    raise CheckpointError(f"{label}: tensor '{name}' is in two shards, {Path(owner).name} (where"
                                          f" the index puts it) and {Path(f).name}")
        missing = [n for n in files if n not in meta]
        if missing:
            raise CheckpointError(
                f"{label}: lists tensor '{missing[0]}' in {Path(files[missing[0]]).name}, but that file does not"
                " hold it")
        public = _select_names(list(files), select, f"{path}@{select}" if select else str(path))
        self._stored = public                       # public name -> stored name
        self._files = {n: files[s] for n, s in public.items()}
        self._meta = {n: meta[s] for n, s in public.items()}

    # -- the Checkpoint interface -------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._check(name)][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[self._check(name)][0]

    def get(self, name: str) -> torch.Tensor:
        h = self._handle(self._files[self._check(name)])
        s = self._stored[name]
        if isinstance(h, SafetensorsFile):
            return h.read(s)
        return h[s]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (axis 0) of one tensor, reading only those bytes; equal to
        ``get(name)[start:stop]``.  The merge engine uses it to stream big tensors in row
        blocks of a fixed size (Checkpoint-like objects without it are read whole)."""
        h = self._handle(self._files[self._check(name)])
        s = self._stored[name]
        if isinstance(h, SafetensorsFile):
            return h.read_rows(s, start, stop)
        return h[s][start:stop]

    def __contains__(self, name) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __repr__(self) -> str:
        sel = f"@{self.select}" if self.select else ""
        return f"Checkpoint({str(self.path) + sel!r}, {len(self)} tensors)"

    # -- extras ------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of the first file ({} for PyTorch files)."""
        fs = list(dict.fromkeys(self._files.values()))
        h = self._handle(fs[0]) if fs else None
        return dict(h.metadata) if isinstance(h, SafetensorsFile) else {}

    @property
    def files(self) -> list[Path]:
        """The weight files, in order (what the model card checksums)."""
        return [Path(f) for f in dict.fromkeys(self._files.values())]

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n

    def nbytes(self, name: str) -> int:
        return self.numel(name) * self.dtype(name).itemsize

    def close(self):
        with self._lock:
            for h in self._open.values():
                if isinstance(h, SafetensorsFile):
                    h.close()
            self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, name: str) -> str:
        if name not in self._files:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'")
        return name

    def _handle(self, f: str):
        with self._lock:
            h = self._open.get(f)
            if h is None:
                h = SafetensorsFile(f) if self.kind == "safetensors" else _torch_load(Path(f))
                self._open[f] = h
            return h

    @staticmethod
    def _entries(h) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if isinstance(h, SafetensorsFile):
            return {n: (e[0], e[1]) for n, e in h.entries.items()}
        return {n: (t.dtype, tuple(t.shape)) for n, t in h.items()}


def _select_names(names: list[str], select: str | None, where: str) -> dict[str, str]:
    """``{public name: stored name}``: all names, or those under ``select.`` without the prefix."""
    if select is None:
        out = {n: n for n in names}
    else:
        pre = select + "."
        out = {n[len(pre):]: n for n in names if n.startswith(pre)}
        if not out:
            if select in names:
                raise CheckpointError(f"{where}: '{select}' is a tensor, not a sub-dict of tensors")
            tops = sorted({n.split(".", 1)[0] for n in names})
            raise CheckpointError(f"{where}: no tensors under '{select}' (top-level names: "
                                  f"{', '.join(tops[:8])}{', ...' if len(tops) > 8 else ''})")
    if not out:
        raise CheckpointError(f"{where}: the checkpoint holds no tensors")
    return out


def _read_json(p: Path, what: str, duplicate: str = "'{}' appears twice in one object of the {}"):
    fd = open_regular(p, what)
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read {what} ({e.strerror})") from None
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as d:
        raise CheckpointError(f"{p}: " + duplicate.format(d.args[0], what)) from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{p}: cannot read {what} ({str(e)[:120]})") from None


def read_config(p: Path) -> dict:
    """``config.json`` as a dict; anything but a JSON object is a CheckpointError naming it."""
    cfg = _read_json(p, "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: expected a JSON object, found a JSON {type(cfg).__name__}")
    return cfg


def _shard_path(folder: Path, index: Path, name: str, fn) -> Path:
    """The shard file ``fn`` that ``index`` names for tensor ``name``: a relative path that
    stays in the model folder, also after following symlinks (a Hugging Face cache snapshot's
    links into its ``blobs/`` folder are allowed)."""
    where = f"{index}: tensor '{name}'"
    if not isinstance(fn, str) or not fn:
        raise CheckpointError(f"{where}: the weight_map value is {describe(fn)}, expected a shard file name")
    parts = PurePosixPath(fn).parts
    if (PurePosixPath(fn).is_absolute() or PureWindowsPath(fn).is_absolute() or PureWindowsPath(fn).drive
            or ".." in parts or ".." in PureWindowsPath(fn).parts or "\0" in fn):
        raise CheckpointError(f"{where}: shard path '{fn}' leaves the model folder {folder}")
    p = folder / fn
    if _stat(p) is None:
        raise CheckpointError(f"{where}: shard '{fn}' is missing from {folder}")
    real, root = p.resolve(), folder.resolve()
    if not real.is_relative_to(root):
        snap = root.parent
        if not (snap.name == "snapshots" and real.is_relative_to(snap.parent / "blobs")):
            raise CheckpointError(f"{where}: shard '{fn}' is a link to {real}, outside the model folder {folder}")
    return p


def _from_index(folder: Path, index: Path) -> dict[str, str]:
    data = _read_json(index, "index file", "tensor '{}' is listed twice (or a key appears twice in one object)")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: expected a JSON object with a non-empty 'weight_map' object")
    files: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, fn in wm.items():
        if not isinstance(fn, str) or fn not in seen:
            seen[fn] = str(_shard_path(folder, index, name, fn))
        files[name] = seen[fn]
    return files


def _single(path: Path, kind: str, select: str | None) -> tuple[dict[str, str], dict]:
    if kind == "safetensors":
        h = SafetensorsFile(path)
        names = sorted(h.entries, key=lambda n: h.entries[n][2])  # file order
    else:
        h = _torch_load(path, select)
        names = list(h)
    return {n: str(path) for n in names}, {str(path): h}


def split_selector(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``"ckpt.pt@model.encoder"`` -> ``(Path("ckpt.pt"), "model.encoder")``.

    A path that exists as written is never split; otherwise the text after the last ``@``
    (without ``/``) is the sub-dict when the text before it exists."""
    path = os.fspath(path)
    if not isinstance(path, str):
        return Path(os.fsdecode(path)).expanduser(), None
    p = Path(path).expanduser()
    if "@" not in path or _stat(p) is not None:
        return p, None
    head, _, key = path.rpartition("@")
    if "/" in key or os.sep in key or not head:
        return p, None
    base = Path(head).expanduser()
    if _stat(base) is None:
        return p, None
    if not key or any(not part for part in key.split(".")):
        raise CheckpointError(f"{path}: '@{key}' is not a sub-dict name (expected @name or @name.sub)")
    return base, key


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` (``@key`` allowed) names something on disk."""
    p, _ = split_selector(path)
    return _stat(p) is not None


def open_checkpoint(path: str | os.PathLike, select: str | None = None) -> Checkpoint:
    """Open a checkpoint lazily (HF folder, sharded index, ``.safetensors``, ``.pt``/``.bin``).

    ``path@key`` or ``select="key"`` reads only the sub-dict ``key`` (dotted: ``a.b``), names
    without the prefix."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"expected a checkpoint path, found {describe(path)}")
    p, sel = split_selector(path)
    if select is not None:
        if sel is not None:
            raise CheckpointError(f"{path}: give the sub-dict either as @{sel} or as select=, not both")
        if not isinstance(select, str) or not select or any(not s for s in select.split(".")):
            raise CheckpointError(f"{path}: select={select!r} is not a sub-dict name")
        sel = select
    st = _stat(p)
    if st is None:
        raise CheckpointError(f"{p}: no such file or folder")
    config = None
    if stat.S_ISDIR(st.st_mode):
        cfg = p / "config.json"
        if _stat(cfg) is not None:
            config = read_config(cfg)
        for fn, kind, is_index in WEIGHT_FILES:
            f = p / fn
            if _stat(f) is not None:
                if is_index:
                    return Checkpoint(p, _from_index(p, f), config, kind, sel, index=f)
                files, opened = _single(f, kind, sel)
                return Checkpoint(p, files, config, kind, sel, opened=opened)
        sts = sorted(p.glob("*.safetensors"))
        if len(sts) == 1:
            files, opened = _single(sts[0], "safetensors", sel)
            return Checkpoint(p, files, config, "safetensors", sel, opened=opened)
        raise CheckpointError(
            f"{p}: no model weights found (expected model.safetensors, model.safetensors.index.json,"
            " pytorch_model.bin or pytorch_model.bin.index.json"
            + (f"; found {len(sts)} .safetensors files and no index)" if sts else ")"))
    suffix = p.suffix.lower()
    cfg = p.parent / "config.json"
    if p.name.endswith(".index.json"):
        kind = "safetensors" if "safetensors" in p.name else "torch"
        config = read_config(cfg) if _stat(cfg) is not None else None
        return Checkpoint(p.parent, _from_index(p.parent, p), config, kind, sel, index=p)
    if suffix == ".safetensors":
        kind = "safetensors"
    elif suffix in (".pt", ".pth", ".bin"):
        kind = "torch"
    else:
        raise CheckpointError(f"{p}: unknown checkpoint format (expected a folder, .safetensors, .pt, .pth or .bin)")
    check_regular_file(p, "checkpoint file")
    config = read_config(cfg) if _stat(cfg) is not None else None
    files, opened = _single(p, kind, sel)
    return Checkpoint(p, files, config, kind, sel, opened=opened)


class LazyState(Mapping):
    """A read-only ``Mapping[str, Tensor]`` over a checkpoint; each access reads one tensor."""

    def __init__(self, ckpt: Checkpoint):
        self.checkpoint = ckpt

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.checkpoint:
            raise KeyError(name)
        return self.checkpoint.get(name)

    def __iter__(self):
        return iter(self.checkpoint.keys())

    def __len__(self):
        return len(self.checkpoint)

    def __contains__(self, name) -> bool:
        return name in self.checkpoint


def load_state(path: str | os.PathLike, select: str | None = None) -> LazyState:
    """A lazy ``Mapping[str, Tensor]`` over the checkpoint at ``path`` (``path@key`` allowed)."""
    return LazyState(open_checkpoint(path, select))
