"""Hostile and unlucky inputs (issue 9, the input side): every one is one ``error:`` line and
exit code 2 on the CLI (no traceback, inputs unchanged by hash, nothing new on disk) or one
``MergelabError`` subclass from the Python API; nested ``.pt`` state dicts are read whole.

Groups (the README counts cases per group from the test ids): ``headers`` (crafted
safetensors headers, hand-written and generated with hypothesis), ``index``
(``model.safetensors.index.json``), ``pt`` (``.pt`` contents), ``config`` (``config.json``),
``data`` (``stats`` / ``align`` data and models), ``api`` (the Python API).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save_file

import mergelab
from mergelab.cli import main
from mergelab.errors import CheckpointError, DataError, MergelabError
from mergelab.io import reader
from mergelab.io.reader import ST_DTYPES, SafetensorsFile, open_checkpoint

TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` -> sha256 (regular files) or its kind (links, FIFOs, folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            m = os.lstat(p).st_mode
            key = str(p.relative_to(root))
            if stat.S_ISLNK(m):
                out[key] = "link->" + os.readlink(p)
            elif stat.S_ISREG(m):
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[key] = f"mode {stat.S_IFMT(m)}"
    return out


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def refused(root: Path, *args, match: str | None = None) -> str:
    """Run the CLI in-process: exit 2, one stderr line ``error: ...``, no traceback, nothing
    under ``root`` changed or added."""
    before = snapshot(root)
    code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    if match:
        assert re.search(match, lines[0]), lines[0]
    assert snapshot(root) == before
    return lines[0]


def refused_subprocess(root: Path, *args, match: str | None = None, timeout: float = 120) -> str:
    """As :func:`refused`, in a fresh ``python -m mergelab`` process (hangs become timeouts)."""
    before = snapshot(root)
    r = subprocess.run([sys.executable, "-m", "mergelab", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=root)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    if match:
        assert re.search(match, lines[0]), lines[0]
    assert snapshot(root) == before
    return lines[0]


def st_bytes(header, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def f32(name="w", shape=(2,), begin=0):
    n = int(np.prod(shape)) * 4
    return {name: {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}}


def toy_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.weight": torch.randn(4, 3, generator=g), "layers.1.weight": torch.randn(4, 3, generator=g),
            "head.bias": torch.randn(4, generator=g)}


def hf_folder(path: Path, state, config=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "toy", "num_hidden_layers": 2}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def recipe(tmp: Path, models, method="linear", parameters=None, name="r.yaml", **extra) -> Path:
    r = {"merge_method": method, "models": [{"model": str(m)} for m in models], **extra}
    if parameters:
        r["parameters"] = parameters
    p = tmp / name
    p.write_text(yaml.safe_dump(r))
    return p


# ============================================================================ headers
HEADER_CASES = {
    "short-file": b"\x01\x02\x03",
    "length-2^63": st_bytes(f32(), b"\0" * 8, n=2 ** 63),
    "length-past-eof": st_bytes(f32(), b"\0" * 8, n=10_000),
    "not-utf8": st_bytes(b"\xff\xfe{}", b""),
    "not-json": st_bytes(b"{not json", b""),
    "json-list": st_bytes([1, 2], b""),
    "json-string": st_bytes("hello", b""),
    "entry-not-object": st_bytes({"w": [1, 2]}, b""),
    "entry-null": st_bytes({"w": None}, b""),
    "no-dtype": st_bytes({"w": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "no-shape": st_bytes({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4),
    "no-offsets": st_bytes({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "unknown-dtype": st_bytes({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    "dtype-int": st_bytes({"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "dtype-lowercase": st_bytes({"w": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative-dim": st_bytes({"w": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, b"\0" * 16),
    "bool-dim": st_bytes({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
    "float-dim": st_bytes({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4),
    "string-dim": st_bytes({"w": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}, b"\0" * 4),
    "shape-not-list": st_bytes({"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}, b"\0" * 4),
    "three-offsets": st_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8),
    "reversed-offsets": st_bytes({"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4),
    "bool-offsets": st_bytes({"w": {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]}}, b"\0"),
    "negative-offset": st_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
    "size-mismatch": st_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    # prod(shape) * itemsize wraps to 16 in 64-bit arithmetic: 2^62 * 2^62 * 4 = 2^126 ...
    "overflowing-shape": st_bytes({"w": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62, 1], "data_offsets": [0, 16]}},
                                  b"\0" * 16),
    "overflow-to-zero": st_bytes({"w": {"dtype": "U8", "shape": [2 ** 32, 2 ** 32], "data_offsets": [0, 0]}}, b""),
    "huge-declared": st_bytes({"w": {"dtype": "F64", "shape": [2 ** 40], "data_offsets": [0, 2 ** 43]}}, b"\0" * 8),
    "past-eof": st_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "overlap": st_bytes({**f32("a", (2,), 0), **f32("b", (2,), 4)}, b"\0" * 12),
    "same-range": st_bytes({**f32("a", (2,), 0), **f32("b", (2,), 0)}, b"\0" * 8),
    "hole": st_bytes({**f32("a", (1,), 0), **f32("b", (1,), 8)}, b"\0" * 12),
    "trailing-bytes": st_bytes(f32(), b"\0" * 12),
    "metadata-int-values": st_bytes({"__metadata__": {"k": 1}, **f32()}, b"\0" * 8),
    "metadata-list": st_bytes({"__metadata__": ["k"], **f32()}, b"\0" * 8),
    "duplicate-name": st_bytes(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                               b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "no-tensors": st_bytes({}, b""),
    "metadata-only": st_bytes({"__metadata__": {"a": "b"}}, b""),
    "deep-nesting": st_bytes(b"[" * 100_000 + b"]" * 100_000, b""),
    "giant-integer": st_bytes(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', b"\0" * 4),
    "leading-space": st_bytes(b' {"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_headers_inspect_refuses(tmp_path, case):
    p = tmp_path / "m.safetensors"
    p.write_bytes(HEADER_CASES[case])
    line = refused(tmp_path, "inspect", p, match=re.escape(str(p)))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(p)
    assert f"error: {e.value}" == line


@pytest.mark.parametrize("case", ["past-eof", "duplicate-name", "overflowing-shape", "no-tensors"])
def test_headers_merge_refuses(tmp_path, case):
    good = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, str(good))
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(HEADER_CASES[case])
    r = recipe(tmp_path, [good, bad])
    refused(tmp_path, "merge", r, "-o", tmp_path / "out", match=re.escape(str(bad)))


def test_headers_not_regular_files(tmp_path):
    """A FIFO, a character device, a folder and a symlink loop named .safetensors: refused
    without blocking (a FIFO used to hang `merge` and `inspect`)."""
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    refused_subprocess(tmp_path, "inspect", fifo, match="FIFO", timeout=60)
    good = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, str(good))
    refused_subprocess(tmp_path, "merge", recipe(tmp_path, [good, fifo]), "-o", tmp_path / "out", match="FIFO",
                       timeout=60)
    dev = tmp_path / "zero.safetensors"
    dev.symlink_to("/dev/zero")
    refused(tmp_path, "inspect", dev, match="character device")
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    refused(tmp_path, "inspect", loop, match="cannot access")
    (tmp_path / "dir.safetensors").mkdir()
    refused(tmp_path, "inspect", tmp_path / "dir.safetensors", match="no model weights")
    with pytest.raises(CheckpointError, match="FIFO"):
        SafetensorsFile(fifo)


# -- generated headers: the reader agrees with the upstream safetensors library or refuses
NAMES = st.text(alphabet="abcxyz._0", min_size=1, max_size=6)
DTYPES = list(ST_DTYPES)
BAD_DIM = st.one_of(st.integers(-3, -1), st.just(2 ** 62), st.just(2 ** 64 + 1), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=2), st.none())
GARBAGE = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                       max_leaves=6)


@st.composite
def crafted_file(draw) -> bytes:
    """A valid file (names, dtypes, small shapes, contiguous data), then up to two mutations."""
    names = draw(st.lists(NAMES, min_size=0, max_size=4, unique=True))
    header: dict = {}
    pos = 0
    for n in names:
        dt = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nb = int(np.prod(shape, dtype=np.int64)) * ST_DTYPES[dt].itemsize
        header[n] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + nb]}
        pos += nb
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    data = draw(st.binary(min_size=pos, max_size=pos))
    n_len = None
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["dtype", "dim", "bad-dim", "offset", "swap", "garbage-entry", "meta",
                                     "data-len", "header-len", "drop-key", "extra-key", "raw"]))
        tensors = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                   and isinstance(v.get("shape"), list) and isinstance(v.get("data_offsets"), list)
                   and len(v["data_offsets"]) == 2]
        t = draw(st.sampled_from(tensors)) if tensors else None
        if kind == "dtype" and t:
            header[t]["dtype"] = draw(st.sampled_from(DTYPES + ["F4", "C64", "", "X"]) | GARBAGE)
        elif kind == "dim" and t:
            header[t]["shape"] = header[t]["shape"] + [draw(st.integers(0, 4))]
        elif kind == "bad-dim" and t:
            header[t]["shape"] = [draw(BAD_DIM)] + header[t]["shape"]
        elif kind == "offset" and t:
            i = draw(st.integers(0, 1))
            header[t]["data_offsets"][i] = header[t]["data_offsets"][i] + draw(st.integers(-8, 8) | st.just(2 ** 63) | st.just(2 ** 64))
        elif kind == "swap" and len(tensors) >= 2:
            a, b = draw(st.permutations(tensors))[:2]
            header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        elif kind == "garbage-entry":
            header[draw(NAMES)] = draw(GARBAGE)
        elif kind == "meta":
            header["__metadata__"] = draw(GARBAGE)
        elif kind == "data-len":
            k = draw(st.integers(-8, 8))
            data = data[:max(0, len(data) + k)] if k < 0 else data + bytes(k)
        elif kind == "header-len":
            n_len = draw(st.integers(0, 2 ** 64 - 1))
        elif kind == "drop-key" and t:
            header[t].pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "extra-key" and t:
            header[t]["extra"] = draw(GARBAGE)
        elif kind == "raw":
            raw = draw(st.binary(max_size=40))
            return struct.pack("<Q", len(raw) if n_len is None else n_len) + raw + data
    return st_bytes(header, data, n_len)


STATS = {"tried": 0, "accepted": 0, "refused": 0, "max_seconds": 0.0, "max_python_peak_bytes": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(blob=crafted_file())
# found by hypothesis: an empty tensor with a dimension past int64 (torch cannot hold that size)
@example(blob=b'\xcf' + bytes(7) + b'{"0": {"dtype": "F64", "shape": [18446744073709551617, 0], "data_offsets": [0, 0]}, '
         b'"00": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}, '
         b'"000": {"dtype": "F64", "shape": [], "data_offsets": [8, 16]}}' + bytes(16))
def test_headers_generated_agree_with_upstream_or_refuse(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("h")
    p = d / "x.safetensors"
    p.write_bytes(blob)
    asked: list[int] = []
    real_empty = torch.empty

    def spy(*size, **kw):  # every tensor buffer the reader allocates
        n = size[0] if size and isinstance(size[0], int) else 0
        asked.append(n)
        return real_empty(*size, **kw)

    STATS["tried"] += 1
    t0 = time.perf_counter()
    tracemalloc.start()
    reader.torch.empty = spy
    try:
        f = SafetensorsFile(p)
        got = {n: f.read(n) for n in f.entries}
        meta = f.metadata
        f.close()
    except CheckpointError:
        got = None
    finally:
        reader.torch.empty = real_empty
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    STATS["max_seconds"] = max(STATS["max_seconds"], time.perf_counter() - t0)
    # tensor buffers: never more than the file holds; Python objects of the header: bounded by its size
    assert sum(asked) <= len(blob)
    assert peak <= 64 * len(blob) + (1 << 20)
    STATS["max_python_peak_bytes"] = max(STATS["max_python_peak_bytes"], peak)
    if got is None:
        STATS["refused"] += 1
        return
    STATS["accepted"] += 1
    want = st_load(blob)  # upstream must accept what we accept ...
    assert set(got) == set(want)
    for n, t in got.items():  # ... and agree on every tensor, bit for bit
        assert t.dtype == want[n].dtype and t.shape == want[n].shape
        assert t.reshape(-1).view(torch.uint8).tolist() == want[n].reshape(-1).view(torch.uint8).tolist()
    assert isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())


def test_headers_generated_summary():
    """Not a property: prints what the generated run saw (for the README's numbers)."""
    print(f"\ngenerated headers: {STATS}")


# ============================================================================== index
def sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map, raw: bytes | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    for fn, tensors in shards.items():
        save_file(tensors, str(folder / fn))
    idx = folder / "model.safetensors.index.json"
    idx.write_bytes(raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    return folder


A = {"a.weight": torch.ones(2)}
B = {"b.weight": torch.zeros(3)}
GOOD_MAP = {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors"}


def index_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    m = tmp_path / "model"
    out = tmp_path / "outside"
    out.mkdir()
    save_file(B, str(out / "s2.safetensors"))
    if case == "listed-twice":
        raw = (b'{"weight_map": {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors",'
               b' "a.weight": "s2.safetensors"}}')
        return sharded(m, {"s1.safetensors": A, "s2.safetensors": B}, None, raw), "'a.weight' is listed twice"
    if case == "value-int":
        return sharded(m, {"s1.safetensors": A}, {"a.weight": "s1.safetensors", "b.weight": 2}), "'b.weight'.*an int"
    if case == "value-null":
        return sharded(m, {"s1.safetensors": A}, {"a.weight": "s1.safetensors", "b.weight": None}), "'b.weight'.*None"
    if case == "value-list":
        return sharded(m, {"s1.safetensors": A}, {"a.weight": ["s1.safetensors"]}), "'a.weight'.*a list"
    if case == "value-empty":
        return sharded(m, {"s1.safetensors": A}, {"a.weight": ""}), "'a.weight'"
    if case == "dotdot":
        return sharded(m, {"s1.safetensors": A}, {"a.weight": "s1.safetensors",
                                                  "b.weight": "../outside/s2.safetensors"}), "leaves the model folder"
    if case == "absolute":
        return sharded(m, {"s1.safetensors": A}, {"a.weight": "s1.safetensors",
                                                  "b.weight": str(out / "s2.safetensors")}), "leaves the model folder"
    if case == "symlink-outside":
        sharded(m, {"s1.safetensors": A}, GOOD_MAP)
        (m / "s2.safetensors").symlink_to(out / "s2.safetensors")
        return m, "outside the model folder"
    if case == "symlinked-folder-outside":
        sharded(m, {"s1.safetensors": A}, {"a.weight": "s1.safetensors", "b.weight": "sub/s2.safetensors"})
        (m / "sub").symlink_to(out)
        return m, "outside the model folder"
    if case == "missing-shard":
        return sharded(m, {"s1.safetensors": A}, GOOD_MAP), "'b.weight'.*missing"
    if case == "shard-lacks-tensor":
        return sharded(m, {"s1.safetensors": A, "s2.safetensors": {"c": torch.ones(1)}},
                       {"a.weight": "s1.safetensors", "b.weight": "s2.safetensors", "c": "s2.safetensors"}), \
            "'b.weight'.*does not hold it"
    if case == "unlisted-tensor":
        return sharded(m, {"s1.safetensors": A, "s2.safetensors": {**B, "extra": torch.ones(1)}}, GOOD_MAP), \
            "'extra', which the index does not list"
    if case == "two-shards-same":
        return sharded(m, {"s1.safetensors": {**A, **B}, "s2.safetensors": B}, GOOD_MAP), "'b.weight' is in two shards"
    if case == "two-shards-different":
        return sharded(m, {"s1.safetensors": {**A, "b.weight": torch.ones(3)}, "s2.safetensors": B}, GOOD_MAP), \
            "'b.weight' is in two shards"
    if case == "no-weight-map":
        return sharded(m, {"s1.safetensors": A}, None, b'{"metadata": {}}'), "weight_map"
    if case == "weight-map-list":
        return sharded(m, {"s1.safetensors": A}, None, b'{"weight_map": ["s1.safetensors"]}'), "weight_map"
    if case == "empty-weight-map":
        return sharded(m, {"s1.safetensors": A}, {}), "weight_map"
    if case == "index-not-json":
        return sharded(m, {"s1.safetensors": A}, None, b"{oops"), "index file"
    if case == "index-list":
        return sharded(m, {"s1.safetensors": A}, None, b"[]"), "weight_map"
    if case == "shard-is-folder":
        sharded(m, {"s1.safetensors": A}, GOOD_MAP)
        (m / "s2.safetensors").mkdir()
        return m, "folder"
    if case == "shard-is-fifo":
        sharded(m, {"s1.safetensors": A}, GOOD_MAP)
        os.mkfifo(m / "s2.safetensors")
        return m, "FIFO"
    if case == "index-is-fifo":
        m.mkdir()
        os.mkfifo(m / "model.safetensors.index.json")
        return m, "FIFO"
    if case == "corrupt-shard":
        sharded(m, {"s1.safetensors": A, "s2.safetensors": B}, GOOD_MAP)
        p = m / "s2.safetensors"
        p.write_bytes(p.read_bytes()[:-4])
        return m, "s2.safetensors"
    if case == "bin-index-dotdot":
        m.mkdir()
        torch.save(A, m / "p1.bin")
        (m / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": {"a.weight": "p1.bin", "b.weight": "../outside/p2.bin"}}))
        return m, "leaves the model folder"
    raise AssertionError(case)


INDEX_CASES = ["listed-twice", "value-int", "value-null", "value-list", "value-empty", "dotdot", "absolute",
               "symlink-outside", "symlinked-folder-outside", "missing-shard", "shard-lacks-tensor",
               "unlisted-tensor", "two-shards-same", "two-shards-different", "no-weight-map", "weight-map-list",
               "empty-weight-map", "index-not-json", "index-list", "shard-is-folder", "shard-is-fifo",
               "index-is-fifo", "corrupt-shard", "bin-index-dotdot"]


@pytest.mark.parametrize("case", INDEX_CASES)
def test_index_refused(tmp_path, case):
    m, pattern = index_case(tmp_path, case)
    line = refused(tmp_path, "inspect", m, match=pattern)
    assert str(m) in line
    with pytest.raises(CheckpointError):
        open_checkpoint(m)


@pytest.mark.parametrize("case", ["listed-twice", "two-shards-different", "dotdot"])
def test_index_merge_refused(tmp_path, case):
    m, pattern = index_case(tmp_path, case)
    good = sharded(tmp_path / "good", {"s1.safetensors": A, "s2.safetensors": B}, GOOD_MAP)
    refused(tmp_path, "merge", recipe(tmp_path, [good, m]), "-o", tmp_path / "out", match=pattern)


def test_index_hf_cache_snapshot_links_are_read(tmp_path):
    """A Hugging Face cache snapshot links its shards into ../../blobs: that is not 'outside'."""
    repo = tmp_path / "models--org--toy"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    save_file(A, str(blobs / "h1"))
    save_file(B, str(blobs / "h2"))
    (snap / "s1.safetensors").symlink_to("../../blobs/h1")
    (snap / "s2.safetensors").symlink_to("../../blobs/h2")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": GOOD_MAP}))
    ck = open_checkpoint(snap)
    assert sorted(ck.keys()) == ["a.weight", "b.weight"]
    assert torch.equal(ck.get("b.weight"), B["b.weight"])


# ================================================================================ .pt
def nested_state():
    g = torch.Generator().manual_seed(0)
    return {"encoder": {"layer": {"0": {"weight": torch.randn(3, 2, generator=g)}}, "norm.bias": torch.randn(3, generator=g)},
            "head.weight": torch.randn(2, 3, generator=g)}


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_pt_nested_round_trip_through_merge(tmp_path):
    """Nested dicts merge with dotted names; nothing is dropped."""
    a, b = nested_state(), nested_state()
    b["head.weight"] = b["head.weight"] + 1
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    code, out, err = cli("merge", recipe(tmp_path, [tmp_path / "a.pt", tmp_path / "b.pt"]), "-o", tmp_path / "out",
                         "-q")
    assert code == 0, err
    got = open_checkpoint(tmp_path / "out")
    fa, fb = flat(a), flat(b)
    assert sorted(got.keys()) == sorted(fa) == ["encoder.layer.0.weight", "encoder.norm.bias", "head.weight"]
    for n in fa:
        torch.testing.assert_close(got.get(n), (fa[n] + fb[n]) / 2)


def test_pt_training_checkpoint_needs_a_pick(tmp_path):
    """torch.save({"model": sd, "optimizer": ..., "epoch": 3}): refused with a hint naming
    @model; with @model (recipe, CLI, API) the model's tensors are read, names unprefixed."""
    sd = flat(nested_state())
    ck = {"model": sd, "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3, 2)}},
                                      "param_groups": [{"lr": 0.1, "params": [0]}]}, "epoch": 3}
    for n in ("a", "b"):
        torch.save(ck, tmp_path / f"{n}.pt")
    line = refused(tmp_path, "inspect", tmp_path / "a.pt", match="not a tensor")
    assert f"{tmp_path / 'a.pt'}@model" in line
    refused(tmp_path, "merge", recipe(tmp_path, [tmp_path / "a.pt", tmp_path / "b.pt"]), "-o", tmp_path / "out",
            match="@model")
    # the pick: CLI, recipe (relative to the recipe's folder), API
    code, out, _ = cli("inspect", f"{tmp_path / 'a.pt'}@model", "--json")
    assert code == 0 and sorted(t["name"] for t in json.loads(out)["tensors"]) == sorted(sd)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a.pt@model"}, {"model": "b.pt@model"}]}))
    code, _, err = cli("merge", r, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    got = open_checkpoint(tmp_path / "out")
    assert sorted(got.keys()) == sorted(sd)
    assert torch.equal(got.get("head.weight"), sd["head.weight"])
    assert sorted(mergelab.load_state(tmp_path / "a.pt", select="model.encoder")) == ["layer.0.weight", "norm.bias"]
    assert sorted(open_checkpoint(f"{tmp_path / 'a.pt'}@model.encoder.layer").keys()) == ["0.weight"]
    # the optimizer is not a state dict of tensors: refused, naming the non-tensor
    with pytest.raises(CheckpointError, match="param_groups"):
        open_checkpoint(f"{tmp_path / 'a.pt'}@optimizer")


def test_pt_at_in_a_real_file_name_is_not_split(tmp_path):
    p = tmp_path / "run@3.pt"
    torch.save({"w": torch.ones(1)}, p)
    assert open_checkpoint(p).keys() == ["w"]
    assert open_checkpoint(str(p)).keys() == ["w"]


PT_CASES = {
    "complex": ({"w": torch.ones(2, dtype=torch.complex64)}, "complex"),
    "sparse": ({"w": torch.eye(2).to_sparse()}, "sparse"),
    "sparse-csr": ({"w": torch.eye(2).to_sparse_csr()}, "sparse_csr"),
    "meta": ({"w": torch.empty(2, device="meta")}, "meta"),
    "quantized": (None, "quantized"),
    "top-level-list": ([torch.ones(1)], "found a list"),
    "top-level-tensor": (torch.ones(2), "found a Tensor"),
    "top-level-int": (3, "found an int"),
    "empty-dict": ({}, "no tensors"),
    "nested-empty": ({"a": {}, "b": {"c": {}}}, "no tensors"),
    "float-leaf": ({"w": torch.ones(1), "lr": 0.1}, "'lr' is a float"),
    "string-leaf": ({"w": torch.ones(1), "name": "bert"}, "'name' is a str"),
    "none-leaf": ({"w": torch.ones(1), "x": None}, "'x' is None"),
    "list-leaf": ({"w": torch.ones(1), "ws": [torch.ones(1)]}, "'ws' is a list"),
    "tuple-leaf": ({"w": torch.ones(1), "ws": (torch.ones(1),)}, "'ws' is a tuple"),
    "int-key": ({0: torch.ones(1)}, "0"),
    "dotted-clash": ({"a": {"b": torch.ones(1)}, "a.b": torch.zeros(1)}, "'a.b'"),
    "state-dict-wrapper": ({"state_dict": {"w": torch.ones(1)}, "epoch": 1, "lr": 0.1},
                           "@state_dict"),
    "garbage-bytes": (b"\x00garbage", "refused to load"),
    "zip-not-torch": (b"PK\x03\x04" + bytes(60), "refused to load"),
    "pickle-object": (None, "refused to load"),
}


@pytest.mark.parametrize("case", list(PT_CASES))
def test_pt_contents_refused(tmp_path, case):
    obj, pattern = PT_CASES[case]
    p = tmp_path / "m.pt"
    if case == "quantized":
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = {"w": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)}
    if case == "pickle-object":
        import datetime
        obj = {"w": torch.ones(1), "when": datetime.date(2020, 1, 1)}
    if isinstance(obj, bytes):
        p.write_bytes(obj)
    else:
        torch.save(obj, p)
    refused(tmp_path, "inspect", p, match=pattern)
    with pytest.raises(CheckpointError):
        open_checkpoint(p)


@pytest.mark.parametrize("pick,pattern", [("nope", "not a sub-dict"), ("w", "is a tensor, not a sub-dict"),
                                           ("", "not a sub-dict name"), ("a..b", "not a sub-dict name"),
                                           ("opt", "'opt.lr' is a float")])
def test_pt_bad_pick(tmp_path, pick, pattern):
    p = tmp_path / "m.pt"
    torch.save({"w": torch.ones(1), "m": {"x": torch.ones(1)}, "opt": {"lr": 0.1}}, p)
    refused(tmp_path, "inspect", f"{p}@{pick}", match=pattern)


def test_pt_fifo_and_safetensors_pick(tmp_path):
    fifo = tmp_path / "m.pt"
    os.mkfifo(fifo)
    refused_subprocess(tmp_path, "inspect", fifo, match="FIFO", timeout=60)
    # @key on safetensors selects the names under key.
    save_file({"enc.w": torch.ones(2), "enc.b": torch.zeros(1), "head": torch.ones(1)}, str(tmp_path / "s.safetensors"))
    assert sorted(open_checkpoint(f"{tmp_path / 's.safetensors'}@enc").keys()) == ["b", "w"]
    refused(tmp_path, "inspect", f"{tmp_path / 's.safetensors'}@head", match="is a tensor")


# ============================================================================= config
def test_config_not_an_object(tmp_path):
    for i, text in enumerate(["[1, 2]", "{not json", "3", '"s"']):
        m = hf_folder(tmp_path / f"m{i}", toy_state())
        (m / "config.json").write_text(text)
        refused(tmp_path, "inspect", m, match=re.escape(str(m / "config.json")))


def test_config_fifo(tmp_path):
    m = hf_folder(tmp_path / "m", toy_state())
    (m / "config.json").unlink()
    os.mkfifo(m / "config.json")
    refused_subprocess(tmp_path, "inspect", m, match="FIFO", timeout=60)


@pytest.mark.parametrize("value,pattern", [(1, "layers up to index 1"), ("two", "expected a positive integer"),
                                           (0, "expected a positive integer"), (True, "expected a positive integer"),
                                           (-2, "expected a positive integer")])
def test_config_layer_count_contradicts_weights(tmp_path, value, pattern):
    a = hf_folder(tmp_path / "a", toy_state(0), {"model_type": "toy", "num_hidden_layers": value})
    b = hf_folder(tmp_path / "b", toy_state(1), {"model_type": "toy", "num_hidden_layers": value})
    r = recipe(tmp_path, [a, b], parameters={"weight": [0.0, 1.0]})  # a depth gradient needs the count
    refused(tmp_path, "merge", r, "-o", tmp_path / "out", match=pattern)


def test_config_contradiction_irrelevant_without_gradient(tmp_path):
    a = hf_folder(tmp_path / "a", toy_state(0), {"model_type": "toy", "num_hidden_layers": 1})
    b = hf_folder(tmp_path / "b", toy_state(1), {"model_type": "toy", "num_hidden_layers": 1})
    code, _, err = cli("merge", recipe(tmp_path, [a, b]), "-o", tmp_path / "out", "-q")
    assert code == 0, err


# =============================================================================== data
FACTORY = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from torch import nn
    from _stats_models import mlp

    def make_mlp():
        return mlp(7)

    def wider():
        return mlp(7, width=20)

    def renamed():
        m = mlp(7)
        return nn.Sequential(*list(m.children())[:-1], nn.Identity(), m[-1])
""")


@pytest.fixture
def work(tmp_path, monkeypatch):
    from _stats_models import mlp, tiny_bert

    (tmp_path / "mymodels.py").write_text(FACTORY.format(tests=str(TESTS)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymodels", None)
    save_file(mlp(7).state_dict(), "m.safetensors")
    save_file(mlp(8).state_dict(), "m2.safetensors")
    tiny_bert(0).save_pretrained("hf")
    rng = np.random.default_rng(0)
    np.savez("ok.npz", x=rng.standard_normal((20, 10)).astype("f4"), y=np.arange(20) % 3)
    np.savez("labels5.npz", x=rng.standard_normal((20, 10)).astype("f4"), y=np.arange(20) % 5)
    np.savez("labelsneg.npz", x=rng.standard_normal((20, 10)).astype("f4"), y=np.arange(20) % 3 - 1)
    np.savez("labelsfloat.npz", x=rng.standard_normal((20, 10)).astype("f4"), y=rng.random(20))
    np.savez("labels2d.npz", x=rng.standard_normal((20, 10)).astype("f4"), y=np.zeros((20, 2), dtype="i8"))
    np.savez("feat7.npz", x=rng.standard_normal((20, 7)).astype("f4"), y=np.arange(20) % 3)
    np.savez("strings.npz", x=np.array(["a"] * 20))
    np.savez("scalar.npz", x=np.float32(3))
    np.savez("empty.npz", x=np.zeros((0, 10), dtype="f4"))
    np.savez("rows.npz", x=rng.standard_normal((20, 10)).astype("f4"), y=np.arange(19) % 3)
    np.savez("complex.npz", x=np.ones((20, 10), dtype="c8"))
    np.savez("floattok.npz", x=rng.standard_normal((4, 8)).astype("f4"))
    np.savez("vocab.npz", x=np.full((4, 8), 45))
    np.savez("negtok.npz", x=np.full((4, 8), -1))
    np.savez("positions.npz", x=np.ones((4, 40), dtype="i8"))
    Path("corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    Path("bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    Path("imgs").mkdir()
    return tmp_path


STATS_CASES = {
    "label-range": (["fisher", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "labels5.npz",
                     "--mode", "empirical"], "labels5.npz.*label 4 .*0..2.*3 classes"),
    "label-negative": (["fisher", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "labelsneg.npz"],
                       "labelsneg.npz.*label -1"),
    "label-float": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "labelsfloat.npz"],
                    "labelsfloat.npz.*integer class"),
    "label-2d": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "labels2d.npz"],
                 "labels2d.npz.*1-D"),
    "feature-count": (["activations", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "feat7.npz"],
                      "feat7.npz.*cannot run on the first batch"),
    "string-data": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "strings.npz"],
                    "strings.npz.*array of numbers"),
    "scalar-data": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "scalar.npz"],
                    "scalar.npz"),
    "complex-data": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "complex.npz"],
                     "complex.npz"),
    "no-rows": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "empty.npz"],
                "empty.npz.*no examples"),
    "x-y-rows": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "rows.npz"],
                 "rows.npz.*20 rows, y has 19"),
    "corrupt-npz": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "corrupt.npz"],
                    "corrupt.npz"),
    "bad-jsonl": (["gram", "hf", "--data", "bad.jsonl"], "bad.jsonl.*line 2"),
    "empty-image-folder": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "imgs"], "imgs"),
    "float-for-tokens": (["activations", "hf", "--data", "floattok.npz"], "floattok.npz.*token ids"),
    "tokens-out-of-vocab": (["activations", "hf", "--data", "vocab.npz"], "vocab.npz.*token id 45.*0..39"),
    "negative-token": (["gram", "hf", "--data", "negtok.npz"], "negtok.npz.*token id -1"),
    "too-many-positions": (["fisher", "hf", "--data", "positions.npz"], "positions.npz.*40 tokens.*32"),
    "model-mismatch": (["gram", "m.safetensors", "--model-code", "mymodels:wider", "--data", "ok.npz"],
                       "weights do not fit.*wrong shape"),
    "model-missing": (["gram", "nope.safetensors", "--model-code", "mymodels:make_mlp", "--data", "ok.npz"],
                      "no such file"),
    "data-missing": (["gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "nope.npz"],
                     "nope.npz"),
}


def _prepare(work, case):
    if case == "unknown-arch":
        cfg = json.loads((work / "hf" / "config.json").read_text())
        cfg["architectures"] = ["NopeForEverything"]
        (work / "hf" / "config.json").write_text(json.dumps(cfg))
    if case == "corrupt-config":
        (work / "hf" / "config.json").write_text("{oops")
    if case == "corrupt-weights":
        p = work / "hf" / "model.safetensors"
        p.write_bytes(p.read_bytes()[:-100])


STATS_CASES.update({
    "unknown-arch": (["gram", "hf", "--data", "vocab.npz"], "NopeForEverything"),
    "corrupt-config": (["gram", "hf", "--data", "vocab.npz"], "config.json"),
    "corrupt-weights": (["gram", "hf", "--data", "vocab.npz"], "model.safetensors.*truncated"),
})


@pytest.mark.parametrize("case", list(STATS_CASES))
def test_data_stats_refused(work, case):
    args, pattern = STATS_CASES[case]
    _prepare(work, case)
    cmd, *rest = args
    refused(work, "stats", cmd, *rest, "-o", "out.safetensors", "--quiet", match=pattern)


def test_data_not_regular_files_and_nonfinite(work):
    """Data files that are FIFOs (a .npz, a .jsonl, an image) are refused without blocking;
    data holding NaN is refused before the pass (the statistics would be NaN)."""
    os.mkfifo("fifo.npz")
    os.mkfifo("fifo.jsonl")
    (work / "imgs" / "cat").mkdir()
    os.mkfifo(work / "imgs" / "cat" / "a.png")
    for data, pattern in [("fifo.npz", "fifo.npz.*FIFO"), ("fifo.jsonl", "fifo.jsonl.*FIFO"),
                          ("imgs", "a.png.*FIFO")]:
        refused_subprocess(work, "stats", "gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data",
                           data, "-o", "out.safetensors", "--quiet", match=pattern, timeout=90)
    x = np.random.default_rng(0).standard_normal((20, 10)).astype("f4")
    x[7, 3] = np.nan
    np.savez("nan.npz", x=x, y=np.arange(20) % 3)
    refused(work, "stats", "gram", "m.safetensors", "--model-code", "mymodels:make_mlp", "--data", "nan.npz",
            "-o", "out.safetensors", "--quiet", match="nan.npz.*example 7 holds NaN")


def test_data_text_longer_than_positions(work):
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(30)]
    (work / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    BertTokenizerFast(vocab_file=str(work / "vocab.txt")).save_pretrained("hf")
    (work / "long.jsonl").write_text("\n".join(json.dumps({"text": " ".join(words * 2), "label": 0}) for _ in range(3)))
    refused(work, "stats", "gram", "hf", "--data", "long.jsonl", "--max-length", "64", "-o", "out.safetensors",
            "--quiet", match="long.jsonl.*62 tokens.*32.*--max-length 32")


ALIGN_CASES = {
    "factory-shapes": (["m.safetensors", "m2.safetensors", "--model-code", "mymodels:wider", "--input-shape", "1,10"],
                       "weights do not fit.*wrong shape.*0.weight"),
    "factory-names": (["m.safetensors", "m2.safetensors", "--model-code", "mymodels:renamed", "--input-shape", "1,10"],
                      "weights do not fit.*missing from the checkpoint.*not in the model"),
    "activation-labels": (["m.safetensors", "m2.safetensors", "--model-code", "mymodels:make_mlp", "--method",
                           "activation", "--data", "labels5.npz"], "labels5.npz.*label 4"),
    "activation-features": (["m.safetensors", "m2.safetensors", "--model-code", "mymodels:make_mlp", "--method",
                             "activation", "--data", "feat7.npz"], "feat7.npz.*cannot run"),
    "other-corrupt": (["m.safetensors", "trunc.safetensors", "--model-code", "mymodels:make_mlp", "--input-shape",
                       "1,10"], "trunc.safetensors"),
    "other-empty-pt": (["m.safetensors", "empty.pt", "--model-code", "mymodels:make_mlp", "--input-shape", "1,10"],
                       "no tensors"),
}


@pytest.mark.parametrize("case", list(ALIGN_CASES))
def test_data_align_refused(work, case):
    Path("trunc.safetensors").write_bytes(Path("m2.safetensors").read_bytes()[:-8])
    torch.save({}, "empty.pt")
    args, pattern = ALIGN_CASES[case]
    refused(work, "align", *args, "-o", "aligned", "-q", match=pattern)


# ================================================================================ API
def test_api_bad_devices(tmp_path):
    a = hf_folder(tmp_path / "a", toy_state(0))
    b = hf_folder(tmp_path / "b", toy_state(1))
    r = recipe(tmp_path, [a, b])
    for dev in ["banana", "", "cuda:x", "tpu"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"]):
        with pytest.raises(MergelabError, match="--device"):
            mergelab.merge(r, tmp_path / "out", device=dev)
    assert not (tmp_path / "out").exists()


def _spec():
    from torch import nn

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return mergelab.permutation_spec(net, torch.randn(1, 3)), net.state_dict()


BAD_STATES = {
    "float-value": {"w": 1.0},
    "list-value": {"w": [1, 2]},
    "none-value": {"w": None},
    "numpy-value": {"w": np.ones(2)},
    "int-key": {0: torch.ones(1)},
    "complex-tensor": {"w": torch.ones(2, dtype=torch.complex64)},
    "sparse-tensor": {"w": torch.eye(2).to_sparse()},
    "meta-tensor": {"w": torch.empty(2, device="meta")},
    "not-a-mapping": [torch.ones(1)],
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_api_non_tensor_states(tmp_path, case):
    bad = BAD_STATES[case]
    with pytest.raises(CheckpointError):
        mergelab.save_state(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergelabError):
        mergelab.fisher_merge([bad, bad], [{"w": torch.ones(1)}] * 2)
    with pytest.raises(MergelabError):
        mergelab.regmean_merge([bad, bad], [{}, {}])
    spec, sd = _spec()
    state = dict(sd)
    if isinstance(bad, dict):
        state.update(bad)
    else:
        state = bad
    with pytest.raises(CheckpointError):
        mergelab.permute(spec, state, mergelab.weight_matching(spec, sd, sd))


def test_api_checkpoint_errors_are_typed(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(HEADER_CASES["overlap"])
    for call in (lambda: mergelab.open_checkpoint(p), lambda: mergelab.load_state(p),
                 lambda: mergelab.open_checkpoint(tmp_path / "nope.pt"),
                 lambda: mergelab.open_checkpoint(123), lambda: mergelab.open_checkpoint("a\0b"),
                 lambda: mergelab.open_checkpoint(p, select="")):
        with pytest.raises(CheckpointError):
            call()


def test_api_stats_data_errors_are_typed():
    from _stats_models import mlp

    net = mlp(7)
    with pytest.raises(DataError, match="label 5"):
        mergelab.diagonal_fisher(net, [(torch.randn(4, 10), torch.tensor([0, 1, 2, 5]))], progress=False)
    with pytest.raises(DataError, match="cannot run on the first batch"):
        mergelab.activation_stats(net, [torch.randn(4, 9)], progress=False)
    with pytest.raises(DataError, match="cannot run on the first batch"):
        mergelab.gram_matrices(net, [torch.randn(4, 9)], progress=False)
    with pytest.raises(DataError, match="no examples"):
        mergelab.gram_matrices(net, [], progress=False)


def test_api_misuse_is_one_line():
    """Wrong types and mismatched states given to the public functions: MergelabError, never
    a TypeError/IndexError/RuntimeError/KeyError from deep inside."""
    from torch import nn

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    sd = net.state_dict()
    spec = mergelab.permutation_spec(net, torch.randn(1, 3))
    calls = {
        "merge-int-recipe": lambda: mergelab.merge(123, "o"),
        "wm-non-tensor": lambda: mergelab.weight_matching(spec, {k: 1 for k in sd}, sd),
        "wm-shapes": lambda: mergelab.weight_matching(spec, sd, {k: torch.zeros(1) for k in sd}),
        "am-bad-batch": lambda: mergelab.activation_matching(spec, net, net, [torch.randn(2, 7)]),
        "stats-non-module": lambda: mergelab.activation_stats(5, [torch.randn(2, 3)], progress=False),
        "gram-non-iterable": lambda: mergelab.gram_matrices(net, 5, progress=False),
        "fisher-missing-name": lambda: mergelab.fisher_merge([sd, {}], [sd, sd]),
        "fisher-shape": lambda: mergelab.fisher_merge([sd, {k: torch.zeros(1) for k in sd}], [sd, sd]),
        "regmean-shape": lambda: mergelab.regmean_merge([sd, {k: torch.zeros(1) for k in sd}], [{}, {}]),
        "regmean-gram-non-tensor": lambda: mergelab.regmean_merge([sd, sd], [{"0.weight": 1}] * 2),
    }
    for name, call in calls.items():
        with pytest.raises(MergelabError) as e:
            call()
        assert "\n" not in str(e.value), name
