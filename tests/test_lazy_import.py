"""Start-up: `import mergelab` and every `--help` stay free of torch; the lazy public names
still resolve to the same objects as their defining modules."""
import subprocess
import sys
import textwrap

import mergelab


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_every_help_imports_no_torch():
    r = _run("""
        import sys
        from click.testing import CliRunner
        import mergelab.cli as cli

        def walk(cmd, path):
            yield path
            for name, sub in getattr(cmd, "commands", {}).items():
                yield from walk(sub, path + [name])

        paths = list(walk(cli.main, []))
        assert len(paths) > 5, paths
        for p in paths:
            res = CliRunner().invoke(cli.main, p + ["--help"])
            assert res.exit_code == 0, (p, res.output)
            assert "Usage:" in res.output, p
            heavy = sorted(m for m in ("torch", "scipy", "numpy", "transformers") if m in sys.modules)
            assert not heavy, (p, heavy)
        print("ok", len(paths))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_import_mergelab_is_light():
    r = _run("""
        import sys, mergelab, mergelab.io, mergelab.io.outputs
        assert "torch" not in sys.modules
        assert mergelab.__version__
        assert "merge" in dir(mergelab) and set(mergelab.__all__) <= set(dir(mergelab))
    """)
    assert r.returncode == 0, r.stderr


def test_all_names_resolve_to_their_definitions():
    import importlib

    for name in mergelab.__all__:
        value = getattr(mergelab, name)
        assert value is not None, name
        if name != "__version__":
            home = importlib.import_module(mergelab._LAZY[name], "mergelab")
            assert value is getattr(home, name), name
    for name in mergelab.io.__all__:
        assert getattr(mergelab.io, name) is not None, name


def test_functions_keep_their_names_over_same_named_submodules():
    # mergelab.merge (module merge.py) and mergelab.repair (a package) are also functions;
    # importing the submodules must not rebind the public names to the modules.
    r = _run("""
        import mergelab.merge, mergelab.repair.tact, mergelab
        from mergelab import merge, repair
        assert callable(mergelab.merge) and mergelab.merge is merge, mergelab.merge
        assert callable(mergelab.repair) and mergelab.repair is repair, mergelab.repair
        import sys
        assert sys.modules["mergelab.merge"].merge is merge
    """)
    assert r.returncode == 0, r.stderr


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError):
        mergelab.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from mergelab import no_such_name", {})


# Modules a plain merge (safetensors in, no align/repair/tact section) has no use for; each
# cost start-up time before it was deferred.
_NOT_FOR_A_PLAIN_MERGE = (
    "mergelab.stats.activations", "mergelab.stats.fisher", "mergelab.stats.gram",
    "mergelab.stats.sites", "mergelab.repair.correct", "mergelab.repair.repair",
    "mergelab.repair.tact", "mergelab.align", "mergelab.experiments", "transformers", "scipy",
    "ctypes.util",
)


def test_a_plain_merge_imports_only_what_it_uses(tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for n in ("a", "b"):
        save_file({"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)},
                  str(tmp_path / f"{n}.safetensors"))
    (tmp_path / "r.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a.safetensors'}\n"
        f"  - model: {tmp_path / 'b.safetensors'}\n")
    r = _run(f"""
        import runpy, sys
        sys.argv = ["mergelab", "merge", {str(tmp_path / 'r.yaml')!r}, "-o", {str(tmp_path / 'out')!r}, "-q"]
        try:
            runpy.run_module("mergelab", run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), e.code
        loaded = sorted(m for m in {_NOT_FOR_A_PLAIN_MERGE!r} if m in sys.modules)
        assert not loaded, loaded
        assert "torch" in sys.modules and "mergelab.stats.distributed" in sys.modules
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    assert (tmp_path / "out" / "model.safetensors").is_file()
