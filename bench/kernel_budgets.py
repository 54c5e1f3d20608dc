"""The budgets of bench/kernel_budgets.toml applied to rows of the static kernel report (bench/kernel_report.py).

`violations(row, budgets, baseline)` lists, in one line each, every budget a report row breaks; `baseline` maps row
ids to the rows of the committed report (bench/results/kernels-sm90.json) for the inner-loop budget. Used by the
report (to print them) and by tests/bench/test_kernel_report.py (to fail on them).
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Optional

BUDGETS_PATH = Path(__file__).with_name("kernel_budgets.toml")


def load_budgets(path: Path = BUDGETS_PATH) -> dict[str, dict[str, Any]]:
    with open(path, "rb") as f:
        budgets = tomllib.load(f)
    for name, b in budgets.items():
        if not b.get("reason") or not b.get("rows"):
            raise ValueError(f"{path}: budget {name} needs `rows` and a one-line `reason`")
    return budgets


def applies(budget: dict[str, Any], row: dict[str, Any]) -> bool:
    """Does this budget cover this row? ("group" or "group/direction" selectors, optional head_dim)."""
    selectors = budget["rows"]
    if row["group"] not in selectors and f"{row['group']}/{row['direction']}" not in selectors:
        return False
    return "head_dim" not in budget or row["params"].get("D") == budget["head_dim"]


def _loop_growth(row: dict[str, Any], old: Optional[dict[str, Any]], max_ratio: float) -> list[str]:
    """Loops more than max_ratio x the committed row's: every loop, matched in order, when the number of loops is
    unchanged; else the hot inner loop alone."""
    if old is None or old.get("status") != "ok" or old.get("inner_loop") is None or row.get("inner_loop") is None:
        return []
    new_loops, old_loops = row.get("loops", []), old.get("loops", [])
    if new_loops and len(new_loops) == len(old_loops):
        return [f"loop {i} ({a['start']}): {a['instructions']} SASS instructions > {max_ratio} x committed "
                f"{b['instructions']}" for i, (a, b) in enumerate(zip(new_loops, old_loops))
                if a["instructions"] > max_ratio * b["instructions"]]
    if row["inner_loop"] > max_ratio * old["inner_loop"]:
        return [f"inner loop {row['inner_loop']} SASS instructions > {max_ratio} x committed {old['inner_loop']}"]
    return []


def violations(row: dict[str, Any], budgets: dict[str, dict[str, Any]],
               baseline: Optional[dict[str, dict[str, Any]]] = None) -> list[str]:
    """Every budget this row breaks, as `budget: what` lines (empty: within budget)."""
    out: list[str] = []
    covered = [name for name, b in budgets.items() if applies(b, row)]
    if not covered or row["status"] == "pruned":  # reference rows; configs the autotuner never runs
        return out
    if row["status"] != "ok":
        return [f"error: {row.get('error', 'failed')}"]
    spill = row["spill_store_bytes"] + row["spill_load_bytes"]
    for name in covered:
        b = budgets[name]
        if "max_spill_bytes" in b and spill > b["max_spill_bytes"]:
            out.append(f"{name}: spills {row['spill_store_bytes']} B stored / {row['spill_load_bytes']} B loaded")
        if "max_registers" in b and row["registers"] > b["max_registers"]:
            out.append(f"{name}: {row['registers']} registers > {b['max_registers']}")
        if "max_bytes" in b and row["shared_bytes"] > b["max_bytes"]:
            out.append(f"{name}: {row['shared_bytes']} B shared memory > {b['max_bytes']}")
        if name == "smem_estimate" and row["autotuned"]:
            est = row.get("smem_estimate")
            if est is None:
                out.append(f"{name}: no SMEM_ESTIMATES entry for autotuned kernel {row['kernel']}")
            elif est < row["shared_bytes"]:
                out.append(f"{name}: autotune estimate {est} B < compiled {row['shared_bytes']} B")
        if name == "wgmma" and row["dots_16bit"] and not row["sass"]["hgmma"]:
            out.append(f"{name}: {row['dots_16bit']} 16-bit tl.dot but no HGMMA in the SASS "
                       f"({row['sass']['hmma']} HMMA)")
        if name == "softmax_vector_access":  # loads: LDG, or cp.async (LDGSTS) in a pipelined loop
            s = row["sass"]
            loads, wide = s["ldg"] + s.get("ldgsts", 0), s["ldg128"] + s.get("ldgsts128", 0)
            if loads != wide or s["stg"] != s["stg128"] or not loads:
                out.append(f"{name}: {wide}/{loads} loads (LDG, LDGSTS) and {s['stg128']}/{s['stg']} stores are "
                           f"16-byte")
        if "max_ratio" in b:
            out += [f"{name}: {v}" for v in _loop_growth(row, (baseline or {}).get(row["id"]), b["max_ratio"])]
    return out
