"""local-text suite: the cached lower layers are exact, the batching trims padding only, smoke end to end (slow)."""

import numpy as np
import pytest
import torch

from mergelab.experiments import zoo
from mergelab.experiments.suites.local_text import Encoded, MiniLMTop, additive_mask, lower_hidden
from suite_helpers import ensure_data, reproduce_smoke


def _tiny_bert():
    return zoo.tiny_text_classifier(3, seed=0).bert.eval()


def _ids(n=4, t=10, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i, L in enumerate([10, 7, 3, 5][:n]):
        mask[i, L:] = 0
        ids[i, L:] = 0
    return ids, mask


@pytest.mark.parametrize("first", [0, 1, 2])
def test_top_on_cached_hidden_equals_full_model(first):
    bert = _tiny_bert()
    full = zoo.TextClassifier(bert, 3).eval()
    ids, mask = _ids()
    ref = full.features({"input_ids": ids, "attention_mask": mask})
    top = MiniLMTop(bert, first, 3).eval()
    h = lower_hidden(bert, first, ids, mask)
    got = top.features({"hidden": h, "attention_mask": mask})
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # keyword call (what the statistics passes do) and the additive 4-D mask give the same output
    torch.testing.assert_close(top(hidden=h, attention_mask=mask), top({"hidden": h, "attention_mask": mask}))
    torch.testing.assert_close(top.features({"hidden": h, "attention_mask": additive_mask(mask, h.dtype)}), got)


def test_top_layers_are_copies_not_shared():
    bert = _tiny_bert()
    top = MiniLMTop(bert, 1, 2)
    with torch.no_grad():
        top.layers[0].output.dense.weight.add_(1.0)
    assert not torch.equal(top.layers[0].output.dense.weight, bert.encoder.layer[1].output.dense.weight)


def test_encoded_batch_trims_padding_without_changing_features():
    bert = _tiny_bert()
    ids, mask = _ids()
    h = lower_hidden(bert, 1, ids, mask)
    enc = Encoded(h, mask, np.array([0, 1, 2, 0]))
    xb, yb = enc.batch(torch.tensor([1, 3]))
    assert xb["hidden"].shape[1] == 7 and xb["attention_mask"].shape == (2, 7)
    assert yb.tolist() == [1, 0]
    top = MiniLMTop(bert, 1, 3).eval()
    full = top.features({"hidden": h[[1, 3]], "attention_mask": mask[[1, 3]]})
    torch.testing.assert_close(top.features(xb), full, atol=1e-5, rtol=1e-5)
    assert sum(len(y) for _, y in enc.loader(batch=3)) == 4


def test_reproduce_local_text_is_registered():
    from mergelab.experiments.suites import SUITES
    assert "local-text" in SUITES


@pytest.mark.slow
def test_local_text_smoke_end_to_end(tmp_path):
    from mergelab.experiments import data
    ensure_data(["rotten-tomatoes", "orange-text"])
    res = reproduce_smoke("local-text", tmp_path / "out")
    assert set(res["experts"]["local"]) == set(res["tasks"]) == set(data.TEXT_TASKS)
    assert all(0 <= a <= 1 for a in res["experts"]["local"].values())
    assert {r["method"] for r in res["runs"]} >= {"task_arithmetic", "ties", "ties_tall"}
    for run in res["runs"]:
        assert set(run["acc"]) == set(res["tasks"])
        for coef in run["coef_seeds"]:  # chosen among the validation-scored grid, per seed
            assert str(coef["coef"]) in coef["val_scores"]
    assert all(v for v in res["splits"].values())


class _Tok:
    """A whitespace tokenizer over a tiny vocabulary with the Hugging Face call signature."""

    def __call__(self, texts, padding=True, truncation=True, max_length=8, return_tensors="pt"):
        ids = [[1 + (sum(map(ord, w)) % 100) for w in t.split()][:max_length] for t in texts]
        t = max(len(x) for x in ids)
        return {"input_ids": torch.tensor([x + [0] * (t - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x in ids])}


def test_encode_chunks_equal_one_padded_pass():
    from mergelab.experiments.suites.local_text import encode
    bert = _tiny_bert()
    texts = ["a b c", "d e f g h i j k l m", "n", "o p", "q r s t"]
    enc = encode(bert, _Tok(), texts, np.arange(5), max_len=8, first=1, chunk=2)
    assert enc.hidden.shape == (5, 8, 32) and enc.mask.sum(1).tolist() == [3, 8, 1, 2, 4]
    tok = _Tok()(texts, max_length=8)
    ref = lower_hidden(bert, 1, tok["input_ids"], tok["attention_mask"])
    real = tok["attention_mask"].bool()
    torch.testing.assert_close(enc.hidden[real], ref[real], atol=1e-5, rtol=1e-5)


def test_eval_loader_covers_every_example_once_and_matches_data_order_accuracy():
    from mergelab.experiments.train import evaluate
    bert = _tiny_bert()
    ids, mask = _ids()
    h = lower_hidden(bert, 1, ids, mask)
    enc = Encoded(h, mask, np.array([0, 1, 2, 0]))
    bl = enc.eval_loader(batch=3)
    # shortest first: lengths 3, 5, 7 then 10; every batch trimmed to its own longest text
    assert [xb["hidden"].shape[1] for xb, _ in bl] == [7, 10]
    assert sorted(y for _, yb in bl for y in yb.tolist()) == sorted(enc.labels.tolist())
    top = MiniLMTop(bert, 1, 3).eval()
    a, b = evaluate(top, bl), evaluate(top, enc.loader(batch=3))
    assert a["acc"] == b["acc"] and a["n"] == b["n"] == 4
    assert abs(a["loss"] - b["loss"]) < 1e-5


def test_length_grouped_sampler_draws_the_same_examples_in_length_sorted_batches():
    L = torch.tensor([3, 9, 1, 7, 5, 2, 8, 4, 6, 10])
    mask = (torch.arange(10)[None, :] < L[:, None]).long()
    enc = Encoded(torch.randn(10, 10, 4), mask, np.arange(10))
    g, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    sample = enc.sampler(group=4)
    batches = [sample(g, 3) for _ in range(4)]
    draws = torch.randint(10, (12,), generator=g2)  # the same uniform draws, in one pool
    got = sorted(y for _, yb in batches for y in yb.tolist())
    assert got == sorted(draws.tolist())
    for xb, yb in batches:  # each batch trimmed to its own longest example
        assert xb["hidden"].shape[1] == int(L[yb].max())
    # the batches partition the pool's length order (no two batches' length ranges interleave)
    spans = sorted((int(L[yb].min()), int(L[yb].max())) for _, yb in batches)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # group=1 is the plain uniform sampler
    g3, g4 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert enc.sampler()(g3, 5)[1].tolist() == torch.randint(10, (5,), generator=g4).tolist()
