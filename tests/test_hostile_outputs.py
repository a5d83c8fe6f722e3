"""Hostile OUTPUT paths, signals and concurrent runs, for every command that writes.

Each refused case asserts: exit code 2, exactly one stderr line starting ``error:``, no
traceback, and the whole test folder byte-for-byte as before (inputs unchanged, nothing new
on disk).  Signals: exit code 128 + signum, nothing left behind.  The fixtures are built here
(HF folders from ``core_helpers.save_hf``, tiny MLPs from ``_stats_models``).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from _stats_models import mlp
from core_helpers import save_hf, toy_family
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.io import AtomicFolder, load_state, save_state
from mergelab.io.outputs import Output, clean_stale

TESTS = Path(__file__).resolve().parent
# The `mergelab` command itself (argv[0] as the console script sets it: late signals are then
# ignored as in `mergelab ...`; a bare `python -c` caller gets its own handlers back, which
# CPython resets to SIG_DFL during its last exit steps) plus the tests' slow method.
MERGELAB = [sys.executable, "-c",
            f"import sys; sys.argv[0] = 'mergelab'; sys.path.insert(0, {str(TESTS)!r}); "
            "import core_helpers, _slow_method; from mergelab.cli import main; main(prog_name='mergelab')"]
FACTORY = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom _stats_models import mlp\ndef make():\n    return mlp(7)\n"


# ---------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (hidden ones too): file digests, link targets, folders."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif not p.is_file():
                out[rel] = "special"   # a FIFO: never opened
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(autouse=True)
def _restore_signals():
    """The CLI installs SIGINT/SIGTERM/SIGHUP handlers; give pytest its own back."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in old.items():
        signal.signal(s, h)
    import mergelab.io.outputs as O
    O._interrupting = False


