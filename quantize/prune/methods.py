"""The pruning methods, on the linear layers of the transformer blocks (the tied embedding / LM head stays whole).

Unstructured and semi-structured methods return keep-masks (True = kept) that `apply_masks` multiplies in, so
the shapes stay and fine-tuning can hold the pattern fixed; structured methods return a new, smaller GPT.

- ``magnitude``: the fraction S of weights with the smallest |w|, ranked over all blocks at once (``global``) or
  within each linear layer (``layer``).
- ``2:4``: in every group of four consecutive weights along the input dimension, the two smallest |w| zeroed (the
  pattern sparse tensor cores and TensorRT's sparse weights take); `verify_2_4` checks a model against it.
- ``heads``: whole KV groups (a key/value head and its query heads) removed from every layer, ranked by
  `structured_importance` (mean ||W_o[:, head] @ y_head|| over calibration tokens); `head_dim` is kept.
- ``neurons``: MLP hidden units removed from every layer, ranked by mean |activation| x ||W_down[:, j]||.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from common.errors import UserError
from model.gpt import GPT, GPTConfig

METHODS = ("magnitude", "2:4", "heads", "neurons")
SCOPES = ("global", "layer")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")

Masks = dict[str, torch.Tensor]  # linear layer name -> bool keep-mask shaped like its weight


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linear layers: every projection inside the transformer blocks."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in BLOCK_LINEARS}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Non-zero parameter values, each shared tensor (the tied embedding / head) counted once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += int((p != 0).sum())
    return n


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise UserError(f"unknown --scope {scope!r} (choose from {', '.join(SCOPES)})")


def check_sparsity(method: str, sparsity: Optional[float]) -> float:
    """The sparsity `method` will use: `sparsity` checked, or 0.5 for 2:4."""
    check_method(method)
    if method == "2:4":
        if sparsity is not None and abs(sparsity - 0.5) > 1e-9:
            raise UserError(f"--sparsity {sparsity:g} does not fit 2:4, which is 0.5 by definition (leave it out)")
        return 0.5
    if sparsity is None:
        raise UserError(f"--method {method} needs --sparsity S with 0 < S < 1")
    if not (0.0 < sparsity < 1.0) or math.isnan(sparsity):
        raise UserError(f"--sparsity {sparsity:g} is outside (0, 1) (pass a fraction such as 0.25)")
    return sparsity


# ---------------------------------------------------------------------------------------------- masks
@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "global") -> Masks:
    """Keep-masks (True = kept) zeroing the `sparsity` fraction of smallest |w| of the block linears."""
    check_scope(scope)
    linears = block_linears(model)
    masks = {}
    if scope == "global":
        allw = torch.cat([m.weight.detach().abs().flatten() for m in linears.values()])
        k = int(round(sparsity * allw.numel()))
        threshold = allw.kthvalue(max(k, 1)).values if k > 0 else torch.tensor(-1.0)
        for name, m in linears.items():
            masks[name] = m.weight.detach().abs() > threshold
    else:
        for name, m in linears.items():
            w = m.weight.detach().abs().flatten()
            k = int(round(sparsity * w.numel()))
            keep = torch.ones_like(w, dtype=torch.bool)
            if k > 0:
                keep[w.argsort()[:k]] = False  # exact count, ties broken by order
            masks[name] = keep.view_as(m.weight)
    return masks


@torch.no_grad()
def two_four_masks(model: nn.Module) -> Masks:
    """Keep-masks with exactly two True in every group of four along the input dimension."""
    masks = {}
    for name, m in block_linears(model).items():
        out_f, in_f = m.weight.shape
        if in_f % 4:
            raise UserError(f"{name} has {in_f} input features, not a multiple of 4: the model cannot take the 2:4 "
                            "pattern (use --method magnitude)")
        groups = m.weight.detach().abs().view(out_f, in_f // 4, 4)
        top2 = groups.topk(2, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
        masks[name] = keep.view(out_f, in_f)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the weights outside their masks, in place."""
    linears = block_linears(model)
    for name, mask in masks.items():
        weight = linears[name].weight
        weight.mul_(mask.to(weight.dtype))


