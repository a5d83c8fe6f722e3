"""Run the seeds of one suite as separate processes and write one aggregated report.

    python scripts/reproduce_parallel.py SUITE PROFILE OUT SEED [SEED ...] [--jobs N] [--reuse]

Every seed is independent and deterministic (one thread, pinned CPU kernels, its own cached
experts), so the report is the one `mergelab reproduce SUITE --profile PROFILE --seeds ...
--out OUT` writes; on a machine with idle cores it finishes in the time of one seed.
``--jobs N`` runs at most N seeds at a time (``--jobs 1``: one after the other, the way to
measure a budget on a shared machine); ``--reuse`` keeps a seed whose OUT/seed-<s>.json exists.
Each seed's raw results are kept as OUT/seed-<s>.json, and the CPU time (user + system, from
the kernel's rusage of the seed's process: everything it did, imports and data loading
included) of every seed run now in OUT/cpu.json.
"""
import json
import os
import subprocess
import sys
import time
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
    args = sys.argv[1:]
    jobs, reuse = 0, False
    if "--reuse" in args:
        args.remove("--reuse")
        reuse = True
    if "--jobs" in args:
        i = args.index("--jobs")
        jobs = int(args[i + 1])
        del args[i:i + 2]
    suite, profile, out, seeds = args[0], args[1], Path(args[2]), [int(s) for s in args[3:]]
    out.mkdir(parents=True, exist_ok=True)
    cpu_path = out / "cpu.json"
    cpu = json.loads(cpu_path.read_text()) if cpu_path.exists() else {}
    todo = [s for s in seeds if not (reuse and (out / f"seed-{s}.json").exists())]
    running: dict[int, tuple[int, float]] = {}
    failed = False
    while todo or running:
        while todo and (not jobs or len(running) < jobs):
            s = todo.pop(0)
            p = subprocess.Popen([sys.executable, "-c", ONE_SEED, suite, profile, str(s), str(out / f"seed-{s}.json")])
            running[p.pid] = (s, time.time())
        pid, status, ru = os.wait4(-1, 0)
        if pid not in running:
            continue
        s, t0 = running.pop(pid)
        failed |= status != 0
        cpu[str(s)] = {"cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "user_s": round(ru.ru_utime, 1),
                       "sys_s": round(ru.ru_stime, 1), "wall_s": round(time.time() - t0, 1),
                       "max_rss_mb": round(ru.ru_maxrss / 1024), "load": os.getloadavg()[0]}
        cpu_path.write_text(json.dumps(cpu, indent=1))
        print(f"seed {s}: {cpu[str(s)]}", flush=True)
    if failed:
        sys.exit("a seed failed")
    from mergelab.experiments.report import headline, write_report
    from mergelab.experiments.seeds import aggregate

    res = aggregate([json.loads((out / f"seed-{s}.json").read_text()) for s in seeds], seeds)
    res["paths"] = {k: str(v) for k, v in write_report(res, out).items()}
    total = sum(cpu[str(s)]["cpu_s"] for s in seeds if str(s) in cpu)
    print(headline(res))
    print(f"CPU (user+sys, all seeds' processes): {total:.0f} s = {total / 60:.1f} min")
    print(f"report: {res['paths']['report']}")


if __name__ == "__main__":
    main()
