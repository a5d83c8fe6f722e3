"""A merge of three big Llama-architecture bf16 checkpoints under a memory limit.

    python benchmarks/scale.py --size 7b|1b|110m [--methods task_arithmetic,ties,dare_ties]
        [--limit 4GiB] [--workdir DIR] [--threads T] [--json FILE]

Generates a base and two fine-tune-like variants (the generator of
benchmarks/merge_throughput.py: bf16, 1 GB shards) in a temporary folder under ``--workdir``
(checks the free disk first and stops with one line if it is short), merges them with each
method in a child process run under ``RLIMIT_AS = --limit`` (address space: every mapping
counts, so it bounds resident memory from above), and reports per method: wall, CPU, peak
RSS (VmHWM polled from /proc), throughput (bytes of weights read + written per second) next
to the machine's read bandwidth (one generated shard read with ``os.pread`` after
``posix_fadvise(DONTNEED)``: a cold-ish page cache) and copy bandwidth (a numpy memcpy of
512 MiB).  Everything generated is deleted at the end, whatever happens.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_throughput as mt  # noqa: E402  (the checkpoint generator)
from childproc import measure  # noqa: E402  (the timed child process, shared with merge_throughput.py)

SIZES = ("7b", "1b", "110m", "tiny")


def parse_bytes(s: str) -> int:
    s = s.strip().upper().rstrip("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if s.endswith("I"):
        s = s[:-1]
    return int(float(s[:-1]) * mult[s[-1]]) if s and s[-1] in mult else int(s)


def recipe(method: str, base: Path, a: Path, b: Path) -> dict:
    if method == "dare_ties":
        return {"models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                           {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}],
                "merge_method": "dare_ties", "base_model": str(base), "dtype": "bfloat16", "seed": 0}
    return mt.recipe(method, base, a, b)


def read_bandwidth(folder: Path) -> float:
    """Bytes per second of reading the largest shard of ``folder`` after dropping it from the
    page cache (``posix_fadvise(DONTNEED)``; dirty pages are synced first)."""
    f = max(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    size = f.stat().st_size
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(64 * 2**20)
        view = memoryview(buf)
        t0 = time.perf_counter()
        off = 0
        while off < size:
            n = os.preadv(fd, [view], off)
            if n <= 0:
                break
            off += n
        return off / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def copy_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    import numpy as np
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def with_limit(cmd: list[str], limit: int) -> list[str]:
    """``cmd`` run with RLIMIT_AS set (through ``prlimit`` when present, else a tiny Python shim)."""
    if shutil.which("prlimit"):
        return ["prlimit", f"--as={limit}", "--"] + cmd
    shim = f"import os,resource,sys;resource.setrlimit(resource.RLIMIT_AS,({limit},{limit}));os.execvp(sys.argv[1],sys.argv[1:])"
    return [sys.executable, "-c", shim] + cmd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="7b", choices=SIZES)
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    ap.add_argument("--limit", default="4GiB", help="RLIMIT_AS of each merge (default 4GiB; 0: none)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: $TMPDIR)")
    ap.add_argument("--threads", type=int, default=None, help="mergelab --threads")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    limit = parse_bytes(args.limit)
    methods = args.methods.split(",")
    for m in methods:
        if m not in ("linear", "task_arithmetic", "ties", "dare_ties"):
            raise SystemExit(f"error: --methods: unknown method '{m}', expected linear, task_arithmetic, ties or dare_ties")
    workdir = Path(args.workdir or tempfile.gettempdir())
    if not workdir.is_dir():
        raise SystemExit(f"error: --workdir: {workdir} is not a folder")
    nparam = mt.n_params(args.size)
    need = int(nparam * 2 * 4 * 1.02)  # three checkpoints + one output, bf16
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(f"error: {workdir}: {free / 1e9:.1f} GB free, --size {args.size} needs "
                         f"{need / 1e9:.1f} GB (3 checkpoints + 1 output); use --workdir or a smaller --size")
    cbw = copy_bandwidth()
    print(f"size {args.size}: {nparam / 1e9:.2f}B params; cpus {os.cpu_count()}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; limit RLIMIT_AS={limit / 2**30:.1f} GiB; "
          f"copy bandwidth {cbw / 1e9:.2f} GB/s", flush=True)
    rows = []
    root = Path(tempfile.mkdtemp(prefix=f"mergelab-scale-{args.size}-", dir=workdir))
    try:
        t0 = time.perf_counter()
        base, a, b = root / "base", root / "a", root / "b"
        for folder, seed, of in ((base, 0, None), (a, 1, 0), (b, 2, 0)):
            mt.generate(folder, args.size, seed, of)
        print(f"generated 3 checkpoints ({3 * mt.weight_bytes(a) / 1e9:.1f} GB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        rbw = read_bandwidth(a)
        print(f"read bandwidth (one shard, page cache dropped): {rbw / 1e9:.2f} GB/s", flush=True)
        import yaml
        for method in methods:
            rp = root / f"{method}.yaml"
            rp.write_text(yaml.safe_dump(recipe(method, base, a, b)))
            reads = mt.weight_bytes(a) + mt.weight_bytes(b) + (mt.weight_bytes(base) if method != "linear" else 0)
            cmd = [sys.executable, "-m", "mergelab", "merge", str(rp), "-o", str(root / "out"), "--quiet",
                   "--no-checksums"] + (["--threads", str(args.threads)] if args.threads else [])
            if limit:
                cmd = with_limit(cmd, limit)
            m = measure(cmd, root / "out")
            wall, rss, rc, cpu, written = m["wall_s"], m["peak_rss"], 0 if m["ok"] else 1, m["cpu_s"], m["written"]
            row = {"size": args.size, "params": nparam, "method": method, "ok": rc == 0,
                   "limit_gib": round(limit / 2**30, 2), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                   "peak_rss_mib": round(rss / 2**20), "gb_per_s": round((reads + written) / wall / 1e9, 3),
                   "read_gb_per_s": round(rbw / 1e9, 2), "copy_gb_per_s": round(cbw / 1e9, 2),
                   "load": round(os.getloadavg()[0], 1)}
            rows.append(row)
            print(f"  {method:<16} wall {wall:7.1f} s  cpu {cpu:7.1f} s  peak RSS {rss / 2**20:6.0f} MiB  "
                  f"{row['gb_per_s']:.2f} GB/s{'' if rc == 0 else '  FAILED'}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| size | method | limit | wall (s) | CPU (s) | peak RSS (MiB) | read+write GB/s | disk read GB/s | copy GB/s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['method']} | {r['limit_gib']} GiB | {r['wall_s']} | {r['cpu_s']} | "
              f"{r['peak_rss_mib']}{'' if r['ok'] else ' FAILED'} | {r['gb_per_s']} | {r['read_gb_per_s']} | "
              f"{r['copy_gb_per_s']} | {r['load']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
