"""The quantization pipeline behind `python -m quantize`: export if needed, quantize, then measure the variant
against its fp32 original in the same run (perplexity, top-1 agreement, size, latency) and gate on perplexity."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from common.errors import UserError
from common.files import existing_file
from common.machine import machine_info, peak_rss_mib
from export.onnx_meta import read_hotpath_metadata, read_metadata_props, tokenizer_of
from model.data import TokenData

from . import report as R
from .onnx_quant import ONNX_MODES, default_output, quantize_onnx

TORCH_MODES = ("torch-int8-weight", "torch-int8-dynamic")
ALL_MODES = ONNX_MODES + TORCH_MODES
CHECKPOINT_SUFFIXES = (".pt", ".safetensors")
DEFAULT_EVAL_BYTES = 2_000_000  # corpus read for evaluation (the held-out files are the same at any size)


def export_fp32(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The fp32 ONNX decoder of a checkpoint, written by export/ (the artifact's owner) for ONNX Runtime, which runs
    every ONNX mode's output: the ort target (GroupQueryAttention, a KV cache the server writes in place), as
    `python -m export.to_onnx` writes by default."""
    from export.to_onnx import export_onnx

    export_onnx(str(ckpt), str(out), validate=False, target="ort")
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
def eval_data(model_path: Path, corpus: Optional[list[str]] = None, corpus_bytes: Optional[int] = None,
              tokenizer: Any = None, meta: Optional[dict] = None) -> TokenData:
    """The token data (held-out split included) of a checkpoint or a hotpath .onnx: its training corpus unless
    `corpus` says otherwise, encoded with its tokenizer."""
    if tokenizer is None:
        if _kind(model_path) == "checkpoint":
            from model.checkpoint import load_checkpoint

            _, tokenizer, meta = load_checkpoint(model_path)
        else:
            tokenizer = tokenizer_of(read_hotpath_metadata(model_path))
    _, default_bytes = R.corpus_args(meta)
    return R.load_token_data(tokenizer, meta, corpus, corpus_bytes or min(default_bytes, DEFAULT_EVAL_BYTES))


def perplexity_onnx(path: str | os.PathLike, *, windows: int = R.DEFAULT_EVAL_WINDOWS,
                    corpus: Optional[list[str]] = None, corpus_bytes: Optional[int] = None,
                    threads: Optional[int] = None, batch_size: int = R.EVAL_CHUNK) -> dict[str, Any]:
    """Held-out perplexity of a hotpath .onnx in ONNX Runtime: {'loss', 'ppl', 'tokens'}."""
    path = existing_file(path, "model")
    prefill = R.OrtPrefill(path, threads=threads)
    data = eval_data(path, corpus, corpus_bytes)
    s = R.score(prefill, R.eval_batches(data.val, prefill.config.block_size, windows, batch_size))
    return {"loss": s["loss"], "ppl": s["ppl"], "tokens": s["tokens"]}


