"""A test-only merge method that sleeps per tensor, so a subprocess merge is reliably mid-way
when another run or a signal arrives (the engine, reader and writer are the real ones)."""
import time

from mergelab.methods.registry import REGISTRY, merge_method

if "_hostile_slow" not in REGISTRY:
    @merge_method("_hostile_slow")
    def _hostile_slow(tensors, base, *, delay: float = 0.05):
        time.sleep(delay)
        return sum(tensors) / len(tensors)
