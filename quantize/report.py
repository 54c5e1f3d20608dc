"""Accuracy and speed of a transformed model, measured side by side with its fp32 original in one run.

Accuracy: perplexity on the held-out split (deterministic windows of the model context, as `model.eval`), and
top-1 agreement (the fraction of positions where the transformed model's most likely next token equals the fp32
model's). Speed: median prefill latency over repeats after warm-up, with the spread (min..max), ratio against fp32
(`common.timing`, both models interleaved run by run). Never a speedup without its accuracy cost: `format_report`
prints them on one table.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from common.errors import UserError
from common.timing import measure_interleaved
from export.onnx_meta import gpt_config, parse_hotpath_metadata
from export.ort_session import open_session
from model.corpus import EmptyCorpusError, build_corpus
from model.data import TokenData, eval_windows

DEFAULT_EVAL_WINDOWS = 32
DEFAULT_LATENCY_SHAPE = (8, 256)  # batch x tokens: the prefill benchmark
LATENCY_WARMUP = 2

LogitsFn = Callable[[torch.Tensor], Any]  # input ids (B, T) -> logits (B, T, vocab), a tensor or an array
Batches = list[tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------------------------- data
def corpus_args(meta: Optional[dict]) -> tuple[Optional[list[str]], int]:
    """The corpus a checkpoint was trained on (its `meta["args"]`), so the held-out split is the same one."""
    args = (meta or {}).get("args", {}) or {}
    return args.get("corpus"), int(args.get("corpus_bytes") or 8_000_000)


def load_token_data(tokenizer: Any, meta: Optional[dict] = None, corpus: Optional[list[str]] = None,
                    corpus_bytes: Optional[int] = None) -> TokenData:
    default_corpus, default_bytes = corpus_args(meta)
    try:
        c = build_corpus(corpus if corpus is not None else default_corpus, max_bytes=corpus_bytes or default_bytes)
    except (EmptyCorpusError, FileNotFoundError) as e:
        raise UserError(f"{e} (pass readable text files with --corpus, or leave it out for the built-in corpus)") from e
    return TokenData.encode(c, tokenizer)


def eval_batches(ids: torch.Tensor, block: int, windows: int = DEFAULT_EVAL_WINDOWS, batch_size: int = 8) -> Batches:
    """Deterministic non-overlapping windows of `block` tokens, batched: list of (x, y) int64 (B, block)."""
    ws = list(eval_windows(ids, block, windows))
    if not ws:
        raise UserError(f"the validation split ({len(ids)} tokens) is shorter than one window of {block + 1} "
                        "(pass more text with --corpus)")
    return [(torch.stack([w[0] for w in ws[i:i + batch_size]]), torch.stack([w[1] for w in ws[i:i + batch_size]]))
            for i in range(0, len(ws), batch_size)]


def score(logits_fn: LogitsFn, batches: Batches,
          reference_top1: Optional[list[np.ndarray]] = None) -> dict[str, Any]:
    """Loss, perplexity, the argmax per position, and agreement with `reference_top1` when given."""
    total, count, agree, top1 = 0.0, 0, 0, []
    for i, (x, y) in enumerate(batches):
        logits = torch.as_tensor(np.asarray(logits_fn(x))).float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
        t1 = logits.argmax(-1).numpy()
        top1.append(t1)
        if reference_top1 is not None:
            agree += int((t1 == reference_top1[i]).sum())
    loss = total / count
    out: dict[str, Any] = {"loss": loss, "ppl": math.exp(loss), "tokens": count, "top1": top1}
    if reference_top1 is not None:
        out["top1_agreement"] = agree / count
    return out


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    @torch.inference_mode()
    def fn(x: torch.Tensor) -> torch.Tensor:
        return model(x).float()
    return fn


# ---------------------------------------------------------------------------------------------- ONNX Runtime
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class OrtPrefill:
    """An ONNX Runtime session over a hotpath decoder, run as a prefill (empty past): logits for input_ids.

    Feeds are built from the session's own inputs: `input_ids`, `attention_mask` (ones), `position_ids`
    (0..T-1) and empty past key/values (B, H_kv, 0, D) for a KV-cache export. `config` is needed for a graph
    without hotpath metadata (ONNX Runtime's pre-processed copy); the CPU provider unless `providers` says."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, config: Any = None,
                 providers: Optional[Sequence[str]] = None):
        self.path = Path(path)
        # one inter-op thread: a decoder graph is a chain, and the intra-op threads are the ones timed
        self.session = open_session(self.path, providers=providers or ["CPUExecutionProvider"], threads=threads,
                                    inter_op_threads=1)
        self.config = config or gpt_config(parse_hotpath_metadata(
            self.session.get_modelmeta().custom_metadata_map, str(self.path)))
        self.inputs = self.session.get_inputs()
        self.logits_name = next((o.name for o in self.session.get_outputs() if "logits" in o.name),
                                self.session.get_outputs()[0].name)

    def feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        B, T = ids.shape
        cfg = self.config
        out: dict[str, np.ndarray] = {}
        for i in self.inputs:
            dtype = _NP.get(i.type, np.float32)
            name = i.name.lower()
            if "input_ids" in name:
                out[i.name] = ids.astype(dtype)
            elif "attention_mask" in name:
                out[i.name] = np.ones((B, T), dtype=dtype)
            elif "position" in name:
                out[i.name] = np.broadcast_to(np.arange(T, dtype=dtype), (B, T)).copy()
            elif len(i.shape) == 4:  # past key or value
                h = i.shape[1] if isinstance(i.shape[1], int) else cfg.n_kv_head
                d = i.shape[3] if isinstance(i.shape[3], int) else cfg.head_dim
                out[i.name] = np.zeros((B, h, 0, d), dtype=dtype)
            else:
                raise UserError(f"{self.path.name} has an input {i.name!r} that a hotpath decoder does not have "
                                "(quantize models written by python -m export.to_onnx)")
        return out

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        ids = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return self.session.run([self.logits_name], self.feeds(ids))[0]


