"""Child process of tests/test_memory_bound.py: merge one recipe and print the memory used.

    python tests/_mem_worker.py RECIPE.json OUT_DIR [--block-size B] [--threads T]

Prints one JSON line: ``base`` (VmRSS after importing torch and mergelab, bytes), ``peak``
(VmHWM after the merge, bytes) and ``extra = peak - base``.
"""
import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def main() -> None:
    import torch  # noqa: F401
    import mergelab as ml
    from mergelab.engine import run as _run  # noqa: F401  (import everything the merge imports)

    recipe, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    kw = {}
    args = sys.argv[3:]
    for k, v in zip(args[::2], args[1::2]):
        kw[k.lstrip("-").replace("-", "_")] = int(v) if k == "--threads" else v
    # reset the high-water mark to the current RSS (Linux >= 4.0: write 5 to clear_refs)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _status("VmRSS")
    ml.merge(recipe, out, quiet=True, checksums=False, **kw)
    peak = _status("VmHWM")
    print(json.dumps({"base": base, "peak": peak, "extra": peak - base}))


if __name__ == "__main__":
    main()
