"""Terminal and Markdown tables: one row per variant, the headline metrics as columns, ratios to the baseline."""
from __future__ import annotations

from typing import Any, Optional

# (suite, metric, column title, higher is better)
COLUMNS = {
    "inference": [
        ("prefill tokens/s", "prefill tok/s", True),
        ("decode latency", "decode ms/tok (b1)", False),
        ("decode tokens/s", "decode tok/s (b8)", True),
        ("peak memory", "peak MiB", False),
        ("file size", "file MiB", False),
        ("perplexity", "ppl", False),
        ("perplexity change", "Δppl %", False),
        ("top-1 agreement", "top-1 %", True),
    ],
    "gpt2-124m": [
        ("decode latency", "decode ms/tok (b1)", False),
        ("prefill latency", "prefill 1x512 ms", False),
        ("decode tokens/s", "decode tok/s (b8)", True),
        ("peak memory", "peak RSS MiB", False),
        ("file size", "file MiB", False),
    ],
    "train": [("step time", "ms/step", False), ("train tokens/s", "tokens/s", True)],
    "serve": [
        ("throughput", "tokens/s", True),
        ("ttft p50", "TTFT p50 ms", False),
        ("ttft p99", "TTFT p99 ms", False),
        ("itl p50", "ITL p50 ms", False),
        ("itl p99", "ITL p99 ms", False),
        ("errors", "errors", False),
    ],
}
RATIO_OF = {"inference": "prefill tokens/s", "train": "train tokens/s", "serve": "throughput"}
BASELINES = {"inference": "torch eager fp32", "train": "eager+AdamW"}


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def suite_table(rows: list[dict[str, Any]], suite: str) -> tuple[list[str], list[list[str]]]:
    """Header and body for one suite: variants in first-seen order; a ratio column against the baseline."""
    rows = [r for r in rows if r["suite"] == suite]
    variants: list[str] = []
    cases: dict[str, dict[str, float]] = {}
    for r in rows:
        key = r["variant"] if suite != "serve" else f"{r['variant']} @{r['case']}"
        if key not in variants:
            variants.append(key)
        cases.setdefault(key, {})[r["metric"]] = r["value"]
    cols = COLUMNS.get(suite) or [(m, m, True) for m in dict.fromkeys(r["metric"] for r in rows)]
    header = ["variant", *(c[1] for c in cols)]
    ratio_metric = RATIO_OF.get(suite)
    base = cases.get(BASELINES.get(suite, ""), {}).get(ratio_metric)
    extra_ratio = suite == "inference" and "ort fp32" in cases
    if base:
        header.append(f"× {BASELINES[suite]}")
    if extra_ratio:
        header.append("× ort fp32")
    if suite == "serve":
        header.append("× one at a time")
    body = []
    for v in variants:
        line = [v, *(_fmt(cases[v].get(c[0])) for c in cols)]
        mine = cases[v].get(ratio_metric)
        if base:
            line.append(f"{mine / base:.2f}×" if mine else "—")
        if extra_ratio:
            ref = cases["ort fp32"].get(ratio_metric)
            line.append(f"{mine / ref:.2f}×" if mine and ref else "—")
        if suite == "serve":  # against the same backend serving one client at a time
            ref = cases.get(v.split(" @")[0] + " @1 clients", {}).get(ratio_metric)
            line.append(f"{mine / ref:.2f}×" if mine and ref else "—")
        body.append(line)
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def print_tables(rows, skipped, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 200)
    for suite in dict.fromkeys(r["suite"] for r in rows):
        header, body = suite_table(rows, suite)
        table = Table(title=f"{suite} (medians; ratios measured in this run)")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for line in body:
            table.add_row(*line)
        console.print(table)
    for s in skipped:
        console.print(f"[yellow]not run[/]: {s['suite']} / {s['variant']}: {s['reason']}")