# ---------------------------------------------------------------------------------------------- pipeline
def run_quantization(model_path: str | os.PathLike, mode: str, out: str | os.PathLike | None = None, *,
                     evaluate: bool = True, windows: int = R.DEFAULT_EVAL_WINDOWS, latency_repeats: int = 7,
                     latency_shape: tuple[int, int] = R.DEFAULT_LATENCY_SHAPE, threads: Optional[int] = None,
                     corpus: Optional[list[str]] = None, corpus_bytes: Optional[int] = None,
                     **opts: Any) -> dict[str, Any]:
    """Quantize a checkpoint or hotpath .onnx with `mode` and (by default) measure it against fp32 in this run.

    Returns the report dict: output, mode, size_before/size_after (bytes), ppl_before/ppl_after,
    ppl_increase_pct, top1_agreement, kl_per_token, eval_tokens, latency {runtime, shape, threads, baseline, variant,
    speedup}, machine, peak_rss_mib (this process's peak RSS, MiB). `opts` go to `quantize_onnx` (calibration,
    exclude, block size...)."""
    src = existing_file(model_path, "model")
    check_mode(mode, src)
    threads = threads or os.cpu_count() or 1
    if mode in TORCH_MODES:
        return _run_torch(src, mode, out, evaluate=evaluate, windows=windows, latency_repeats=latency_repeats,
                          latency_shape=latency_shape, threads=threads, corpus=corpus, corpus_bytes=corpus_bytes)
    with tempfile.TemporaryDirectory(prefix="hotpath-quant.") as tmpdir:
        fp32 = src
        if _kind(src) == "checkpoint":
            fp32 = export_fp32(src, Path(tmpdir) / f"{src.stem}.onnx")
        out = Path(out) if out is not None else default_output(src, mode)
        path = quantize_onnx(fp32, mode, out, corpus=corpus, corpus_bytes=corpus_bytes, threads=threads, **opts)
        r: dict[str, Any] = {"what": f"quantize {mode}", "mode": mode, "source": str(src), "output": str(path),
                             "size_before": R.file_bytes(fp32), "size_after": R.file_bytes(path),
                             "machine": machine_info(threads),
                             "quantization": json.loads(read_metadata_props(path).get("hotpath.quantization", "{}"))}
        if evaluate:
            base = R.OrtPrefill(fp32, threads=threads)
            var = R.OrtPrefill(path, threads=threads)
            cfg = base.config
            batches = R.eval_batches(eval_data(src, corpus, corpus_bytes).val, cfg.block_size, windows)
            r.update(R.compare(base, var, batches, latency_inputs=None, runtime="onnxruntime CPU", threads=threads))
            # fresh sessions for the timing: the evaluation's arenas hold buffers planned for its shape, and the
            # timed prefill's would come on top (GPT-2 124M fp16: +1.2 GiB, the run's peak)
            del base, var
            if latency_repeats > 0:
                r["latency"] = R.latency(R.OrtPrefill(fp32, threads=threads), R.OrtPrefill(path, threads=threads),
                                         R.latency_batch(cfg.vocab_size, cfg.block_size, latency_shape),
                                         runtime="onnxruntime CPU", threads=threads, repeats=latency_repeats)
        r["peak_rss_mib"] = peak_rss_mib()
        return r


def _run_torch(src: Path, mode: str, out: str | os.PathLike | None, *, evaluate: bool, windows: int,
               latency_repeats: int, latency_shape: tuple[int, int], threads: int, corpus: Optional[list[str]],
               corpus_bytes: Optional[int]) -> dict[str, Any]:
    from model.checkpoint import load_checkpoint

    from .torch_quant import load_quantized, model_bytes, save_quantized_checkpoint

    model, tokenizer, meta = load_checkpoint(src)
    if meta.get("quantization"):
        raise UserError(f"{src} is already quantized ({meta['quantization'].get('mode')}); "
                        "quantize the fp32 checkpoint")
    out = Path(out) if out is not None else src.with_name(f"{src.stem}.{mode}.pt")
    save_quantized_checkpoint(out, model, tokenizer, meta, mode.removeprefix("torch-"))
    qmodel, _, _ = load_quantized(out)  # what serve will run: the saved file, re-quantized at load
    r: dict[str, Any] = {"what": f"quantize {mode}", "mode": mode, "source": str(src), "output": str(out),
                         "size_before": model_bytes(model), "size_after": model_bytes(qmodel),
                         "machine": machine_info(threads),
                         "notes": ["sizes are the model's in-memory weights; the checkpoint file stores the "
                                   "int8-grid weights in fp32 and is quantized at load (quantize.torch_quant."
                                   "load_quantized)"]}
    if evaluate:
        data = eval_data(src, corpus, corpus_bytes, tokenizer=tokenizer, meta=meta)
        batches = R.eval_batches(data.val, model.config.block_size, windows)
        torch.set_num_threads(threads)
        r.update(R.compare(R.torch_logits_fn(model), R.torch_logits_fn(qmodel), batches,
                           latency_inputs=R.latency_batch(model.config.vocab_size, model.config.block_size,
                                                          latency_shape),
                           runtime="torch eager CPU", threads=threads, repeats=latency_repeats))
    r["peak_rss_mib"] = peak_rss_mib()
    return r
