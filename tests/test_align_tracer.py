"""The tracer on real architectures (transformers' own implementations, tiny random configs)
and on small models written in tracer_zoo: every spec is built, deterministic, preserves
the function under a random permutation of every group (checked here in float64, not by
the self-test), has the number of groups the architecture implies, and says why each
pinned axis is pinned."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from mergelab.align import permutation_spec  # noqa: E402
from mergelab.align.apply import permute  # noqa: E402
from mergelab.errors import MergelabError  # noqa: E402

import tracer_zoo  # noqa: E402
from tracer_zoo import NAMES, build, digest  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent

# groups each architecture implies (2 layers unless noted; docs/align.md lists them)
GROUPS = {
    "llama": 7,             # residual + per layer: heads, v/o within-head (per head), MLP hidden
    "llama_gqa": 9,         # residual + per layer: kv heads, query heads within a kv head, v/o within, MLP
    "llama_gqa_nomask": 9,  # the same through SDPA's enable_gqa
    "mistral": 9,
    "qwen2": 9,
    "gpt2": 9,              # residual + per layer: heads, q/k within, v/o within, MLP (c_attn = [Q|K|V])
    "bert_eager": 10,       # residual + per layer: heads, q/k within, v/o within, FFN (classifier head)
    "t5": 19,               # residual pinned (encoder_last_hidden_state is returned); heads shared
                            # across layers by the relative position bias
    "vit": 9,
    "swin": 10,             # per stage: residual, heads, q/k, v/o, MLP (pad/roll/window views)
    "convnext": 4,          # per stage: residual, MLP hidden
    "mobilenetv2": 25,
    "regnet": 11,
    "wav2vec2": 13,
    "mixer": 5,             # channels, token-MLP hidden x2 layers, channel-MLP hidden x2 layers
    "weight_norm": 2,
    "inplace_views": 1,
}
ROPE = {"llama", "llama_gqa", "llama_gqa_nomask", "mistral", "qwen2"}


def _scaled_init(model: torch.nn.Module, seed: int) -> None:
    """float64, weights N(0, 1/fan_in) x 1.3, norm scales 1 + 0.2 N, biases 0.2 N, BN stats
    random: activations far from the small-init regime where many errors hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point() or t.numel() == 0:
                continue
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("running_var"):
                v = torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5
            elif t.dim() >= 2:
                v = r * (1.3 / (t[0].numel() ** 0.5))
            elif name.endswith(("bias", "running_mean")):
                v = r * 0.2
            else:
                v = 1.0 + 0.2 * r
            t.copy_(v)


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _outputs(v)]
    return []


def _double_inputs(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _double_inputs(v) for k, v in x.items()}
    return x


def _run(model, x):
    with torch.no_grad():
        return _outputs(model(**x) if isinstance(x, dict) else model(x))


def _copy(model):
    """deepcopy; computed tensor attributes (old-style weight_norm's ``weight``) detached."""
    import copy
    memo = {id(v): v.detach() for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not v.is_leaf}
    return copy.deepcopy(model, memo)


def independent_check(spec, model, x, seed=0) -> float:
    """Max relative error of the model's outputs after permuting every group at random."""
    m1 = _copy(model).double().eval()
    _scaled_init(m1, seed + 7)
    xd = _double_inputs(x)
    ref = _run(m1, xd)
    perm = spec.random_permutation(seed + 3)
    assert any(not torch.equal(v, torch.arange(len(v))) for v in perm.values())
    state = {k: v.detach() for k, v in m1.state_dict().items()}
    new = permute(spec, state, perm)
    changed = sum(not torch.equal(new[k], state[k]) for k in state)
    assert changed >= len(spec.groups)          # the permutation really moved parameters
    m2 = _copy(m1)
    m2.load_state_dict(new)
    out = _run(m2, xd)
    assert len(out) == len(ref)
    worst = 0.0
    for a, b in zip(ref, out):
        if a.is_floating_point():
            worst = max(worst, float((a - b).norm() / a.norm().clamp_min(1e-300)))
        else:
            assert torch.equal(a, b)
    return worst


def _every_axis_accounted(spec, model):
    """Each parameter axis of size > 1 is permuted (spec.axes) or pinned with a reason."""
    for name, t in model.state_dict().items():
        for a in range(t.dim()):
            if t.shape[a] <= 1:
                continue
            permuted = any(ap.axis == a for ap in spec.axes.get(name, []))
            key = f"{name}:{a}"
            assert permuted or key in spec.frozen, f"{key} neither permuted nor in spec.frozen"
    for k, why in spec.frozen.items():
        assert isinstance(why, str) and len(why) > 5, (k, why)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_spec_preserves_function(name):
    model, x = build(name)
    spec = permutation_spec(model, x)
    assert len(spec.groups) == GROUPS[name], spec.summary()
    assert spec.unknown_ops == []
    err = independent_check(spec, model, x)
    assert err <= 1e-5, f"{name}: relative output error {err:.3g}"
    _every_axis_accounted(spec, model)
    # in-process determinism: a second build (new tensor ids) says exactly the same
    model2, x2 = build(name)
    assert digest(permutation_spec(model2, x2)) == digest(spec)


