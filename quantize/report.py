"""Accuracy and speed of a transformed model, measured side by side with its fp32 original in one run.

Accuracy: perplexity on the held-out split (deterministic windows of the model context, as `model.eval`), and
top-1 agreement (the fraction of positions where the transformed model's most likely next token equals the fp32
model's), and KL(fp32 || transformed) per token. Evaluation streams: one chunk of windows through both models,
reduced at once to per-token sums, so memory stays O(chunk x context x vocab) whatever the number of windows
(`EVAL_CHUNK`), with a progress bar. Speed: median prefill latency over repeats after warm-up, with the spread
(min..max), ratio against fp32 (`common.timing`, both models interleaved run by run). Never a speedup without its
accuracy cost: `format_report` prints them on one table.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError
from common.timing import measure_interleaved
from export.onnx_meta import LOGITS_TO_KEEP, gpt_config, parse_hotpath_metadata
from export.ort_session import open_session
from model.corpus import EmptyCorpusError, build_corpus
from model.data import TokenData, eval_windows

DEFAULT_EVAL_WINDOWS = 32
# windows per model call: the logits held at once are EVAL_CHUNK x context x vocab floats (GPT-2 124M: 206 MB a
# window; batches of 8 in two sessions once took 19.6 GB)
EVAL_CHUNK = 1
REDUCE_ROWS = 256  # positions reduced at a time: log-softmax temporaries of REDUCE_ROWS x vocab floats
DEFAULT_LATENCY_SHAPE = (8, 256)  # batch x tokens: the prefill benchmark
LATENCY_WARMUP = 2

# input ids (B, T), logits_to_keep (0: every position, k: the last k) -> logits (B, T or k, vocab), tensor or array
LogitsFn = Callable[..., Any]
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


def eval_batches(ids: torch.Tensor, block: int, windows: int = DEFAULT_EVAL_WINDOWS,
                 batch_size: int = EVAL_CHUNK) -> Batches:
    """Deterministic non-overlapping windows of `block` tokens, in chunks of `batch_size` windows: list of (x, y)
    int64 (chunk, block). One model call per chunk, so the chunk bounds the logits held at once."""
    ws = list(eval_windows(ids, block, windows))
    if not ws:
        raise UserError(f"the validation split ({len(ids)} tokens) is shorter than one window of {block + 1} "
                        "(pass more text with --corpus)")
    return [(torch.stack([w[0] for w in ws[i:i + batch_size]]), torch.stack([w[1] for w in ws[i:i + batch_size]]))
            for i in range(0, len(ws), batch_size)]


def _logits(fn: LogitsFn, x: torch.Tensor) -> torch.Tensor:
    """(positions, vocab) float32 logits of one chunk; no copy when the function returns float32."""
    out = fn(x)
    t = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
    return t.float().reshape(-1, t.shape[-1])


def _row_slices(n: int) -> range:
    return range(0, n, REDUCE_ROWS)


def _bar(batches: Batches, desc: str, progress: bool) -> tqdm:
    return tqdm(total=sum(len(x) for x, _ in batches), desc=desc, unit="window", dynamic_ncols=True,
                file=sys.stderr, disable=not progress)


@torch.no_grad()
def score(logits_fn: LogitsFn, batches: Batches, *, progress: bool = False) -> dict[str, Any]:
    """Held-out loss and perplexity of one model, chunk by chunk: {'loss', 'ppl', 'tokens'}."""
    total, count = 0.0, 0
    with _bar(batches, "evaluating", progress) as bar:
        for x, y in batches:
            logits, target = _logits(logits_fn, x), y.reshape(-1)
            for s in _row_slices(len(target)):
                logp = torch.log_softmax(logits[s:s + REDUCE_ROWS], -1)
                total -= logp.gather(1, target[s:s + REDUCE_ROWS, None]).sum(dtype=torch.float64).item()
            count += len(target)
            bar.update(len(x))
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


@torch.no_grad()
def score_pair(baseline_fn: LogitsFn, variant_fn: LogitsFn, batches: Batches, *,
               progress: bool = False) -> dict[str, Any]:
    """Both models on each chunk in turn, reduced at once to per-token sums (loss of each, top-1 agreement,
    KL(baseline || variant)) and dropped: memory is O(chunk x context x vocab), never the eval set's logits."""
    nll_b, nll_v, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
    with _bar(batches, "evaluating fp32 and variant", progress) as bar:
        for x, y in batches:
            base, var, target = _logits(baseline_fn, x), _logits(variant_fn, x), y.reshape(-1)
            for s in _row_slices(len(target)):
                rows, t = slice(s, s + REDUCE_ROWS), target[s:s + REDUCE_ROWS, None]
                logp_b, logp_v = torch.log_softmax(base[rows], -1), torch.log_softmax(var[rows], -1)
                nll_b -= logp_b.gather(1, t).sum(dtype=torch.float64).item()
                nll_v -= logp_v.gather(1, t).sum(dtype=torch.float64).item()
                kl += (logp_b.exp() * (logp_b - logp_v)).sum(dtype=torch.float64).item()
                agree += int((base[rows].argmax(-1) == var[rows].argmax(-1)).sum())
            count += len(target)
            del base, var
            bar.update(len(x))
    return {"loss_before": nll_b / count, "loss_after": nll_v / count, "kl": kl / count,
            "top1_agreement": agree / count, "tokens": count}


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    @torch.inference_mode()
    def fn(x: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        return model(x, logits_to_keep=logits_to_keep).float()
    return fn


# ---------------------------------------------------------------------------------------------- ONNX Runtime
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class OrtPrefill:
    """An ONNX Runtime session over a hotpath decoder, run as a prefill (empty past): logits for input_ids.

    Feeds are built from the session's own inputs: `input_ids`, `attention_mask` (ones), `position_ids`
    (0..T-1), empty past key/values (B, H_kv, 0, D) for a KV-cache export, and `logits_to_keep` where the graph
    has it: 0 by default, as evaluation (perplexity, top-1 agreement, calibration) needs every position's logits; 1
    for the latency, timed as a generation prefill. `config` is
    needed for a graph without hotpath metadata (ONNX Runtime's pre-processed copy); the CPU provider unless
    `providers` says."""

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None, config: Any = None,
                 providers: Optional[Sequence[str]] = None):
        self.path = Path(path)
        # one inter-op thread: a decoder graph is a chain, and the intra-op threads are the ones timed
        self.session = open_session(self.path, providers=providers or ["CPUExecutionProvider"], threads=threads,
                                    inter_op_threads=1)
        self.config = config or gpt_config(parse_hotpath_metadata(
            self.session.get_modelmeta().custom_metadata_map, str(self.path)))
        self.inputs = self.session.get_inputs()
        # logits_to_keep has a default (0), so ONNX Runtime lists it as an overridable initializer, not an input
        self.keeps_logits = LOGITS_TO_KEEP in {i.name for i in self.inputs} | {
            i.name for i in self.session.get_overridable_initializers()}
        self.logits_name = next((o.name for o in self.session.get_outputs() if "logits" in o.name),
                                self.session.get_outputs()[0].name)

    def feeds(self, ids: np.ndarray, logits_to_keep: int = 0) -> dict[str, np.ndarray]:
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
            elif i.name == LOGITS_TO_KEEP:
                continue  # fed below
            elif len(i.shape) == 4:  # past key or value
                h = i.shape[1] if isinstance(i.shape[1], int) else cfg.n_kv_head
                d = i.shape[3] if isinstance(i.shape[3], int) else cfg.head_dim
                out[i.name] = np.zeros((B, h, 0, d), dtype=dtype)
            else:
                raise UserError(f"{self.path.name} has an input {i.name!r} that a hotpath decoder does not have "
                                "(quantize models written by python -m export.to_onnx)")
        if self.keeps_logits:
            out[LOGITS_TO_KEEP] = np.array(logits_to_keep, dtype=np.int64)  # 0 = every position
        return out

    def __call__(self, x: torch.Tensor | np.ndarray, logits_to_keep: int = 0) -> np.ndarray:
        ids = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return self.session.run([self.logits_name], self.feeds(ids, logits_to_keep))[0]


