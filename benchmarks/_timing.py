"""Timing helper shared by the script modes of the benchmarks (not collected by pytest)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def min_time(fn: Callable[..., Any], *args: Any, rounds: int, warmup: int = 0) -> float:
    """Fastest of ``rounds`` calls, after ``warmup`` untimed ones: the least noisy figure on a
    shared machine, where other jobs only ever add time."""
    for _ in range(warmup):
        fn(*args)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best
