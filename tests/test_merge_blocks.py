"""Row-block streaming: row reads and writes, block-invariant methods, flat memory."""
import hashlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from core_helpers import save_hf
from mergelab.io import open_checkpoint
from mergelab.io.writer import ShardedWriter, TensorSpec
from mergelab.merge import Driver, merge, plan
from mergelab.methods import TensorContext, get_method
from mergelab.methods import sparse


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _family(tmp_path, rows=300, cols=37, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(rows, cols, generator=g), "layers.0.w": torch.randn(cols, rows, generator=g),
            "layers.0.b": torch.randn(rows, generator=g), "scalar": torch.tensor(0.5), "ids": torch.arange(4)}
    out = []
    for i, name in enumerate(("base", "a", "b")):
        t = {k: ((v + 0.01 * (i > 0) * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v)
             for k, v in base.items()}
        out.append(save_hf(tmp_path / name, t))
    return out


# ------------------------------------------------------------------ reader / writer

def test_get_rows_reads_the_same_bytes_as_a_slice(tmp_path):
    g = torch.Generator().manual_seed(1)
    t = {"m": torch.randn(17, 5, 3, generator=g).to(torch.bfloat16), "v": torch.randn(9, generator=g)}
    save_hf(tmp_path / "st", t)
    torch.save(t, tmp_path / "m.pt")
    for path in (tmp_path / "st", tmp_path / "m.pt"):
        ck = open_checkpoint(path)
        for name, x in t.items():
            for a, b in ((0, 1), (3, 11), (0, x.shape[0]), (x.shape[0] - 1, x.shape[0]), (5, 5)):
                got = ck.get_rows(name, a, b)
                assert got.dtype == x.dtype and torch.equal(got, x[a:b]), (path, name, a, b)


def test_write_rows_in_any_order_equals_whole_write(tmp_path):
    x = torch.randn(23, 4)
    spec = [TensorSpec("x", (23, 4), torch.float32), TensorSpec("y", (3,), torch.float32)]
    for folder, blocks in (("whole", None), ("rows", [(10, 23), (0, 4), (4, 10)])):
        (tmp_path / folder).mkdir()
        w = ShardedWriter(tmp_path / folder, spec)
        if blocks is None:
            w.write("x", x)
        else:
            for a, b in blocks:
                w.write_rows("x", a, x[a:b])
        w.write("y", torch.ones(3))
        w.close()
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "rows" / "model.safetensors").read_bytes()
    (tmp_path / "part").mkdir()
    w = ShardedWriter(tmp_path / "part", spec)
    w.write_rows("x", 0, x[:5])
    w.write("y", torch.ones(3))
    with pytest.raises(AssertionError, match="never written"):
        w.close()


# ------------------------------------------------------------------ methods on blocks

def _blockwise(method, xs, base, kw, rows, seed=3):
    """Call ``method`` block by block as the engine does (tensor_prepass first)."""
    spec = get_method(method)
    n0, row = base.shape[0], base[0].numel()
    state = None
    if spec.tensor_prepass is not None:
        state = spec.tensor_prepass(kw, lambda: ((TensorContext(name="w", seed=seed), base[a:a + rows],
                                                   [x[a:a + rows] for x in xs]) for a in range(0, n0, rows)))
    parts = []
    for a in range(0, n0, rows):
        ctx = TensorContext(name="w", seed=seed, offset=a * row, numel=base.numel(), tensor_state=state)
        parts.append(spec([x[a:a + rows] for x in xs], base[a:a + rows], ctx=ctx, **kw))
    return torch.cat(parts)


