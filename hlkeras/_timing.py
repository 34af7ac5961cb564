"""The one timer of hlkeras and its benchmarks: median of repeats after a
warm-up. (It lives in the package, not in `benchmarks/`, because
`hlkeras.export` measures latency with it and nothing imports `benchmarks/`.)
"""

import statistics
import time


def time_calls(run_once, repeats, warmup):
    """Wall seconds of each of `repeats` calls of `run_once()`, after
    `warmup` untimed calls (compilation, caches, thread pools)."""
    for _ in range(warmup):
        run_once()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        seconds.append(time.perf_counter() - start)
    return seconds


def median_seconds(run_once, repeats=50, warmup=5):
    """Median wall seconds of `run_once()`: a shared machine's spikes do not
    move a median the way they move a mean."""
    return statistics.median(time_calls(run_once, repeats, warmup))


def time_interleaved(steps, repeats, warmup):
    """Times several steps against each other on a noisy machine.

    Each step is warmed up, then `repeats` rounds run one call of every step,
    reversing the order every other round, so a change in machine load hits
    all of them alike. Returns one list of wall seconds per step.
    """
    for step in steps:
        for _ in range(warmup):
            step()
    seconds = [[] for _ in steps]
    for round_index in range(repeats):
        order = list(range(len(steps)))
        if round_index % 2:
            order.reverse()
        for index in order:
            start = time.perf_counter()
            steps[index]()
            seconds[index].append(time.perf_counter() - start)
    return seconds


def median_pair_ratio(numerator_seconds, denominator_seconds):
    """Median of the per-round ratios of two `time_interleaved` lists: the
    two calls of a round saw about the same load."""
    return statistics.median(a / b for a, b in zip(numerator_seconds, denominator_seconds))
