"""Run only the ``fisher`` suite's robust fine-tuning part for several seeds and write its report.

    python scripts/fisher_robust.py PROFILE OUT SEED [SEED ...]

The same code, configuration (``PROFILES[PROFILE]["robust"]``), model seeds and expert cache as
``mergelab reproduce fisher --profile PROFILE`` (whose report includes this part), without the
ensembling and transfer parts: for measuring this part's cost and re-running it alone. One
process, one thread, CPU kernels pinned; prints the CPU time (user + system) of the process.
"""
import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    profile, out, seeds = sys.argv[1], Path(sys.argv[2]), [int(s) for s in sys.argv[3:]]
    from mergelab.experiments.determinism import cpu_report, one_thread, pin_cpu_kernels

    pin_cpu_kernels()
    from mergelab.experiments import data as D
    from mergelab.experiments import train as T
    from mergelab.experiments.report import headline, write_report
    from mergelab.experiments.seeds import aggregate, seed_base
    from mergelab.experiments.suites.common import Timer, versions
    from mergelab.experiments.suites.fisher import PROFILES
    from mergelab.experiments.suites.fisher_robust import run_robust, task_names

    rp = PROFILES[profile]["robust"] if profile in PROFILES else json.loads(profile)  # a JSON dict: tests
    cache = T.ExpertCache(D.cache_dir() / "experts")
    per_seed, t0 = [], time.time()
    with one_thread():
        for s in seeds:
            timer = Timer()
            res = {"suite": "fisher", "profile": f"{profile} (robust part only)", "config": {"robust": rp},
                   "versions": versions(), "splits": {}, "tasks": list(task_names(rp)), "n_classes": {},
                   "experts": {}, "runs": [], "variance_collapse": [], "barrier": [], "notes": [],
                   "timings": timer.t, "timings_cpu": timer.cpu, "seeds": {"run": s, "models": seed_base(s)}}
            run_robust(res, rp, False, seed_base(s), cache, timer)
            per_seed.append(res)
            print(f"seed {s}: CPU {json.dumps(timer.cpu)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    from mergelab.experiments.report import _clean

    (out / "per_seed.json").write_text(json.dumps(_clean(per_seed)))
    res = aggregate(per_seed, seeds)
    res["versions"] = {**res.get("versions", {}), **cpu_report()}
    r = resource.getrusage(resource.RUSAGE_SELF)
    res["process_cpu_s"] = round(r.ru_utime + r.ru_stime, 1)
    paths = write_report(res, out)
    print(headline(res))
    print(f"CPU (user+sys, this process): {res['process_cpu_s']} s; wall {time.time() - t0:.0f} s")
    print(f"report: {paths['report']}")


if __name__ == "__main__":
    main()
