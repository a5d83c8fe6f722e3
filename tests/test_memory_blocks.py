"""Methods that need a whole-tensor quantity (SLERP's angle, Fisher's norms, the TIES trim of
TALL masks and consensus, global TIES thresholds) are merged in row blocks with bounded memory
and give the same bytes as on whole tensors: the float64 reductions are regrouped into the same
fixed flat chunks (``methods/chunks.py``), whatever the row blocks."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import mergelab as ml
from core_helpers import save_hf
from mergelab.engine.driver import Driver
from mergelab.engine.planning import plan
from mergelab.io import open_checkpoint
from mergelab.methods import basic, fisher
from mergelab.methods.chunks import FlatChunks


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=12), size=st.integers(1, 40))
def test_flat_chunks_regroup_any_cut_into_the_whole_tensors_chunks(sizes, size):
    x = torch.arange(sum(sizes), dtype=torch.float32)
    y = -x.double()
    fc, got, pos = FlatChunks(size), [], 0
    for i, k in enumerate(sizes):
        for c in fc.add([x[pos:pos + k], y[pos:pos + k]], last=i == len(sizes) - 1):
            got.append([t.clone() for t in c])  # a chunk is valid until the next one
        pos += k
    want = [[x[a:a + size], y[a:a + size]] for a in range(0, x.numel(), size)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(g, w))


def _family(tmp):
    states = []
    for i, n in enumerate(("base", "a", "b", "c")):
        g = torch.Generator().manual_seed(i)
        s = {"big.weight": torch.randn(37, 23, generator=g), "small.weight": torch.randn(3, 5, generator=g),
             "norm.weight": torch.randn(23, generator=g)}
        if n != "base":
            s["big.weight"][::5] = 0.5  # ties at the trim threshold
        save_hf(tmp / n, s)
        states.append(s)
        if n != "base":
            f = {k: torch.rand(v.shape, generator=g) for k, v in s.items()}
            save_file(f, str(tmp / f"fisher_{n}.safetensors"), metadata={"mergelab_kind": "fisher"})
    return states


def _read(folder):
    ck = open_checkpoint(folder)
    return {k: ck.get(k) for k in ck.keys()}


CASES = {
    "ties_global": ("ties", {"density": 0.4, "scope": "global"}, "base", "abc"),
    "consensus": ("consensus", {"base_merge": "ties", "density": 0.5, "k": 2}, "base", "abc"),
    "tall_masks": ("tall_masks", {"base_merge": "ties", "density": 0.5, "lambda": 0.4}, "base", "abc"),
    "tall_masks_ta": ("tall_masks", {"lambda": 0.6, "output": "masks"}, "base", "abc"),
    "slerp": ("slerp", {"t": 0.3}, None, "ab"),
    "slerp_base_listed": ("slerp", {"t": 0.6}, "base", ["a", "base"]),
    "fisher": ("fisher", {"normalize": True}, None, "abc"),
}


def test_row_blocks_give_the_bytes_of_whole_tensors(tmp_path, monkeypatch):
    # chunks of 64 entries (instead of 2^20) so that the 851-entry tensor spans 14 of them and
    # 2-row blocks (46 entries) cut them everywhere
    monkeypatch.setattr(fisher, "_CHUNK", 64)
    monkeypatch.setattr(basic, "_GRAM_CHUNK", 64)
    states = dict(zip(("base", "a", "b", "c"), _family(tmp_path)))
    fishers = {m: _read(tmp_path / f"fisher_{m}.safetensors") for m in "abc"}
    for cid, (method, params, base, models) in CASES.items():
        r = {"models": [{"model": str(tmp_path / m),
                         "parameters": {"fisher": str(tmp_path / f"fisher_{m}.safetensors")} if method == "fisher" else {}}
                        for m in models], "merge_method": method, "parameters": params, "seed": 5}
        if base:
            r["base_model"] = str(tmp_path / base)
        d = Driver(plan(r), block_bytes=200)
        assert d.rows_per_block("big.weight") == 2, cid  # merged in row blocks
        res = ml.merge(r, tmp_path / f"{cid}_blocks", block_size="200B", threads=1, quiet=True)
        kw = dict(params)
        if method == "fisher":
            whole = ml.merge_states(method, [states[m] for m in models], stats={"fisher": [fishers[m] for m in models]},
                                    seed=5, **kw)
        else:
            whole = ml.merge_states(method, [states[m] for m in models], base=states[base] if base else None,
                                    model_names=[str(tmp_path / m) for m in models], seed=5, **kw)
        outs = {v or "": _read(o) for v, o in zip(res.variants or [""], res.outputs)}
        whole = whole if method == "tall_masks" else {"": whole}
        assert sorted(outs) == sorted(whole), cid
        for v in outs:
            for k, t in outs[v].items():
                assert torch.equal(t.view(-1).view(torch.uint8), whole[v][k].contiguous().view(-1).view(torch.uint8)), (cid, v, k)


def test_a_statistic_of_another_shape_merges_the_tensor_whole(tmp_path):
    _family(tmp_path)
    for m in "abc":  # a Fisher stored flattened: same entries, another shape
        ck = open_checkpoint(tmp_path / f"fisher_{m}.safetensors")
        f = {k: ck.get(k).reshape(-1).clone() for k in ck.keys()}
        save_file(f, str(tmp_path / f"flat_{m}.safetensors"), metadata={"mergelab_kind": "fisher"})
    r = lambda pre: {"models": [{"model": str(tmp_path / m), "parameters": {"fisher": str(tmp_path / f"{pre}_{m}.safetensors")}}  # noqa: E731
                                for m in "abc"], "merge_method": "fisher", "parameters": {"normalize": True}}
    assert Driver(plan(r("flat")), block_bytes=200).rows_per_block("big.weight") is None
    assert Driver(plan(r("fisher")), block_bytes=200).rows_per_block("big.weight") == 2
    x = ml.merge(r("flat"), tmp_path / "x", block_size="200B", quiet=True)
    y = ml.merge(r("fisher"), tmp_path / "y", block_size="200B", quiet=True)
    a, b = _read(x.outputs[0]), _read(y.outputs[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_float64_prepass_values_are_the_same_from_row_blocks(tmp_path, monkeypatch):
    """The quantities themselves (not only the float32 outputs, which rarely show a last-bit
    change of a float64 norm) are equal to the last bit: Fisher norms and SLERP's Gram."""
    monkeypatch.setattr(fisher, "_CHUNK", 64)
    monkeypatch.setattr(basic, "_GRAM_CHUNK", 64)
    states = dict(zip(("base", "a", "b", "c"), _family(tmp_path)))
    rf = {"models": [{"model": str(tmp_path / m), "parameters": {"fisher": str(tmp_path / f"fisher_{m}.safetensors")}}
                     for m in "abc"], "merge_method": "fisher", "parameters": {"normalize": True}}
    p = plan(rf)
    kw = next(iter(p.kwargs.values()))
    blocks, whole = Driver(p, block_bytes=200), Driver(p, block_bytes=2**30)
    assert blocks.rows_per_block("big.weight") == 2 and whole.rows_per_block("big.weight") is None
    fs = [_read(tmp_path / f"fisher_{m}.safetensors") for m in "abc"]
    want = [sum(float(torch.dot(c, c)) for n in p.names if n in p.merged
                for c in f[n].reshape(-1).double().split(64)) ** 0.5 for f in fs]
    assert fisher.fisher_prepass(kw, blocks.stream()) == fisher.fisher_prepass(kw, whole.stream()) == want
    rs = {"models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}], "merge_method": "slerp",
          "parameters": {"t": 0.3}}
    st_ = Driver(plan(rs), block_bytes=200).tensor_state("big.weight", 2)
    a, b = states["a"]["big.weight"], states["b"]["big.weight"]
    assert st_["swap"] is False and st_["grams"] == basic._float64_grams(a, b)
