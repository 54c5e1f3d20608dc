"""The pruning pipeline behind `python -m quantize.prune`: load a checkpoint, prune it with one of `methods`,
optionally fine-tune it (`finetune`), save it, and measure it against the original in the same run."""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from common.errors import UserError
from common.files import existing_file
from common.machine import machine_info
from model.data import eval_windows
from model.gpt import GPT

from .. import report as R
from .finetune import finetune
from .methods import (Masks, apply_masks, check_sparsity, count_nonzero, count_params, magnitude_masks, prune_heads,
                      prune_neurons, structured_importance, two_four_masks, verify_2_4)

DEFAULT_TRAIN_BYTES = 2_000_000  # training text read for importance and fine-tuning


def default_output(src: Path, method: str, sparsity: float) -> Path:
    """`ckpt.pt` -> `ckpt.pruned-heads25.pt` (`-2of4`, `-magnitude50`, ...), beside the input."""
    tag = "2of4" if method == "2:4" else f"{method}{round(100 * sparsity)}"
    return src.with_name(f"{src.stem}.pruned-{tag}.pt")


def _check_2_4(model: torch.nn.Module, masks: Optional[Masks], when: str) -> None:
    bad = verify_2_4(model, masks)
    if bad:
        raise RuntimeError(f"2:4 pattern broken {when}: {bad[:3]}")


def _prune(base: GPT, method: str, sparsity: float, scope: str, train_ids: torch.Tensor, importance_batches: int,
           batch_size: int) -> tuple[GPT, Optional[Masks], dict[str, Any]]:
    """(pruned copy of `base`, its keep-masks for the masked methods, the details saved in meta["pruning"])."""
    details: dict[str, Any] = {"method": method, "sparsity": sparsity}
    if method in ("magnitude", "2:4"):
        model = copy.deepcopy(base)
        masks = magnitude_masks(model, sparsity, scope) if method == "magnitude" else two_four_masks(model)
        apply_masks(model, masks)
        if method == "magnitude":
            details["scope"] = scope
        else:
            _check_2_4(model, masks, "after pruning")
        return model, masks, details
    # heads and neurons are ranked on training windows (never the held-out split the report scores)
    windows = [x for x, _ in eval_windows(train_ids, base.config.block_size, importance_batches * batch_size)]
    calib = [torch.stack(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]
    heads, neurons = structured_importance(base, calib)
    model, info = prune_heads(base, sparsity, heads) if method == "heads" else prune_neurons(base, sparsity, neurons)
    return model, None, {**details, **info}


def _ort_latency(model_a: GPT, model_b: GPT, tokenizer: Any, shape: tuple[int, int], threads: int,
                 repeats: int) -> Optional[dict[str, Any]]:
    """Prefill latency of two models exported to ONNX (by export/) and run in ONNX Runtime, interleaved."""
    from export.to_onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="hotpath-prune.") as tmp:
        prefills = []
        for tag, m in (("before", model_a), ("after", model_b)):
            path = Path(tmp) / f"{tag}.onnx"
            export_onnx(m, path, tokenizer=tokenizer, validate=False)
            prefills.append(R.OrtPrefill(path, threads=threads))
        x = R.latency_batch(model_a.config.vocab_size, model_a.config.block_size, shape)
        return R.latency(prefills[0], prefills[1], x, runtime="onnxruntime CPU", threads=threads, repeats=repeats)


def _checkpoint_bytes(model: GPT, tokenizer: Any, meta: dict[str, Any]) -> int:
    """The size `model` has saved as hotpath saves it: weights only, like for like with the pruned file (the
    source checkpoint may also hold optimizer state)."""
    from model.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="hotpath-prune.") as tmp:
        return R.file_bytes(save_checkpoint(Path(tmp) / "base.pt", model, tokenizer, meta))


def prune_checkpoint(ckpt: str | os.PathLike, method: str, sparsity: Optional[float] = None, *,
                     finetune_steps: int = 0, out: str | os.PathLike | None = None, scope: str = "global",
                     lr: float = 3e-4, batch_size: int = 8, importance_batches: int = 8,
                     corpus: Optional[list[str]] = None, corpus_bytes: Optional[int] = None, evaluate: bool = True,
                     windows: int = R.DEFAULT_EVAL_WINDOWS, latency_repeats: int = 5,
                     latency_shape: tuple[int, int] = R.DEFAULT_LATENCY_SHAPE, ort_latency: bool = False,
                     threads: Optional[int] = None, seed: int = 0,
                     progress: bool = False) -> tuple[GPT, dict[str, Any]]:
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
    src = existing_file(ckpt, "checkpoint")
    base, tokenizer, meta = load_checkpoint(src)
    if (meta or {}).get("quantization"):
        raise UserError(f"{src} is a quantized checkpoint; prune the fp32 one, then quantize")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    block = base.config.block_size
    _, default_bytes = R.corpus_args(meta)
    data = R.load_token_data(tokenizer, meta, corpus, corpus_bytes or min(default_bytes, DEFAULT_TRAIN_BYTES))
    if len(data.train) <= block + 1:
        raise UserError(f"the training split has {len(data.train)} tokens, under one window of {block + 1} "
                        "(pass more text with --corpus)")

    model, masks, details = _prune(base, method, sparsity, scope, data.train, importance_batches, batch_size)
    r: dict[str, Any] = {"what": f"prune {method}", "method": method, "sparsity": sparsity, "source": str(src),
                         "params_before": count_params(base), "params_after": count_params(model),
                         "nonzero_before": count_nonzero(base), "machine": machine_info(threads)}
    batches = R.eval_batches(data.val, block, windows) if evaluate else []
    if evaluate:
        r["ppl_pruned_before_finetune"] = R.score(R.torch_logits_fn(model), batches)["ppl"]
    if finetune_steps:
        losses = finetune(model, data.train, finetune_steps, masks=masks, lr=lr, batch_size=batch_size, seed=seed,
                          progress=progress)
        r["finetune"] = {"steps": finetune_steps, "lr": lr, "batch_size": batch_size, "first_loss": losses[0],
                         "last_loss": losses[-1]}
        if method == "2:4":
            _check_2_4(model, masks, "by fine-tuning")
    r["nonzero_after"] = count_nonzero(model)

    out = Path(out) if out is not None else default_output(src, method, sparsity)
    details["finetune_steps"] = finetune_steps
    save_checkpoint(out, model, tokenizer, {**meta, "pruning": details})
    r["output"] = str(out)
    r["size_before"] = _checkpoint_bytes(base, tokenizer, meta)
    r["size_after"] = R.file_bytes(out)
    if method == "2:4":  # verified again on the file as saved
        _check_2_4(load_checkpoint(out)[0], None, f"in the saved checkpoint {out}")
        r["verified_2_4"] = True
    r["pruning"] = details

    if evaluate:
        r.update(R.compare(R.torch_logits_fn(base), R.torch_logits_fn(model), batches,
                           latency_inputs=R.latency_batch(base.config.vocab_size, block, latency_shape),
                           runtime="torch eager CPU", threads=threads, repeats=latency_repeats))
        if ort_latency and latency_repeats > 0:
            lat = _ort_latency(base, model, tokenizer, latency_shape, threads, latency_repeats)
            if lat:
                r["latency_ort"] = lat
    return model, r
