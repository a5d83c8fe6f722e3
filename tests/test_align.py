"""Permutation specs, their self-test, weight/activation matching and applying permutations."""
import copy

import pytest
import torch
from torch import nn

from align_models import MLP, VGG, ResNet20, ViT, bert_inputs, tiny_bert
from mergelab.align.apply import (PermutedCheckpoint, invert, load_permutation, permute,
                                  save_permutation)
from mergelab.align.matching import (activation_matching, align_to_reference, merge_many,
                                     transfer_permutation, weight_matching)
from mergelab.align.spec import permutation_spec, self_test
from mergelab.errors import MergelabError


def _img(b=2, s=8):
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(1))


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


# (name, factory, inputs, expected number of groups, why)
ZOO = [
    # 2 hidden layers -> 2 groups; input and logits axes are never permuted
    ("mlp", lambda: MLP(), lambda: torch.randn(4, 16), 2),
    # 3 conv layers -> 3 channel groups (BN weight/bias/running stats ride along,
    # flatten carries each channel's spatial block), + 1 hidden classifier layer = 4
    ("vgg_bn", lambda: VGG(norm="bn"), _img, 4),
    # same with LayerNorm over channels (channels-last LN inside the conv stack) = 4
    ("vgg_ln", lambda: VGG(norm="ln"), _img, 4),
    # GroupNorm(4, C): each conv group splits into 4 norm groups (a "heads" group) and
    # per-group channel orders (a "within_head" group): 3 x 2 + 1 hidden = 7
    ("vgg_gn", lambda: VGG(norm="gn"), _img, 7),
    # ResNet-20: 3 residual streams (stem + stage 1; stages 2 and 3 start at their shortcut
    # conv) + 9 block-internal groups (after each block's first conv) = 12
    ("resnet20", lambda: ResNet20(), _img, 12),
    # ViT, 2 blocks: 1 residual stream + per block (heads, q/k within-head, v/o within-head,
    # MLP hidden) = 1 + 2 x 4 = 9
    ("vit_mha", lambda: ViT(), _img, 9),
    # BertModel returns last_hidden_state, so the residual stream touches an output and stays
    # in place: per layer heads, q/k, v/o, intermediate = 2 x 4 = 8
    ("bert", lambda: tiny_bert(), bert_inputs, 8),
    # with a classifier head the residual stream (1) and the pooler (1) move too: 8 + 2 = 10
    ("bert_cls", _bert_cls, bert_inputs, 10),
]


@pytest.fixture(scope="module")
def specs():
    return {}


def _get(specs, name):
    if name not in specs:
        _, make, inp, _ = next(z for z in ZOO if z[0] == name)
        m = make().eval()
        x = inp()
        specs[name] = (m, x, permutation_spec(m, x))
    return specs[name]


def _run(m, x):
    with torch.no_grad():
        out = m(**x) if isinstance(x, dict) else m(x)
    return out if torch.is_tensor(out) else out[0]


@pytest.mark.parametrize("name", [z[0] for z in ZOO])
def test_group_count_and_self_test(specs, name):
    m, x, spec = _get(specs, name)
    assert len(spec.groups) == next(z[3] for z in ZOO if z[0] == name), spec.summary()
    assert spec.unknown_ops == []
    self_test(spec, m, x, seed=3)   # another random permutation passes too


@pytest.mark.parametrize("name", [z[0] for z in ZOO])
def test_permute_preserves_function_and_weight_matching_recovers_exactly(specs, name):
    m, x, spec = _get(specs, name)
    a = {k: v.detach().clone() for k, v in m.state_dict().items()}
    p = spec.random_permutation(seed=7)
    b = permute(spec, a, p)
    assert any(not torch.equal(a[k], b[k]) for k in spec.axes)
    m2 = copy.deepcopy(m)
    m2.load_state_dict(b)
    torch.testing.assert_close(_run(m2, x), _run(m, x), atol=1e-5, rtol=1e-5)
    q = weight_matching(spec, a, b, seed=1)
    back = permute(spec, b, q)
    assert all(torch.equal(back[k], a[k]) for k in a)
    # never worse than the start (the signature start may already be optimal: float32 rounding)
    assert q.history[-1] >= q.history[0] * (1 - 1e-6)
    # the found permutation is the inverse of the applied one
    inv = invert(spec, p)
    assert all(torch.equal(q[g], inv[g]) for g in spec.groups)


