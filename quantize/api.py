"""The quantization pipeline behind `python -m quantize`: export if needed, quantize, then measure the variant
against its fp32 original in the same run (perplexity, top-1 agreement, size, latency) and gate on perplexity."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from common.cli import UserError, existing_file

from . import report as R
from .onnx_quant import ONNX_MODES, default_output, quantize_onnx

TORCH_MODES = ("torch-int8-weight", "torch-int8-dynamic")
ALL_MODES = ONNX_MODES + TORCH_MODES
CHECKPOINT_SUFFIXES = (".pt", ".safetensors")
DEFAULT_EVAL_BYTES = 2_000_000  # corpus read for evaluation (the held-out files are the same at any size)


def export_fp32(ckpt, out) -> Path:
    """The fp32 ONNX decoder of a checkpoint, written by export/ (the artifact's owner)."""
    try:
        from export.to_onnx import export_onnx
    except ImportError as e:
        raise UserError(f"exporting a checkpoint needs export.to_onnx, which this install lacks ({e}); "
                        "pass an exported .onnx instead") from e
    export_onnx(str(ckpt), str(out), validate=False)
    return Path(out)


def _kind(path: Path) -> str:
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    raise UserError(f"{path} is neither a hotpath checkpoint (.pt, .safetensors) nor an .onnx model")


def check_mode(mode: str, path: Optional[Path] = None) -> None:
    if mode not in ALL_MODES:
        raise UserError(f"unknown mode {mode!r} (choose from {', '.join(ALL_MODES)})")
    if path is not None and mode in TORCH_MODES and _kind(path) != "checkpoint":
        raise UserError(f"--mode {mode} quantizes a PyTorch checkpoint, not {path.name} "
                        f"(pass the ckpt.pt, or use {', '.join(ONNX_MODES)} for .onnx)")


# ---------------------------------------------------------------------------------------------- evaluation data
def eval_data(model_path: Path, windows: int, corpus=None, corpus_bytes=None, tokenizer=None, meta=None):
    """(batches of held-out windows, the context length) for a checkpoint or a hotpath .onnx."""
    if tokenizer is None:
        if _kind(model_path) == "checkpoint":
            from model.checkpoint import load_checkpoint

            _, tokenizer, meta = load_checkpoint(model_path)
        else:
            from tokenizers import Tokenizer

            props = R.read_props(model_path)
            if "hotpath.tokenizer" not in props:
                raise UserError(f"{model_path} has no hotpath.tokenizer metadata (re-export it with python -m export.to_onnx)")
            tokenizer = Tokenizer.from_str(props["hotpath.tokenizer"])
    default_corpus, default_bytes = R.corpus_args(meta)
    data = R.load_token_data(tokenizer, meta, corpus if corpus is not None else default_corpus,
                             corpus_bytes or min(default_bytes, DEFAULT_EVAL_BYTES))
    return data


def perplexity_onnx(path, *, windows: int = R.DEFAULT_EVAL_WINDOWS, corpus=None, corpus_bytes=None,
                    threads: Optional[int] = None, batch_size: int = 8) -> dict[str, Any]:
    """Held-out perplexity of a hotpath .onnx in ONNX Runtime: {'loss', 'ppl', 'tokens'}."""
    path = existing_file(path, "model")
    prefill = R.OrtPrefill(path, threads=threads)
    data = eval_data(path, windows, corpus, corpus_bytes)
    s = R.score(prefill, R.eval_batches(data.val, prefill.config.block_size, windows, batch_size))
    return {"loss": s["loss"], "ppl": s["ppl"], "tokens": s["tokens"]}


def compare(baseline_fn, variant_fn, batches, *, latency_inputs: Optional[np.ndarray], runtime: str,
            threads: int, repeats: int = 7) -> dict[str, Any]:
    """Perplexity before/after, top-1 agreement and the interleaved latency ratio of two logits functions."""
    before = R.score(baseline_fn, batches)
    after = R.score(variant_fn, batches, reference_top1=before["top1"])
    r: dict[str, Any] = {
        "ppl_before": before["ppl"], "ppl_after": after["ppl"], "loss_before": before["loss"],
        "loss_after": after["loss"], "ppl_increase_pct": 100 * (after["ppl"] / before["ppl"] - 1),
        "top1_agreement": after["top1_agreement"], "eval_tokens": after["tokens"],
    }
    if latency_inputs is not None and repeats > 0:
        x = torch.from_numpy(latency_inputs)
        base, var, speedup = R.latency_pair(lambda: baseline_fn(x), lambda: variant_fn(x), repeats=repeats)
        r["latency"] = {"runtime": runtime, "shape": list(latency_inputs.shape), "threads": threads,
                        "baseline": base, "variant": var, "speedup": speedup}
    return r


def latency_batch(vocab_size: int, block: int, shape=R.DEFAULT_LATENCY_SHAPE) -> np.ndarray:
    b, t = shape
    return np.random.default_rng(0).integers(0, vocab_size, (b, min(t, block)), dtype=np.int64)


# ---------------------------------------------------------------------------------------------- pipeline
def run_quantization(model_path, mode: str, out=None, *, evaluate: bool = True,
                     windows: int = R.DEFAULT_EVAL_WINDOWS, latency_repeats: int = 7,
                     latency_shape=R.DEFAULT_LATENCY_SHAPE, threads: Optional[int] = None,
                     corpus=None, corpus_bytes: Optional[int] = None, **opts) -> dict[str, Any]:
    """Quantize a checkpoint or hotpath .onnx with `mode` and (by default) measure it against fp32 in this run.

    Returns the report dict: output, mode, size_before/size_after (bytes), ppl_before/ppl_after,
    ppl_increase_pct, top1_agreement, eval_tokens, latency {runtime, shape, threads, baseline, variant, speedup},
    machine. `opts` go to `quantize_onnx` (calibration, exclude, block size...)."""
    import os

    src = existing_file(model_path, "model")
    check_mode(mode, src)
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="hotpath-quant.") as tmpdir:
        if mode in TORCH_MODES:
            return _run_torch(src, mode, out, evaluate, windows, latency_repeats, latency_shape, threads,
                              corpus, corpus_bytes)
        fp32 = src
        if _kind(src) == "checkpoint":
            fp32 = export_fp32(src, Path(tmpdir) / f"{src.stem}.onnx")
        out = Path(out) if out is not None else default_output(src, mode)
        path = quantize_onnx(fp32, mode, out, corpus=corpus, corpus_bytes=corpus_bytes, threads=threads, **opts)
        r: dict[str, Any] = {"what": f"quantize {mode}", "mode": mode, "source": str(src), "output": str(path),
                             "size_before": R.file_bytes(fp32), "size_after": R.file_bytes(path),
                             "machine": R.machine()}
        props = R.read_props(path)
        import json

        r["quantization"] = json.loads(props.get("hotpath.quantization", "{}"))
        if evaluate:
            base = R.OrtPrefill(fp32, threads=threads)
            var = R.OrtPrefill(path, threads=threads)
            cfg = base.config
            data = eval_data(src, windows, corpus, corpus_bytes)
            batches = R.eval_batches(data.val, cfg.block_size, windows)
            r.update(compare(base, var, batches, latency_inputs=latency_batch(cfg.vocab_size, cfg.block_size,
                                                                              latency_shape),
                             runtime="onnxruntime CPU", threads=threads, repeats=latency_repeats))
        return r


