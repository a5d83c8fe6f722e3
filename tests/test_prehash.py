"""Checksums started before torch is imported (io/prehash.py): the guess of the weight files
agrees with the reader, a started hash is used only for the same file and algorithm, a
changed file is hashed again, a wrong guess changes nothing, and a stopped hash ends."""
import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from core_helpers import save_hf, toy_family, toy_tensors
from mergelab.errors import MergelabError
from mergelab.io import prehash
from mergelab.io.checksums import Cancelled, file_digest
from mergelab.io.reader import open_checkpoint
from mergelab.io.writer import save_tensors
from mergelab.merge import merge

blake3 = pytest.importorskip("blake3")


@pytest.fixture(autouse=True)
def _clean():
    prehash.discard(everything=True)
    yield
    prehash.discard(everything=True)


def _layouts(tmp_path):
    t = toy_tensors(0)
    out = {"sharded": save_hf(tmp_path / "sharded", t, shards=3), "single": save_hf(tmp_path / "single", t)}
    odd = tmp_path / "odd"
    odd.mkdir()
    save_tensors(t, odd / "weights.safetensors")
    out["odd"] = odd
    out["file"] = odd / "weights.safetensors"
    out["index"] = out["sharded"] / "model.safetensors.index.json"
    pt = tmp_path / "ckpt.pt"
    torch.save(t, pt)
    out["pt"] = pt
    return out


def test_weight_files_are_the_readers_files(tmp_path):
    for name, ref in _layouts(tmp_path).items():
        guessed = [os.path.realpath(f) for f in prehash.weight_files(ref)]
        assert guessed == [os.path.realpath(f) for f in open_checkpoint(ref).files], name


def test_ambiguous_folder_is_not_guessed(tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    save_tensors(toy_tensors(0), d / "x.safetensors")
    save_tensors(toy_tensors(1), d / "y.safetensors")
    assert prehash.weight_files(d) == []
    with pytest.raises(MergelabError):
        open_checkpoint(d)


def _recipe(tmp_path, text):
    rp = tmp_path / "r.yaml"
    rp.write_text(text)
    return rp


def test_started_digest_is_the_files_digest_and_relative_paths_resolve(tmp_path):
    paths, _ = toy_family(tmp_path, shards=2)
    base, a, b = paths
    # relative to the recipe's folder (not the cwd), as Recipe.resolve_path does
    rp = _recipe(tmp_path, f"models:\n- model: {a.name}\n- model: {b}\nbase_model: {base.name}\n"
                           "merge_method: task_arithmetic\n")
    cwd = os.getcwd()
    os.chdir("/")
    try:
        n = prehash.start(rp, "blake3", 2)
    finally:
        os.chdir(cwd)
    files = [f for p in paths for f in sorted(p.glob("*.safetensors"))]
    assert n == len(files)
    for f in files:
        fut = prehash.take(f, "blake3")
        assert fut is not None, f
        assert fut.result(timeout=60) == blake3.blake3(f.read_bytes()).hexdigest()
        assert prehash.take(f, "blake3") is None  # taken once


def test_other_algorithm_or_changed_file_is_not_used(tmp_path):
    paths, _ = toy_family(tmp_path)
    base, a, b = paths
    rp = _recipe(tmp_path, f"models:\n- model: {a}\n- model: {b}\nbase_model: {base}\nmerge_method: linear\n")
    prehash.start(rp, "blake3", 1)
    fa = a / "model.safetensors"
    assert prehash.take(fa, "sha256") is None          # started as blake3
    fb = b / "model.safetensors"
    st = os.stat(fb)
    os.utime(fb, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file changed since
    assert prehash.take(fb, "blake3") is None
    fut = prehash.take(base / "model.safetensors", "blake3")
    assert fut is not None and fut.result(timeout=60) == file_digest(base / "model.safetensors", "blake3")


@pytest.mark.parametrize("rank", ["1", "3"])
def test_only_rank_zero_hashes(tmp_path, monkeypatch, rank):
    paths, _ = toy_family(tmp_path)
    rp = _recipe(tmp_path, f"models:\n- model: {paths[1]}\n- model: {paths[2]}\nmerge_method: linear\n")
    monkeypatch.setenv("RANK", rank)
    assert prehash.start(rp, "blake3") == 0


def test_nothing_for_no_checksums_lora_or_selector(tmp_path):
    paths, _ = toy_family(tmp_path)
    a = paths[1]
    rp = _recipe(tmp_path, f"models:\n- model: {a}+{tmp_path}/adapter\n- model: {a}/model.safetensors@sub\n"
                           "merge_method: linear\n")
    assert prehash.start(rp, "blake3") == 0
    rp2 = _recipe(tmp_path, f"models:\n- model: {a}\nmerge_method: linear\n")
    assert prehash.start(rp2, None) == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                      st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
                                   lambda c: st.one_of(st.lists(c, max_size=4),
                                                       st.dictionaries(st.sampled_from(
                                                           ["models", "model", "base_model", "slices", "sources",
                                                            "x"]), c, max_size=4)),
                                   max_leaves=12).map(repr)))