@pytest.mark.parametrize("name", ["mlp", "vgg_bn", "vit_mha", "bert_cls"])
def test_activation_matching_recovers_exactly(specs, name):
    m, x, spec = _get(specs, name)
    b = permute(spec, m.state_dict(), spec.random_permutation(seed=11))
    m2 = copy.deepcopy(m)
    m2.load_state_dict(b)
    # enough samples that distinct channels are not perfectly correlated by chance
    if isinstance(x, dict):
        g = torch.Generator().manual_seed(5)
        data = [{**x, "input_ids": torch.randint(0, 50, (16, x["input_ids"].shape[1]), generator=g),
                 "attention_mask": torch.ones(16, x["input_ids"].shape[1], dtype=torch.long),
                 "token_type_ids": torch.zeros(16, x["input_ids"].shape[1], dtype=torch.long)} for _ in range(4)]
    else:
        data = [torch.randn(16, *x.shape[1:]) for _ in range(4)]
    q = activation_matching(spec, m, m2, data)
    back = permute(spec, b, q)
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())


def test_attention_heads_move_whole(specs):
    _, _, spec = _get(specs, "bert_cls")
    heads = [g for g in spec.groups.values() if g.kind == "heads"]
    within = [g for g in spec.groups.values() if g.kind == "within_head"]
    assert len(heads) == 2 and len(within) == 4
    assert all(g.per_head and g.n_heads == 4 and g.head_dim == 8 for g in within)
    p = spec.random_permutation(seed=2)
    for g in within:
        v = p[g.name].view(g.n_heads, g.head_dim)
        assert torch.equal(v // g.head_dim, p[g.head_group][:, None].expand_as(v))  # inside its head
    # query and key share a within-head group, value and output another
    qk = next(g for g in within if "query" in g.name and "layer.0" in g.name).name
    assert ("bert.encoder.layer.0.attention.self.key.weight", 0) in spec.members(qk)
    vo = next(g for g in within if "value" in g.name and "layer.0" in g.name).name
    assert ("bert.encoder.layer.0.attention.output.dense.weight", 1) in spec.members(vo)


def test_wrong_qk_grouping_is_caught_by_self_test(specs):
    """A spec that gives key its own within-head permutation must fail the self-test."""
    m, x, spec = _get(specs, "bert")
    bad = copy.deepcopy(spec)
    qk = next(g for g in bad.groups.values() if g.kind == "within_head" and "query" in g.name)
    name = "encoder.layer.0.attention.self.key.weight"
    bad.groups["fake"] = copy.deepcopy(qk)
    bad.groups["fake"].name = "fake"
    for r in bad.axes[name] + bad.axes["encoder.layer.0.attention.self.key.bias"]:
        r.expr = ("group", "fake")
    with pytest.raises(MergelabError, match="self-test failed"):
        self_test(bad, m, x)


def test_save_load_and_lazy_checkpoint(specs, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    m, x, spec = _get(specs, "vit_mha")
    p = spec.random_permutation(seed=4)
    f = save_permutation(p, tmp_path / "perm.safetensors", spec)
    with safe_open(str(f), "pt") as h:
        assert h.metadata()["mergelab_kind"] == "permutation"
        assert sorted(h.keys()) == sorted(spec.groups)
    q = load_permutation(f, spec)
    assert all(torch.equal(p[k], q[k]) for k in p)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))

    class Reader:   # stand-in for mergelab.io's Checkpoint
        def __init__(self, path):
            self.path, self.config, self.reads = path, None, []
            with safe_open(str(path), "pt") as h:
                self._keys = list(h.keys())

        def keys(self): return list(self._keys)
        def __contains__(self, k): return k in self._keys
        def __len__(self): return len(self._keys)
        def shape(self, k): return tuple(self.get(k).shape)
        def dtype(self, k): return self.get(k).dtype

        def get(self, k):
            self.reads.append(k)
            with safe_open(str(self.path), "pt") as h:
                return h.get_tensor(k)

    r = Reader(tmp_path / "m.safetensors")
    lazy = PermutedCheckpoint(r, spec, q)
    eager = permute(spec, state, q)
    name = "blocks.0.attn.in_proj_weight"
    r.reads.clear()
    assert torch.equal(lazy.get(name), eager[name]) and r.reads == [name]
    assert all(torch.equal(lazy.get(k), eager[k]) for k in lazy.keys())
    assert lazy.shape(name) == tuple(state[name].shape) and len(lazy) == len(state)


