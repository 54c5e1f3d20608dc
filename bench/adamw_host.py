"""Host time of one `kernels.FusedAdamW` step for GPT-2 124M, measured on the CPU with the Triton launches recorded
instead of run, and the launches of one step for the static (sm_90a) kernel report.

What is timed: ``opt.step()`` on GPT-2 124M-shaped CPU parameters (148 tensors: wte 50257x768, wpe 1024x768, 12
layers of ln_1 / attn.c_attn / attn.c_proj / ln_2 / mlp.c_fc / mlp.c_proj weights and biases, ln_f), in the two
groups `model.train` uses (weight decay on matrices, none on vectors and norms), fp32 or bf16 parameters with fp32
master weights. The step takes the Triton path for CPU tensors (`kernels.fused_adamw._triton_path_on_cpu`, a
private hook) and `bench.sm90.capture_launches` records each launch instead of running it, so everything the host
does per step is timed -- plan validation, step-count update (a real CPU op here, one small device op on a GPU),
launch arguments -- except the launch itself (Triton's binder and the driver call, ~10-30 us per launch on a GPU
host; `launches_per_step` says how many).

Gradients: ``grads="fresh"`` (default) gives every parameter a new ``.grad`` object at the same address before
each step (outside the timed region), which is what ``zero_grad(set_to_none=True)`` plus the CUDA caching
allocator gives a training loop; ``grads="same"`` keeps the same objects (``set_to_none=False``, or a CUDA graph);
``grads="moved"`` gives new gradients at new addresses every step (the worst case: a new launch table each step).

Memory: parameters, gradients and the optimizer state (the tensors FusedAdamW would create, made here with
``torch.empty``) are never touched, since no kernel runs: a GPT-2 run needs little memory and starts in well under
a second. The first step (plan build) is untimed and reported apart.

    python -m bench.adamw_host [--dtype fp32|bf16-master|both] [--steps 50] [--grads fresh|same|moved] [--json]

A benchmark measures and reports: nothing here asserts a time.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from typing import Any, Iterator, Optional, Sequence

import torch

from common import cli

DTYPES = ("fp32", "bf16-master")
N_EMBD, N_LAYER, VOCAB, N_CTX = 768, 12, 50257, 1024


def gpt2_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 124M (Hugging Face layout: Conv1D weights are (in, out))."""
    d = N_EMBD
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(VOCAB, d), (N_CTX, d), *layer * N_LAYER, (d,), (d,)]


