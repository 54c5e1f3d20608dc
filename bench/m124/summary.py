"""From worker results to the table and the issue's goals: medians with min-max over every repeat of every round,
the greedy tokens checked against the reference engine, and each goal met or missed by how much. Pure functions."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .rounds import Variant

REFERENCE = "hotpath torch fp32"  # the tokens every other engine's greedy output is compared with
MB = 1e6 / 2**20  # the memory goals are in MB (10^6 bytes); the table is in MiB


def spread(samples: Sequence[float]) -> Optional[dict[str, float]]:
    """{"median", "min", "max", "n"} of the samples, or None when there are none."""
    xs = [float(x) for x in samples if x == x]  # NaN (a failed repeat) is left out
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(variants: list[Variant], results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant: the metrics' spreads over all rounds, its file size, note, error and greedy match."""
    ref_runs = results.get(REFERENCE) or []
    ref_tokens = ref_runs[0]["tokens"] if ref_runs else None
    rows = []
    for v in variants:
        runs = results.get(v.name, [])
        row: dict[str, Any] = {"variant": v.name, "kind": v.kind, "precision": v.precision, "runner": v.runner,
                               "rounds": len(runs), "file_mib": v.file_mib, "error": v.error,
                               "note": runs[0].get("note", "") if runs else ""}
        for key in ("prefill_ms", "decode_b1_ms", "decode_b8_tok_s"):
            row[key] = spread([x for r in runs for x in r[key]])
        row["peak_rss_mib"] = spread([r["peak_rss_mib"] for r in runs])
        row["batch_note"] = next((r["batch_note"] for r in runs if r.get("batch_note")), None)
        if runs and ref_tokens is not None:
            tokens = runs[0]["tokens"]
            row["greedy_match"] = f"{matching_prefix(tokens, ref_tokens)}/{len(ref_tokens)}"
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Goal:
    label: str
    metric: str  # a row key
    precision: str  # hotpath's best row of this precision is judged
    target: float  # the ratio (or, with no peers, the absolute value) to reach
    peers: tuple[str, ...] = ()  # the best of these peer rows; empty: every peer of `precision`; None-like: absolute
    absolute: bool = False
    speed: bool = False  # compare speeds (1 / time) rather than times


GOALS = (
    Goal("decode b1 fp32 <= 0.9x the fastest peer fp32", "decode_b1_ms", "fp32", 0.9),
    Goal("decode b1 8-bit <= 0.9x llama.cpp Q8_0", "decode_b1_ms", "int8", 0.9, ("llama.cpp Q8_0",)),
    Goal("decode b1 4-bit <= 0.9x best of onnxruntime-genai int4 and llama.cpp Q4_0", "decode_b1_ms", "int4", 0.9,
         ("onnxruntime-genai int4", "llama.cpp Q4_0")),
    Goal("prefill 1x512 fp32 >= 1.1x CTranslate2 float32 speed", "prefill_ms", "fp32", 1.1,
         ("CTranslate2 float32",), speed=True),
    Goal("prefill 1x512 int8 >= 1.0x CTranslate2 int8 speed", "prefill_ms", "int8", 1.0, ("CTranslate2 int8",),
         speed=True),
    Goal("decode b8 fp32 >= 1.2x CTranslate2 float32 tokens/s", "decode_b8_tok_s", "fp32", 1.2,
         ("CTranslate2 float32",)),
    Goal("decode b8 int8 >= 1.2x CTranslate2 int8 tokens/s", "decode_b8_tok_s", "int8", 1.2, ("CTranslate2 int8",)),
    Goal("peak RSS fp32 <= 1.0 GB", "peak_rss_mib", "fp32", 1000 * MB, absolute=True),
    Goal("peak RSS int8 <= 500 MB", "peak_rss_mib", "int8", 500 * MB, absolute=True),
    Goal("peak RSS int4 <= 450 MB", "peak_rss_mib", "int4", 450 * MB, absolute=True),
)
HIGHER_IS_BETTER = {"decode_b8_tok_s"}


def _median(row: dict[str, Any], metric: str) -> Optional[float]:
    s = row.get(metric)
    return s["median"] if s else None


