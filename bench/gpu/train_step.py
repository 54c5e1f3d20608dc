"""Training-step section: one step (forward, loss, backward, optimizer step, zero_grad) of the gpt2 preset as
model/train.py does it (bf16 autocast on CUDA, fp32 parameters).

Target (issue 4): patch() + FusedAdamW >= 1.2x the eager reference step (the model's SDPA attention +
torch.optim.AdamW).

Check (always run): a few steps of a 2-layer gpt2-shaped model, the eager reference against patch() + FusedAdamW on
the same batch; every step's loss must agree within CHECK_LOSS_RTOL (bf16 autocast on both sides).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

import torch

from .checks import check_error, check_row, print_verdict
from .context import Context, failure_reason, ratio_rows

TRAIN_BATCH, TRAIN_SEQ = 8, 1024
TRAIN_VARIANTS = ("eager_reference", "eager_torch_fused_adamw", "hotpath_patch_fused_adamw")
CHECK_LAYERS, CHECK_BATCH, CHECK_SEQ, CHECK_STEPS = 2, 2, 256, 3
CHECK_LOSS_RTOL = 2e-3  # bf16 autocast: both sides round activations to 8 bits of mantissa (~4e-3 per value)


def _build(variant: str, cfg: Any, dev: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (same seed for every variant) and its optimizer, with weight decay on matrices only."""
    import kernels
    from model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(cfg).to(dev).train()
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if variant == "hotpath_patch_fused_adamw":
        kernels.patch(model)
        return model, kernels.FusedAdamW(groups, lr=6e-4, betas=(0.9, 0.95))
    if variant == "eager_torch_fused_adamw":
        return model, torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=dev == "cuda")
    if variant == "eager_reference":
        return model, torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95))
    raise ValueError(f"unknown train step variant {variant!r}")


def _step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, inp: torch.Tensor, tgt: torch.Tensor,
             autocast: ContextManager[Any]) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with autocast:
            logits = model(inp)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _measure_step(ctx: Context, case: str, variant: str, step: Callable[[], torch.Tensor], B: int, T: int) -> None:
    first_loss = ctx.warm(step).item()  # compile / autotune outside the timing; same first loss everywhere
    p20, p50, p80 = ctx.measure(step)
    ctx.add(case, variant, "step_ms", p50, "ms", p20_ms=p20, p80_ms=p80, B=B, T=T)
    ctx.add(case, variant, "tokens_per_s", B * T / (p50 * 1e-3), "tok/s", B=B, T=T)
    ctx.add(case, variant, "first_step_loss", first_loss, "nats", B=B, T=T)


def run_train_step_case(ctx: Context, preset: str = "gpt2", B: int = TRAIN_BATCH, T: int = TRAIN_SEQ,
                        variants: Sequence[str] = TRAIN_VARIANTS, **overrides: Any) -> None:
    """One training step per variant: the eager reference (the model's SDPA attention + torch.optim.AdamW), the
    same with AdamW(fused=True), and kernels.patch() + FusedAdamW. Rows: ms, tokens/s, first-step loss."""
    from model.gpt import GPTConfig

    dev = ctx.torch_device
    cfg = GPTConfig.preset(preset, **overrides)
    case = f"train step {preset} B{B} T{T}"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g, device=dev)
    inp, tgt = x[:, :-1], x[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else contextlib.nullcontext()
    for variant in variants:
        if ctx.out_of_time(case, variant, "step_ms"):
            continue
        try:
            # the model and optimizer live only inside this call: freed before the next variant is built
            _measure_step(ctx, case, variant, _step_fn(*_build(variant, cfg, dev), inp, tgt, autocast), B, T)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is a result, not a crash
            ctx.add(case, variant, "step_ms", None, "ms", skipped=failure_reason(e))
        if dev == "cuda":
            torch.cuda.empty_cache()
    ratio_rows(ctx, case, base="hotpath_patch_fused_adamw")


def check_train_step(ctx: Context, preset: str = "gpt2", steps: int = CHECK_STEPS, B: int = CHECK_BATCH,
                     T: int = CHECK_SEQ, **overrides: Any) -> None:
    """patch() + FusedAdamW against the eager reference, `steps` steps on the same batch: each step's loss within
    CHECK_LOSS_RTOL relative (one row per step)."""
    from model.gpt import GPTConfig

    case = f"check train step {preset} B{B} T{T}"
    try:
        dev = ctx.torch_device
        cfg = GPTConfig.preset(preset, **{"n_layer": CHECK_LAYERS, **overrides})
        g = torch.Generator(device=dev).manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g, device=dev)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev == "cuda" else contextlib.nullcontext
        losses = {}
        for variant in ("eager_reference", "hotpath_patch_fused_adamw"):
            step = _step_fn(*_build(variant, cfg, dev), x[:, :-1], x[:, 1:], autocast())
            losses[variant] = [step().item() for _ in range(steps)]
        for i, (want, got) in enumerate(zip(losses["eager_reference"], losses["hotpath_patch_fused_adamw"])):
            check_row(ctx, case, "hotpath_patch_fused_adamw", f"step{i + 1}_loss", abs(got - want),
                      CHECK_LOSS_RTOL * abs(want), loss=got, reference_loss=want)
    except Exception as e:  # noqa: BLE001 - a check that raises is a failed check, and the suite goes on
        check_error(ctx, case, "hotpath_patch_fused_adamw", e)
    print_verdict(ctx, case, [case])


def checks(ctx: Context) -> None:
    check_train_step(ctx)


def timings(ctx: Context) -> None:
    print(f"[train step] gpt2 B{TRAIN_BATCH} T{TRAIN_SEQ}  ({ctx.time_left():.0f} s of budget left)", flush=True)
    run_train_step_case(ctx)