def verify_2_4(model: nn.Module, masks: Optional[Masks] = None) -> list[str]:
    """Layers breaking 2:4 (more than two non-zeros in a group of four; with `masks`, any weight outside its
    mask, or a mask without exactly two per group). Empty when the model is 2:4 sparse."""
    bad = []
    for name, m in block_linears(model).items():
        out_f, in_f = m.weight.shape
        if in_f % 4:
            bad.append(f"{name}: {in_f} input features")
            continue
        nz = (m.weight.detach() != 0).view(out_f, in_f // 4, 4).sum(-1)
        if int(nz.max()) > 2:
            bad.append(f"{name}: {int((nz > 2).sum())} groups with more than 2 non-zeros")
        if masks is not None and name in masks:
            mk = masks[name].view(out_f, in_f // 4, 4).sum(-1)
            if not bool((mk == 2).all()):
                bad.append(f"{name}: mask without exactly 2 of 4")
            if bool(((m.weight.detach() != 0) & ~masks[name]).any()):
                bad.append(f"{name}: non-zero weights outside the mask")
    return bad


# ---------------------------------------------------------------------------------------------- structured
@torch.no_grad()
def structured_importance(model: GPT, batches: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: head importance (n_head,) and MLP neuron importance (mlp_hidden,) over calibration batches."""
    cfg = model.config
    D = cfg.head_dim
    heads = [torch.zeros(cfg.n_head, dtype=torch.float64) for _ in range(cfg.n_layer)]
    neurons = [torch.zeros(cfg.mlp_hidden, dtype=torch.float64) for _ in range(cfg.n_layer)]
    hooks = []
    for i, block in enumerate(model.blocks):
        def head_hook(mod: nn.Linear, inp: tuple[torch.Tensor, ...], i: int = i) -> None:
            y = inp[0].float()  # (B, T, H*D)
            W = mod.weight.float()  # (C, H*D)
            for h in range(cfg.n_head):
                contrib = y[..., h * D:(h + 1) * D] @ W[:, h * D:(h + 1) * D].T  # (B, T, C)
                heads[i][h] += contrib.norm(dim=-1).mean().item()

        def neuron_hook(mod: nn.Linear, inp: tuple[torch.Tensor, ...], i: int = i) -> None:
            a = inp[0].float().abs().flatten(0, -2).mean(0)  # (hidden,)
            neurons[i] += (a * mod.weight.float().norm(dim=0)).double()

        hooks += [block.attn.o_proj.register_forward_pre_hook(head_hook),
                  block.mlp.down_proj.register_forward_pre_hook(neuron_hook)]
    was = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return heads, neurons


def _slice_linear(lin: nn.Linear, rows: Optional[torch.Tensor] = None,
                  cols: Optional[torch.Tensor] = None) -> nn.Linear:
    """A copy of `lin` keeping only the output `rows` and input `cols` given."""
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.detach()[rows] if rows is not None else lin.bias.detach())
    return new


def _rebuilt(model: GPT, changes: dict[str, Any], sliced: dict[str, nn.Linear]) -> GPT:
    """A new GPT with `changes` to the config and the weights of `model`, the `sliced` layers replaced."""
    new = GPT(GPTConfig.from_dict({**model.config.to_dict(), **changes}))
    state = dict(model.state_dict())
    for name, lin in sliced.items():
        for pname, p in lin.named_parameters():
            state[f"{name}.{pname}"] = p.data
    new.load_state_dict(state)
    return new.eval()


@torch.no_grad()
def prune_heads(model: GPT, sparsity: float, head_scores: list[torch.Tensor]) -> tuple[GPT, dict[str, Any]]:
    """A new, smaller GPT without the least important KV groups (and their query heads) in every layer."""
    cfg = model.config
    group = cfg.n_head // cfg.n_kv_head
    remove = int(round(sparsity * cfg.n_kv_head))
    if remove < 1:
        raise UserError(f"--sparsity {sparsity:g} removes no head: {cfg.n_kv_head} KV heads per layer "
                        f"(use at least {1 / cfg.n_kv_head:.3f})")
    if remove >= cfg.n_kv_head:
        raise UserError(f"--sparsity {sparsity:g} would remove all {cfg.n_kv_head} KV heads of a layer (use less)")
    D = cfg.head_dim
    kept_per_layer, sliced = [], {}
    for i, block in enumerate(model.blocks):
        g_scores = head_scores[i].view(cfg.n_kv_head, group).sum(-1)
        keep_groups = sorted(g_scores.argsort(descending=True)[:cfg.n_kv_head - remove].tolist())
        kept_per_layer.append(keep_groups)
        q_heads = [g * group + j for g in keep_groups for j in range(group)]
        q_rows = torch.tensor([h * D + d for h in q_heads for d in range(D)])
        kv_rows = torch.tensor([g * D + d for g in keep_groups for d in range(D)])
        a = block.attn
        sliced.update({f"blocks.{i}.attn.q_proj": _slice_linear(a.q_proj, rows=q_rows),
                       f"blocks.{i}.attn.k_proj": _slice_linear(a.k_proj, rows=kv_rows),
                       f"blocks.{i}.attn.v_proj": _slice_linear(a.v_proj, rows=kv_rows),
                       f"blocks.{i}.attn.o_proj": _slice_linear(a.o_proj, cols=q_rows)})
    new = _rebuilt(model, {"n_head": cfg.n_head - remove * group, "n_kv_head": cfg.n_kv_head - remove,
                           "head_dim": D}, sliced)
    return new, {"kv_groups_kept": kept_per_layer, "n_head": [cfg.n_head, new.config.n_head],
                 "n_kv_head": [cfg.n_kv_head, new.config.n_kv_head], "head_dim": D}


@torch.no_grad()
def prune_neurons(model: GPT, sparsity: float, neuron_scores: list[torch.Tensor]) -> tuple[GPT, dict[str, Any]]:
    """A new, smaller GPT with the least important MLP hidden units removed in every layer."""
    cfg = model.config
    remove = int(round(sparsity * cfg.mlp_hidden))
    if remove < 1 or remove >= cfg.mlp_hidden:
        raise UserError(f"--sparsity {sparsity:g} removes {remove} of {cfg.mlp_hidden} MLP neurons (choose a "
                        "fraction that keeps some and removes some)")
    sliced = {}
    for i, block in enumerate(model.blocks):
        keep = torch.sort(neuron_scores[i].argsort(descending=True)[:cfg.mlp_hidden - remove]).values
        m = block.mlp
        sliced[f"blocks.{i}.mlp.up_proj"] = _slice_linear(m.up_proj, rows=keep)
        sliced[f"blocks.{i}.mlp.down_proj"] = _slice_linear(m.down_proj, cols=keep)
        if cfg.mlp == "swiglu":
            sliced[f"blocks.{i}.mlp.gate_proj"] = _slice_linear(m.gate_proj, rows=keep)
    new = _rebuilt(model, {"mlp_hidden": cfg.mlp_hidden - remove}, sliced)
    return new, {"mlp_hidden": [cfg.mlp_hidden, new.config.mlp_hidden]}
