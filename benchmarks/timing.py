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


def interleaved_rates(fns: dict, items: int, rounds: int, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Items per second of each of `fns` (name -> callable), timed in alternating rounds so that a change in the
    machine's load hits all of them alike: the median of `rounds` timed calls each, after `warmup` untimed ones."""
    import statistics

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: items / statistics.median(ts) for name, ts in times.items()}
