"""What every GPU section shares: the run's Context (result rows, the current section's time budget and compile
seconds, the GPU timer), unit formulas and hotpath's ratio against every other variant of a case.

Time is read from `Context.clock` (time.monotonic on a GPU run; tests give a fake clock). Three regions:
  - checks: correctness, always run in full (never cut by a budget);
  - warm-up (`Context.warm`): the first call of each timed function, which compiles and autotunes its kernels; its
    seconds are the section's `compile_s`, kept out of every timed region;
  - timed (`Context.measure`): do_bench on an already-compiled function.
A section's budget is wall time (checks + warm-ups + timings); once it is spent, each remaining timing is a row
with `skipped` = the budget reason (`Context.out_of_time`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from ..harness import Results

SUITE = "gpu"
BUDGET_SPENT = "time budget spent"  # every budget skip reason contains this

# (fn, grad_to_none=None) -> [p20, p50, p80] in ms
Bench = Callable[..., Sequence[float]]
R = TypeVar("R")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


@dataclass
class Context:
    device: str  # the GPU's name, recorded on every row
    quick: bool = False
    budget_s: float = math.inf  # the current section's budget
    torch_device: str = "cuda"
    bench: Optional[Bench] = None  # default triton.testing.do_bench; tests pass a fake one to run on CPU
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    section: str = ""
    compile_s: float = 0.0  # the current section's warm-up (compile + autotune + first run) seconds
    results: Results = field(init=False)
    start: float = field(init=False)
    section_start: float = field(init=False)

    def __post_init__(self) -> None:
        self.results = Results(device=self.device)
        self.start = self.section_start = self.clock()

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.results.rows

    def add(self, case: str, variant: str, metric: str, value: Optional[float], unit: str,
            **extra: Any) -> dict[str, Any]:
        return self.results.add(SUITE, case, variant, metric, value, unit, **extra)

    # ------------------------------------------------------------------------------------------ section budget
    def begin_section(self, name: str, budget_s: float) -> None:
        self.section, self.budget_s = name, budget_s
        self.section_start, self.compile_s = self.clock(), 0.0

    def elapsed(self) -> float:
        """Seconds since the current section began."""
        return self.clock() - self.section_start

    def time_left(self) -> float:
        return self.budget_s - self.elapsed()

    def budget_reason(self) -> str:
        return f"{self.section or 'section'} {BUDGET_SPENT} ({self.budget_s:g} s)"

    def out_of_time(self, case: str, variant: str, metric: str, unit: str = "ms", **extra: Any) -> bool:
        """True (and a `skipped` row for this timing) once the section's budget is spent."""
        if self.time_left() > 0:
            return False
        self.add(case, variant, metric, None, unit, skipped=self.budget_reason(), **extra)
        return True

    # ------------------------------------------------------------------------------------------ timing
    def synchronize(self) -> None:
        if self.torch_device == "cuda":
            torch.cuda.synchronize()

    def warm(self, fn: Callable[..., R], *args: Any) -> R:
        """Call fn(*args) once, outside any timed region: the first call compiles and autotunes its kernels (and
        runs them once). Its seconds are added to the section's compile_s."""
        t0 = self.clock()
        try:
            out = fn(*args)
            self.synchronize()
            return out
        finally:
            self.compile_s += self.clock() - t0

    def measure(self, fn: Callable[[], object], grad_to_none: Optional[list[torch.Tensor]] = None) -> list[float]:
        """[p20, p50, p80] milliseconds: do_bench's median of the runs in a ~100 ms window after ~25 ms of
        warm-up (it flushes L2 between runs and resets `grad_to_none`'s grads). Call `warm` on fn first: do_bench's
        own warm-up is a time window, and a compile inside it would skew its estimate of the run count."""
        if self.bench is not None:
            return list(self.bench(fn, grad_to_none=grad_to_none))
        import triton.testing

        return list(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                            quantiles=[0.2, 0.5, 0.8]))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def failure_reason(e: BaseException) -> str:
    """One line saying why a variant could not run: it is recorded as the row's `skipped` reason."""
    return "out of memory" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def ratio_rows(ctx: Context, case_name: str, base: str = "hotpath_triton") -> None:
    """hotpath's speedup over every other variant measured on the same case (> 1: hotpath faster)."""
    times = {}
    for r in ctx.rows:
        if r["case"] == case_name and r["metric"].endswith("_ms") and isinstance(r["value"], (int, float)):
            times[(r["variant"], r["metric"])] = r["value"]
    for (variant, metric), ms in sorted(times.items()):
        if variant == base or (base, metric) not in times:
            continue
        ctx.add(case_name, base, f"speedup_vs_{variant}_{metric[:-3]}", ms / times[(base, metric)], "x")
