"""A test-only merge method that sleeps per tensor, so a subprocess merge is reliably mid-way
when another run or a signal arrives (the engine, reader and writer are the real ones).
``gate``: a path; each tensor waits until it exists (at most 120 s), so a test decides when
the run may finish."""
import os
import time

from mergelab.methods.registry import REGISTRY, merge_method

if "_hostile_slow" not in REGISTRY:
    @merge_method("_hostile_slow")
    def _hostile_slow(tensors, base, *, delay: float = 0.05, gate: str = ""):
        time.sleep(delay)
        t0 = time.time()
        while gate and not os.path.exists(gate) and time.time() - t0 < 120:
            time.sleep(0.02)
        return sum(tensors) / len(tensors)
