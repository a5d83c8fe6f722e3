"""Offline data: install, checksums, loaders, fixed splits."""
import gzip
import os
import pickle
import stat

import numpy as np
import pytest

from mergelab.errors import MergelabError
from mergelab.experiments import data
from suite_helpers import ensure_data


@pytest.fixture(scope="module")
def installed():
    """Install into the real cache once (idempotent); skip only if the registries are unreachable."""
    ensure_data()
    return True


def test_fashion_mnist_shapes_and_classes(installed):
    xtr, ytr, xte, yte = data.load_fashion_mnist()
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8
    assert np.bincount(ytr).tolist() == [6000] * 10
    assert np.bincount(yte).tolist() == [1000] * 10


def test_mnist10k_and_animal(installed):
    x, y = data.load_mnist10k()
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    xa, ya = data.load_animal_mnist()
    assert xa.shape == (10000, 28, 28) and xa.dtype == np.uint8
    assert np.bincount(ya).tolist() == [1000] * 10


def test_text_tasks(installed):
    rt = data.load_rotten_tomatoes()
    cats = [r["category"] for r in rt]
    assert len(rt) == 13905
    assert (cats.count("fresh"), cats.count("rotten"), cats.count("plot")) == (7403, 5405, 1097)
    tw = data.text_task("election-tweets")
    assert sum(len(v) for v in tw.texts.values()) == 6444
    r8 = data.text_task("reuters-r8")
    assert len(r8.classes) == 8 and len(r8.texts["test"]) == 2189
    assert len(r8.texts["train"]) + len(r8.texts["val"]) == 5485
    ng = data.text_task("20newsgroups")
    assert len(ng.classes) == 20 and len(ng.texts["test"]) == 7528
    for t in (tw, r8, ng):
        for k in ("train", "val", "test"):
            assert len(t.texts[k]) == len(t.labels[k]) > 0
            assert t.labels[k].min() >= 0 and t.labels[k].max() < len(t.classes)


def test_image_pool_splits_disjoint_and_fixed(installed):
    p = data.image_pool("animal-mnist")
    sets = [set(v.tolist()) for v in p.splits.values()]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 10000
    q = data.image_pool("animal-mnist")
    assert data.indices_hash(p.splits) == data.indices_hash(q.splits)
    x, y = p.part("val", classes=(5, 6, 7, 8, 9))
    assert x.shape[1:] == (1, 28, 28) and x.dtype == np.float32
    assert set(np.unique(y).tolist()) == {0, 1, 2, 3, 4}
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_minilm_checksums(installed):
    assert (data.minilm_path() / "model.safetensors").is_file()


def test_split_indices_properties():
    s = data.split_indices(1000, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=3)
    assert [len(v) for v in s.values()] == [500, 300, 200]
    assert len(set(np.concatenate(list(s.values())).tolist())) == 1000
    t = data.split_indices(1000, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=4)
    assert data.indices_hash(s) != data.indices_hash(t)
    assert data.indices_hash(s) == data.indices_hash(data.split_indices(1000, {"a": 0.5, "b": 0.3, "c": 0.2}, 3))


def test_missing_and_corrupt_file_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path))
    with pytest.raises(MergelabError, match=r"missing; run `mergelab data install`"):
        data.load_animal_mnist()
    d = tmp_path / "data" / "animal-mnist"
    d.mkdir(parents=True)
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        (d / name).write_bytes(b"not the real file")
    with pytest.raises(MergelabError) as e:
        data.load_animal_mnist()
    msg = str(e.value)
    assert "corrupt" in msg and "mergelab data install" in msg and "\n" not in msg


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.gz"
    with gzip.open(p, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data._load_numpy_pickle(p)
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as f:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), f)
    assert data._load_numpy_pickle(good).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_stale_apt_lists_error_names_the_fix(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package dataset-fashion-mnist' >&2\nexit 100\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MergelabError) as e:
        data.install(["fashion-mnist"], log=lambda s: None)
    msg = str(e.value)
    assert "apt-get update" in msg and "Unable to locate package" in msg
    with pytest.raises(MergelabError, match="unknown data source"):
        data.install(["nope"], log=lambda s: None)


def test_split_hash_identifies_the_data_not_only_the_indices(installed):
    mn, an = data.image_pool("mnist"), data.image_pool("animal-mnist")
    # same size, same seed: the index arrays (the old hash) are equal...
    assert data.indices_hash(mn.splits) == data.indices_hash(an.splits)
    # ...the data are not, and one changed pixel or label changes the hash
    assert mn.split_hash() != an.split_hash()
    assert mn.split_hash() == data.image_pool("mnist").split_hash()
    x = mn.x.copy()
    x[0, 0, 0] ^= 1
    assert data.split_data_hash(mn.splits, x, mn.y) != mn.split_hash()
    y = mn.y.copy()
    y[0] = (y[0] + 1) % 10
    assert data.split_data_hash(mn.splits, mn.x, y) != mn.split_hash()
    t = data.text_task("rt-sentiment")
    texts = [s for k in sorted(t.texts) for s in t.texts[k]]
    assert data.split_data_hash({}, texts, [0] * len(texts)) != data.split_data_hash({}, texts[::-1], [0] * len(texts))