def invoke(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
    return r


def assert_refused(r, root: Path, before: dict, *needles: str):
    """Exit 2, exactly one stderr line ``error: ...`` containing every needle, nothing changed."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.stdout)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in r.stderr + r.stdout
    assert snapshot(root) == before




# ---------------------------------------------------------------- fixtures
@pytest.fixture
def fam(tmp_path):
    """models/{base,a,b} HF folders, stats/ with per-model Fisher files, data/ files, and
    recipes in work/ (relative paths, resolved against the recipe's folder)."""
    (paths, tensors) = toy_family(tmp_path / "models")
    (tmp_path / "stats").mkdir()
    for n, t in zip(("a", "b"), tensors[1:]):
        save_file({k: torch.ones_like(v) for k, v in t.items() if v.is_floating_point()},
                  str(tmp_path / "stats" / f"{n}.safetensors"), metadata={"mergelab_kind": "fisher"})
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "d.npz", x=np.zeros((4, 10), np.float32), y=np.zeros(4, np.int64))
    (tmp_path / "work").mkdir()
    plain = {"models": [{"model": "../models/a"}, {"model": "../models/b"}], "merge_method": "task_arithmetic",
             "base_model": "../models/base", "parameters": {"weight": 0.5}}
    (tmp_path / "work" / "r.yaml").write_text(yaml.safe_dump(plain))
    fisher = {"models": [{"model": "../models/a", "parameters": {"fisher": "../stats/a.safetensors"}},
                         {"model": "../models/b", "parameters": {"fisher": "../stats/b.safetensors"}}],
              "merge_method": "_core_fisher"}
    (tmp_path / "work" / "fisher.yaml").write_text(yaml.safe_dump(fisher))
    stages = dict(plain, align={"method": "activation", "data": "../data/d.npz", "model_code": "m.py:make"},
                  repair={"data": "../data/d.npz"})
    (tmp_path / "work" / "stages.yaml").write_text(yaml.safe_dump(stages))
    return tmp_path


# ---------------------------------------------------------------- 1. outputs that are inputs
MERGE_GUARD = [
    # (name, recipe, -o, --force, what the message names)
    ("is a model folder", "r.yaml", "../models/a", True, "is the input models[0].model"),
    ("is a model folder, no --force", "r.yaml", "../models/a", False, "is the input models[0].model"),
    ("is the base through a symlink", "r.yaml", "../link", True, "is the input base_model"),
    ("is a model through ..", "r.yaml", "../models/a/../b", True, "is the input models[1].model"),
    ("contains the models", "r.yaml", "../models", True, "contains the input"),
    ("contains the recipe", "r.yaml", ".", True, "contains the input the recipe"),
    ("lies inside a model folder", "r.yaml", "../models/a/merged", False, "lies inside the input models[0].model"),
    ("contains the statistics files", "fisher.yaml", "../stats", True, "models[0].parameters.fisher"),
    ("is a statistics file through ..", "fisher.yaml", "../stats/../stats/a.safetensors", True,
     "is the input models[0].parameters.fisher"),
    ("contains the align data", "stages.yaml", "../data", True, "align.data"),
    ("is the align model code", "stages.yaml", "m.py", True, "align.model_code"),
    ("is the repair data", "stages.yaml", "../data/d.npz", True, "is the input align.data"),
]


@pytest.mark.parametrize("name,recipe,out,force,needle", MERGE_GUARD, ids=[c[0] for c in MERGE_GUARD])
def test_merge_refuses_an_output_that_is_an_input(fam, name, recipe, out, force, needle):
    (fam / "link").symlink_to(fam / "models" / "base")
    (fam / "work" / "m.py").write_text(FACTORY)
    before = snapshot(fam)
    r = invoke(["merge", recipe, "-o", out] + (["--force"] if force else []), fam / "work")
    assert_refused(r, fam, before, needle)


def test_merge_refuses_a_bind_mounted_alias_of_an_input(fam):
    """Same folder under another path (a bind mount): caught by st_dev/st_ino."""
    alias = fam / "alias"
    alias.mkdir()
    if subprocess.run(["mount", "--bind", str(fam / "models" / "a"), str(alias)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        before = snapshot(fam / "models")
        r = invoke(["merge", "r.yaml", "-o", alias, "--force"], fam / "work")
        assert r.exit_code == 2 and "is the input models[0].model" in r.stderr, r.stderr
        assert snapshot(fam / "models") == before
    finally:
        subprocess.run(["umount", str(alias)])


@pytest.fixture
def st(tmp_path):
    """A tiny MLP checkpoint, .npz data, an image folder and the factory file for stats/align."""
    net = mlp(7)
    save_file(net.state_dict(), str(tmp_path / "m.safetensors"))
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "d.npz", x=torch.randn(12, 10, generator=g).numpy(),
             y=torch.randint(0, 3, (12,), generator=g).numpy())
    (tmp_path / "mymodels.py").write_text(FACTORY)
    os.link(tmp_path / "m.safetensors", tmp_path / "hard.safetensors")
    (tmp_path / "sym.npz").symlink_to(tmp_path / "d.npz")
    (tmp_path / "ref").mkdir()
    (tmp_path / "oth").mkdir()
    save_file(net.state_dict(), str(tmp_path / "ref" / "model.safetensors"))
    save_file(mlp(7).state_dict(), str(tmp_path / "oth" / "model.safetensors"))
    return tmp_path


STATS = ["m.safetensors", "--model-code", "mymodels.py:make", "--data", "d.npz", "--quiet"]
STATS_GUARD = [
    ("fisher", "m.safetensors", "is the input MODEL"),            # today: overwrites the model it reads
    ("fisher", "./hard.safetensors", "is the input MODEL"),       # a hard link to the model
    ("gram", "d.npz", "is the input --data"),
    ("gram", "sym.npz", "is the input --data"),                   # a symlink to the data
    ("activations", "mymodels.py", "is the input --model-code"),
    ("activations", "../" + "{name}/m.safetensors", "is the input MODEL"),  # relative alias via the parent
]


@pytest.mark.parametrize("cmd,out,needle", STATS_GUARD)
def test_stats_refuses_an_output_that_is_an_input(st, cmd, out, needle):
    before = snapshot(st)
    r = invoke(["stats", cmd, *STATS, "-o", out.format(name=st.name)], st)
    assert_refused(r, st, before, needle)


ALIGN_GUARD = [
    (["ref", "oth"], "ref", [], "is the input REFERENCE"),
    (["ref", "oth"], "ref/sub", [], "lies inside the input REFERENCE"),
    (["ref", "oth"], ".", ["--checkpoints", "--force"], "is the input OTHER oth"),  # target ./oth/ = the input
    (["m.safetensors", "hard.safetensors"], "oth", ["--transfer-to", "oth"], "is the input --transfer-to oth"),
]


@pytest.mark.parametrize("models,out,extra,needle", ALIGN_GUARD)
def test_align_refuses_an_output_that_is_an_input(st, models, out, extra, needle):
    before = snapshot(st)
    r = invoke(["align", *models, "--model-code", "mymodels.py:make", "--input-shape", "1,10", "-o", out, *extra], st)
    assert_refused(r, st, before, needle)


@pytest.mark.parametrize("out", ["cache", "cache/runs"])
def test_reproduce_refuses_the_cache_as_output(tmp_path, monkeypatch, out):
    (tmp_path / "cache" / "data").mkdir(parents=True)
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    before = snapshot(tmp_path)
    r = invoke(["reproduce", "fisher", "--out", out], tmp_path)
    assert_refused(r, tmp_path, before, "the data and model cache")


@pytest.mark.parametrize("out", [None, "a/b/c"])
def test_reproduce_failing_early_leaves_no_folder(tmp_path, monkeypatch, out):
    """An unknown suite fails after the output claim: neither the default runs/ nor the
    --out parents it created stay behind (the lock file included)."""
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    before = snapshot(tmp_path)
    r = invoke(["reproduce", "no-such-suite", *(["--out", out] if out else [])], tmp_path)
    assert_refused(r, tmp_path, before, "unknown suite 'no-such-suite'")


def _failing_suite(monkeypatch, exc: BaseException):
    """run_suite writes part of its report into the output folder, then fails."""
    import mergelab.experiments.suites as S

    def run_suite(name, profile, out, **kw):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text("{}")
        raise exc

    monkeypatch.setattr(S, "run_suite", run_suite)


@pytest.mark.parametrize("exc,code", [(MergelabError("suite failed"), 2), (KeyboardInterrupt(), 130)])
def test_reproduce_failing_midway_removes_what_it_created(tmp_path, monkeypatch, exc, code):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    _failing_suite(monkeypatch, exc)
    before = snapshot(tmp_path)
    r = invoke(["reproduce", "fisher", "--out", "runs/deep/fisher"], tmp_path)
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert snapshot(tmp_path) == before


def test_reproduce_failing_keeps_an_existing_output_folder_and_its_files(tmp_path, monkeypatch):
    """--out names a folder that exists: a failure removes what the run added to it and
    nothing that was there before (the folder, a file, the parent runs/)."""
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "notes.txt").write_text("keep")
    _failing_suite(monkeypatch, MergelabError("suite failed"))
    before = snapshot(tmp_path)
    r = invoke(["reproduce", "fisher", "--out", "runs/mine"], tmp_path)
    assert r.exit_code == 2
    assert snapshot(tmp_path) == before


def test_api_save_state_refuses_to_write_over_the_checkpoint_it_reads(tmp_path):
    (paths, _) = toy_family(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(MergelabError, match="is the input the checkpoint being saved"):
        save_state(load_state(paths[1]), paths[1], force=True)
    with pytest.raises(MergelabError, match="contains the input like"):
        save_state({"w": torch.zeros(2)}, tmp_path, like=paths[0], force=True)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 3. output problems
@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MB tmpfs (root only); ``mount(ro=True)`` remounts it read-only."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def _ro(mnt: Path):
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)


def _problem_paths(root: Path, mnt: Path | None) -> dict:
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "loop").symlink_to(root / "loop")
    (root / "afile").write_text("x")
    (root / "adir").mkdir()
    (root / "adir" / "keep").write_text("y")
    os.mkfifo(root / "fifo")
    return {"dangling": ("dangling", "dangling link"), "loop": ("loop", "cannot be followed"),
            "missing parent": ("no/such/out", "does not exist"), "parent is a file": ("afile/out", "is not a folder"),
            "fifo": ("fifo", "exists and is not a")}


