"""Weight matching streamed from checkpoints on disk (mergelab.align.stream): the same
permutations as the in-memory matcher, each tensor read once per sweep where it touches two
units, a permuted copy recovered from bf16 files, and the clear errors."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from zoo_models import llama, squeezenet  # noqa: E402

import mergelab as ml  # noqa: E402
from mergelab.align.spec import _reinit  # noqa: E402
from mergelab.align.stream import weight_matching_streamed  # noqa: E402
from mergelab.errors import MergelabError  # noqa: E402
from mergelab.io import open_checkpoint  # noqa: E402
from mergelab.io.outputs import save_safetensors  # noqa: E402

pytest.importorskip("transformers")

_cache: dict = {}


def _pair(name):
    """The spec and two independent (scaled) initialisations: the descent has work to do."""
    if name not in _cache:
        m, x = {"llama": llama, "squeezenet": squeezenet}[name]()
        spec = ml.permutation_spec(m, x)
        a, b = copy.deepcopy(m), copy.deepcopy(m)
        _reinit(a, 1)
        _reinit(b, 2)
        _cache[name] = (spec, {k: v.detach().clone() for k, v in a.state_dict().items()},
                        {k: v.detach().clone() for k, v in b.state_dict().items()})
    return _cache[name]


@pytest.mark.parametrize("name", ["llama", "squeezenet"])
@pytest.mark.parametrize("init", ["identity", "signature"])
@pytest.mark.parametrize("order", ["random", "local"])
def test_streamed_equals_in_memory(name, init, order, tmp_path):
    spec, sa, sb = _pair(name)
    mem = ml.weight_matching(spec, sa, sb, init=init, order=order, seed=3)
    save_safetensors(sa, tmp_path / "a.safetensors")
    save_safetensors(sb, tmp_path / "b.safetensors")
    with open_checkpoint(tmp_path / "a.safetensors") as ca, open_checkpoint(tmp_path / "b.safetensors") as cb:
        st = {}
        disk = weight_matching_streamed(spec, ca, cb, init=init, order=order, seed=3, stats=st)
    assert set(disk) == set(mem) and all(torch.equal(disk[g], mem[g]) for g in mem)
    assert len(disk.history) == len(mem.history) >= 2
    # the in-memory objective is read off float32 products; the streamed one sums in float64
    for u, v in zip(mem.history, disk.history):
        assert abs(u - v) <= 1e-6 * abs(u)
    assert st["sweeps"] == len(disk.history) - 1
    assert disk.history[-1] > disk.history[0] or init == "signature"


def test_each_tensor_read_once_per_sweep_when_it_touches_two_units():
    """Llama with as many kv heads as heads: every block matrix touches its block's unit and
    the residual stream; the objective pass and each sweep read every tensor exactly once."""
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(cfg).eval()
    spec = ml.permutation_spec(m, {"input_ids": torch.randint(1, 128, (2, 8))})
    sa = {k: v.detach().clone() for k, v in m.state_dict().items()}
    reads: dict = {}

    class Counting:                       # the Checkpoint interface: shape() reads nothing
        def __contains__(self, k):
            return k in sa

        def shape(self, k):
            return tuple(sa[k].shape)

        def get(self, k):
            reads[k] = reads.get(k, 0) + 1
            return sa[k]

    st = {}
    p = weight_matching_streamed(spec, Counting(), sa, init="identity", max_iter=3, stats=st)
    assert all(torch.equal(v, torch.arange(len(v))) for v in p.values())
    assert st["sweeps"] == 1 and st["reads_per_sweep"] == [len(spec.axes)]
    assert set(reads) == set(spec.axes) and set(reads.values()) == {2}     # objective pass + 1 sweep


@pytest.mark.parametrize("seed", [0, 1])
def test_permuted_bf16_copy_recovered_from_disk(seed, tmp_path):
    spec, sa, _ = _pair("llama")
    sa = {k: v.to(torch.bfloat16) for k, v in sa.items()}
    p = spec.random_permutation(seed)
    sb = ml.permute(spec, sa, p)
    save_safetensors(sa, tmp_path / "a.safetensors")
    save_safetensors(sb, tmp_path / "b.safetensors")
    with open_checkpoint(tmp_path / "a.safetensors") as ca, open_checkpoint(tmp_path / "b.safetensors") as cb:
        got = weight_matching_streamed(spec, ca, cb, seed=seed)
    back = ml.permute(spec, sb, got)
    assert all(torch.equal(back[k], sa[k]) for k in spec.axes)


def test_errors_are_one_line():
    spec, sa, sb = _pair("llama")
    name = next(iter(spec.axes))
    short = {k: v for k, v in sb.items() if k != name}
    with pytest.raises(MergelabError, match="has no tensor") as e:
        weight_matching_streamed(spec, sa, short)
    assert "\n" not in str(e.value)
    bad = dict(sb)
    bad[name] = torch.zeros(3, 3)
    with pytest.raises(MergelabError, match="differ in shape"):
        weight_matching_streamed(spec, sa, bad)
    with pytest.raises(MergelabError, match="order must be"):
        weight_matching_streamed(spec, sa, sb, order="zigzag")
    with pytest.raises(MergelabError, match="order must be"):
        ml.weight_matching(spec, sa, sb, order="zigzag")


def test_align_checkpoints_streamed_or_in_memory_same_permutation(tmp_path):
    """``mergelab align`` on save_pretrained folders: the streamed path and the in-memory
    path (both in the "local" unit order) give the same permutation; the CLI's --stream."""
    import subprocess

    from mergelab.align.pipeline import align_checkpoints
    from mergelab.align.apply import load_permutation
    m, _ = llama()
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    _reinit(a, 1)
    _reinit(b, 2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    on = align_checkpoints(tmp_path / "a", [tmp_path / "b"], stream=True)
    off = align_checkpoints(tmp_path / "a", [tmp_path / "b"], stream=False)
    auto = align_checkpoints(tmp_path / "a", [tmp_path / "b"])          # small: in memory
    for r in (off, auto):
        assert all(torch.equal(on.permutations[0][g], r.permutations[0][g]) for g in on.permutations[0])
    assert not all(torch.equal(v, torch.arange(len(v))) for v in on.permutations[0].values())
    r = subprocess.run([sys.executable, "-m", "mergelab", "align", str(tmp_path / "a"), str(tmp_path / "b"),
                        "-o", str(tmp_path / "out"), "--stream", "on", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = load_permutation(tmp_path / "out" / "b.permutation.safetensors")
    assert all(torch.equal(got[g], on.permutations[0][g]) for g in got)


@pytest.mark.parametrize("kv", [4, 2])
def test_large_hf_model_is_aligned_from_a_reduced_copy(tmp_path, monkeypatch, kv):
    """Over REDUCED_SPEC_ABOVE_BYTES, align_checkpoints never builds the model: the spec is
    traced on a 2-layer copy and extended (meta model); the permutation recovers a permuted
    4-layer Llama exactly and equals the one from the whole model's spec."""
    import transformers as tf

    from mergelab.align import pipeline
    from mergelab.align.apply import invert

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=32)
    m = tf.LlamaForCausalLM(cfg).eval()
    for p in m.parameters():            # spread the weights so that units are well separated
        p.data.normal_(0, 0.5)
    m.save_pretrained(tmp_path / "a")
    x = pipeline.hf_example_inputs(m)
    spec = ml.permutation_spec(m, x)
    truth = spec.random_permutation(seed=3)
    m2 = tf.LlamaForCausalLM(cfg).eval()
    m2.load_state_dict(ml.permute(spec, m.state_dict(), truth))
    m2.save_pretrained(tmp_path / "b")

    built = []
    real_build = pipeline.build_model

    def spy(path, model_code=None, **kw):
        built.append(kw)
        return real_build(path, model_code, **kw)
    monkeypatch.setattr(pipeline, "build_model", spy)
    monkeypatch.setattr(pipeline, "REDUCED_SPEC_ABOVE_BYTES", 0)
    small = pipeline.align_checkpoints(tmp_path / "a", [tmp_path / "b"], method="weight")
    assert built == [{"meta": True}, {"layers": 2}]
    assert small.spec.trace is None
    monkeypatch.setattr(pipeline, "REDUCED_SPEC_ABOVE_BYTES", 1 << 60)
    whole = pipeline.align_checkpoints(tmp_path / "a", [tmp_path / "b"], method="weight")
    assert sorted(small.spec.groups) == sorted(whole.spec.groups)
    want = invert(spec, truth)
    for g in whole.spec.groups:
        assert torch.equal(small.permutations[0][g], whole.permutations[0][g]), g
        assert torch.equal(whole.permutations[0][g], want[g]), g