# ---------------------------------------------------------------------------------------------- side by side
def latency_batch(vocab_size: int, block: int, shape: tuple[int, int] = DEFAULT_LATENCY_SHAPE) -> np.ndarray:
    """The timed prefill's input ids: batch x min(tokens, context), fixed seed."""
    b, t = shape
    return np.random.default_rng(0).integers(0, vocab_size, (b, min(t, block)), dtype=np.int64)


def latency(baseline_fn: LogitsFn, variant_fn: LogitsFn, inputs: np.ndarray, *, runtime: str, threads: int,
            repeats: int) -> dict[str, Any]:
    """Prefill latency of both on the same input ids, as generation prefills (the last position's logits only, where
    the graph can: an export without logits_to_keep returns all), interleaved run by run in this process so that
    machine noise hits both alike: {runtime, shape, threads, logits_to_keep, baseline, variant (Timing.to_dict()),
    speedup}. Keeping one position also keeps (batch x tokens x vocab) logits out of memory: at GPT-2 124M the
    8x256 prefill's were 411 MB per call and set quantize's peak RSS."""
    x = torch.from_numpy(inputs)
    base, var = measure_interleaved([lambda: baseline_fn(x, logits_to_keep=1), lambda: variant_fn(x, logits_to_keep=1)],
                                    warmup=LATENCY_WARMUP, repeats=repeats)
    return {"runtime": runtime, "shape": list(x.shape), "threads": threads, "logits_to_keep": 1,
            "baseline": base.to_dict(), "variant": var.to_dict(), "speedup": base.median / var.median}


