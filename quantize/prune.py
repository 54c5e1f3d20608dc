"""Pruning: `python -m quantize.prune ckpt.pt --method magnitude|2:4|heads|neurons --sparsity S [--finetune-steps N]`.

Methods, on the linear layers of the transformer blocks (the tied embedding / language-model head is left whole):

- ``magnitude``: unstructured; the fraction S of weights with the smallest |w| set to zero, ranked over all
  blocks at once (``--scope global``) or within each linear layer (``--scope layer``). Same shapes: a smaller file
  only once compressed, a speedup only on sparse kernels.
- ``2:4``: semi-structured; in every group of four consecutive weights along the input dimension, the two with
  the smallest |w| are zeroed (the pattern sparse tensor cores and TensorRT's sparse weights take). S is 0.5 by
  definition. Checked after saving (on the file) and after fine-tuning.
- ``heads``: structured; whole attention heads removed from every layer, ranked by their contribution to the
  attention output (mean over calibration tokens of ||W_o[:, head] @ y_head||). With grouped-query attention a
  KV group (its key/value head and its query heads) goes as a unit. `round(S * n_kv_head)` groups per layer; the new
  config keeps `head_dim` and lowers `n_head` / `n_kv_head`: a smaller dense model, faster on every backend.
- ``neurons``: structured; MLP hidden units removed from every layer by mean |activation| x ||W_down[:, j]||;
  `mlp_hidden` shrinks by round(S * mlp_hidden).

`--finetune-steps N` then trains N steps of AdamW on the training split (masks kept fixed: pruned weights are
re-zeroed after every step) to recover accuracy. The report shows parameters, held-out perplexity and top-1
agreement before and after, and prefill latency (torch eager, and ONNX Runtime when export/ is installed).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from common import cli
from common.cli import UserError
from model.data import eval_windows, random_batch

from . import report as R

METHODS = ("magnitude", "2:4", "heads", "neurons")
SCOPES = ("global", "layer")
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
DEFAULT_TRAIN_BYTES = 2_000_000  # training text read for importance and fine-tuning


# ---------------------------------------------------------------------------------------------- helpers
def block_linears(model) -> dict[str, nn.Linear]:
    """The prunable linear layers: every projection inside the transformer blocks."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in BLOCK_LINEARS}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += int((p != 0).sum())
    return n


def check_sparsity(method: str, sparsity: Optional[float]) -> float:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
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
def magnitude_masks(model, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) zeroing the `sparsity` fraction of smallest |w| of the block linears."""
    if scope not in SCOPES:
        raise UserError(f"unknown --scope {scope!r} (choose from {', '.join(SCOPES)})")
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
def two_four_masks(model) -> dict[str, torch.Tensor]:
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
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    mods = dict(model.named_modules())
    for name, mask in masks.items():
        mods[name].weight.mul_(mask.to(mods[name].weight.dtype))


def verify_2_4(model, masks: Optional[dict[str, torch.Tensor]] = None) -> list[str]:
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
def structured_importance(model, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: head importance (n_head,) and MLP neuron importance (mlp_hidden,) over calibration batches."""
    cfg = model.config
    D = cfg.head_dim
    heads = [torch.zeros(cfg.n_head, dtype=torch.float64) for _ in range(cfg.n_layer)]
    neurons = [torch.zeros(cfg.mlp_hidden, dtype=torch.float64) for _ in range(cfg.n_layer)]
    hooks = []
    for i, block in enumerate(model.blocks):
        def head_hook(mod, inp, i=i):
            y = inp[0].float()  # (B, T, H*D)
            W = mod.weight.float()  # (C, H*D)
            for h in range(cfg.n_head):
                contrib = y[..., h * D:(h + 1) * D] @ W[:, h * D:(h + 1) * D].T  # (B, T, C)
                heads[i][h] += contrib.norm(dim=-1).mean().item()

        def neuron_hook(mod, inp, i=i):
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


def _slice_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
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


