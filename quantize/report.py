"""Accuracy and speed of a transformed model, measured side by side with its fp32 original in one run.

Accuracy: perplexity on the held-out split (deterministic windows of the model context, as `model.eval`), and
top-1 agreement (the fraction of positions where the transformed model's most likely next token equals the fp32
model's). Speed: median prefill latency over repeats after warm-up, with the spread (min..max), ratio against fp32.
Never a speedup without its accuracy cost: `format_report` prints them on one table.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from common.cli import UserError
from model.corpus import EmptyCorpusError, build_corpus
from model.data import TokenData, eval_windows

DEFAULT_EVAL_WINDOWS = 32
DEFAULT_LATENCY_SHAPE = (8, 256)  # batch x tokens: the prefill benchmark


# ---------------------------------------------------------------------------------------------- data
def corpus_args(meta: dict | None) -> tuple[Optional[list[str]], int]:
    """The corpus a checkpoint was trained on (its `meta["args"]`), so the held-out split is the same one."""
    args = (meta or {}).get("args", {}) or {}
    return args.get("corpus"), int(args.get("corpus_bytes") or 8_000_000)


def load_token_data(tokenizer, meta: dict | None = None, corpus: Optional[list[str]] = None,
                    corpus_bytes: Optional[int] = None) -> TokenData:
    default_corpus, default_bytes = corpus_args(meta)
    try:
        c = build_corpus(corpus if corpus is not None else default_corpus, max_bytes=corpus_bytes or default_bytes)
    except (EmptyCorpusError, FileNotFoundError) as e:
        raise UserError(f"{e} (pass readable text files with --corpus, or leave it out for the built-in corpus)") from e
    return TokenData.encode(c, tokenizer)


def eval_batches(ids: torch.Tensor, block: int, windows: int = DEFAULT_EVAL_WINDOWS, batch_size: int = 8):
    """Deterministic non-overlapping windows of `block` tokens, batched: list of (x, y) int64 (B, block)."""
    ws = list(eval_windows(ids, block, windows))
    if not ws:
        raise UserError(f"the validation split ({len(ids)} tokens) is shorter than one window of {block + 1} "
                        "(pass more text with --corpus)")
    return [(torch.stack([w[0] for w in ws[i:i + batch_size]]), torch.stack([w[1] for w in ws[i:i + batch_size]]))
            for i in range(0, len(ws), batch_size)]


def score(logits_fn: Callable[[torch.Tensor], Any], batches, reference_top1: Optional[list[np.ndarray]] = None):
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
    out = {"loss": loss, "ppl": math.exp(loss), "tokens": count, "top1": top1}
    if reference_top1 is not None:
        out["top1_agreement"] = agree / count
    return out


def torch_logits_fn(model):
    @torch.inference_mode()
    def fn(x):
        return model(x).float()
    return fn


# ---------------------------------------------------------------------------------------------- ONNX Runtime
def read_props(model_or_path) -> dict[str, str]:
    """metadata_props of an ONNX model (without loading its weights when given a path)."""
    import onnx

    m = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path),
                                                                                load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def hotpath_config(props: dict[str, str]):
    from model.gpt import GPTConfig

    raw = props.get("hotpath.config")
    if not raw:
        raise UserError("the ONNX model has no hotpath.config metadata (export it with python -m export.to_onnx)")
    return GPTConfig.from_dict(json.loads(raw))


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def session_options(threads: Optional[int] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


class OrtPrefill:
    """An ONNX Runtime session over a hotpath decoder, run as a prefill (empty past): logits for input_ids.

    Feeds are built from the session's own inputs: `input_ids`, `attention_mask` (ones), `position_ids`
    (0..T-1) and empty past key/values (B, H_kv, 0, D) for a KV-cache export."""

    def __init__(self, path, threads: Optional[int] = None, config=None, providers=None):
        import onnxruntime as ort

        self.path = Path(path)
        self.config = config or hotpath_config(read_props(path))
        self.session = ort.InferenceSession(str(path), session_options(threads),
                                            providers=providers or ["CPUExecutionProvider"])
        self.inputs = self.session.get_inputs()
        self.logits_name = next((o.name for o in self.session.get_outputs() if "logits" in o.name),
                                self.session.get_outputs()[0].name)

    def feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        B, T = ids.shape
        cfg = self.config
        out = {}
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

    def __call__(self, x) -> np.ndarray:
        ids = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return self.session.run([self.logits_name], self.feeds(ids))[0]


# ---------------------------------------------------------------------------------------------- speed, size
def time_call(fn: Callable[[], Any], warmup: int = 2, repeats: int = 7) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def latency_pair(fp32_fn: Callable[[], Any], other_fn: Callable[[], Any], warmup: int = 2, repeats: int = 7):
    """Both measured in the same process, interleaved run by run so that machine noise hits both alike."""
    for _ in range(warmup):
        fp32_fn(), other_fn()
    a, b = [], []
    for _ in range(repeats):
        for fn, acc in ((fp32_fn, a), (other_fn, b)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    stats = lambda ts: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}
    sa, sb = stats(a), stats(b)
    return sa, sb, sa["median_s"] / sb["median_s"]


def file_bytes(path) -> int:
    path = Path(path)
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def machine() -> dict[str, Any]:
    import platform

    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- report
def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MB"


def format_report(r: dict[str, Any]) -> str:
    """The human summary: size, perplexity before/after, agreement and latency on adjacent lines."""
    lines = [f"{r.get('what', 'result')}: {r.get('output', '')}"]
    if "size_before" in r:
        ratio = r["size_before"] / r["size_after"] if r.get("size_after") else float("nan")
        lines.append(f"  file size     {_mb(r['size_before'])} -> {_mb(r['size_after'])}  ({ratio:.2f}x smaller)")
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
        lines.append(f"  latency       {lat['baseline']['median_s'] * 1e3:.1f} ms -> {lat['variant']['median_s'] * 1e3:.1f} ms"
                     f"  ({speed_words(lat['speedup'])}; {lat['runtime']}, prefill {lat['shape'][0]}x{lat['shape'][1]},"
                     f" median of {lat['variant']['repeats']}, spread {lat['variant']['min_s'] * 1e3:.1f}.."
                     f"{lat['variant']['max_s'] * 1e3:.1f} ms, {lat['threads']} threads)")
    for note in r.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def speed_words(speedup: float) -> str:
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def jsonable(r: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(r, default=str))


def ppl_gate(r: dict[str, Any], max_increase_pct: Optional[float]) -> Optional[str]:
    """None when within the gate; otherwise the one-line reason."""
    if max_increase_pct is None or "ppl_increase_pct" not in r:
        return None
    inc = r["ppl_increase_pct"]
    if inc > max_increase_pct:
        return (f"perplexity rose {inc:.2f}% ({r['ppl_before']:.3f} -> {r['ppl_after']:.3f}), "
                f"{inc - max_increase_pct:.2f} points over --max-ppl-increase {max_increase_pct:g}%")
    return None
