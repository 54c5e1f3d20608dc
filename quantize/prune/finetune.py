"""Fine-tuning a pruned model to recover accuracy, with its sparsity pattern held fixed.

The pieces are model/'s training loop's own: `model.data.random_batch` windows of the training split,
`model.train.make_optimizer` (AdamW, betas 0.9/0.95) and `model.train.lr_at` (linear warmup, then cosine to lr/10),
gradient clipping at 1.0. What pruning adds: the gradients of pruned weights are dropped before each step and the
weights re-zeroed after it (AdamW's moments would otherwise revive them).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from model.data import random_batch
from model.gpt import GPT

from .methods import Masks, apply_masks, block_linears


def finetune(model: GPT, train_ids: torch.Tensor, steps: int, *, masks: Optional[Masks] = None, lr: float = 3e-4,
             batch_size: int = 8, block: Optional[int] = None, seed: int = 0, progress: bool = False) -> list[float]:
    """Train `model` in place for `steps` AdamW steps on random windows of `train_ids` (no weight decay); returns
    the per-step losses. With `masks`, the weights outside them stay zero."""
    from tqdm import tqdm

    from model.train import lr_at, make_optimizer

    block = block or model.config.block_size
    gen = torch.Generator().manual_seed(seed)
    # make_optimizer reads these three of model.train's flags
    opt = make_optimizer(model, argparse.Namespace(optimizer="adamw", lr=lr, weight_decay=0.0))
    linears = block_linears(model)
    warmup = max(1, steps // 10)
    losses = []
    model.train()
    bar = tqdm(range(steps), unit="step", desc="fine-tune", dynamic_ncols=True, file=sys.stderr, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, lr, lr / 10)
        x, y = random_batch(train_ids, batch_size, block, gen)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        for name, mask in (masks or {}).items():
            grad = linears[name].weight.grad
            if grad is not None:
                grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masks:
            apply_masks(model, masks)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses
