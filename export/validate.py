"""Validation of an exported decoder against the PyTorch model it came from: part of every export.

ONNX Runtime (through :class:`export.onnx_runtime.OnnxDecoder`) and PyTorch (float32, the source model) run the same
inputs; each check reports the max absolute difference of the logits, the top-1 agreement over every compared
position, and one check the greedy-decode agreement (how many of 32 greedy tokens, made with each side's own KV
cache, match before the first difference). Checks:

- ``random prefill``: random token ids, batch 2, empty past, every position's logits (``logits_to_keep`` 0, what
  evaluation asks for);
- ``last-token prefill``: the same prefill with ``logits_to_keep`` 1 (what generation asks for): the graph must
  return the last position only, (2, 1, vocab), equal to PyTorch's last position;
- ``random decode``: one more random token per row, each side on its own cache (KV exports);
- ``left-padded batch`` (``right-padded batch`` for an ort-target graph, whose GroupQueryAttention keeps row b's
  tokens at [0, len_b)): two prompts of different lengths, padded with a mask, prefill and one decode step, against
  each prompt run alone and unpadded in PyTorch (only real positions compared);
- ``corpus text``: two windows of real held-out text (the standard-library corpus of :mod:`model.corpus`);
- ``greedy 32``: 32 greedy tokens from a corpus prompt, ``OnnxDecoder.generate`` against ``model.generate`` (on an
  ort-target graph through the shared, in-place cache: :meth:`OnnxDecoder.step`).

Tolerances (per export dtype, :data:`TOLERANCES`): logits max-abs ≤ ``logits_rel · max(1, max |torch logits|)``,
top-1 agreement ≥ ``top1``, greedy prefix ≥ ``greedy`` tokens (capped by what the context allows).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from model.gpt import GPT

    from .onnx_runtime import OnnxDecoder

GREEDY_TOKENS = 32


@dataclass(frozen=True)
class Tolerance:
    logits_rel: float  # max |ort - torch| <= logits_rel * max(1, max |torch logits|)
    top1: float  # minimum top-1 agreement (fraction of positions)
    greedy: int  # minimum greedy tokens that match before the first difference (of GREEDY_TOKENS)


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(logits_rel=1e-4, top1=0.99, greedy=GREEDY_TOKENS),
    # fp16 weights and KV cache against the fp32 model: a near-tie may flip a greedy choice, and then the rest
    # of the continuation differs legitimately
    "fp16": Tolerance(logits_rel=3e-2, top1=0.95, greedy=8),
}


@dataclass
class Check:
    name: str
    max_abs_diff: Optional[float] = None
    logits_scale: Optional[float] = None  # max |torch logits| over the compared positions
    top1_agreement: Optional[float] = None
    positions: int = 0
    greedy_match: Optional[int] = None  # matching greedy tokens before the first difference
    greedy_total: Optional[int] = None
    passed: bool = True
    why: str = ""

    def judge(self, tol: Tolerance) -> "Check":
        reasons = []
        if self.max_abs_diff is not None:
            bound = tol.logits_rel * max(1.0, self.logits_scale or 0.0)
            if not self.max_abs_diff <= bound:  # NaN fails too
                reasons.append(f"max abs diff {self.max_abs_diff:.3g} > {bound:.3g}")
        if self.top1_agreement is not None and not self.top1_agreement >= tol.top1:
            reasons.append(f"top-1 agreement {self.top1_agreement:.3f} < {tol.top1}")
        need = min(tol.greedy, self.greedy_total or 0)  # a short context allows fewer greedy tokens
        if self.greedy_match is not None and self.greedy_match < need:
            reasons.append(f"greedy {self.greedy_match}/{self.greedy_total} < {need}")
        self.passed, self.why = not reasons, "; ".join(reasons)
        return self


@dataclass
class ValidationReport:
    dtype: str
    tolerance: Tolerance
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def rejudge(self, tol: Tolerance) -> bool:
        """Would these measurements pass `tol`? (Does not change the report.)"""
        from copy import deepcopy

        return all(deepcopy(c).judge(tol).passed for c in self.checks)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks if c.max_abs_diff is not None), default=float("nan"))

    @property
    def min_top1(self) -> float:
        return min((c.top1_agreement for c in self.checks if c.top1_agreement is not None), default=float("nan"))

    @property
    def greedy(self) -> tuple[int, int]:
        for c in self.checks:
            if c.greedy_match is not None:
                return c.greedy_match, c.greedy_total or 0
        return 0, 0

    def table(self) -> str:
        rows = [f"  {'check':<18} {'max|diff|':>10} {'top-1':>7} {'greedy':>7}  result"]
        for c in self.checks:
            diff = f"{c.max_abs_diff:.2e}" if c.max_abs_diff is not None else "-"
            top1 = f"{c.top1_agreement:.3f}" if c.top1_agreement is not None else "-"
            greedy = f"{c.greedy_match}/{c.greedy_total}" if c.greedy_match is not None else "-"
            rows.append(f"  {c.name:<18} {diff:>10} {top1:>7} {greedy:>7}  {'ok' if c.passed else 'FAIL: ' + c.why}")
        rows += [f"  note: {n}" for n in self.notes]
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "tolerance": asdict(self.tolerance), "passed": self.passed,
                "seconds": self.seconds, "checks": [asdict(c) for c in self.checks], "notes": list(self.notes)}


def _compare(name: str, ort_logits: np.ndarray, torch_logits: torch.Tensor) -> Check:
    """Compare (N, V) logits (already restricted to real positions)."""
    ref = torch_logits.detach().float().cpu().numpy().reshape(-1, torch_logits.shape[-1])
    got = np.asarray(ort_logits, dtype=np.float32).reshape(-1, ref.shape[-1])
    diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
    if not np.isfinite(got).all():
        diff = float("nan")
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1))) if got.size else 1.0
    return Check(name, max_abs_diff=diff, logits_scale=float(np.abs(ref).max()) if ref.size else 0.0,
                 top1_agreement=top1, positions=int(ref.shape[0]))


def _worst_first(check: Check) -> float:
    """Sort key: the max abs diff, NaN (a non-finite output) counting as the worst."""
    diff = check.max_abs_diff
    return float("inf") if diff is None or np.isnan(diff) else diff


def _merge(name: str, parts: list[Check]) -> Check:
    worst = max(parts, key=_worst_first)
    n = sum(c.positions for c in parts)
    top1 = sum((c.top1_agreement or 0) * c.positions for c in parts) / max(1, n)
    return Check(name, max_abs_diff=worst.max_abs_diff, logits_scale=max(c.logits_scale or 0 for c in parts),
                 top1_agreement=top1, positions=n)


def corpus_ids(tokenizer: Tokenizer, max_bytes: int = 200_000) -> Optional[list[int]]:
    """Token ids of held-out corpus text (the standard library's validation files), or None if unavailable."""
    from model.corpus import EmptyCorpusError, build_corpus

    try:
        corpus = build_corpus(max_bytes=max_bytes)
    except (EmptyCorpusError, OSError):
        return None
    ids = tokenizer.encode(corpus.val_text[:40_000]).ids
    return ids or None


@torch.no_grad()
def validate_decoder(decoder: OnnxDecoder, model: GPT, tokenizer: Tokenizer, dtype: str = "fp32", *,
                     tolerance: Optional[Tolerance] = None, seed: int = 0) -> ValidationReport:
    """Run the checks above on `decoder` (an OnnxDecoder) against `model` (the float32 torch GPT)."""
    from model.generate import generate

    start = time.perf_counter()
    tol = tolerance or TOLERANCES[dtype]
    report = ValidationReport(dtype, tol)
    cfg = model.config
    ctx, V = cfg.block_size, cfg.vocab_size
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    kv = decoder.kv_cache

    def torch_run(ids, mask=None, past=None):
        ids_t = torch.as_tensor(ids, device=device)
        mask_t = None if mask is None else torch.as_tensor(mask, device=device)
        return model(ids_t, attention_mask=mask_t, past_key_values=past, use_cache=True)

    # random prefill, then one decode step on each side's own cache
    T = min(16, ctx - 1) if kv else min(16, ctx)
    ids = rng.integers(0, V, size=(2, T), dtype=np.int64)
    ort_logits, ort_past = decoder.forward(ids)
    ref_logits, ref_past = torch_run(ids)
    report.checks.append(_compare("random prefill", ort_logits, ref_logits))
    last, _ = decoder.forward(ids, logits_to_keep=1)
    if last.shape == (2, 1, V):
        report.checks.append(_compare("last-token prefill", last, ref_logits[:, -1:]))
    else:  # a graph that ignores logits_to_keep: a shape error shows as a NaN difference, which fails
        report.checks.append(Check("last-token prefill", max_abs_diff=float("nan"), logits_scale=0.0))
        report.notes.append(f"logits_to_keep=1 gave logits of shape {last.shape}, not (2, 1, {V})")
    if kv:
        nxt = rng.integers(0, V, size=(2, 1), dtype=np.int64)
        ort_logits, _ = decoder.forward(nxt, past=ort_past)
        ref_logits, _ = torch_run(nxt, past=ref_past)
        report.checks.append(_compare("random decode", ort_logits, ref_logits))

    # padded batch against unpadded single runs: left padding (generic graphs) or right padding (ort graphs,
    # GroupQueryAttention: row b's tokens at [0, len_b))
    lens = [T, max(1, T // 2 - 1)]
    prompts = [rng.integers(0, V, size=n).tolist() for n in lens]
    from .onnx_runtime import pad_left, pad_right

    right = getattr(decoder, "padding_side", "left") == "right"
    ids, mask, pos = (pad_right if right else pad_left)(prompts)
    ort_logits, ort_past = decoder.forward(ids, mask, pos)
    parts = []
    singles = []
    for b, p in enumerate(prompts):
        ref_logits, ref_past = torch_run(np.array([p]))
        real = slice(0, len(p)) if right else slice(T - len(p), T)
        parts.append(_compare("", ort_logits[b, real], ref_logits[0]))
        singles.append((ref_logits, ref_past))
    if kv:  # one decode step with the padded cache and a grown mask
        last_real = [len(p) - 1 for p in prompts] if right else [T - 1] * 2
        nxt = ort_logits[np.arange(2), last_real].argmax(-1)[:, None].astype(np.int64)
        if right:  # the new token goes to column len_b of each row; positions len_b
            mask2 = (np.arange(T + 1)[None, :] < np.array(lens)[:, None] + 1).astype(np.int64)
            pos2 = np.array(lens, dtype=np.int64)[:, None]
        else:
            mask2 = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
            pos2 = pos[:, -1:] + 1
        ort_logits2, _ = decoder.forward(nxt, mask2, pos2, ort_past)
        for b in range(2):
            ref_logits2, _ = torch_run(nxt[b:b + 1], past=singles[b][1])
            parts.append(_compare("", ort_logits2[b], ref_logits2[0]))
    report.checks.append(_merge("right-padded batch" if right else "left-padded batch", parts))

    # real text
    text_ids = corpus_ids(tokenizer)
    if text_ids is None or len(text_ids) < 8:
        report.notes.append("no corpus text found: the corpus check was skipped")
        text_ids = rng.integers(0, V, size=64).tolist()
    else:
        W = min(ctx, 64, len(text_ids) // 2)
        windows = np.array([text_ids[:W], text_ids[W:2 * W]], dtype=np.int64)
        ort_logits, _ = decoder.forward(windows)
        report.checks.append(_compare("corpus text", ort_logits, torch_run(windows)[0]))

    # greedy decode with each side's KV cache
    n_prompt = max(1, min(16, ctx + 1 - GREEDY_TOKENS, len(text_ids)))
    prompt = [int(t) for t in text_ids[:n_prompt]]
    want = generate(model, prompt, GREEDY_TOKENS)
    got = decoder.generate(prompt, GREEDY_TOKENS)
    match = 0
    for a, b in zip(want, got):
        if a != b:
            break
        match += 1
    report.checks.append(Check("greedy 32", greedy_match=match, greedy_total=len(want)))

    for c in report.checks:
        c.judge(tol)
    report.seconds = time.perf_counter() - start
    return report