def test_bad_permutation_files_are_one_line_errors(specs, tmp_path):
    from safetensors.torch import save_file
    _, _, spec = _get(specs, "mlp")
    save_file({"x": torch.zeros(3)}, str(tmp_path / "a.safetensors"), metadata={"mergelab_kind": "fisher"})
    with pytest.raises(MergelabError, match="not a permutation file"):
        load_permutation(tmp_path / "a.safetensors")
    p = dict(spec.identity())
    g = next(iter(p))
    p[g] = torch.zeros_like(p[g])
    save_permutation(p, tmp_path / "b.safetensors")
    with pytest.raises(MergelabError, match="not a permutation of 32"):
        load_permutation(tmp_path / "b.safetensors", spec)
    with pytest.raises(MergelabError, match="no file"):
        load_permutation(tmp_path / "nope.safetensors")
    with pytest.raises(MergelabError, match="missing"):
        permute(spec, {}, {})


class _Unknown(nn.Module):
    """An MLP whose second hidden layer goes through an op the tracer has no handler for."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.special.i0(self.b(h))   # aten.special_i0 / i0: no handler, no pointwise tag? either way
        h = torch.fft.fft(h).real         # FFT along the hidden axis: certainly unknown
        return self.c(h)


def test_unknown_op_leaves_its_axes_in_place():
    m = _Unknown().eval()
    spec = permutation_spec(m, torch.randn(3, 6))
    assert any("fft" in op for op in spec.unknown_ops)
    assert len(spec.groups) == 1                       # only the first hidden layer moves
    assert "unknown op" in spec.frozen["c.weight:1"]   # and the report says why c's input stays
    assert ("b.weight", 1) in spec.members(next(iter(spec.groups)))


def test_many_models(specs):
    m, x, spec = _get(specs, "mlp")
    a = {k: v.detach().clone() for k, v in m.state_dict().items()}
    perms = [spec.random_permutation(seed=s) for s in (1, 2)]
    others = [permute(spec, a, p) for p in perms]
    found = align_to_reference(spec, a, others)
    for o, q in zip(others, found):
        back = permute(spec, o, q)
        assert all(torch.equal(back[k], a[k]) for k in a)
    # transfer: a permutation found between two "foundation" models applied to experts of B
    experts = [{k: v + 0.01 * torch.randn_like(v) for k, v in others[0].items()} for _ in range(2)]
    moved = transfer_permutation(spec, found[0], experts)
    for e, mv in zip(experts, moved):
        assert all(torch.equal(mv[k], permute(spec, e, found[0])[k]) for k in e)
    # MergeMany on three permuted copies of one model lands them in one frame
    ps = merge_many(spec, [a] + others, seed=0)
    aligned = [permute(spec, s, p) for s, p in zip([a] + others, ps)]
    for s in aligned[1:]:
        assert all(torch.equal(s[k], aligned[0][k]) for k in a)


def test_model_that_fails_on_inputs_is_one_line_error():
    with pytest.raises(MergelabError, match="running the model"):
        permutation_spec(MLP(), torch.randn(2, 5))
    with pytest.raises(MergelabError, match="nn.Module"):
        permutation_spec(lambda x: x, torch.randn(2))