def _best(rows: list[dict[str, Any]], metric: str) -> Optional[dict[str, Any]]:
    have = [r for r in rows if _median(r, metric) is not None]
    if not have:
        return None
    pick = max if metric in HIGHER_IS_BETTER else min
    return pick(have, key=lambda r: r[metric]["median"])


def judge(goal: Goal, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{"goal", "hotpath", "value", "peer", "peer_value", "ratio", "target", "met", "verdict"}: ratio is hotpath
    over peer for times and tokens/s, peer over hotpath for speeds; `verdict` says met or the gap (how many times
    better hotpath must get)."""
    out: dict[str, Any] = {"goal": goal.label, "target": goal.target}
    mine = _best([r for r in rows if r["kind"] == "hotpath" and r["precision"] == goal.precision], goal.metric)
    if mine is None:
        return {**out, "met": None, "verdict": f"no hotpath {goal.precision} row measured"}
    value = _median(mine, goal.metric)
    assert value is not None
    out.update(hotpath=mine["variant"], value=value)
    higher = goal.metric in HIGHER_IS_BETTER
    if goal.absolute:
        met = value >= goal.target if higher else value <= goal.target
        gap = value / goal.target
        return {**out, "ratio": None, "met": met,
                "verdict": "met" if met else f"missed: {gap:.2f}x the limit ({value:.0f} vs {goal.target:.0f} MiB)"}
    peers = [r for r in rows if r["kind"] == "peer"
             and (r["variant"] in goal.peers if goal.peers else r["precision"] == goal.precision)]
    ref = _best(peers, goal.metric)
    if ref is None:
        return {**out, "met": None, "verdict": "no peer measured: " + (", ".join(goal.peers) or goal.precision)}
    peer_value = _median(ref, goal.metric)
    assert peer_value is not None
    if value <= 0 or peer_value <= 0:  # below the timer's resolution (a quick run's tiny model)
        return {**out, "peer": ref["variant"], "peer_value": peer_value, "met": None, "verdict": "not comparable"}
    ratio = peer_value / value if goal.speed else value / peer_value
    met = ratio >= goal.target if (higher or goal.speed) else ratio <= goal.target
    gap = goal.target / ratio if (higher or goal.speed) else ratio / goal.target
    return {**out, "peer": ref["variant"], "peer_value": peer_value, "ratio": ratio, "met": met,
            "verdict": "met" if met else f"missed: {gap:.3f}x to go"}


def judge_all(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [judge(g, rows) for g in GOALS]


# ---------------------------------------------------------------------------------------------------- Markdown
def fmt(s: Optional[dict[str, float]], digits: int = 1) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | decode b1 ms/token | prefill 1x512 ms | decode b8 tokens/s | peak RSS MiB | file MiB | "
             "greedy = ref | notes |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['variant']} | - | - | - | - | - | - | not run: {r['error']} |")
            continue
        notes = "; ".join(n for n in (r.get("note"), r.get("batch_note")) if n)
        size = f"{r['file_mib']:.1f}" if r.get("file_mib") else "-"
        lines.append(f"| {r['variant']} | {fmt(r['decode_b1_ms'])} | {fmt(r['prefill_ms'], 0)} | "
                     f"{fmt(r['decode_b8_tok_s'])} | {fmt(r['peak_rss_mib'], 0)} | {size} | "
                     f"{r.get('greedy_match', '-')} | {notes} |")
    return "\n".join(lines)


def _num(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "-"


def goals_markdown(goals: list[dict[str, Any]]) -> str:
    lines = ["| goal | hotpath | value | peer | peer value | ratio | verdict |", "|---|---|---|---|---|---|---|"]
    for g in goals:
        ratio = f"{g['ratio']:.2f}x" if g.get("ratio") is not None else "-"
        lines.append(f"| {g['goal']} | {g.get('hotpath', '-')} | {_num(g.get('value'))} | {g.get('peer', '-')} | "
                     f"{_num(g.get('peer_value'))} | {ratio} | {g['verdict']} |")
    return "\n".join(lines)
