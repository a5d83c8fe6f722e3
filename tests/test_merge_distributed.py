"""Merges under torchrun (gloo, CPU): 2 and 3 processes write the same bytes as 1 process
(an elementwise method in row blocks, TIES with a global threshold, a multi-output method, a
TACT stage whose calibration is sharded); the tensors are split by bytes, each rank says
what it did; a rank that fails, dies or hangs fails the run and leaves nothing behind."""
import contextlib
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from _stats_models import mlp
from mergelab.engine.ranks import partition

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))


def _inputs(root):
    d = root / "in"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (40, 12), "layer.0.weight": (12, 12), "layer.0.bias": (12,),
              "layer.1.weight": (30, 12), "layer.1.bias": (30,), "head.weight": (5, 30), "scale": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(16)             # an integer buffer: copied, not merged
    save_file(base, str(d / "base.safetensors"))
    for i in (1, 2, 3):
        e = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
             for k, v in base.items()}
        save_file(e, str(d / f"e{i}.safetensors"))
    for i in (1, 2):
        save_file({k: v.contiguous() for k, v in mlp(i).state_dict().items()}, str(d / f"m{i}.safetensors"))
    rng = np.random.default_rng(0)
    for task, n in (("a", 29), ("b", 23)):              # batches of 6: uneven for 2 and 3 ranks
        np.savez(d / f"{task}.npz", x=rng.normal(size=(n, 10)).astype(np.float32), y=rng.integers(0, 3, n))