def test_any_recipe_text_starts_quietly(tmp_path, text):
    """A guess never raises, whatever the recipe holds: the merge reports the real problem."""
    rp = tmp_path / "h.yaml"
    rp.write_text(text, encoding="utf-8", errors="surrogateescape")
    assert prehash.start(rp, "blake3") >= 0
    prehash.discard(everything=True)


def test_fifo_is_never_opened(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    rp = _recipe(tmp_path, f"models:\n- model: {tmp_path}\n- model: {fifo}\nmerge_method: linear\n")
    assert prehash.start(rp, "blake3") == 0  # would block forever if opened


def test_discard_stops_a_started_hash(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "model.safetensors").write_bytes(os.urandom(1 << 20) * 256)  # 256 MiB: many windows
    rp = _recipe(tmp_path, f"models:\n- model: {big}\nmerge_method: linear\n")
    assert prehash.start(rp, "sha256", 1) == 1  # sha256: ~1 s for 256 MiB, stopped long before its end
    fut = prehash.take(big / "model.safetensors", "sha256")
    prehash.discard(everything=True)
    deadline = time.monotonic() + 60
    while any(t.name.startswith("mergelab-prehash") for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert fut.cancelled() or isinstance(fut.exception(), Cancelled)


def test_taken_then_stopped_hash_is_redone(tmp_path):
    """A taken hash stopped early (discard(everything=True)) raises Cancelled: the merge's
    checksums then hash the file themselves (engine/run.py), so the card is still right."""
    paths, _ = toy_family(tmp_path)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        file_digest(paths[1] / "model.safetensors", "blake3", stop=stop)
    from concurrent.futures import Future

    from mergelab.engine.run import _Checksums

    f = paths[1] / "model.safetensors"
    for stopped in (Cancelled(str(f)), None):  # stopped mid-file, or cancelled before it began
        fut = Future()
        if stopped is None:
            fut.cancel()
        else:
            fut.set_exception(stopped)
        sums = object.__new__(_Checksums)
        sums.futs, sums.unique, sums.algorithm = {"k": fut}, {"k": f}, "blake3"
        assert sums._digest("k") == blake3.blake3(f.read_bytes()).hexdigest()


def _card(folder):
    return (folder / "README.md").read_text()


@pytest.mark.parametrize("algo", [None, "sha256"])
def test_cli_card_equals_api_card(tmp_path, algo):
    """The command (which starts the hashes early) and merge() write the same model card."""
    paths, _ = toy_family(tmp_path, shards=2)
    base, a, b = paths
    rp = _recipe(tmp_path, f"models:\n- model: {a}\n  parameters: {{weight: 0.5}}\n- model: {b}\n"
                           f"  parameters: {{weight: 0.5}}\nbase_model: {base}\nmerge_method: task_arithmetic\n")
    opt = ["--checksums", algo] if algo else []
    p = subprocess.run([sys.executable, "-m", "mergelab", "merge", str(rp), "-o", str(tmp_path / "cli"), "-q", *opt],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    res = merge(str(rp), tmp_path / "api", quiet=True, **({"checksums": algo} if algo else {}))
    assert _card(tmp_path / "cli") == _card(res.outputs[0])
    h = hashlib.sha256 if algo == "sha256" else (lambda b: blake3.blake3(b))
    for f in a.glob("*.safetensors"):
        assert h(f.read_bytes()).hexdigest() in _card(tmp_path / "cli")
