"""The per-block Python work the engine caches (the tensor seed, whether a method takes a
context) gives every block exactly what the uncached computation gave."""
import threading

import torch

from core_helpers import toy_family
from mergelab.merge import merge
from mergelab.methods.registry import REGISTRY, merge_method
from mergelab.methods.seeds import derive_seed


def test_every_row_block_sees_the_tensors_seed_and_its_context(tmp_path):
    seen: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    @merge_method("_seed_probe", elementwise=True)
    def _probe(tensors, base, *, ctx):
        with lock:
            seen.append((ctx.name, ctx.seed, ctx.offset))
        return tensors[0].clone()

    try:
        paths, _ = toy_family(tmp_path)
        r = {"models": [{"model": str(paths[1])}], "merge_method": "_seed_probe", "seed": 11}
        res = merge(r, tmp_path / "o", block_size="400B", threads=2, quiet=True)
        again = merge(r, tmp_path / "o2", block_size="400B", threads=1, quiet=True)
    finally:
        del REGISTRY["_seed_probe"]
    names = {n for n, _, _ in seen}
    assert len(seen) > len(names) * 1 and len(names) > 1      # several blocks per tensor
    for name, seed, _ in seen:                                # the documented formula, written out
        assert seed == derive_seed(11, name)
    for f in sorted(res.outputs[0].glob("*.safetensors")):   # the identity method: input bytes back
        assert f.read_bytes() == (again.outputs[0] / f.name).read_bytes()


def test_a_method_without_ctx_is_called_without_it_and_with_it_when_it_changes():
    spec = REGISTRY["linear"]
    a, b = torch.ones(3), torch.full((3,), 3.0)
    assert torch.equal(spec([a, b], None, weight=[0.5, 0.5]), torch.full((3,), 2.0))
    old = spec.fn
    try:
        spec.fn = lambda tensors, base, *, ctx, **kw: torch.full((3,), float(ctx.seed))
        from mergelab.methods.registry import TensorContext

        assert torch.equal(spec([a, b], None, ctx=TensorContext(seed=7)), torch.full((3,), 7.0))
        spec.fn = lambda tensors, base, **kw: tensors[0]
        assert spec([a, b], None, ctx=TensorContext(seed=7)) is a
    finally:
        spec.fn = old
