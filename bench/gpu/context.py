"""What every GPU section shares: the run's Context (result rows, time budget, the GPU timer), unit formulas and
hotpath's ratio against every other variant of a case."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..harness import Results

SUITE = "gpu"
DEFAULT_BUDGET_S = 400.0
BUDGET_SPENT = "suite time budget spent"

# (fn, grad_to_none=None) -> [p20, p50, p80] in ms
Bench = Callable[..., Sequence[float]]


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


@dataclass
class Context:
    device: str  # the GPU's name, recorded on every row
    quick: bool = False
    budget_s: float = DEFAULT_BUDGET_S
    torch_device: str = "cuda"
    bench: Optional[Bench] = None  # default triton.testing.do_bench; tests pass a fake one to run on CPU
    failures: int = 0
    start: float = field(default_factory=time.monotonic)
    results: Results = field(init=False)

    def __post_init__(self) -> None:
        self.results = Results(device=self.device)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.results.rows

    def add(self, case: str, variant: str, metric: str, value: Optional[float], unit: str,
            **extra: Any) -> dict[str, Any]:
        return self.results.add(SUITE, case, variant, metric, value, unit, **extra)

    def time_left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def measure(self, fn: Callable[[], object], grad_to_none: Optional[list[torch.Tensor]] = None) -> list[float]:
        """[p20, p50, p80] milliseconds: do_bench's median of the runs in a ~100 ms window after ~25 ms of
        warm-up (it flushes L2 between runs and resets `grad_to_none`'s grads)."""
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