@torch.no_grad()
def prune_heads(model, sparsity: float, head_scores: list[torch.Tensor]):
    """A new, smaller GPT without the least important KV groups (and their query heads) in every layer."""
    from model.gpt import GPT, GPTConfig

    cfg = model.config
    group = cfg.n_head // cfg.n_kv_head
    remove = int(round(sparsity * cfg.n_kv_head))
    if remove < 1:
        raise UserError(f"--sparsity {sparsity:g} removes no head: {cfg.n_kv_head} KV heads per layer "
                        f"(use at least {1 / cfg.n_kv_head:.3f})")
    if remove >= cfg.n_kv_head:
        raise UserError(f"--sparsity {sparsity:g} would remove all {cfg.n_kv_head} KV heads of a layer (use less)")
    new_cfg = GPTConfig.from_dict({**cfg.to_dict(), "n_head": cfg.n_head - remove * group,
                                   "n_kv_head": cfg.n_kv_head - remove, "head_dim": cfg.head_dim})
    new = GPT(new_cfg)
    state = {k: v for k, v in model.state_dict().items()}
    D = cfg.head_dim
    kept_per_layer = []
    for i, block in enumerate(model.blocks):
        g_scores = head_scores[i].view(cfg.n_kv_head, group).sum(-1)
        keep_groups = sorted(g_scores.argsort(descending=True)[:cfg.n_kv_head - remove].tolist())
        kept_per_layer.append(keep_groups)
        q_heads = [g * group + j for g in keep_groups for j in range(group)]
        q_rows = torch.tensor([h * D + d for h in q_heads for d in range(D)])
        kv_rows = torch.tensor([g * D + d for g in keep_groups for d in range(D)])
        a = block.attn
        for name, lin in (("q_proj", _slice_linear(a.q_proj, rows=q_rows)), ("k_proj", _slice_linear(a.k_proj, rows=kv_rows)),
                          ("v_proj", _slice_linear(a.v_proj, rows=kv_rows)), ("o_proj", _slice_linear(a.o_proj, cols=q_rows))):
            for pname, p in lin.named_parameters():
                state[f"blocks.{i}.attn.{name}.{pname}"] = p.data
    new.load_state_dict(state)
    return new.eval(), {"kv_groups_kept": kept_per_layer, "n_head": [cfg.n_head, new_cfg.n_head],
                        "n_kv_head": [cfg.n_kv_head, new_cfg.n_kv_head], "head_dim": D}


@torch.no_grad()
def prune_neurons(model, sparsity: float, neuron_scores: list[torch.Tensor]):
    """A new, smaller GPT with the least important MLP hidden units removed in every layer."""
    from model.gpt import GPT, GPTConfig

    cfg = model.config
    remove = int(round(sparsity * cfg.mlp_hidden))
    if remove < 1 or remove >= cfg.mlp_hidden:
        raise UserError(f"--sparsity {sparsity:g} removes {remove} of {cfg.mlp_hidden} MLP neurons (choose a "
                        "fraction that keeps some and removes some)")
    new_cfg = GPTConfig.from_dict({**cfg.to_dict(), "mlp_hidden": cfg.mlp_hidden - remove})
    new = GPT(new_cfg)
    state = dict(model.state_dict())
    for i, block in enumerate(model.blocks):
        keep = torch.sort(neuron_scores[i].argsort(descending=True)[:cfg.mlp_hidden - remove]).values
        m = block.mlp
        parts = [("up_proj", _slice_linear(m.up_proj, rows=keep)), ("down_proj", _slice_linear(m.down_proj, cols=keep))]
        if cfg.mlp == "swiglu":
            parts.append(("gate_proj", _slice_linear(m.gate_proj, rows=keep)))
        for name, lin in parts:
            for pname, p in lin.named_parameters():
                state[f"blocks.{i}.mlp.{name}.{pname}"] = p.data
    new.load_state_dict(state)
    return new.eval(), {"mlp_hidden": [cfg.mlp_hidden, new_cfg.mlp_hidden]}