@pytest.mark.parametrize("case", ["dangling", "loop", "missing parent", "parent is a file", "existing file",
                                  "read-only parent", "fifo"])
def test_merge_output_problems(fam, tiny_fs, case):
    probs = _problem_paths(fam / "work", tiny_fs)
    probs["existing file"] = ("afile", "exists and is not a folder")
    probs["read-only parent"] = (tiny_fs / "out", "cannot create files in")
    if case == "read-only parent":
        _ro(tiny_fs)
    out, needle = probs[case]
    before = snapshot(fam)
    r = invoke(["merge", "r.yaml", "-o", out, "--force"], fam / "work")
    assert_refused(r, fam, before, needle)


def test_merge_no_space_refused_before_the_work(tmp_path, tiny_fs):
    """Planned weights larger than the free space: refused before any tensor is merged."""
    g = torch.Generator().manual_seed(0)
    t = {f"l.{i}": torch.randn(256, 256, generator=g) for i in range(10)}   # 2.6 MB > 2 MB
    for n in ("a", "b"):
        save_hf(tmp_path / n, t)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"models": [{"model": "a"}, {"model": "b"}],
                                                      "merge_method": "linear"}))
    before = snapshot(tmp_path)
    r = invoke(["merge", "r.yaml", "-o", tiny_fs / "out"], tmp_path)
    assert_refused(r, tmp_path, before, "needs about 2.6 MB", "are free")


