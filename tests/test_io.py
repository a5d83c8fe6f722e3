import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from core_helpers import nothing_written, save_hf, toy_tensors
from mergelab.errors import MergelabError
from mergelab.io import AtomicFolder, load_state, open_checkpoint, parse_size, save_state


def _all_dtypes():
    g = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(64, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(3, 3, 3, generator=g).to(torch.float16),
        "i64": torch.arange(9, dtype=torch.int64),
        "u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("shard_size", ["200B", "5GB"])
def test_round_trip_identical_bytes(tmp_path, shard_size):
    src = _all_dtypes()
    save_file(src, str(tmp_path / "in.safetensors"))
    out = save_state(load_state(tmp_path / "in.safetensors"), tmp_path / "out", shard_size=shard_size)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if shard_size == "200B":
        assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
        wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(wm) == set(src) and set(wm.values()) == set(files)
    else:
        assert files == ["model.safetensors"]
    # independent reader (upstream safetensors) and our lazy reader both give the same bytes
    upstream = {}
    for f in files:
        upstream.update(load_file(str(out / f)))
    back = open_checkpoint(out)
    assert back.keys() == open_checkpoint(tmp_path / "in.safetensors").keys()  # order kept
    assert set(back.keys()) == set(src)
    for k, v in src.items():
        for got in (upstream[k], back.get(k)):
            assert got.dtype == v.dtype and got.shape == v.shape
            assert got.contiguous().view(-1).view(torch.uint8).tolist() == v.contiguous().view(-1).view(torch.uint8).tolist()


def test_lazy_and_eager_reads_agree(tmp_path):
    t = toy_tensors(3)
    p = save_hf(tmp_path / "m", t, shards=3)
    eager = {}
    for f in sorted(p.glob("*.safetensors")):
        eager.update(load_file(str(f)))
    ck = open_checkpoint(p)
    assert len(ck) == len(t) and set(ck.keys()) == set(eager)
    for k in eager:
        assert ck.shape(k) == tuple(eager[k].shape) and ck.dtype(k) == eager[k].dtype
        assert torch.equal(ck.get(k), eager[k])
    assert ck.config == {"model_type": "toy", "num_hidden_layers": 2}
    lazy = load_state(p)
    assert set(lazy) == set(eager) and torch.equal(lazy["embed.weight"], eager["embed.weight"])


def test_pt_and_bin_weights_only(tmp_path):
    t = toy_tensors(0)
    torch.save(t, tmp_path / "m.pt")
    (tmp_path / "hf").mkdir()
    torch.save(t, tmp_path / "hf" / "pytorch_model.bin")
    for path in (tmp_path / "m.pt", tmp_path / "hf"):
        ck = open_checkpoint(path)
        assert set(ck.keys()) == set(t)
        assert all(torch.equal(ck.get(k), t[k]) for k in t)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_refused_without_running(tmp_path):
    victim = tmp_path / "pwned.txt"
    for name in ("evil.pt", "evil.bin"):
        torch.save({"w": torch.zeros(2), "x": _Evil(str(victim))}, tmp_path / name)
        with pytest.raises(MergelabError, match="refused to load") as e:
            open_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value)
        assert not victim.exists()
    # a plain pickle (not a torch zip) with the same payload
    with open(tmp_path / "raw.bin", "wb") as f:
        pickle.dump(_Evil(str(victim)), f)
    with pytest.raises(MergelabError, match="refused to load"):
        open_checkpoint(tmp_path / "raw.bin")
    assert not victim.exists()


def test_missing_truncated_corrupted(tmp_path):
    with pytest.raises(MergelabError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope")
    save_file(toy_tensors(0), str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(MergelabError, match="truncated or corrupted"):
        open_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(MergelabError, match="truncated or corrupted"):
        open_checkpoint(tmp_path / "short.safetensors")
    bad = bytearray(data)
    bad[8:20] = b"#!garbage!#{"
    (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
    with pytest.raises(MergelabError, match="corrupted safetensors file"):
        open_checkpoint(tmp_path / "bad.safetensors")
    # a sharded folder whose index names a missing shard
    p = save_hf(tmp_path / "sh", toy_tensors(0), shards=2)
    os.remove(p / "model-00002-of-00002.safetensors")
    with pytest.raises(MergelabError, match="is missing"):
        open_checkpoint(p)


def test_atomic_folder_exception_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with AtomicFolder(out) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("mid-write")
    assert nothing_written(out)
    with pytest.raises(KeyboardInterrupt):
        with AtomicFolder(out) as tmp:
            (tmp / "x").write_text("partial")
            raise KeyboardInterrupt
    assert nothing_written(out)


def test_existing_output_refused_unless_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MergelabError, match="exists and is not empty"):
        AtomicFolder(out)
    save_state({"a": torch.ones(2)}, out, force=True)
    assert not (out / "keep.txt").exists() and torch.equal(open_checkpoint(out).get("a"), torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_state_dtype_and_like(tmp_path):
    src = save_hf(tmp_path / "src", toy_tensors(0))
    out = save_state(load_state(src), tmp_path / "o", like=src, dtype="bfloat16")
    ck = open_checkpoint(out)
    assert ck.dtype("embed.weight") == torch.bfloat16 and ck.dtype("position_ids") == torch.int64
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer_config.json").is_file()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(MergelabError, match="--shard-size"):
        parse_size("lots")
    with pytest.raises(MergelabError, match="^--block-size: must be positive"):  # the option it is about
        parse_size("0", "--block-size")