def _torchrun(n, *args, env=None, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _files(folder, root=None):
    """Every file's bytes; ``root`` (the run's input folder, named in the model card's recipe)
    is replaced by a placeholder."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            b = p.read_bytes()
            out[str(p.relative_to(folder))] = b if root is None else b.replace(str(root).encode(), b"<ROOT>")
    return out


def _left_behind(root):
    """What a failed run left: the output or a temporary folder.  A rank 0 that torchrun
    SIGKILLs cannot remove its (empty) lock file; the next run on the output removes it
    (``test_sigkill_then_rerun_cleans_the_stale_temporary`` in test_hostile_outputs.py), so
    the lock file is checked there, not here."""
    return sorted(p.name for p in root.iterdir()
                  if ("mergelab-" in p.name or p.name == "out") and not p.name.endswith(".mergelab-lock"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from _merge_worker import main

    out = {}
    for n in (1, 2, 3):
        root = tmp_path_factory.mktemp(f"w{n}")
        _inputs(root)
        if n == 1:
            cwd, buf = os.getcwd(), io.StringIO()
            os.chdir(HERE)
            try:
                with contextlib.redirect_stdout(buf):
                    main("all", str(root))
            finally:
                os.chdir(cwd)
            out[n] = (root, buf.getvalue())
        else:
            r = _torchrun(n, HERE / "_merge_worker.py", "all", root)
            assert r.returncode == 0, r.stderr[-3000:]
            out[n] = (root, r.stdout)
    return out


@pytest.mark.slow     # two torchrun launches: ~40 s on the shared 2-core machine
@pytest.mark.parametrize("n", [2, 3])
def test_torchrun_merge_is_byte_identical(runs, n):
    from _merge_worker import recipes

    one, many = runs[1][0], runs[n][0]
    for name in recipes(one):
        a, b = _files(one / name, one), _files(many / name, many)
        assert a, name
        assert sorted(a) == sorted(b), name
        for f in a:
            assert a[f] == b[f], f"{name}/{f}"
    assert len([f for f in _files(one / "linear") if f.endswith(".safetensors")]) > 1   # several shards
    assert sorted(p.name for p in (one / "tall_masks").iterdir()) == [f"e{i}.safetensors" for i in (1, 2, 3)]
    assert (one / "tact" / "tact" / "corrections.safetensors").exists()
    assert _left_behind(many) == []


def _rank_lines(text):
    """``[(rank, world, tensors, of, bytes)]`` of the ``rank R/W: merged T of N tensors (B bytes)`` lines."""
    out = []
    for ln in text.splitlines():
        if ln.startswith("rank "):
            head, rest = ln.split(": merged ")
            r, w = head.removeprefix("rank ").split("/")
            t, rest = rest.split(" of ")
            total, b = rest.split(" tensors (")
            out.append((int(r), int(w), int(t), int(total), int(b.removesuffix(" bytes)"))))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_each_rank_reports_its_share(runs, n):
    one, many = _rank_lines(runs[1][1]), _rank_lines(runs[n][1])
    assert len(one) == 4 and len(many) == 4 * n                   # one line per rank and recipe
    assert sorted(r for r, *_ in many) == sorted(list(range(n)) * 4)
    assert {w for _, w, *_ in many} == {n}
    for total in {t for *_, t, _ in one}:                          # tensors: each merged by one rank
        assert sum(t for *_, t, tot, _ in many if tot == total) == sum(t for *_, t, tot, _ in one if tot == total)
    assert sum(b for *_, b in many) == sum(b for *_, b in one)    # bytes: each written once
    assert all(t > 0 for _, _, t, *_ in many)                     # 6-8 tensors: every rank has work


def test_partition_is_deterministic_balanced_and_complete():
    names = [f"t{i}" for i in range(23)]
    nbytes = {n: (i * 7919) % 1000 + 1 for i, n in enumerate(names)}
    for world in (1, 2, 3, 5, 30):
        parts = partition(names, nbytes, world)
        assert parts == partition(names, nbytes, world)
        assert sorted(n for p in parts for n in p) == sorted(names)          # each name exactly once
        assert all(p == [n for n in names if n in p] for p in parts)       # plan order kept
        loads = [sum(nbytes[n] for n in p) for p in parts]
        if world <= len(names):                        # greedy bound: max - min <= the largest item
            assert max(loads) - min(loads) <= max(nbytes.values())


def _prepared(tmp_path):
    _inputs(tmp_path)
    return tmp_path


def _owner(root, tensor, world):
    from mergelab.io import open_checkpoint

    ck = open_checkpoint(root / "in" / "e1.safetensors")
    names = ck.keys()
    nb = {n: ck.get(n).numel() * (2 if ck.dtype(n).is_floating_point else ck.dtype(n).itemsize) for n in names}
    return next(r for r, p in enumerate(partition(names, nb, world)) if tensor in p)


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_killed_rank_fails_the_run_and_leaves_nothing(tmp_path, killed):
    root = _prepared(tmp_path)
    target = next(t for t in ("embed.weight", "layer.1.weight", "head.weight", "layer.0.weight")
                  if _owner(root, t, 2) == killed)
    r = _torchrun(2, HERE / "_merge_worker.py", "kill", root, target)
    assert r.returncode != 0
    assert _left_behind(root) == [], r.stderr[-2000:]


@pytest.mark.slow
def test_hanging_rank_times_out_and_leaves_nothing(tmp_path):
    root = _prepared(tmp_path)
    r = _torchrun(2, HERE / "_merge_worker.py", "hang", root, "embed.weight", env={"MERGELAB_DIST_TIMEOUT": "5"})
    assert r.returncode != 0
    assert "waiting for the other ranks failed" in r.stdout + r.stderr
    assert _left_behind(root) == [], r.stderr[-2000:]


@pytest.mark.slow
def test_cli_torchrun_merge_and_a_failing_rank(tmp_path):
    """``torchrun -m mergelab merge``: rank lines and the single-process bytes; then a NaN in a
    tensor that one rank owns: that rank's one-line error fails the run, nothing is written."""
    import yaml

    from _merge_worker import recipes

    root = _prepared(tmp_path)
    (root / "r.yaml").write_text(yaml.safe_dump(recipes(root)["linear"]))
    args = ["-m", "mergelab", "merge", root / "r.yaml", "--shard-size", "1500B"]
    one = subprocess.run([sys.executable, *map(str, args), "-o", root / "one", "-q"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    r = _torchrun(2, *args, "-o", root / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("rank "))
    assert [ln.split(":")[0] for ln in lines] == ["rank 0/2", "rank 1/2"]
    assert sum(int(ln.split("merged ")[1].split(" of")[0]) for ln in lines) == 8
    assert _files(root / "one") == _files(root / "two")
    # a NaN in one expert's head: only its owner sees it
    from safetensors.torch import load_file

    e = load_file(str(root / "in" / "e2.safetensors"))
    e["head.weight"][1, 2] = float("nan")
    save_file(e, str(root / "in" / "e2.safetensors"))
    r = _torchrun(2, *args, "-o", root / "out")
    assert r.returncode != 0
    assert "error: " in r.stderr and "holds NaN or Inf" in r.stderr
    assert _left_behind(root) == []