def test_merge_no_space_while_writing_leaves_nothing(tmp_path, tiny_fs):
    """The weights fit but a companion file does not: ENOSPC mid-run is one line, nothing left."""
    (paths, _) = toy_family(tmp_path)
    (paths[0] / "tokenizer.json").write_bytes(os.urandom(3_000_000))   # copied beside the weights
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"models": [{"model": "a"}, {"model": "b"}],
                                                      "merge_method": "task_arithmetic", "base_model": "base"}))
    before = snapshot(tmp_path)
    r = invoke(["merge", "r.yaml", "-o", tiny_fs / "out", "-q"], tmp_path)
    assert_refused(r, tmp_path, before, "-o ", "no space left")


@pytest.mark.parametrize("case", ["dangling", "loop", "missing parent", "parent is a file", "existing folder",
                                  "read-only parent", "no space", "fifo"])
def test_stats_output_problems(st, tiny_fs, case):
    probs = _problem_paths(st, tiny_fs)
    probs["existing folder"] = ("adir", "is a folder (expected an output file)")
    probs["read-only parent"] = (tiny_fs / "f.safetensors", "cannot create files in")
    probs["no space"] = (tiny_fs / "f.safetensors", "no space left")
    if case == "read-only parent":
        _ro(tiny_fs)
    if case == "no space":
        (tiny_fs / "filler").write_bytes(b"\0" * (2 * 2**20 - 4096))
    out, needle = probs[case]
    before = snapshot(st)
    r = invoke(["stats", "fisher", *STATS, "-o", out], st)
    assert_refused(r, st, before, needle)


