"""Run the seeds of one suite as separate processes and write one aggregated report.

    python scripts/reproduce_parallel.py SUITE PROFILE OUT SEED [SEED ...]

Every seed is independent and deterministic (one thread, pinned CPU kernels, its own cached
experts), so the report is the one `mergelab reproduce SUITE --profile PROFILE --seeds ...
--out OUT` writes; on a machine with idle cores it finishes in the time of one seed. Each
seed's raw results are kept as OUT/seed-<s>.json.
"""
import json
import subprocess
import sys
from pathlib import Path

ONE_SEED = """
import json, sys
from mergelab.experiments.determinism import cpu_report, one_thread, pin_cpu_kernels
pin_cpu_kernels()
import importlib
from mergelab.experiments.report import _clean
from mergelab.experiments.suites import _MODULES
suite, profile, seed, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
mod = importlib.import_module("mergelab.experiments.suites." + _MODULES[suite])
with one_thread():
    res = mod.run(profile, quiet=False, seed=seed)
res["versions"] = {**res.get("versions", {}), **cpu_report()}
open(path, "w").write(json.dumps(_clean(res)))
"""


def main() -> None:
    suite, profile, out, seeds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), [int(s) for s in sys.argv[4:]]
    out.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", ONE_SEED, suite, profile, str(s), str(out / f"seed-{s}.json")])
             for s in seeds]
    if any(p.wait() != 0 for p in procs):
        sys.exit("a seed failed")
    from mergelab.experiments.report import headline, write_report
    from mergelab.experiments.seeds import aggregate

    res = aggregate([json.loads((out / f"seed-{s}.json").read_text()) for s in seeds], seeds)
    res["paths"] = {k: str(v) for k, v in write_report(res, out).items()}
    print(headline(res))
    print(f"report: {res['paths']['report']}")


if __name__ == "__main__":
    main()
