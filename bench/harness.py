"""Measurement plumbing shared by every suite: timing with warm-up and repeats, peak memory, machine facts, rows.

A benchmark measures and reports; it never fails on a time. Every number is the median of several repeats after
warm-up, with its spread (min and max), taken in the same process as the baseline it is compared to.
"""
from __future__ import annotations

import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import psutil
import torch


@dataclass
class Timing:
    median: float  # seconds
    low: float
    high: float
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the repeats disagree."""
        return (self.high - self.low) / self.median if self.median else 0.0


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Timing:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's resident memory (Linux: VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then counts from process start


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or the last reset. On CPU the allocators of torch and
    ONNX Runtime are invisible to tracemalloc, so the process's own high-water mark is the common honest measure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, Optional[str]]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "onnxruntime", "onnx", "tokenizers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed, or broken
            out[name] = None
    return out


def machine_info(threads: int) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": gpu,
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **library_versions(),
    }


@dataclass
class Results:
    """Rows of one run: {suite, case, variant, metric, value, unit, device, ...}."""

    device: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, suite: str, case: str, variant: str, metric: str, value: float, unit: str, **extra) -> None:
        self.rows.append({"suite": suite, "case": case, "variant": variant, "metric": metric,
                          "value": value, "unit": unit, "device": self.device, **extra})

    def add_timing(self, suite: str, case: str, variant: str, metric: str, timing: Timing, work: float,
                   unit: str, **extra) -> float:
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