@pytest.mark.parametrize("case", ["dangling", "loop", "missing parent", "existing file", "read-only parent"])
def test_align_output_problems(st, tiny_fs, case):
    probs = _problem_paths(st, tiny_fs)
    probs["existing file"] = ("afile", "exists and is not a folder")
    probs["read-only parent"] = (tiny_fs / "al", "cannot create files in")
    if case == "read-only parent":
        _ro(tiny_fs)
    out, needle = probs[case]
    before = snapshot(st)
    r = invoke(["align", "ref", "oth", "--model-code", "mymodels.py:make", "--input-shape", "1,10",
                "-o", out, "--checkpoints"], st)
    assert_refused(r, st, before, needle)


# ---------------------------------------------------------------- 5. usage errors: one line, the option named
USAGE = [
    (["merge"], "Missing argument 'RECIPE'"),
    (["merge", "r.yaml"], "Missing option '-o'"),
    (["merge", "r.yaml", "-o", "x", "--threads", "many"], "'--threads'"),
    (["merge", "r.yaml", "-o", "x", "--threads", "0"], "'--threads'"),
    (["merge", "r.yaml", "-o", "x", "--bogus"], "No such option '--bogus'"),
    (["merge", "r.yaml", "-o", "x", "--device", "tpu"], "--device"),
    (["merge", "r.yaml", "-o", "x", "--block-size", "0"], "--block-size: must be positive"),
    (["merge", "r.yaml", "-o", "x", "--block-size", "lots"], "--block-size: expected a size"),
    (["merge", "r.yaml", "-o", "x", "--shard-size", "0"], "--shard-size: must be positive"),
    (["stats", "fisher", "m", "--data", "d", "-o", "f", "--batch-size", "0"], "'--batch-size'"),
    (["stats", "fisher", "m", "--data", "d", "-o", "f", "--limit", "-3"], "'--limit'"),
    (["stats", "fisher", "m", "--data", "d", "-o", "f", "--n-examples", "0"], "'--n-examples'"),
    (["stats", "gram", "m", "--data", "d", "-o", "f", "--max-length", "0"], "'--max-length'"),
    (["stats", "activations", "m", "--data", "d", "-o", "f", "--image-size", "0"], "'--image-size'"),
    (["stats", "fisher", "m", "-o", "f"], "Missing option '--data'"),
    (["stats", "nope"], "No such command 'nope'"),
    (["align", "a"], "Missing argument 'OTHERS...'"),
    (["align", "a", "b", "-o", "x", "--max-iter", "0"], "'--max-iter'"),
    (["align", "a", "b", "-o", "x", "--batch-size", "0"], "'--batch-size'"),
    (["align", "a", "b", "-o", "x", "--input-shape", "1,a"], "'--input-shape'"),
    (["align", "a", "b", "-o", "x", "--method", "magic"], "'--method'"),
    (["reproduce", "fisher", "--profile", "huge"], "'--profile'"),
    (["frobnicate"], "No such command 'frobnicate'"),
]


