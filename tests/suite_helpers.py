"""Helpers shared by the data and reproduction-suite tests."""
import json
import subprocess
import sys

import pytest

from mergelab.experiments import data


def ensure_data(names=None) -> None:
    """Install the named offline sources (all by default) into the real cache if missing
    (idempotent); skip only when the registries cannot be reached."""
    names = list(data.SOURCES) if names is None else list(names)
    if not all(data.source_ok(n) for n in names):
        try:
            data.install(names, log=lambda s: None)
        except Exception as e:  # pragma: no cover - depends on the machine
            pytest.skip(f"data cannot be installed here: {e}")


def reproduce_smoke(suite: str, out) -> dict:
    """``mergelab reproduce SUITE --profile smoke`` in a subprocess; checks the exit code, the
    printed report path and the report's title, and returns the parsed results.json."""
    r = subprocess.run([sys.executable, "-m", "mergelab", "reproduce", suite, "--profile", "smoke",
                        "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"report: {out / 'report.md'}" in r.stdout
    assert (out / "report.md").read_text().startswith(f"# mergelab reproduce: {suite}")
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == suite and res["profile"] == "smoke"
    return res