@pytest.mark.parametrize("method,params", [
    ("linear", {"weight": [0.3, 0.9]}),
    ("task_arithmetic", {"weight": [0.5, 1.5], "lambda": 0.7}),
    ("ties", {"density": [0.3, 0.6], "weight": [1.0, 0.5]}),
    ("ties", {"density": [0.3, 0.6], "tie_break": "argsort"}),
    ("dare_linear", {"density": [0.3, 0.6]}),
    ("dare_ties", {"density": [0.5, 0.2], "normalize": True}),
])
def test_elementwise_methods_give_the_same_bytes_on_any_blocks(method, params):
    g = torch.Generator().manual_seed(0)
    # bf16-valued deltas: many equal magnitudes at the TIES threshold
    base = torch.randn(1300, 1700, generator=g).bfloat16().float()
    xs = [(base + 0.01 * torch.randn(base.shape, generator=g)).bfloat16().float() for _ in range(2)]
    spec = get_method(method)
    glob = {k: v for k, v in params.items() if not isinstance(v, list)}
    per = [{k: v[i] for k, v in params.items() if isinstance(v, list)} for i in range(2)]
    kw = spec.resolve(glob, per)
    whole = spec(xs, base, ctx=TensorContext(name="w", seed=3), **kw)
    for rows in (333, 640, 1300):  # blocks that cross the 2^20-entry chunk edges in every way
        got = _blockwise(method, xs, base, kw, rows)
        assert got.numpy().tobytes() == whole.numpy().tobytes(), (method, rows)


def test_dare_keep_of_a_range_is_a_slice_of_the_whole_mask():
    whole = sparse.dare_keep(0, 3 * sparse.DRAW_CHUNK + 5, 0.3, 11)
    for a, b in ((0, 10), (sparse.DRAW_CHUNK - 3, sparse.DRAW_CHUNK + 4), (2 * sparse.DRAW_CHUNK + 1, 3 * sparse.DRAW_CHUNK + 5)):
        assert torch.equal(sparse.dare_keep(a, b, 0.3, 11), whole[a:b])
    assert abs(float(whole.float().mean()) - 0.3) < 0.01


@settings(max_examples=30, deadline=None)
@given(total=st.integers(1, 3 * sparse.DRAW_CHUNK + 7), cuts=st.lists(st.floats(0, 1), max_size=6),
       seed=st.integers(0, 2**63 - 1), density=st.sampled_from([0.1, 0.5, 0.9]))
def test_dare_keep_with_the_chunk_cache_draws_the_same_mask(total, cuts, seed, density):
    """dare_keep(..., total=n) (whole chunks drawn once, cached) gives the same entries as the
    uncached draw, for any cut of the tensor into ranges, in any order."""
    edges = sorted({0, total} | {int(c * total) for c in cuts})
    ranges = list(zip(edges, edges[1:]))
    for a, b in ranges[::-1] + ranges:  # backwards first: cache hits and misses in both orders
        assert torch.equal(sparse.dare_keep(a, b, density, seed, total=total), sparse.dare_keep(a, b, density, seed)), (a, b)


def test_ties_trim_keeps_exactly_k_even_when_the_threshold_is_tied_across_blocks():
    base = torch.zeros(40, 10)
    x = torch.ones(40, 10)  # every |τ| ties at the threshold
    x[39, 9] = 5.0
    spec = get_method("ties")
    kw = spec.resolve({}, [{"density": 0.25}])
    out = _blockwise("ties", [x], base, kw, rows=3)
    assert int((out != 0).sum()) == 100
    assert out[39, 9] == 5.0                                   # the largest survives
    assert int((out.reshape(-1)[:99] != 0).sum()) == 99       # ties: the lowest indices
    assert torch.equal(out, spec([x], base, ctx=TensorContext(name="w"), **kw))


# ------------------------------------------------------------------ the engine

@pytest.mark.parametrize("method,params", [
    ("linear", {}), ("task_arithmetic", {"lambda": 0.8}),
    ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5}),
])
def test_engine_output_bytes_do_not_depend_on_the_block_budget(tmp_path, method, params):
    base, a, b = _family(tmp_path)
    r = {"models": [{"model": str(a), "parameters": {"weight": 0.6}},
                    {"model": str(b), "parameters": {"weight": 0.4}}],
         "merge_method": method, "parameters": params, "seed": 5}
    if method != "linear":
        r["base_model"] = str(base)
    digests = []
    for i, bs in enumerate(("400B", "3KiB", "64MiB")):
        res = merge(r, tmp_path / f"o{i}", block_size=bs, threads=2, quiet=True)
        digests.append(_digest(res.outputs[0]))
    assert digests[0] == digests[1] == digests[2]
    # and the small budget really cut tensors into blocks
    p = plan(r)
    runner = Driver(p, seed=5, block_bytes=400)
    assert runner.rows_per_block("embed.weight") == 2 and runner.rows_per_block("layers.0.b") == 100
    assert runner.rows_per_block("scalar") is None