@pytest.mark.parametrize("args,needle", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_error_line(fam, args, needle):
    before = snapshot(fam)
    r = invoke(args, fam / "work")
    assert_refused(r, fam, before, needle)


# ---------------------------------------------------------------- 2/4. locks, races, stale temporaries
def test_a_held_lock_refuses_a_second_run_at_once(fam):
    out = fam / "work" / "merged"
    lock = fam / "work" / ".merged.mergelab-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)            # another run (another process) holds the output
    try:
        before = snapshot(fam)
        r = subprocess.run(MERGELAB + ["merge", "r.yaml", "-o", str(out), "--force"], cwd=fam / "work",
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "another mergelab run holds the output" in lines[0], r.stderr
        assert snapshot(fam) == before
    finally:
        os.close(fd)
        lock.unlink()


def test_final_rename_never_replaces_a_folder_that_appeared(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MergelabError, match="appeared while this run was writing it"):
        with AtomicFolder(out) as tmp:
            (tmp / "w").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("keep")
    assert (out / "theirs").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with AtomicFolder(out, force=True) as tmp:  # --force: replaced
        (tmp / "w").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["w"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_of_a_dead_run_are_removed_live_ones_are_not(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.mergelab-tmp-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    other = tmp_path / ".other.mergelab-tmp-abcd1234"   # another output's: untouched
    other.mkdir()
    with Output(out):                                   # the lock is free: its owner is dead
        pass
    assert not stale.exists() and other.exists()
    # a replacement killed between its two renames is rolled back: the old output comes back
    trash = tmp_path / ".out.mergelab-old-zzzz0000"
    (trash / "old").mkdir(parents=True)
    (trash / "old" / "x").write_text("old output")
    assert clean_stale(out) == [trash] and (out / "x").read_text() == "old output"


def _family_big(root: Path, n: int = 60) -> Path:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.w": torch.randn(64, 256, generator=g) for i in range(n)}
    for k, s in (("base", 0), ("a", 1), ("b", 2)):
        save_hf(root / k, {name: v + 0.01 * s for name, v in base.items()})
    (root / "r.yaml").write_text(yaml.safe_dump({"models": [{"model": "a"}, {"model": "b"}],
                                                 "merge_method": "task_arithmetic", "base_model": "base",
                                                 "parameters": {"weight": 0.5}}))
    for name, params in (("slow", {"delay": 0.05}), ("gated", {"delay": 0.0, "gate": str(root / "go")})):
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"models": [{"model": "a"}, {"model": "b"}],
                                                           "merge_method": "_hostile_slow", "parameters": params}))
    return root


def _start(root: Path, recipe: str, out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(MERGELAB + ["merge", recipe, "-o", out, "--threads", "1", "-q", *extra],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_tmp(root: Path, out: str, proc: subprocess.Popen, timeout: float = 60) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if any(p.name.startswith(f".{out}.mergelab-tmp-") for p in root.iterdir()):
            return True
        time.sleep(0.01)
    return False


def _inputs_of(root: Path) -> dict:
    return {k: v for k, v in snapshot(root).items() if k.split("/")[0] in ("base", "a", "b", "r.yaml", "slow.yaml", "gated.yaml")}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = _family_big(tmp_path_factory.mktemp("big"))
    r = subprocess.run(MERGELAB + ["merge", "slow.yaml", "-o", "reference", "-q"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return root


def _check_interrupted(root, out, proc, signum, inputs, reference="reference"):
    """No temporary left, inputs unchanged; the output is absent, or (a signal after the final
    rename, while the process exits) complete and equal to an uninterrupted run's."""
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert not [p for p in root.iterdir() if p.name.startswith(f".{out}.mergelab-")]
    assert _inputs_of(root) == inputs
    assert "Traceback" not in err
    if proc.returncode == 0:
        assert_same_output(root / out, root / reference)
        return "finished"
    assert proc.returncode == 128 + signum, (proc.returncode, err)
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    if (root / out).exists():  # the signal came after the final rename: the line says it was kept
        assert "complete and kept: " in lines[0] and lines[0].split("complete and kept: ")[1].startswith(
            str(root / out)), err
        assert_same_output(root / out, root / reference)
        return "finished"
    assert lines[0].endswith("; temporary output removed") and "kept" not in lines[0], err
    return "interrupted"


def assert_same_output(a: Path, b: Path):
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_merge_leaves_nothing(big, signum):
    inputs = _inputs_of(big)
    out = f"sig{int(signum)}"
    p = _start(big, "slow.yaml", out)
    assert _wait_for_tmp(big, out, p), "the merge never started writing"
    time.sleep(0.3)
    p.send_signal(signum)
    assert _check_interrupted(big, out, p, signum, inputs) == "interrupted"


@pytest.mark.slow
def test_signals_at_random_points_of_a_real_merge(big):
    """Seeded delays over the whole run of a real (task_arithmetic, 4 KiB blocks) merge.

    The delays are drawn over this machine's own writing time (measured on an uninterrupted run
    with the same options, from the temporary's appearance to the final rename), so a fast machine does
    not see every signal arrive after the merge has finished."""
    rng = random.Random(0)
    inputs = _inputs_of(big)
    r = subprocess.run(MERGELAB + ["merge", "r.yaml", "-o", "reference_ta", "-q"], cwd=big, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p = _start(big, "r.yaml", "timed", "--block-size", "4KiB")
    assert _wait_for_tmp(big, "timed", p), p.communicate()[1]
    t0 = time.monotonic()
    while not (big / "timed").exists() and p.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.002)
    writing = time.monotonic() - t0
    assert p.wait(timeout=300) == 0, p.communicate()[1]
    assert_same_output(big / "timed", big / "reference_ta")
    import shutil
    shutil.rmtree(big / "timed")
    seen = []
    for i in range(9):
        signum = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP][i % 3]
        out = f"rnd{i}"
        p = _start(big, "r.yaml", out, "--block-size", "4KiB")
        if not _wait_for_tmp(big, out, p):
            pytest.fail(p.communicate()[1])
        time.sleep(rng.uniform(0, 1.2 * writing))
        p.send_signal(signum)
        seen.append(_check_interrupted(big, out, p, signum, inputs, "reference_ta"))
        if (big / out).exists():
            shutil.rmtree(big / out)
    assert "interrupted" in seen, (writing, seen)


def test_sigkill_then_rerun_cleans_the_stale_temporary(big):
    out = "killed"
    p = _start(big, "slow.yaml", out)
    assert _wait_for_tmp(big, out, p)
    time.sleep(0.3)
    p.kill()
    p.wait()
    left = [q.name for q in big.iterdir() if q.name.startswith(f".{out}.mergelab-")]
    assert any("mergelab-tmp-" in n for n in left)           # what SIGKILL leaves
    r = subprocess.run(MERGELAB + ["merge", "slow.yaml", "-o", out, "-q"], cwd=big, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not [q for q in big.iterdir() if q.name.startswith(f".{out}.mergelab-")]
    assert_same_output(big / out, big / "reference")


def test_two_concurrent_merges_one_output(big):
    out = "both"
    a = _start(big, "gated.yaml", out, "--force")    # waits at its first tensor until `go` exists
    try:
        assert _wait_for_tmp(big, out, a)
        b = subprocess.run(MERGELAB + ["merge", "gated.yaml", "-o", out, "--force", "-q"], cwd=big,
                           capture_output=True, text=True, timeout=120)
        assert a.poll() is None
    finally:
        (big / "go").write_text("")
    lines = b.stderr.strip().splitlines()
    assert b.returncode == 2 and len(lines) == 1 and "another mergelab run holds the output" in lines[0], b.stderr
    _, err = a.communicate(timeout=300)
    (big / "go").unlink()
    assert a.returncode == 0, err
    assert not [q for q in big.iterdir() if q.name.startswith(f".{out}.mergelab-")]
    assert_same_output(big / out, big / "reference")


def test_ctrl_c_during_start_up_is_quiet(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "mergelab", "merge", "r.yaml", "-o", "x"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:   # until python is loading torch's library
        try:
            if "libtorch" in Path(f"/proc/{p.pid}/maps").read_text():
                break
        except OSError:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    # 130, or -SIGINT when Python itself re-raises the signal on its way out: quiet either way
    assert p.returncode in (130, -signal.SIGINT) and "Traceback" not in err, (p.returncode, err)
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_output_through_a_symlink_lands_where_it_points(fam):
    """Not an accident: ``-o link`` to an existing (empty) folder writes there, the link stays."""
    (fam / "elsewhere").mkdir()
    (fam / "work" / "merged").symlink_to(fam / "elsewhere")
    r = invoke(["merge", "r.yaml", "-o", "merged", "-q"], fam / "work")
    assert r.exit_code == 0, r.stderr
    assert (fam / "work" / "merged").is_symlink() and (fam / "elsewhere" / "model.safetensors").is_file()
    assert not [p for p in fam.rglob(".*mergelab-*")]


def test_no_space_in_the_writer_threads_is_one_error(tmp_path, tiny_fs, monkeypatch):
    """The free-space check passes (the file system fills meanwhile: simulated by a lying
    statvfs); the shards' pwrite then fails with ENOSPC in a worker thread: one MergelabError,
    the temporary folder removed."""
    import mergelab.io.outputs as O
    from mergelab import merge

    monkeypatch.setattr(O, "free_bytes", lambda folder: 10**12)
    g = torch.Generator().manual_seed(0)
    t = {f"l.{i}": torch.randn(256, 256, generator=g) for i in range(10)}   # 2.6 MB > 2 MB
    for n in ("a", "b"):
        save_hf(tmp_path / n, t)
    before = snapshot(tmp_path)
    with pytest.raises(MergelabError, match="no space left on the device"):
        merge({"models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}],
               "merge_method": "linear"}, tiny_fs / "out", quiet=True, threads=2)
    assert snapshot(tmp_path) == before


def test_a_file_system_error_deep_in_any_command_is_one_line(tmp_path, monkeypatch):
    """The CLI's safety net: ENOSPC raised from deep inside a command (here a reproduction
    suite writing its report) is one line naming the file, exit 2."""
    import errno

    import mergelab.experiments.suites as S

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "runs" / "x" / "results.json"))

    monkeypatch.setattr(S, "run_suite", full)
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    r = invoke(["reproduce", "fisher", "--out", "runs/x"], tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "results.json: No space left on device" in lines[0], r.stderr


def test_a_signal_whose_exception_python_drops_still_stops_the_run(tmp_path):
    """Python runs the handler wherever the main thread is; inside a ``__del__`` the raised
    Interrupted is dropped ("Exception ignored ..."). Seen in a loop of late signals: the run
    went on and exited 0 with a traceback on stderr. Now: nothing printed, no commit after
    it (the output is never renamed into place), and the command exits 128 + signum."""
    code = f"""
import os, signal, sys
from pathlib import Path
from mergelab.io.outputs import Interrupted, atomic_file, install_signal_handlers, raise_if_interrupted
install_signal_handlers()

class Dropper:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):   # the handler runs here, inside __del__
            pass

Dropper()
out = Path({str(tmp_path / 'out.bin')!r})
try:
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"x")
except Interrupted as e:
    print("stopped", e.signum, sorted(p.name for p in out.parent.iterdir()))
try:
    raise_if_interrupted()
except Interrupted as e:
    print("pending", e.signum)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)
    assert r.stdout.split("\n")[:2] == ["stopped 15 []", "pending 15"], r.stdout


def test_the_command_exits_128_plus_signum_after_a_dropped_signal(tmp_path, fam):
    """The same through the CLI: a SIGHUP dropped inside a ``__del__`` while the merge is
    planned ends the command with 129 and one line, nothing written."""
    code = ("import os, signal, sys; sys.argv[0] = 'mergelab'\n"
            "import mergelab.engine.run as P\n"
            "class Dropper:\n"
            "    def __del__(self):\n"
            "        os.kill(os.getpid(), signal.SIGHUP)\n"
            "        for _ in range(1000): pass\n"
            "_plan = P.plan\n"
            "def plan(*a, **k):\n"
            "    Dropper()\n"
            "    return _plan(*a, **k)\n"
            "P.plan = plan\n"
            "from mergelab.cli import main; main(prog_name='mergelab')\n")
    before = snapshot(fam)
    r = subprocess.run([sys.executable, "-c", code, "merge", "r.yaml", "-o", "out", "-q"], cwd=fam / "work",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 129, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == ["error: interrupted (SIGHUP); temporary output removed"], r.stderr
    assert snapshot(fam) == before
