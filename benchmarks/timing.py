"""Timing helper shared by the benchmark parts."""

import time


def best_rate(fn, items: int, repeats: int, warmup: int = 1, clock=time.perf_counter) -> float:
    """Items per second of the fastest of `repeats` timed calls, after `warmup` untimed ones, by `clock`
    (wall time by default; `time.process_time` for CPU time of the whole process)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return items / best