def test_readers_without_get_rows_are_read_whole(tmp_path):
    base, a, b = _family(tmp_path)

    class NoRows:  # a Checkpoint-like view without get_rows (e.g. a permuted view)
        def __init__(self, ck):
            self.ck = ck
            self.path = ck.path
            self.config = ck.config

        def keys(self):
            return self.ck.keys()

        def shape(self, n):
            return self.ck.shape(n)

        def dtype(self, n):
            return self.ck.dtype(n)

        def get(self, n):
            return self.ck.get(n)

        def __contains__(self, n):
            return n in self.ck

        def __len__(self):
            return len(self.ck)

    r = {"models": [{"model": "A"}, {"model": str(b)}], "merge_method": "linear"}
    p = plan(r, inputs={"A": NoRows(open_checkpoint(a))})
    assert Driver(p, block_bytes=400).rows_per_block("embed.weight") is None
    x = merge(r, tmp_path / "x", inputs={"A": NoRows(open_checkpoint(a))}, block_size="400B", quiet=True)
    y = merge({"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "linear"}, tmp_path / "y",
              block_size="400B", quiet=True)
    assert _digest(x.outputs[0]) == _digest(y.outputs[0])


def mergekit_ties_reference(base, xs, ws, ds):
    """mergekit 0.1.5's TIES (generalized_task_arithmetic + sparsify.magnitude), float32 compute,
    re-written here from its description: exactly max(1, int(d n)) survivors chosen by
    torch.argsort(|τ|, descending=True), then sign election by mass (0 -> +) and disjoint mean."""
    deltas = []
    for x, d in zip(xs, ds):
        t = x - base
        k = max(1, int(d * t.numel()))
        m = torch.zeros(t.numel())
        m[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = 1
        deltas.append(t * m.reshape(t.shape))
    D = torch.stack(deltas)
    W = torch.tensor(ws).reshape(-1, *([1] * base.dim()))
    D = D * W
    majority = (D.sum(0) >= 0).float() * 2 - 1
    agree = D.sign() == majority
    div = (W * agree).sum(0)
    div[div == 0] = 1
    return base + (D * agree).sum(0) / div


def test_ties_argsort_tie_break_reproduces_mergekit_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 70, generator=g).bfloat16().float()
    xs = [(base + 0.01 * torch.randn(base.shape, generator=g)).bfloat16().float() for _ in range(3)]
    ws, ds = [1.0, 0.6, 0.3], [0.5, 0.3, 0.9]
    spec = get_method("ties")
    kw = spec.resolve({"tie_break": "argsort"}, [{"weight": w, "density": d} for w, d in zip(ws, ds)])
    ref = mergekit_ties_reference(base, xs, ws, ds)
    assert torch.equal(spec(xs, base, ctx=TensorContext(name="w"), **kw), ref)
    assert torch.equal(_blockwise("ties", xs, base, kw, rows=40), ref)
    # the default tie-break differs from it only where |τ| ties at the threshold
    kw_i = spec.resolve({}, [{"weight": w, "density": d} for w, d in zip(ws, ds)])
    diff = spec(xs, base, ctx=TensorContext(name="w"), **kw_i) != ref
    at_threshold = torch.zeros_like(diff)
    for x, d in zip(xs, ds):
        a = (x - base).abs()
        kth = a.reshape(-1).sort(descending=True).values[max(1, int(d * a.numel())) - 1]
        at_threshold |= a == kth
    assert int(diff.sum()) > 0 and not bool((diff & ~at_threshold).any())


def test_blocks_of_one_tensor_run_on_every_worker(tmp_path):
    import threading
    import time

    from mergelab.methods.registry import REGISTRY, merge_method

    lock, inflight, seen = threading.Lock(), [0], []
    REGISTRY.pop("_core_block_probe", None)

    @merge_method("_core_block_probe", elementwise=True)
    def _probe(tensors, base, *, ctx):
        with lock:
            inflight[0] += 1
            seen.append((inflight[0], ctx.offset))
        time.sleep(0.01)
        with lock:
            inflight[0] -= 1
        return tensors[0]

    save_hf(tmp_path / "m", {"w": torch.randn(64, 10)})
    res = merge({"models": [{"model": str(tmp_path / "m")}], "merge_method": "_core_block_probe"}, tmp_path / "o",
                block_size="160B", threads=2, quiet=True)  # 4 rows of 10 float32 per block: 16 blocks
    del REGISTRY["_core_block_probe"]
    assert sorted(o for _, o in seen) == list(range(0, 640, 40))
    assert max(n for n, _ in seen) == 2  # two blocks in flight at once, never more
    assert torch.equal(open_checkpoint(res.outputs[0]).get("w"), open_checkpoint(tmp_path / "m").get("w"))


def test_chunk_cache_draws_a_chunk_once_for_racing_threads():
    """Two row blocks of one draw chunk, merged at the same time by two workers: the chunk is
    drawn once and the other waits for it (racing threads used to draw it twice); a failed
    draw reaches every waiter and is not cached."""
    import threading
    import time as _time

    cache = sparse._ChunkCache(4)
    calls = []

    def make():
        calls.append(1)
        _time.sleep(0.2)
        return torch.arange(5)

    got = []
    ths = [threading.Thread(target=lambda: got.append(cache.get(("k",), make))) for _ in range(4)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    assert len(calls) == 1 and len(got) == 4 and all(torch.equal(g, torch.arange(5)) for g in got)

    def bad():
        _time.sleep(0.1)
        raise RuntimeError("draw failed")

    errs = []

    def take():
        try:
            cache.get(("bad",), bad)
        except RuntimeError as e:
            errs.append(str(e))

    ths = [threading.Thread(target=take) for _ in range(3)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    assert errs == ["draw failed"] * 3
    assert torch.equal(cache.get(("bad",), lambda: torch.ones(1)), torch.ones(1))


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.4}),
    ("tall_masks", {"base_merge": "ties", "density": 0.5, "lambda": 0.4}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.01}),
    ("sce", {"select_topk": 0.5}),
])
def test_prepass_keeps_its_blocks_for_the_merge_same_bytes(tmp_path, monkeypatch, method, params):
    """A tensor prepass keeps the raw blocks it read (tensors up to KEEP_BYTES of inputs) and
    the merge pass takes them instead of reading again: the same bytes as reading twice,
    fewer bytes read, nothing left kept, and never more than KEEP_BYTES kept at once."""
    from mergelab.engine import driver as drv

    base, a, b = _family(tmp_path)
    r = {"models": [{"model": str(a)}, {"model": str(b)}], "base_model": str(base), "merge_method": method,
         "parameters": params}
    peak = [0]
    real = drv.Driver._read

    def spy(self, inp, name, rows=None):
        t = real(self, inp, name, rows)
        peak[0] = max(peak[0], sum(x.numel() * x.element_size() for x in list(self._kept.values())))
        return t

    monkeypatch.setattr(drv.Driver, "_read", spy)
    runs = {}
    # the two 300 x 37 tensors are merged in row blocks; their 3 bf16 inputs take 66,600 bytes:
    # 0 and 60,000 keep nothing, 70,000 keeps each of them (one per worker thread at a time)
    for keep in (0, 60_000, 70_000):
        monkeypatch.setattr(drv, "KEEP_BYTES", keep)
        peak[0] = 0
        res = merge(r, tmp_path / f"o{keep}", quiet=True, block_size="4KiB", threads=2, checksums=False)
        runs[keep] = ({v: _digest(o) for v, o in zip(res.variants or [""], res.outputs)}, res.bytes_read, peak[0])
        assert peak[0] <= 2 * keep, (keep, peak[0])   # 2 worker threads
    assert runs[0][0] == runs[60_000][0] == runs[70_000][0]
    assert runs[0][1] == runs[60_000][1] and runs[0][2] == runs[60_000][2] == 0
    assert runs[70_000][2] > 0 and runs[70_000][1] < runs[0][1]
