"""One timed child process: the measuring loop shared by merge_throughput.py and scale.py.

:func:`run_child` runs a command and returns its wall seconds, peak RSS (VmHWM polled from
/proc), exit status and CPU seconds (user + system of the reaped child: less sensitive to
other load than wall time).  :func:`measure` runs one merge command into ``out`` (removed
before and after) and adds the bytes it wrote; :func:`summarise` folds repeated runs into
median / min / max.
"""
from __future__ import annotations

import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def run_child(cmd: list[str]) -> tuple[float, int, int, float]:
    """Wall seconds, peak RSS (bytes), exit status and CPU seconds (user + system) of ``cmd``."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    status = Path(f"/proc/{p.pid}/status")
    err: list[bytes] = []
    th = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    th.start()
    while p.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    th.join()
    if p.returncode != 0:
        msg = (err[0] if err else b"").decode(errors="replace").strip().splitlines()[-1:]
        print(f"  ! {' '.join(cmd[:3])} exited {p.returncode}: {msg}", file=sys.stderr)
    return wall, peak, p.returncode, cpu


def weight_bytes(folder: Path) -> int:
    """Bytes of the ``*.safetensors`` files of ``folder`` and of its sub-folders (variants)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors")) if Path(folder).is_dir() else 0


def measure(cmd: list[str], out: Path) -> dict:
    """One run of a merge command writing into ``out`` (removed before and after):
    ``{"wall_s", "cpu_s", "peak_rss", "ok", "written"}``."""
    shutil.rmtree(out, ignore_errors=True)
    try:
        wall, rss, rc, cpu = run_child(cmd)
        return {"wall_s": wall, "cpu_s": cpu, "peak_rss": rss, "ok": rc == 0,
                "written": weight_bytes(out) if rc == 0 else 0}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def summarise(runs: list[dict]) -> dict:
    """Median, min and max wall; median CPU; the largest peak RSS; ok only if every run was."""
    walls = [r["wall_s"] for r in runs]
    return {"runs": len(runs), "ok": all(r["ok"] for r in runs),
            "wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "peak_rss": max(r["peak_rss"] for r in runs),
            "written": max(r["written"] for r in runs)}
