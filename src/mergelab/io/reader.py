"""Lazy checkpoint readers: one tensor at a time, never a whole-model load.

Supported inputs
* a Hugging Face model folder: ``model.safetensors``, a sharded
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``;
* a single ``.safetensors`` file;
* a PyTorch ``.pt`` / ``.bin`` state dict, loaded only with ``torch.load(weights_only=True)``.

Safetensors files are read with our own header parser and ``os.pread`` straight into the
tensor's memory: no mmap, so resident memory holds only the tensors in use, and the
read releases the GIL (threads overlap reading with computing).
"""
from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch

from ..errors import MergelabError

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


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and validated eagerly, data read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise MergelabError(f"{self.path}: no such file") from None
        except OSError as e:
            raise MergelabError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self.entries, self.metadata, self._data_start = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _parse_header(self):
        size = os.fstat(self._fd).st_size
        where = f"{self.path}"
        if size < 8:
            raise MergelabError(f"{where}: truncated or corrupted safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > _MAX_HEADER or 8 + n > size:
            raise MergelabError(
                f"{where}: truncated or corrupted safetensors file (header length {n} bytes, file has {size})")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
            if not isinstance(header, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise MergelabError(f"{where}: corrupted safetensors file (header is not valid JSON)") from None
        meta = header.pop("__metadata__", None) or {}
        entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for name, e in header.items():
            try:
                dt = ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                b, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MergelabError(f"{where}: corrupted safetensors file (bad header entry for tensor '{name}')") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - b != numel * dt.itemsize or b < 0:
                raise MergelabError(
                    f"{where}: corrupted safetensors file (tensor '{name}' of shape {shape} and dtype"
                    f" {e['dtype']} spans {end - b} bytes, expected {numel * dt.itemsize})")
            entries[name] = (dt, shape, b, end)
            spans.append((b, end))
        data_len = size - 8 - n
        spans.sort()
        pos = 0
        for b, end in spans:
            if b != pos:
                raise MergelabError(f"{where}: corrupted safetensors file (tensor data not contiguous at byte {pos})")
            pos = end
        if pos != data_len:
            raise MergelabError(
                f"{where}: truncated or corrupted safetensors file (header says {pos} data bytes, file has {data_len})")
        return entries, meta, 8 + n

    def read(self, name: str) -> torch.Tensor:
        dt, shape, b, end = self.entries[name]
        return self._pread(name, b, end - b).view(dt).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` along axis 0: one contiguous byte range of the file."""
        dt, shape, b, end = self.entries[name]
        if not shape:
            raise ValueError(f"tensor '{name}' is 0-dimensional: it has no rows")
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
                    raise MergelabError(f"{self.path}: truncated while reading tensor '{name}'")
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


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Weights-only load; anything that is not a plain tensor state dict is refused."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MergelabError(f"{path}: no such file") from None
    except Exception as e:  # UnpicklingError for unsafe pickles, others for garbage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergelabError(
            f"{path}: refused to load: not a weights-only PyTorch state dict ({first[:200]})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise MergelabError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    out = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise MergelabError(f"{path}: the state dict holds no tensors")
    return out


class Checkpoint:
    """A lazily read checkpoint: ``name -> tensor``, one tensor per :meth:`get`.

    Thread-safe: several threads may :meth:`get` at once.
    """

    def __init__(self, path: Path, files: dict[str, str], config: dict | None, kind: str):
        self.path = path
        self.config = config
        self.kind = kind                   # "safetensors" or "torch"
        self._files = files                # tensor name -> file path, in checkpoint order
        self._open: dict[str, object] = {}
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for f in dict.fromkeys(files.values()):
            h = self._handle(f)
            for name, (dt, shape) in self._entries(h).items():
                if files.get(name) == f:
                    self._meta[name] = (dt, shape)
        missing = [n for n in files if n not in self._meta]
        if missing:
            raise MergelabError(
                f"{path}: index lists tensor '{missing[0]}' in {files[missing[0]]}, but that file does not hold it")

    # -- the Checkpoint interface -------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._check(name)][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[self._check(name)][0]

    def get(self, name: str) -> torch.Tensor:
        h = self._handle(self._files[self._check(name)])
        if isinstance(h, SafetensorsFile):
            return h.read(name)
        return h[name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (axis 0) of one tensor, reading only those bytes; equal to
        ``get(name)[start:stop]``.  The merge engine uses it to stream big tensors in row
        blocks of a fixed size (Checkpoint-like objects without it are read whole)."""
        h = self._handle(self._files[self._check(name)])
        if isinstance(h, SafetensorsFile):
            return h.read_rows(name, start, stop)
        return h[name][start:stop]

    def __contains__(self, name) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"

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
            raise MergelabError(f"{self.path}: no tensor named '{name}'")
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


def _read_json(p: Path, what: str):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise MergelabError(f"{p}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None


def _from_index(folder: Path, index: Path, kind: str) -> dict[str, str]:
    data = _read_json(index, "index JSON")
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise MergelabError(f"{index}: index JSON has no 'weight_map'")
    files = {}
    for name, fn in wm.items():
        p = folder / fn
        if not p.is_file():
            raise MergelabError(f"{index}: shard '{fn}' (holding tensor '{name}') is missing from {folder}")
        files[name] = str(p)
    return files


def _single(path: Path, kind: str) -> dict[str, str]:
    if kind == "safetensors":
        h = SafetensorsFile(path)
        names = sorted(h.entries, key=lambda n: h.entries[n][2])  # file order
        h.close()
    else:
        names = list(_torch_load(path))
    return {n: str(path) for n in names}


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint lazily (HF folder, sharded index, ``.safetensors``, ``.pt``/``.bin``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MergelabError(f"{p}: no such file or folder")
    config = None
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.is_file():
            config = _read_json(cfg, "config.json")
        candidates = [
            ("model.safetensors.index.json", "safetensors", True),
            ("model.safetensors", "safetensors", False),
            ("pytorch_model.bin.index.json", "torch", True),
            ("pytorch_model.bin", "torch", False),
        ]
        for fn, kind, is_index in candidates:
            f = p / fn
            if f.is_file():
                files = _from_index(p, f, kind) if is_index else _single(f, kind)
                return Checkpoint(p, files, config, kind)
        sts = sorted(p.glob("*.safetensors"))
        if len(sts) == 1:
            return Checkpoint(p, _single(sts[0], "safetensors"), config, "safetensors")
        raise MergelabError(
            f"{p}: no model weights found (expected model.safetensors, model.safetensors.index.json,"
            " pytorch_model.bin or pytorch_model.bin.index.json)")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        kind = "safetensors"
    elif suffix in (".pt", ".pth", ".bin"):
        kind = "torch"
    elif p.name.endswith(".index.json"):
        kind = "safetensors" if "safetensors" in p.name else "torch"
        files = _from_index(p.parent, p, kind)
        cfg = p.parent / "config.json"
        return Checkpoint(p.parent, files, _read_json(cfg, "config.json") if cfg.is_file() else None, kind)
    else:
        raise MergelabError(f"{p}: unknown checkpoint format (expected a folder, .safetensors, .pt, .pth or .bin)")
    cfg = p.parent / "config.json"
    config = _read_json(cfg, "config.json") if cfg.is_file() else None
    return Checkpoint(p, _single(p, kind), config, kind)


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


def load_state(path: str | os.PathLike) -> LazyState:
    """A lazy ``Mapping[str, Tensor]`` over the checkpoint at ``path``."""
    return LazyState(open_checkpoint(path))