@contextlib.contextmanager
def _recording() -> Iterator[list]:
    """FusedAdamW takes its Triton path on CPU tensors and every launch is recorded, not run. TRITON_INTERPRET is
    off inside (under it the kernel would be decorated for the interpreter and really run)."""
    from bench import sm90
    from kernels import fused_adamw

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with fused_adamw._triton_path_on_cpu(), sm90.capture_launches() as launches:
            yield launches
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _optimizer(dtype: str, shapes: Sequence[tuple[int, ...]]) -> tuple[Any, list[torch.Tensor]]:
    from kernels import FusedAdamW

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    pdtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    params = [torch.empty(s, dtype=pdtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = FusedAdamW([g for g in groups if g["params"]], lr=6e-4, betas=(0.9, 0.95),
                     master_weights=dtype == "bf16-master")
    for p in params:  # the state FusedAdamW would create, left uninitialised: the launches are never run
        state = opt.state[p]
        state["step"] = torch.zeros(())
        state["exp_avg"], state["exp_avg_sq"] = torch.empty(p.shape), torch.empty(p.shape)
        if dtype == "bf16-master":
            state["master_param"] = torch.empty(p.shape)
    return opt, params


GRADS = ("fresh", "same", "moved")


def _new_grads(params: list[torch.Tensor], grads: str, keep: list) -> None:
    """fresh: new .grad objects at the same addresses (what set_to_none=True and the caching allocator give);
    moved: new gradients at new addresses (the previous ones are kept alive in `keep` so nothing is reused)."""
    if grads == "fresh":
        for p in params:
            p.grad = p.grad.view_as(p.grad)  # type: ignore[union-attr]
    elif grads == "moved":
        keep[:] = [p.grad for p in params]
        for p in params:
            p.grad = torch.empty_like(p)


def host_time_per_step(dtype: str = "fp32", steps: int = 50, *, warmup: int = 3, grads: str = "fresh",
                       shapes: Optional[Sequence[tuple[int, ...]]] = None) -> dict[str, Any]:
    """Time ``FusedAdamW.step()`` on the host (launches recorded, not run); milliseconds per step.

    Returns dtype, grads, steps, median_ms / min_ms / max_ms of the timed steps, first_step_ms (the plan build: not
    steady state), n_param_tensors, n_params, launches_per_step, programs_per_step (sum of the
    launch grids) and the machine (CPU, threads, torch / triton versions)."""
    if grads not in GRADS:
        raise ValueError(f"grads must be one of {GRADS}, got {grads!r}")
    shapes = list(shapes) if shapes is not None else gpt2_shapes()
    opt, params = _optimizer(dtype, shapes)
    times: list[float] = []
    keep: list = []
    with _recording() as launches:
        t0 = time.perf_counter()
        opt.step()
        first = time.perf_counter() - t0
        for i in range(warmup + steps):
            _new_grads(params, grads, keep)
            before = len(launches)
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt * 1e3)
    step_launches = launches[before:]
    return {
        "dtype": dtype, "grads": grads, "steps": steps,
        "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
        "first_step_ms": first * 1e3,
        "n_param_tensors": len(params), "n_params": sum(p.numel() for p in params),
        "launches_per_step": len(step_launches),
        "programs_per_step": sum(int(launch.grid[0]) for launch in step_launches),
        "machine": _machine(),
    }


def capture_step(dtype: str = "fp32", shapes: Optional[Sequence[tuple[int, ...]]] = None) -> list:
    """The Triton launches (`bench.sm90.Launch`) of one steady-state ``FusedAdamW.step()`` on GPT-2 124M-shaped CPU
    parameters (or ``shapes``), fp32 or bf16 with fp32 master weights: feed them to `bench.sm90.compile_launch`."""
    opt, _ = _optimizer(dtype, list(shapes) if shapes is not None else gpt2_shapes())
    with _recording() as launches:
        opt.step()  # builds the plan
        first = len(launches)
        opt.step()
    return launches[first:]


def _machine() -> dict[str, Any]:
    from common.machine import cpu_model, library_versions

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(), **library_versions(("torch", "triton"))}


def main(argv: Optional[list[str]] = None) -> int:
    ap = cli.parser("python -m bench.adamw_host", __doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    ap.add_argument("--steps", type=cli.positive_int, default=50)
    ap.add_argument("--grads", choices=GRADS, default="fresh")
    ap.add_argument("--json", action="store_true", help="print one JSON object per dtype")
    args = ap.parse_args(argv)
    for dtype in DTYPES if args.dtype == "both" else (args.dtype,):
        r = host_time_per_step(dtype, args.steps, grads=args.grads)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"FusedAdamW host time per step, GPT-2 124M {dtype:<11} ({r['n_param_tensors']} tensors, "
                  f"{r['n_params'] / 1e6:.1f}M params, grads {r['grads']}): median {r['median_ms']:.3f} ms "
                  f"(min {r['min_ms']:.3f}, max {r['max_ms']:.3f}, {r['steps']} steps), "
                  f"{r['launches_per_step']} launches / {r['programs_per_step']} programs per step "
                  f"[launches recorded, not run; first step {r['first_step_ms']:.0f} ms; "
                  f"load {r['machine']['load_avg_1min']:.1f} on {r['machine']['cpu_count']} CPUs]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
