"""Timing helper shared by the benchmark parts."""

import time


def best_rate(fn, items: int, repeats: int, warmup: int = 1) -> float:
    """Items per second of the fastest of `repeats` timed calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return items / best