def compare(baseline_fn: LogitsFn, variant_fn: LogitsFn, batches: Batches, *,
            latency_inputs: Optional[np.ndarray], runtime: str, threads: int, repeats: int = 7,
            progress: bool = True) -> dict[str, Any]:
    """Perplexity before/after, top-1 agreement, KL and the interleaved latency ratio of two logits functions."""
    s = score_pair(baseline_fn, variant_fn, batches, progress=progress)
    ppl_before, ppl_after = math.exp(s["loss_before"]), math.exp(s["loss_after"])
    r: dict[str, Any] = {
        "ppl_before": ppl_before, "ppl_after": ppl_after, "loss_before": s["loss_before"],
        "loss_after": s["loss_after"], "ppl_increase_pct": 100 * (ppl_after / ppl_before - 1),
        "top1_agreement": s["top1_agreement"], "kl_per_token": s["kl"], "eval_tokens": s["tokens"],
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
        kl = f", KL {r['kl_per_token']:.2e} nats/token" if "kl_per_token" in r else ""
        lines.append(f"  top-1 agrees  {100 * r['top1_agreement']:.2f}% of positions with the fp32 model{kl}")
    lat = r.get("latency")
    if lat:
        base, var = lat["baseline"], lat["variant"]
        lines.append(f"  latency       {_ms(base['median_s'])} ms -> {_ms(var['median_s'])} ms"
                     f"  ({speed_words(lat['speedup'])}; {lat['runtime']}, prefill {lat['shape'][0]}x{lat['shape'][1]}"
                     f"{' to the last logits' if lat.get('logits_to_keep') else ''},"
                     f" median of {var['repeats']}, spread {_ms(var['min_s'])}..{_ms(var['max_s'])} ms,"
                     f" {lat['threads']} threads)")
    if "peak_rss_mib" in r:
        lines.append(f"  peak memory   {r['peak_rss_mib']:.0f} MiB (peak RSS of this process)")
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
