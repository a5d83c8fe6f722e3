"""One per-tensor driver behind every entry point: merge() from files, merge_states() in memory,
the experiment suites' merge_state and fisher_merge/regmean_merge give the same bytes for the
same inputs and seed (random DARE masks and global-scope TIES included)."""

import pytest
import torch
from safetensors.torch import save_file

import mergelab as ml
from core_helpers import save_hf
from mergelab.errors import MergelabError
from mergelab.experiments.suites.common import merge_state
from mergelab.io import open_checkpoint


def _tensors(seed, dtype=torch.bfloat16, eps=None):
    g = torch.Generator().manual_seed(seed)
    t = {"embed.weight": torch.randn(40, 16, generator=g), "layers.0.w": torch.randn(24, 16, generator=g),
         "layers.1.w": torch.randn(24, 16, generator=g), "layers.1.b": torch.randn(24, generator=g),
         "norm.weight": torch.randn(16, generator=g)}
    t = {k: v.to(dtype) for k, v in t.items()}
    t["position_ids"] = torch.arange(7, dtype=torch.int64)
    return t


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fam")
    base = _tensors(0)
    states = [{k: (v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(10 + i)).to(v.dtype))
               if v.is_floating_point() else v.clone() for k, v in base.items()} for i in range(3)]
    paths = [save_hf(tmp / n, s) for n, s in zip(("base", "a", "b", "c"), [base] + states)]
    fishers, grams = [], []
    for i, s in enumerate(states):
        g = torch.Generator().manual_seed(100 + i)
        f = {k: torch.rand(v.shape, generator=g) for k, v in s.items() if v.is_floating_point()}
        gr = {k: (lambda x: x.T @ x)(torch.randn(30, v.shape[1], generator=g)) for k, v in s.items()
              if v.is_floating_point() and v.dim() == 2}
        save_file(f, str(tmp / f"fisher{i}.safetensors"), metadata={"mergelab_kind": "fisher"})
        save_file(gr, str(tmp / f"gram{i}.safetensors"),
                  metadata={"mergelab_kind": "gram", **{f"count:{k}": "30" for k in gr}})
        fishers.append(f)
        grams.append(gr)
    return tmp, paths, base, states, fishers, grams


def _read(folder):
    ck = open_checkpoint(folder)
    return {k: ck.get(k) for k in ck.keys()}


def _same_bytes(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8) if a[k].is_floating_point() else a[k],
                           b[k].view(-1).view(torch.uint8) if b[k].is_floating_point() else b[k]), k


CASES = [
    ("linear", {"weight": [0.2, 0.3, 0.5]}, False),
    ("task_arithmetic", {"weight": [0.5, 1.0, 0.7], "lambda": 0.8}, True),
    ("ties", {"density": 0.4, "lambda": 1.0}, True),
    ("ties", {"density": [0.3, 0.5, 0.7], "scope": "global"}, True),
    ("dare_linear", {"density": 0.5}, True),
    ("dare_ties", {"density": [0.3, 0.6, 0.9], "weight": [1.0, 0.5, 0.7]}, True),
    ("consensus", {"base_merge": "ties", "density": 0.5, "scope": "global", "k": 2}, True),
    ("tall_masks", {"base_merge": "ties", "density": 0.5, "lambda": 0.4}, True),
    ("slerp", {"t": 0.3}, None),
]


def _recipe(paths, method, params, with_base, seed):
    base, *experts = paths
    if with_base is None:  # slerp: two models
        experts = experts[:2]
    mp = [{} for _ in experts]
    glob = {}
    for k, v in params.items():
        if isinstance(v, list):
            for i, x in enumerate(v):
                mp[i][k] = x
        else:
            glob[k] = v
    r = {"models": [{"model": str(p), "parameters": q} for p, q in zip(experts, mp)],
         "merge_method": method, "parameters": glob, "seed": seed}
    if with_base:
        r["base_model"] = str(base)
    return r