@pytest.mark.parametrize("name", sorted(ROPE))
def test_rope_heads_move_and_pinned_dims_are_explained(name):
    model, x = build(name)
    spec = permutation_spec(model, x)
    cfg = model.config
    kv = cfg.num_key_value_heads
    heads = [g for g in spec.groups.values() if g.kind == "heads"]
    assert len(heads) == cfg.num_hidden_layers and all(g.size == kv for g in heads)
    if kv < cfg.num_attention_heads:   # the query heads inside each kv head's group move too
        inner = [g for g in spec.groups.values() if g.kind == "within_head" and g.per_head]
        assert len(inner) == cfg.num_hidden_layers
        assert all(g.head_dim == cfg.num_attention_heads // kv for g in inner)
    for layer in range(cfg.num_hidden_layers):
        for proj in ("q_proj", "k_proj"):
            pname = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert spec.axes[pname][0].axis == 0          # the head part of the rows moves
            why = spec.frozen[f"{pname}:0/part1"]         # the within-head part does not
            assert "rotary_emb.inv_freq" in why


def test_gqa_query_heads_follow_their_kv_head():
    """A permutation of the spec keeps query head k*G + r attached to kv head k."""
    model, x = build("llama_gqa")
    spec = permutation_spec(model, x)
    cfg = model.config
    G, d = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    perm = spec.random_permutation(5)
    from mergelab.align.spec import expr_vector
    q = expr_vector(spec.axes["model.layers.0.self_attn.q_proj.weight"][0].expr, perm)
    k = expr_vector(spec.axes["model.layers.0.self_attn.k_proj.weight"][0].expr, perm)
    q_heads = (q.view(-1, d)[:, 0] // d)                  # old query head in each new slot
    k_heads = (k.view(-1, d)[:, 0] // d)
    assert torch.equal(q_heads // G, k_heads.repeat_interleave(G))


def test_gpt2_fused_qkv_is_permuted_blockwise():
    model, x = build("gpt2")
    spec = permutation_spec(model, x)
    rule = [a for a in spec.axes["transformer.h.0.attn.c_attn.weight"] if a.axis == 1]
    assert len(rule) == 1 and rule[0].expr[0] == "cat" and len(rule[0].expr[1]) == 3
    assert not any(k.startswith("transformer.h.0.attn.c_attn") for k in spec.frozen)


def test_swin_relative_position_table_follows_heads():
    model, x = build("swin")
    spec = permutation_spec(model, x)
    t = "swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table"
    (rule,) = spec.axes[t]
    assert rule.axis == 1 and spec.groups[rule.expr[1]].kind == "heads"
    assert "position" in spec.frozen[f"{t}:0"]


def test_wrong_spec_still_refused():
    """The relative tolerance still catches a wrong rule (a group dropped from one tensor)."""
    model, x = build("mixer")
    spec = permutation_spec(model, x)
    from mergelab.align.spec import self_test
    name = "blocks.0.c1.weight"
    spec.axes[name] = [a for a in spec.axes[name] if a.axis != 1]
    with pytest.raises(MergelabError, match="self-test failed"):
        self_test(spec, model, x)


@pytest.mark.slow
def test_builds_identical_across_processes_and_hash_seeds():
    """Three builds in fresh processes with different PYTHONHASHSEED: identical specs."""
    code = ("import sys, json, torch; sys.path.insert(0, %r); import tracer_zoo as z; "
            "from mergelab.align import permutation_spec; "
            "print(json.dumps({n: z.digest(permutation_spec(*z.build(n))) for n in z.NAMES}))") % str(HERE)
    outs = []
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] == outs[2]
    assert set(outs[0]) == set(tracer_zoo.NAMES)


def _depth(name, layers):
    """The zoo model ``name`` with ``layers`` blocks (same seed, same widths)."""
    import transformers as T
    model, x = build(name)
    cfg = model.config.to_dict()
    if name == "t5":
        cfg.update(num_layers=layers, num_decoder_layers=layers)
    else:
        cfg["num_hidden_layers"] = layers
    torch.manual_seed(0)
    return type(model)(type(model.config).from_dict(cfg)).eval(), x


@pytest.mark.parametrize("name", ["llama_gqa", "t5", "bert_eager"])
def test_reduced_depth_extension_equals_direct_build(name):
    """A spec extended from a 2-block copy equals the deep model's own traced spec
    (T5: two stacks, heads shared across blocks by the position bias)."""
    deep, x = _depth(name, 4)
    small, _ = _depth(name, 2)
    direct = permutation_spec(deep, x)
    extended = permutation_spec(deep, x, reduced=small)
    assert extended.trace is None
    assert digest(extended) == digest(direct)


def test_meta_model_extended_without_weights():
    import transformers as T
    small, x = _depth("llama_gqa", 2)
    with torch.device("meta"):
        deep = T.LlamaForCausalLM(T.LlamaConfig(**{**small.config.to_dict(), "num_hidden_layers": 6})).eval()
    spec = permutation_spec(deep, x, reduced=small)
    assert len(spec.groups) == 1 + 4 * 6
    assert set(spec.axes) <= set(deep.state_dict())
    with pytest.raises(MergelabError, match="meta device"):
        permutation_spec(deep, x)
    other, _ = build("mistral")   # another architecture: refused in one line
    with pytest.raises(MergelabError, match="counterpart"):
        permutation_spec(deep, x, reduced=other)
