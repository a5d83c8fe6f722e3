"""Sharded, atomic, Hugging Face-compatible writer.

The layout (names, shapes, dtypes) of the output is known before any tensor is computed,
so every shard's safetensors header is written up front and each tensor goes straight to
its byte offset with ``os.pwrite``: no shard is ever buffered in memory, tensors may arrive
in any order and from several threads.  Output goes to a temporary sibling folder that is
renamed into place at the end (:class:`AtomicFolder`); an exception or Ctrl-C removes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import MergelabError
from .reader import TORCH_TO_ST, open_checkpoint

DEFAULT_SHARD_SIZE = 5_000_000_000

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(s: str | int) -> int:
    """``5GB`` -> 5_000_000_000, ``500MiB`` -> 524288000, ``1234`` -> 1234."""
    if isinstance(s, int) and not isinstance(s, bool):
        n = s
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
        if not m or m.group(2).lower() not in _UNITS:
            raise MergelabError(f"shard size: expected a size like 5GB, 500MB or a byte count, found {s!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise MergelabError(f"shard size: must be positive, found {s!r}")
    return n


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64}


def parse_dtype(s: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    if s is None or isinstance(s, torch.dtype):
        return s
    if s not in DTYPES:
        raise MergelabError(f"{where}: unknown dtype {s!r} (expected one of float32, float16, bfloat16)")
    return DTYPES[s]


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# ------------------------------------------------------------------ atomic output folder
class AtomicFolder:
    """``with AtomicFolder(out, force) as tmp:`` write into ``tmp``; renamed to ``out`` on success.

    An existing non-empty ``out`` is refused unless ``force`` (checked on construction, so a
    caller can fail before doing any work).  On any exception the temporary folder is removed.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.out = Path(out).expanduser().absolute()
        self.force = force
        if self.out.exists():
            if not self.out.is_dir():
                raise MergelabError(f"{self.out}: output exists and is not a folder")
            if any(self.out.iterdir()) and not force:
                raise MergelabError(f"{self.out}: output folder exists and is not empty (use --force to replace it)")
        if not self.out.parent.is_dir():
            raise MergelabError(f"{self.out.parent}: parent folder of the output does not exist")
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.mergelab-tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            if self.out.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.mergelab-old-", dir=self.out.parent))
                os.rename(self.out, trash / "old")
                os.rename(self.tmp, self.out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, self.out)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