@pytest.mark.parametrize("method,params,with_base", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_merge_files_states_and_suites_give_the_same_bytes(tmp_path, family, method, params, with_base):
    _, paths, base, states, _, _ = family
    seed = 11
    res = ml.merge(_recipe(paths, method, params, with_base, seed), tmp_path / "o", block_size="400B",
                   quiet=True, threads=2)
    sts = states[:2] if with_base is None else states
    kw = {k.replace("lambda", "lambda_"): v for k, v in params.items()}
    names = [str(p) for p in paths[1:1 + len(sts)]]
    mem = ml.merge_states(method, sts, base if with_base else None, seed=seed, model_names=names, **kw)
    suite = merge_state(method, base if with_base else None, sts, params, names=list(base),
                        model_names=names, seed=seed)
    if method == "tall_masks":
        assert sorted(res.variants) == sorted(mem) == sorted(suite) == ["a", "b", "c"]
        for v in res.variants:
            _same_bytes(_read(tmp_path / "o" / v), mem[v])
            _same_bytes(mem[v], suite[v])
    else:
        _same_bytes(_read(res.outputs[0]), mem)
        _same_bytes(mem, suite)


def test_dare_masks_depend_on_the_seed_not_on_the_entry_point(family):
    _, paths, base, states, _, _ = family
    a = ml.merge_states("dare_linear", states, base, density=0.5, seed=1)
    b = ml.merge_states("dare_linear", states, base, density=0.5, seed=2)
    assert not torch.equal(a["layers.0.w"], b["layers.0.w"])
    assert torch.equal(a["layers.0.w"], ml.merge_states("dare_linear", states, base, density=0.5, seed=1)["layers.0.w"])


def test_fisher_and_regmean_from_files_equal_the_in_memory_merges(tmp_path, family):
    tmp, paths, base, states, fishers, grams = family
    experts = paths[1:]
    r = {"models": [{"model": str(p), "parameters": {"fisher": str(tmp / f"fisher{i}.safetensors")}}
                    for i, p in enumerate(experts)], "merge_method": "fisher",
         "parameters": {"normalize": True}}
    out = _read(ml.merge(r, tmp_path / "f", quiet=True).outputs[0])
    _same_bytes(out, ml.fisher_merge(states, fishers, normalize=True))
    _same_bytes(out, ml.merge_states("fisher", states, stats={"fisher": fishers}, normalize=True))
    r = {"models": [{"model": str(p), "parameters": {"gram": str(tmp / f"gram{i}.safetensors")}}
                    for i, p in enumerate(experts)], "merge_method": "regmean",
         "parameters": {"alpha": 0.7, "normalize_gram": True}}
    out = _read(ml.merge(r, tmp_path / "g", quiet=True).outputs[0])  # row counts from the Gram files' metadata
    counts = [{k: 30 for k in g} for g in grams]
    _same_bytes(out, ml.regmean_merge(states, grams, alpha=0.7, counts=counts, normalize_gram=True))


def test_merge_states_parameters_like_a_recipe(family):
    _, _, base, states, _, _ = family
    per_model = ml.merge_states("task_arithmetic", states, base, weight=[0.2, 0.3, 0.5])
    as_dicts = ml.merge_states("task_arithmetic", states, base,
                               model_params=[{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}])
    _same_bytes(per_model, as_dicts)
    want = base["layers.0.w"].float() + sum(w * (s["layers.0.w"].float() - base["layers.0.w"].float())
                                            for w, s in zip([0.2, 0.3, 0.5], states))
    assert torch.allclose(per_model["layers.0.w"].float(), want, atol=1e-2)
    assert per_model["layers.0.w"].dtype == torch.bfloat16
    assert torch.equal(per_model["position_ids"], base["position_ids"])
    # a depth gradient in model_params, as in a recipe: layer 0 gets 0, layer 1 gets 1
    grad = ml.merge_states("linear", states[:2], model_params=[{"weight": [1.0, 0.0]}, {"weight": [0.0, 1.0]}],
                           dtype="float32")
    assert torch.equal(grad["layers.0.w"], states[0]["layers.0.w"].float())
    assert torch.equal(grad["layers.1.w"], states[1]["layers.1.w"].float())
    with pytest.raises(MergelabError, match="weight.*2 values, expected 3"):
        ml.merge_states("task_arithmetic", states, base, weight=[0.2, 0.3])
    with pytest.raises(MergelabError, match="unknown parameter 'bogus'"):
        ml.merge_states("linear", states, bogus=1)
    with pytest.raises(MergelabError, match="needs a base_model"):
        ml.merge_states("ties", states)
    with pytest.raises(MergelabError, match="missing from"):
        ml.merge_states("linear", [states[0], {"x": torch.ones(2)}])


def test_recipe_seed_reaches_methods_through_one_seed_function(tmp_path, family):
    from mergelab.methods.seeds import context_seed, derive_seed, tensor_seed

    assert context_seed(3, "w") == derive_seed(3, "w") != derive_seed(4, "w")
    assert tensor_seed(3, "x.weight", 1) == 3254603654826957967  # the pinned DARE model seed
    from mergelab.methods import TensorContext

    ctx = TensorContext(name="x.weight", seed=context_seed(3, "x.weight"))
    assert ctx.model_seed(1) == tensor_seed(ctx.seed, "x.weight", 1)
    seen = []
    from mergelab.methods.registry import REGISTRY, merge_method

    @merge_method("_engine_seed_probe")
    def probe(tensors, base, *, ctx):
        seen.append((ctx.name, ctx.seed))
        return tensors[0]

    try:
        _, paths, _, states, _, _ = family
        ml.merge_states("_engine_seed_probe", states[:1], seed=9, names=["norm.weight"])
        ml.merge({"models": [{"model": str(paths[1])}], "merge_method": "_engine_seed_probe", "seed": 9},
                 tmp_path / "o", quiet=True)
    finally:
        del REGISTRY["_engine_seed_probe"]
    assert ("norm.weight", context_seed(9, "norm.weight")) in seen
    assert seen.count(("norm.weight", context_seed(9, "norm.weight"))) == 2


def test_merge_states_names_ignore_the_other_tensors(family):
    _, _, base, states, _, _ = family
    heads = [{**s, "head.weight": torch.ones(i + 2, 16)} for i, s in enumerate(states)]  # task heads differ
    out = ml.merge_states("linear", heads, names=["layers.0.w", "position_ids"])
    assert list(out) == ["layers.0.w", "position_ids"]
    with pytest.raises(MergelabError, match="head.weight.*shape"):
        ml.merge_states("linear", heads)


def test_merge_states_bad_inputs_are_one_line_errors(family):
    _, _, base, states, _, _ = family
    for bad, match in ((lambda: ml.merge_states("linear", []), "no states"),
                       (lambda: ml.merge_states("linear", [torch.ones(3)]), r"states\[0\] is a Tensor"),
                       (lambda: ml.merge_states("linear", [{"w": 3.0}]), "'w' is a float, expected a tensor"),
                       (lambda: ml.merge_states("nope", states), "unknown merge method 'nope'"),
                       (lambda: ml.merge_states("ties", states, base=[1]), "base is a list"),
                       (lambda: ml.merge_states("linear", states, model_names=["a"]), "model_names has 1")):
        with pytest.raises(MergelabError, match=match) as e:
            bad()
        assert "\n" not in str(e.value)