# ---------------------------------------------------------------------------------------------- fine-tune
def finetune(model, train_ids: torch.Tensor, steps: int, *, masks: Optional[dict[str, torch.Tensor]] = None,
             lr: float = 3e-4, batch_size: int = 8, block: Optional[int] = None, seed: int = 0,
             progress: bool = False) -> list[float]:
    """AdamW for `steps` steps on random training windows (warmup, then cosine to lr/10); pruned weights are
    zeroed again after every step and their gradients dropped, so the sparsity pattern never changes."""
    from model.train import lr_at

    block = block or model.config.block_size
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    mods = dict(model.named_modules())
    model.train()
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc="fine-tune", dynamic_ncols=True, file=sys.stderr)
    warmup = max(1, steps // 10)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, warmup, lr, lr / 10)
        x, y = random_batch(train_ids, batch_size, block, gen)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        if masks:
            for name, mask in masks.items():
                g = mods[name].weight.grad
                if g is not None:
                    g.mul_(mask)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masks:
            apply_masks(model, masks)
        losses.append(loss.item())
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar:
        bar.close()
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------- pipeline
def default_output(src: Path, method: str, sparsity: float) -> Path:
    tag = "2of4" if method == "2:4" else f"{method}{round(100 * sparsity)}"
    return src.with_name(f"{src.stem}.pruned-{tag}{src.suffix if src.suffix == '.pt' else '.pt'}")


def _ort_latency(model_a, model_b, tokenizer, shape, threads, repeats) -> Optional[dict[str, Any]]:
    """Prefill latency of two models exported to ONNX (by export/) and run in ONNX Runtime, interleaved."""
    try:
        from export.to_onnx import export_onnx
    except ImportError:
        return None
    from .api import latency_batch

    with tempfile.TemporaryDirectory(prefix="hotpath-prune.") as tmp:
        paths = []
        for tag, m in (("before", model_a), ("after", model_b)):
            p = Path(tmp) / f"{tag}.onnx"
            export_onnx(m, p, tokenizer=tokenizer, validate=False)
            paths.append(p)
        a, b = R.OrtPrefill(paths[0], threads=threads), R.OrtPrefill(paths[1], threads=threads)
        x = latency_batch(model_a.config.vocab_size, model_a.config.block_size, shape)
        base, var, speedup = R.latency_pair(lambda: a(x), lambda: b(x), repeats=repeats)
        return {"runtime": "onnxruntime CPU", "shape": list(x.shape), "threads": threads, "baseline": base,
                "variant": var, "speedup": speedup}


def prune_checkpoint(ckpt, method: str, sparsity: Optional[float] = None, *, finetune_steps: int = 0,
                     out=None, scope: str = "global", lr: float = 3e-4, batch_size: int = 8,
                     importance_batches: int = 8, corpus=None, corpus_bytes: Optional[int] = None,
                     evaluate: bool = True, windows: int = R.DEFAULT_EVAL_WINDOWS, latency_repeats: int = 5,
                     latency_shape=R.DEFAULT_LATENCY_SHAPE, ort_latency: bool = False, threads: Optional[int] = None,
                     seed: int = 0, progress: bool = False):
    """Prune the checkpoint `ckpt` with `method`, optionally fine-tune, save; returns (pruned model, report dict).

    Report keys: output, method, sparsity, params_before/params_after, nonzero_before/nonzero_after,
    ppl_before/ppl_after, ppl_increase_pct, top1_agreement, latency (torch eager) and, with ort_latency=True (the
    CLI's default), latency_ort (both models exported by export/ and timed in ONNX Runtime), finetune {steps,
    first_loss, last_loss}, pruning details. evaluate=False skips perplexity and timing (what bench/ wants when it
    measures the artifact itself)."""
    from model.checkpoint import load_checkpoint, save_checkpoint

    sparsity = check_sparsity(method, sparsity)
    if finetune_steps < 0:
        raise UserError(f"--finetune-steps {finetune_steps} must be 0 or more")
    src = cli.existing_file(ckpt, "checkpoint")
    base, tokenizer, meta = load_checkpoint(src)
    if (meta or {}).get("quantization"):
        raise UserError(f"{src} is a quantized checkpoint; prune the fp32 one, then quantize")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = base.config
    default_corpus, default_bytes = R.corpus_args(meta)
    data = R.load_token_data(tokenizer, meta, corpus if corpus is not None else default_corpus,
                             corpus_bytes or min(default_bytes, DEFAULT_TRAIN_BYTES))
    block = cfg.block_size
    if len(data.train) <= block + 1:
        raise UserError(f"the training split has {len(data.train)} tokens, under one window of {block + 1} "
                        "(pass more text with --corpus)")

    model = copy.deepcopy(base)
    masks = None
    details: dict[str, Any] = {"method": method, "sparsity": sparsity}
    if method in ("magnitude", "2:4"):
        masks = magnitude_masks(model, sparsity, scope) if method == "magnitude" else two_four_masks(model)
        apply_masks(model, masks)
        if method == "magnitude":
            details["scope"] = scope
    else:
        calib = [torch.stack([w[0] for w in ws]) for ws in
                 _chunks(list(eval_windows(data.train, block, importance_batches * batch_size)), batch_size)]
        heads, neurons = structured_importance(model, calib)
        if method == "heads":
            model, info = prune_heads(model, sparsity, heads)
        else:
            model, info = prune_neurons(model, sparsity, neurons)
        details.update(info)
    if method == "2:4":
        bad = verify_2_4(model, masks)
        if bad:
            raise RuntimeError(f"2:4 pattern broken after pruning: {bad[:3]}")

    r: dict[str, Any] = {"what": f"prune {method}", "method": method, "sparsity": sparsity, "source": str(src),
                         "params_before": count_params(base), "params_after": count_params(model),
                         "nonzero_before": count_nonzero(base), "machine": R.machine()}
    batches = R.eval_batches(data.val, block, windows) if evaluate else None
    if evaluate:
        r["ppl_pruned_before_finetune"] = R.score(R.torch_logits_fn(model), batches)["ppl"]
    if finetune_steps:
        losses = finetune(model, data.train, finetune_steps, masks=masks, lr=lr, batch_size=batch_size, seed=seed,
                          progress=progress)
        r["finetune"] = {"steps": finetune_steps, "lr": lr, "batch_size": batch_size, "first_loss": losses[0],
                         "last_loss": losses[-1]}
        if method == "2:4":
            bad = verify_2_4(model, masks)
            if bad:
                raise RuntimeError(f"2:4 pattern broken by fine-tuning: {bad[:3]}")
    r["nonzero_after"] = count_nonzero(model)

    out = Path(out) if out is not None else default_output(src, method, sparsity)
    details["finetune_steps"] = finetune_steps
    save_checkpoint(out, model, tokenizer, {**meta, "pruning": details})
    r["output"] = str(out)
    with tempfile.TemporaryDirectory(prefix="hotpath-prune.") as tmp:  # like for like: weights, no optimizer state
        save_checkpoint(Path(tmp) / "base.pt", base, tokenizer, meta)
        r["size_before"] = R.file_bytes(Path(tmp) / "base.pt")
    r["size_after"] = R.file_bytes(out)
    if method == "2:4":  # verified again on the file as saved
        reloaded, _, _ = load_checkpoint(out)
        bad = verify_2_4(reloaded)
        if bad:
            raise RuntimeError(f"2:4 pattern broken in the saved checkpoint {out}: {bad[:3]}")
        r["verified_2_4"] = True
    r["pruning"] = details

    if evaluate:
        from .api import compare, latency_batch

        r.update(compare(R.torch_logits_fn(base), R.torch_logits_fn(model), batches,
                         latency_inputs=latency_batch(cfg.vocab_size, block, latency_shape), runtime="torch eager CPU",
                         threads=threads, repeats=latency_repeats))
        if ort_latency and latency_repeats > 0:
            lat = _ort_latency(base, model, tokenizer, latency_shape, threads, latency_repeats)
            if lat:
                r["latency_ort"] = lat
    return model, r


def _chunks(xs, n):
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def format_prune_report(r: dict[str, Any]) -> str:
    text = R.format_report(r)
    lines = text.splitlines()
    if "ppl_pruned_before_finetune" in r and "finetune" in r:
        lines.insert(3, f"  (after pruning, before the {r['finetune']['steps']}-step fine-tune: perplexity "
                        f"{r['ppl_pruned_before_finetune']:.3f})")
    lat = r.get("latency_ort")
    if lat:
        lines.append(f"  latency ORT   {lat['baseline']['median_s'] * 1e3:.1f} ms -> {lat['variant']['median_s'] * 1e3:.1f} ms"
                     f"  ({R.speed_words(lat['speedup'])}; onnxruntime CPU, prefill {lat['shape'][0]}x{lat['shape'][1]}, "
                     f"spread {lat['variant']['min_s'] * 1e3:.1f}..{lat['variant']['max_s'] * 1e3:.1f} ms)")
    if r.get("verified_2_4"):
        lines.append("  2:4 pattern verified after pruning, after fine-tuning and in the saved file")
    return "\n".join(lines)


def build_parser():
    p = cli.parser("python -m quantize.prune", "Prune a hotpath checkpoint and measure the cost and the speedup.")
    p.add_argument("checkpoint")
    p.add_argument("--method", required=True, metavar="M", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction removed, 0 < S < 1 (weights, KV heads or neurons; 2:4 is 0.5 by definition)")
    p.add_argument("--scope", default="global", metavar="S", help="magnitude: global (default) or layer")
    p.add_argument("--finetune-steps", type=int, default=0, help="AdamW steps to recover accuracy (masks fixed)")
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tune peak learning rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="checkpoint to write (default: beside the input, method in the name)")
    p.add_argument("--corpus", nargs="*", default=None, help="text files or folders (default: the training corpus)")
    p.add_argument("--corpus-bytes", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=R.DEFAULT_EVAL_WINDOWS)
    p.add_argument("--latency-repeats", type=int, default=5, help="timed prefills per model (0 = no timing)")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime latency (export + session)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="fail (exit 1) when perplexity rises more than PCT percent")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.method not in METHODS:
        raise UserError(f"unknown method {args.method!r} (choose from {', '.join(METHODS)})")
    if args.scope not in SCOPES:
        raise UserError(f"unknown --scope {args.scope!r} (choose from {', '.join(SCOPES)})")
    for name in ("batch_size", "eval_windows"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    _, r = prune_checkpoint(args.checkpoint, args.method, args.sparsity, finetune_steps=args.finetune_steps,
                            out=args.out, scope=args.scope, lr=args.lr, batch_size=args.batch_size,
                            corpus=args.corpus, corpus_bytes=args.corpus_bytes, evaluate=not args.no_eval,
                            windows=args.eval_windows, latency_repeats=args.latency_repeats,
                            ort_latency=not args.no_ort, threads=args.threads, seed=args.seed,
                            progress=not args.json)
    print(json.dumps(R.jsonable(r)) if args.json else format_prune_report(r))
    failed = R.ppl_gate(r, args.max_ppl_increase)
    if failed:
        print(f"error: {failed} (output kept at {r['output']}; lower --sparsity or add --finetune-steps)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