def _run_torch(src: Path, mode: str, out, evaluate, windows, latency_repeats, latency_shape, threads, corpus,
               corpus_bytes) -> dict[str, Any]:
    from model.checkpoint import load_checkpoint

    from .torch_quant import load_quantized, model_bytes, save_quantized_checkpoint

    torch_mode = mode.removeprefix("torch-")
    model, tokenizer, meta = load_checkpoint(src)
    if meta.get("quantization"):
        raise UserError(f"{src} is already quantized ({meta['quantization'].get('mode')}); quantize the fp32 checkpoint")
    out = Path(out) if out is not None else src.with_name(f"{src.stem}.{mode}{src.suffix if src.suffix == '.pt' else '.pt'}")
    save_quantized_checkpoint(out, model, tokenizer, meta, torch_mode)
    qmodel, _, _ = load_quantized(out)  # what serve will run: the saved file, re-quantized at load
    r: dict[str, Any] = {"what": f"quantize {mode}", "mode": mode, "source": str(src), "output": str(out),
                         "size_before": model_bytes(model), "size_after": model_bytes(qmodel),
                         "machine": R.machine(),
                         "notes": ["sizes are the model's in-memory weights; the checkpoint file stores the "
                                   "int8-grid weights in fp32 and is quantized at load (quantize.torch_quant."
                                   "load_quantized)"]}
    if evaluate:
        data = eval_data(src, windows, corpus, corpus_bytes, tokenizer=tokenizer, meta=meta)
        batches = R.eval_batches(data.val, model.config.block_size, windows)
        torch.set_num_threads(threads)
        r.update(compare(R.torch_logits_fn(model), R.torch_logits_fn(qmodel), batches,
                         latency_inputs=latency_batch(model.config.vocab_size, model.config.block_size, latency_shape),
                         runtime="torch eager CPU", threads=threads, repeats=latency_repeats))
    return r
