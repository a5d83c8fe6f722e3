"""Helpers shared by the data and reproduction-suite tests."""
import json
import re
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


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``; "" when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def check_recorded(got: str, recorded: dict[str, str], what: str) -> None:
    """``got`` equals the digest recorded for this CPU vendor.  The pinned AVX2 kernels make
    runs identical across thread counts, hash seeds and Intel machines, but an AMD EPYC VM
    trains the same experts to other last bits than the Intel Xeon that recorded the first
    digests (2026-11-27; not yet explained: MKL's and oneDNN's dispatch on non-Intel CPUs are
    the suspects), so each vendor has its own; on a vendor with none, nothing is compared."""
    vendor = cpu_vendor()
    if vendor not in recorded:
        print(f"{what}: no digest recorded for CPU vendor {vendor!r}; got {got}")
        return
    assert got == recorded[vendor], f"{what} on {vendor}: {got}, recorded {recorded[vendor]}"


def reproduce_smoke(suite: str, out) -> dict:
    """``mergelab reproduce SUITE --profile smoke`` in a subprocess (output to a pipe); checks the
    exit code, progress lines without carriage returns, the printed report path and the
    report's title, and returns the parsed results.json."""
    r = subprocess.run([sys.executable, "-m", "mergelab", "reproduce", suite, "--profile", "smoke",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # progress goes to a pipe here: one line per phase, never a carriage-return redraw
    assert "\r" not in r.stdout + r.stderr
    # (training lines only when the experts are not cached yet; merge phases always)
    assert any(re.match(r".+: \d+(/\d+)? \w+ in [\d.]+ s$", ln) for ln in r.stderr.splitlines()), r.stderr
    assert f"report: {out / 'report.md'}" in r.stdout
    assert (out / "report.md").read_text().startswith(f"# mergelab reproduce: {suite}")
    res = json.loads((out / "results.json").read_text())
    assert res["suite"] == suite and res["profile"] == "smoke"
    return res


def results_digest(res: dict) -> str:
    """sha256 of every accuracy of a results.json (per seed, experts and runs, rounded to 6
    decimals): identical runs on any machine give the same digest."""
    import hashlib

    experts = {s: {t: [round(v, 6) for v in vs] for t, vs in ts.items()} for s, ts in res["experts_seeds"].items()}
    runs = [[r["setting"], r["method"], r["alignment"], r["correction"],
             {t: [round(v, 6) for v in vs] for t, vs in r["acc_seeds"].items()}] for r in res["runs"]]
    blob = json.dumps({"experts": experts, "runs": runs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
