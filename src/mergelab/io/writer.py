"""Sharded, atomic, Hugging Face-compatible writer.

The layout (names, shapes, dtypes) of the output is known before any tensor is computed,
so every shard's safetensors header is written up front and each tensor goes straight to
its byte offset with ``os.pwrite``: no shard is ever buffered in memory, tensors may arrive
in any order and from several threads.  Output goes to a temporary sibling folder that is
renamed into place at the end (:class:`AtomicFolder`); an exception or Ctrl-C removes it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import MergelabError
from .checksums import sha256_file  # noqa: F401  (re-exported: its old home)
from .outputs import COMMITTED, OLD, TMP, Output, as_os_error, check_not_input, os_error, rename_noreplace, sibling, signals_blocked
from .reader import TORCH_TO_ST, open_checkpoint

DEFAULT_SHARD_SIZE = 5_000_000_000

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(s: str | int, what: str = "--shard-size") -> int:
    """A byte count: ``5GB`` -> 5_000_000_000, ``500MiB`` -> 524288000, ``1234`` -> 1234;
    ``what`` names the option in the error message.

    Units (case-insensitive): B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers
    of 1024); anything else is an error.  ``5B`` is five bytes: the shard writer refuses a
    shard size smaller than every tensor (mergekit's ``--out-shard-size 5B`` means 5e9 bytes:
    use that flag, or ``5GB``, for mergekit's meaning).
    """
    if isinstance(s, int) and not isinstance(s, bool):
        n = s
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
        if not m or m.group(2).lower() not in _UNITS:
            raise MergelabError(f"{what}: expected a size like 5GB, 500MB, 2GiB or a byte count"
                                f" (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), found {s!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise MergelabError(f"{what}: must be positive, found {s!r}")
    return n


def parse_mergekit_size(s: str | int) -> int:
    """mergekit's ``--out-shard-size``: an integer with an optional K, M or B suffix
    (thousand, million, billion; case-insensitive), a number of bytes: ``5B`` = 5e9 bytes."""
    if isinstance(s, int) and not isinstance(s, bool):
        n = s
    else:
        m = re.fullmatch(r"\s*([0-9]+)\s*([kmbKMB]?)\s*", str(s))
        if not m:
            raise MergelabError(f"--out-shard-size: expected an integer with an optional K, M or B suffix"
                                f" (mergekit's units: 5B = 5 billion bytes), found {s!r}")
        n = int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
    if n <= 0:
        raise MergelabError(f"--out-shard-size: must be positive, found {s!r}")
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

    The checks of :class:`~mergelab.io.outputs.Output` run on construction (an existing
    non-empty ``out`` without ``force``, a file or dangling symlink in its place, a missing or
    read-only parent, an output that is or contains one of ``inputs``), so a caller can fail
    before doing any work.  ``with`` takes the output's lock (re-entrant: a caller may hold it
    for a longer run), creates ``.<name>.mergelab-tmp-*`` beside ``out`` and, on success,
    renames it into place; a folder that appeared at ``out`` meanwhile is replaced only with
    ``force``.  On any exception or signal the temporary folder is removed; OS errors while
    writing (no space left, read-only) become a one-line :class:`MergelabError`.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False, *, inputs=(), option: str = "output"):
        self.output = Output(out, kind="folder", option=option, force=force, inputs=inputs, replaces=True)
        self.out = self.output.path
        self.force = force
        self.tmp: Path | None = None

    def check_space(self, nbytes: int) -> None:
        self.output.check_space(nbytes)

    def __enter__(self) -> Path:
        self.output.__enter__()
        try:
            self.tmp = sibling(self.out, TMP)
            self.tmp.mkdir()
        except OSError as e:
            self._abort()
            raise os_error(self.output.option, self.out, e, "creating") from None
        except BaseException:
            self._abort()
            raise
        return self.tmp

    def _abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.output.__exit__(None, None, None)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abort()
            oe = as_os_error(exc)
            if oe is not None:
                raise os_error(self.output.option, self.out, oe) from None
            return False
        try:
            self.output.check_not_replaced()
            with signals_blocked():  # the old output must never be left aside
                if os.path.lexists(self.out) and self.force:
                    trash = sibling(self.out, OLD)
                    trash.mkdir()
                    os.rename(self.out, trash / "old")
                    try:
                        rename_noreplace(self.tmp, self.out)
                        COMMITTED.append(self.out)
                    except BaseException:
                        os.rename(trash / "old", self.out)
                        shutil.rmtree(trash, ignore_errors=True)
                        raise
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    if self.out.is_dir() and not self.out.is_symlink():
                        try:
                            os.rmdir(self.out)  # the empty folder given as the output
                        except OSError:     # no longer empty: something appeared meanwhile
                            raise FileExistsError(errno.EEXIST, "exists", str(self.out)) from None
                    rename_noreplace(self.tmp, self.out)
                    COMMITTED.append(self.out)
        except FileExistsError:
            self._abort()
            raise MergelabError(f"{self.output.option} {self.output.given}: appeared while this run was writing it "
                                "(another program?); use --force to replace it") from None
        except OSError as e:
            self._abort()
            raise os_error(self.output.option, self.out, e, "renaming") from None
        except BaseException:
            self._abort()
            raise
        self.output.__exit__(None, None, None)
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


def check_shard_size(plan: Iterable[TensorSpec], shard_size: int) -> None:
    """Refuse a shard size smaller than every (non-empty) tensor: no shard could hold even one,
    which is what ``5B`` (five bytes) read for mergekit's "5 billion" would do."""
    sizes = [t.nbytes for t in plan if t.nbytes > 0]
    if sizes and shard_size < min(sizes):
        raise MergelabError(
            f"shard size {shard_size} bytes is smaller than every tensor (the smallest has {min(sizes)} bytes);"
            " did you mean GB? (mergekit's --out-shard-size 5B is 5 billion bytes; here write 5GB)")


class ShardedWriter:
    """Write a known set of tensors into HF-style shards; thread-safe :meth:`write`.

    ``plan`` fixes the order, shapes and dtypes.  Shards are filled in plan order up to
    ``shard_size`` bytes of tensor data (a tensor larger than that gets its own shard).
    One shard is ``model.safetensors``; more are ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``.

    Several processes can fill one layout (a merge under torchrun): one creates it
    (``create=True``: headers written, files sized), the others open the same files
    (``create=False``, after the creator finished, same plan and shard size) and each writes
    only its tensors ``only``; :meth:`close` then checks those, and ``index=False`` leaves the
    index to one process.
    """

    def __init__(self, folder: str | os.PathLike, plan: Iterable[TensorSpec],
                 shard_size: int = DEFAULT_SHARD_SIZE, metadata: dict[str, str] | None = None, *,
                 create: bool = True, only: Iterable[str] | None = None):
        self.folder = Path(folder)
        self.plan = list(plan)
        check_shard_size(self.plan, shard_size)
        self.only = None if only is None else set(only)
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
            start = 8 + len(hb)
            if create:
                fd = os.open(self.folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, len(hb).to_bytes(8, "little") + hb, 0)
                os.ftruncate(fd, start + off)
            else:
                fd = os.open(self.folder / fname, os.O_RDWR)
                found = os.fstat(fd).st_size
                if found != start + off:
                    os.close(fd)
                    raise AssertionError(f"{fname}: laid out with {found} bytes, planned {start + off}")
            self._fds.append(fd)
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

    def close(self, index: bool = True) -> None:
        """Close the shards and write the index (unless ``index=False``); every planned tensor
        (of ``only``, if given) must have been written."""
        missing = [t.name for t in self.plan if t.name not in self._written
                   and (self.only is None or t.name in self.only)]
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if missing:
            raise AssertionError(f"tensors never written: {missing[:3]}")
        if index:
            self.write_index()

    def write_index(self) -> None:
        """``model.safetensors.index.json`` (sharded layouts only)."""
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


_TOKENIZER = re.compile(r"^(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
                        r".*\.model|chat_template.*)$")


def copy_model_files(src: str | os.PathLike | None, dst: str | os.PathLike, dtype: torch.dtype | None = None,
                     tokenizer: bool = True) -> list[str]:
    """Copy config and (unless ``tokenizer=False``) tokenizer files of the folder ``src`` into
    ``dst``; set the config's dtype."""
    if src is None:
        return []
    src = Path(src)
    if not src.is_dir():
        src = src.parent
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and _COPY.match(f.name) and (tokenizer or not _TOKENIZER.match(f.name)):
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


_CARD_TEXT = {
    "sha256": "SHA-256 of each whole input file, as `sha256sum FILE` prints it (and as the "
              "Hugging Face Hub lists a file's LFS sha256).",
    "blake3": "BLAKE3 (256-bit) of each whole input file, as `b3sum FILE` prints it "
              "(`python -c \"import blake3,sys; print(blake3.blake3().update_mmap(sys.argv[1]).hexdigest())\" FILE`).",
}


def write_model_card(folder: str | os.PathLike, *, recipe_yaml: str | None, version: str,
                     inputs: dict[str, dict[str, str]], extra: str = "", algorithm: str = "sha256") -> None:
    """README.md recording the recipe, the mergelab version and the inputs' checksums
    (``algorithm``: ``sha256`` or ``blake3``, named in the section title)."""
    lines = ["---", "library_name: transformers", "tags:", "- mergelab", "- merge", "---", "",
             "# Merged model", "", f"Made with mergelab {version}.", ""]
    if extra:
        lines += [extra, ""]
    if recipe_yaml is not None:
        lines += ["## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    if inputs:
        lines += [f"## Inputs ({algorithm})", "", _CARD_TEXT[algorithm], ""]
        for label, files in inputs.items():
            lines.append(f"- `{label}`")
            for fn, digest in files.items():
                lines.append(f"  - `{fn}`: `{digest}`")
        lines.append("")
    (Path(folder) / "README.md").write_text("\n".join(lines))


# ------------------------------------------------------------------ one small file
def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str] | None = None) -> None:
    """One safetensors file whose bytes depend only on its content: tensors and metadata
    keys in sorted order.  (``safetensors.torch.save_file`` orders the metadata by a
    per-process hash, so two runs that compute the same statistics wrote different bytes.)"""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    parts, off = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        nb = t.numel() * t.element_size()
        header[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        parts.append(t)
        off += nb
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb)
        for t in parts:
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


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
    src = getattr(ck, "path", None)
    # ``like`` only lends its config files: the output may lie inside it, never be or hold it
    check_not_input("output", out, [("like", like)], inside=False)
    atomic = AtomicFolder(out, force, inputs=[("the checkpoint being saved", src)])
    atomic.check_space(sum(t.nbytes for t in plan))
    with atomic as tmp:
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


__all__ = ["AtomicFolder", "ShardedWriter", "TensorSpec", "DEFAULT_SHARD_SIZE", "parse_size", "parse_mergekit_size", "check_shard_size", "parse_dtype",
           "copy_model_files", "write_model_card", "sha256_file", "save_state", "open_checkpoint"]
