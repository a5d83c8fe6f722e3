"""io.writer.save_tensors: a valid safetensors file whose bytes depend only on its content."""
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergelab.io.writer import save_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.w": torch.randn(3, 4, generator=g), "a": torch.randn(5, generator=g).to(torch.bfloat16),
            "m": torch.rand(2, 3, generator=g) > 0.5, "n": torch.tensor(7, dtype=torch.int64),
            "e": torch.zeros(0, 3), "d": torch.randn(2, 2, generator=g).double()}


def test_round_trip_and_metadata(tmp_path):
    t = _tensors()
    meta = {"mergelab_kind": "x", "sites": '["a", "b"]', "count:z": "3"}
    save_tensors(t, tmp_path / "f.safetensors", meta)
    back = load_file(str(tmp_path / "f.safetensors"))
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k]), k
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert f.metadata() == meta


def test_same_content_same_bytes(tmp_path):
    t = _tensors()
    meta = {f"k{i}": str(i) for i in range(20)}
    save_tensors(t, tmp_path / "a.safetensors", meta)
    save_tensors(dict(reversed(list(t.items()))), tmp_path / "b.safetensors", dict(reversed(list(meta.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