# ------------------------------------------------------------------ sharded writer
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class ShardedWriter:
    """Write a known set of tensors into HF-style shards; thread-safe :meth:`write`.

    ``plan`` fixes the order, shapes and dtypes.  Shards are filled in plan order up to
    ``shard_size`` bytes of tensor data (a tensor larger than that gets its own shard).
    One shard is ``model.safetensors``; more are ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``.
    """

    def __init__(self, folder: str | os.PathLike, plan: Iterable[TensorSpec],
                 shard_size: int = DEFAULT_SHARD_SIZE, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.plan = list(plan)
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for t in self.plan:
            if groups[-1] and size + t.nbytes > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}   # name -> (fd, byte offset, spec)
        self._fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._written: set[str] = set()
        self._rows: dict[str, int] = {}  # rows written so far, for tensors written in row blocks
        self._lock = threading.Lock()
        meta = {"format": "pt", **(metadata or {})}
        for fname, group in zip(names, groups):
            header: dict = {"__metadata__": meta}
            off = 0
            for t in group:
                header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [off, off + t.nbytes]}
                off += t.nbytes
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)
            fd = os.open(self.folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, len(hb).to_bytes(8, "little") + hb, 0)
            start = 8 + len(hb)
            os.ftruncate(fd, start + off)
            for t in group:
                self._where[t.name] = (fd, start + header[t.name]["data_offsets"][0], t)
                self.weight_map[t.name] = fname
            self.total_size += off
        self.files = names

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fd, off, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise AssertionError(f"{name}: planned {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        self._pwrite(fd, off, tensor)
        with self._lock:
            self._written.add(name)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``start:start+len(rows)`` (axis 0) of a planned tensor at their byte
        offset.  A tensor is complete once all its rows were written, in any order."""
        fd, off, spec = self._where[name]
        if (not spec.shape or tuple(rows.shape[1:]) != spec.shape[1:] or rows.dtype != spec.dtype
                or start < 0 or start + rows.shape[0] > spec.shape[0]):
            raise AssertionError(f"{name}: planned {spec.shape} {spec.dtype}, got rows {start}+{tuple(rows.shape)} {rows.dtype}")
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
        self._pwrite(fd, off + start * row_bytes, rows)
        with self._lock:
            n = self._rows.get(name, 0) + rows.shape[0]
            self._rows[name] = n
            if n == spec.shape[0]:
                self._written.add(name)

    @staticmethod
    def _pwrite(fd: int, off: int, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            view = memoryview(t.view(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], off + done)

    def close(self) -> None:
        """Close the shards and write the index; every planned tensor must have been written."""
        missing = [t.name for t in self.plan if t.name not in self._written]
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if missing:
            raise AssertionError(f"tensors never written: {missing[:3]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


# ------------------------------------------------------------------ companions of the weights
_COPY = re.compile(r"^(config\.json|generation_config\.json|tokenizer.*|vocab\..*|merges\.txt|"
                   r"special_tokens_map\.json|added_tokens\.json|.*\.model|chat_template.*|"
                   r"preprocessor_config\.json|processor_config\.json|sentence_bert_config\.json|"
                   r"modules\.json|config_sentence_transformers\.json)$")


def copy_model_files(src: str | os.PathLike | None, dst: str | os.PathLike, dtype: torch.dtype | None = None) -> list[str]:
    """Copy config and tokenizer files of the folder ``src`` into ``dst``; set the config's dtype."""
    if src is None:
        return []
    src = Path(src)
    if not src.is_dir():
        src = src.parent
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and _COPY.match(f.name):
            shutil.copyfile(f, Path(dst) / f.name)
            copied.append(f.name)
    cfg = Path(dst) / "config.json"
    if dtype is not None and cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except ValueError:
            data = None
        if isinstance(data, dict):
            keys = [k for k in ("torch_dtype", "dtype") if k in data] or ["torch_dtype"]
            for k in keys:
                data[k] = dtype_name(dtype)
            cfg.write_text(json.dumps(data, indent=2) + "\n")
    return copied


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        mv = memoryview(buf)
        while True:
            k = f.readinto(buf)
            if not k:
                break
            h.update(mv[:k])
    return h.hexdigest()


def write_model_card(folder: str | os.PathLike, *, recipe_yaml: str | None, version: str,
                     inputs: dict[str, dict[str, str]], extra: str = "") -> None:
    """README.md recording the recipe, the mergelab version and the inputs' sha256 checksums."""
    lines = ["---", "library_name: transformers", "tags:", "- mergelab", "- merge", "---", "",
             "# Merged model", "", f"Made with mergelab {version}.", ""]
    if extra:
        lines += [extra, ""]
    if recipe_yaml is not None:
        lines += ["## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    if inputs:
        lines += ["## Inputs (sha256)", ""]
        for label, files in inputs.items():
            lines.append(f"- `{label}`")
            for fn, digest in files.items():
                lines.append(f"  - `{fn}`: `{digest}`")
        lines.append("")
    (Path(folder) / "README.md").write_text("\n".join(lines))


# ------------------------------------------------------------------ save_state
def save_state(state: Mapping[str, torch.Tensor], out: str | os.PathLike, like: str | os.PathLike | None = None,
               dtype: str | torch.dtype | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE,
               force: bool = False) -> Path:
    """Write ``state`` as a sharded HF folder at ``out`` (atomic).

    ``like``: a model folder whose config/tokenizer files are copied; ``dtype``: the stored
    dtype of floating tensors (default: each tensor's own).  Tensors are pulled from
    ``state`` one at a time, so a lazy mapping keeps memory bounded.
    """
    from .validate import check_state

    dt = parse_dtype(dtype)
    size = parse_size(shard_size)
    ck = getattr(state, "checkpoint", None)  # a LazyState: shapes without reading
    check_state(state, "save_state", values=ck is None)
    names = list(state.keys())
    plan = []
    for n in names:
        if ck is not None:
            shape, tdt = ck.shape(n), ck.dtype(n)
        else:
            t = state[n]
            shape, tdt = tuple(t.shape), t.dtype
            del t
        sd = dt if (dt is not None and tdt.is_floating_point) else tdt
        plan.append(TensorSpec(n, tuple(shape), sd))
    with AtomicFolder(out, force) as tmp:
        w = ShardedWriter(tmp, plan, size)
        try:
            for spec in plan:
                w.write(spec.name, state[spec.name].to(spec.dtype))
        except BaseException:
            w.abort()
            raise
        w.close()
        if like is not None:
            copy_model_files(Path(like), tmp, dt)
    return Path(out)


__all__ = ["AtomicFolder", "ShardedWriter", "TensorSpec", "DEFAULT_SHARD_SIZE", "parse_size", "parse_dtype",
           "copy_model_files", "write_model_card", "sha256_file", "save_state", "open_checkpoint"]
