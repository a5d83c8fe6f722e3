"""Peak memory of each merge method over the baseline (the table of docs/engine.md, "Memory").

    python benchmarks/memory_bound.py [CASE ...] [--runs R]

The fixture and cases of tests/test_memory_bound.py (tests/_mem_cases.py): a base and three
experts (one 4096 x 4096 float32 tensor = 64 MiB plus small ones), their Fisher and Gram
files, written into a temporary folder (removed at the end).  Each case runs R times (default
2), each in a fresh child (tests/_mem_worker.py: warm-up merge of a tiny twin, then VmHWM
after the merge minus VmHWM reset after the warm-up), --threads 1; prints every run and the median.
"""
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _mem_cases as mc  # noqa: E402


def main() -> None:
    args = sys.argv[1:]
    runs = 2
    if "--runs" in args:
        i = args.index("--runs")
        runs = int(args[i + 1])
        del args[i:i + 2]
    root = Path(tempfile.mkdtemp(prefix="mergelab-mem-"))
    try:
        big, tiny = mc.generate(root / "big"), mc.generate(root / "tiny", rows=8, cols=8)
        for c in mc.cases(big):
            if args and c.id not in args:
                continue
            got = []
            for r in range(runs):
                try:
                    m = mc.measure(c, big, tiny, root / "runs" / f"{c.id}{r}")
                except RuntimeError as e:
                    print(f"{c.id}: FAILED {str(e).strip().splitlines()[-1:]}")
                    break
                got.append(m["extra"] / mc.MiB)
                shutil.rmtree(root / "runs", ignore_errors=True)
            if got:
                print(f"{c.id:16s} N={c.n}  bound {c.bound_text():28s} = {c.bound / mc.MiB:6.0f} MiB  "
                      f"measured {', '.join(f'{x:.0f}' for x in got)} MiB (median {statistics.median(got):.0f}), "
                      f"baseline {m['base'] / mc.MiB:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