# ---------------------------------------------------------------------------------------------- side by side
def latency_batch(vocab_size: int, block: int, shape: tuple[int, int] = DEFAULT_LATENCY_SHAPE) -> np.ndarray:
    """The timed prefill's input ids: batch x min(tokens, context), fixed seed."""
    b, t = shape
    return np.random.default_rng(0).integers(0, vocab_size, (b, min(t, block)), dtype=np.int64)


def latency(baseline_fn: LogitsFn, variant_fn: LogitsFn, inputs: np.ndarray, *, runtime: str, threads: int,
            repeats: int) -> dict[str, Any]:
    """Prefill latency of both on the same input ids, interleaved run by run in this process so that machine noise
    hits both alike: {runtime, shape, threads, baseline, variant (Timing.to_dict()), speedup}."""
    x = torch.from_numpy(inputs)
    base, var = measure_interleaved([lambda: baseline_fn(x), lambda: variant_fn(x)], warmup=LATENCY_WARMUP,
                                    repeats=repeats)
    return {"runtime": runtime, "shape": list(x.shape), "threads": threads, "baseline": base.to_dict(),
            "variant": var.to_dict(), "speedup": base.median / var.median}


def compare(baseline_fn: LogitsFn, variant_fn: LogitsFn, batches: Batches, *,
            latency_inputs: Optional[np.ndarray], runtime: str, threads: int, repeats: int = 7) -> dict[str, Any]:
    """Perplexity before/after, top-1 agreement and the interleaved latency ratio of two logits functions."""
    before = score(baseline_fn, batches)
    after = score(variant_fn, batches, reference_top1=before["top1"])
    r: dict[str, Any] = {
        "ppl_before": before["ppl"], "ppl_after": after["ppl"], "loss_before": before["loss"],
        "loss_after": after["loss"], "ppl_increase_pct": 100 * (after["ppl"] / before["ppl"] - 1),
        "top1_agreement": after["top1_agreement"], "eval_tokens": after["tokens"],
    }
    if latency_inputs is not None and repeats > 0:
        r["latency"] = latency(baseline_fn, variant_fn, latency_inputs, runtime=runtime, threads=threads,
                               repeats=repeats)
    return r


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a file plus its external-data file (`model.onnx.data`) when it has one."""
    path = Path(path)
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ---------------------------------------------------------------------------------------------- report
def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def format_report(r: dict[str, Any]) -> str:
    """The human summary: size, perplexity before/after, agreement and latency on adjacent lines."""
    lines = [f"{r.get('what', 'result')}: {r.get('output', '')}"]
    if "size_before" in r:
        ratio = r["size_before"] / r["size_after"] if r.get("size_after") else float("nan")
        lines.append(f"  file size     {_mib(r['size_before'])} -> {_mib(r['size_after'])}  ({ratio:.2f}x smaller)")
    if "params_before" in r:
        lines.append(f"  parameters    {r['params_before']:,} -> {r['params_after']:,}"
                     + (f"  (non-zero {r['nonzero_after']:,})" if "nonzero_after" in r else ""))
    if "ppl_before" in r:
        lines.append(f"  perplexity    {r['ppl_before']:.3f} -> {r['ppl_after']:.3f}  "
                     f"({r['ppl_increase_pct']:+.2f}%, {r.get('eval_tokens', 0):,} held-out tokens)")
    if "top1_agreement" in r:
        lines.append(f"  top-1 agrees  {100 * r['top1_agreement']:.2f}% of positions with the fp32 model")
    lat = r.get("latency")
    if lat:
        base, var = lat["baseline"], lat["variant"]
        lines.append(f"  latency       {_ms(base['median_s'])} ms -> {_ms(var['median_s'])} ms"
                     f"  ({speed_words(lat['speedup'])}; {lat['runtime']}, prefill {lat['shape'][0]}x{lat['shape'][1]},"
                     f" median of {var['repeats']}, spread {_ms(var['min_s'])}..{_ms(var['max_s'])} ms,"
                     f" {lat['threads']} threads)")
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def speed_words(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def ppl_gate(r: dict[str, Any], max_increase_pct: Optional[float]) -> Optional[str]:
    """None when within the gate; otherwise the one-line reason."""
    if max_increase_pct is None or "ppl_increase_pct" not in r:
        return None
    inc = r["ppl_increase_pct"]
    if inc > max_increase_pct:
        return (f"perplexity rose {inc:.2f}% ({r['ppl_before']:.3f} -> {r['ppl_after']:.3f}), "
                f"{inc - max_increase_pct:.2f} points over --max-ppl-increase {max_increase_pct:g}%")
    return None
