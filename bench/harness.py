"""Measurement plumbing shared by every suite: peak memory and the result rows. Timing is common.timing's and the
machine facts are common.machine's.

A benchmark measures and reports; it never fails on a time. Every number is the median of several repeats after
warm-up, with its spread (min and max), taken in the same process as the baseline it is compared to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import psutil

from common.machine import peak_rss_mib
from common.timing import Timing

__all__ = ["Results", "peak_rss_mib", "reset_peak_rss", "row", "rss_mib"]


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's resident memory (Linux: VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then counts from process start


def row(suite: str, case: str, variant: str, metric: str, value: Optional[float], unit: str, device: str,
        **extra: Any) -> dict[str, Any]:
    """One result row: the required keys first, then the extras (shapes, spread, notes)."""
    return {"suite": suite, "case": case, "variant": variant, "metric": metric, "value": value, "unit": unit,
            "device": device, **extra}


@dataclass
class Results:
    """Rows of one run: {suite, case, variant, metric, value, unit, device, ...}."""

    device: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, suite: str, case: str, variant: str, metric: str, value: Optional[float], unit: str,
            **extra: Any) -> dict[str, Any]:
        r = row(suite, case, variant, metric, value, unit, self.device, **extra)
        self.rows.append(r)
        return r

    def add_timing(self, suite: str, case: str, variant: str, metric: str, timing: Timing, work: float,
                   unit: str, **extra: Any) -> float:
        """Record work/second (or seconds per work when unit starts with 'ms/') with the spread of the repeats."""
        if unit.startswith("ms/"):
            value, low, high = (1e3 * timing.median / work, 1e3 * timing.low / work, 1e3 * timing.high / work)
        else:
            value, low, high = work / timing.median, work / timing.high, work / timing.low
        self.add(suite, case, variant, metric, value, unit, low=low, high=high, repeats=timing.repeats, **extra)
        return value

    def skip(self, suite: str, variant: str, reason: str) -> None:
        """A variant that cannot run here is listed with its reason, never silently dropped."""
        self.skipped.append({"suite": suite, "variant": variant, "reason": reason})

    def value(self, suite: str, variant: str, metric: str) -> Optional[float]:
        for r in self.rows:
            if (r["suite"], r["variant"], r["metric"]) == (suite, variant, metric):
                return r["value"]
        return None
