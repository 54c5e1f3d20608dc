"""Wall-clock timing the way every hotpath measurement does it: warm-up, then the median of several repeats with
the spread (min, max). A measurement reports; it never fails on a time."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass
class Timing:
    median: float  # seconds
    low: float
    high: float
    repeats: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Timing":
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds))

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the repeats disagree."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"median_s": self.median, "min_s": self.low, "max_s": self.high, "repeats": self.repeats}


def _once(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Timing:
    for _ in range(warmup):
        fn()
    return Timing.of([_once(fn) for _ in range(repeats)])


def measure_interleaved(fns: Sequence[Callable[[], Any]], *, warmup: int = 1, repeats: int = 5) -> list[Timing]:
    """Time several functions in the same process, alternating run by run, so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            acc.append(_once(fn))
    return [Timing.of(t) for t in times]
