"""Child process of the memory-bound test and benchmark (tests/_mem_cases.py): merge one recipe
and print the memory it used.

    python tests/_mem_worker.py RECIPE.json OUT_DIR [--block-size B] [--threads T] [--warm-up WARM.json]

With ``--warm-up``, WARM.json (the same recipe on tiny tensors) is merged first, so every
module, thread pool and allocator arena the merge uses exists before the baseline.  Then the
freed heap is returned to the OS (``malloc_trim``), the high-water mark is reset to the
resident memory (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``), and ``base`` is read from
the same counter as the peak (VmHWM).  Prints one JSON line: ``base`` and ``peak`` (VmHWM
before and after the merge, bytes), ``extra = peak - base``, ``reset`` (whether the reset worked).
"""
import json
import shutil
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main() -> None:
    import gc

    import torch  # noqa: F401
    import mergelab as ml
    from mergelab.engine import run as _run  # noqa: F401  (import everything the merge imports)

    recipe, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    kw, warm = {}, None
    args = sys.argv[3:]
    for k, v in zip(args[::2], args[1::2]):
        if k == "--warm-up":
            warm = json.loads(open(v).read())
            continue
        kw[k.lstrip("-").replace("-", "_")] = int(v) if k == "--threads" else v
    if warm is not None:
        ml.merge(warm, out + ".warm", quiet=True, checksums=False, **kw)
        shutil.rmtree(out + ".warm")
    gc.collect()
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _status("VmHWM") if reset else _status("VmRSS")
    ml.merge(recipe, out, quiet=True, checksums=False, **kw)
    peak = _status("VmHWM")
    print(json.dumps({"base": base, "peak": peak, "extra": peak - base, "reset": reset}))


if __name__ == "__main__":
    main()
