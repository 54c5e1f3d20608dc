"""`python -m bench.kernel_report`: the static sm_90a performance report of every Triton kernel, run on CPU.

    python -m bench.kernel_report [--only attention|decode|softmax|adamw|reference ...] [--quick]
                                  [--out PATH] [--markdown PATH] [--jobs N]

Each real launcher is called with CPU tensors while its launches are recorded (bench/sm90.py), and every recorded
launch x every autotune config the autotuner would keep is compiled for sm_90a exactly as a launch specialises it
(configs its pruning drops are listed as `pruned`). Per row: registers, spill bytes, shared memory (compiled, and
the autotune estimate from the kernel module's `SMEM_ESTIMATES`), CTAs per SM, HGMMA / TMA / cp.async / 16-byte
access / spill instruction counts in the SASS and the length of the inner loops. Cases:

- attention: `attention_forward` and `attention_backward`, B=1, H=2, T=S=8192, D 64/128, causal/full, bf16/fp16;
- decode: `attention_forward` with T=1 and T=16 new tokens, S=8192 (whatever kernels it dispatches to), causal;
- softmax: `softmax_forward` / `softmax_backward` on x (4, N), N = 1k .. 32k, bf16/fp32, plus N = 64k (rows
  longer than one block) and a causal x (4, 4096) in bf16;
- adamw: one optimizer step, fp32 and bf16 with fp32 master weights (`bench/adamw_host.py`: `capture_step`),
  plus the host time per step (`host_time_per_step`);
- reference: the forward of Triton's fused-attention tutorial, rewritten in tests/fixtures/tutorial_attention.py.

Writes the JSON (atomically; a full run to bench/results/kernels-sm90.json, the committed report, a partial one
under runs/kernel_report/) and prints a Markdown table. Every number is a static prediction from the compiler
(ptxas and the SASS), not a measurement on a GPU. The compiles run in a pool of fresh processes (`--jobs`,
default: one per core) without TRITON_INTERPRET, with a progress bar; the run ends with its wall time.
Budgets (bench/kernel_budgets.toml) are checked against the committed report and listed; tests enforce them.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import multiprocessing
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from common import cli
from common.files import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("bench/results/kernels-sm90.json")  # the committed report: full runs only
PARTIAL_DIR = Path("runs/kernel_report")
TUTORIAL = ROOT / "tests" / "fixtures" / "tutorial_attention.py"
GROUPS = ("attention", "decode", "softmax", "adamw", "reference")
NOTE = ("Static prediction: every kernel compiled for sm_90a on a CPU-only machine (Triton's own binder, ptxas, "
        "nvdisasm). No number here was measured on a GPU.")

SEQ = 8192  # T = S for training-shaped attention, S for decode
HEADS = 2
SOFTMAX_ROWS = 4
SOFTMAX_N = (1024, 2048, 4096, 8192, 16384, 32768)
SOFTMAX_EXTRA = [(65536, "bf16", False), (4096, "bf16", True)]  # rows longer than one block; the causal mask
ADAMW_KINDS = ("fp32", "bf16-master")  # the dtype names of bench/adamw_host.py


# ------------------------------------------------------------------------------------------------ cases
def cases(only: tuple[str, ...] = GROUPS, quick: bool = False) -> list[dict[str, Any]]:
    """Every case to capture, as plain (picklable) dicts: group, direction, params, label. `quick`: attention,
    decode and reference at D=128 bf16 only (softmax and AdamW in full)."""
    heads = (128,) if quick else (64, 128)
    dtypes = ("bf16",) if quick else ("bf16", "fp16")
    out: list[dict[str, Any]] = []

    def add(group: str, direction: str, label: str, **params: Any) -> None:
        out.append({"group": group, "direction": direction, "label": label, "params": params,
                    "id": f"{group}/{direction} {label}"})

    for group in only:
        if group in ("attention", "reference"):
            for D in heads:
                for dtype in dtypes:
                    for causal in (True, False):
                        label = f"D{D} {dtype} {'causal' if causal else 'full'}"
                        shape = dict(B=1, H=HEADS, T=SEQ, S=SEQ, D=D, dtype=dtype, causal=causal)
                        add(group, "fwd", label, **shape)
                        if group == "attention":  # the default (atomic dq) and the deterministic backward
                            add(group, "bwd", label, **shape)
                            add(group, "bwd", f"{label} deterministic", **shape, deterministic=True)
        elif group == "decode":
            for T in (1, 16):
                for D in heads:
                    for dtype in dtypes:
                        add(group, "fwd", f"T{T} D{D} {dtype}", B=1, H=HEADS, T=T, S=SEQ, D=D, dtype=dtype,
                            causal=True)
        elif group == "softmax":
            shapes = [(N, dtype, False) for N in SOFTMAX_N for dtype in ("bf16", "fp32")]
            shapes += SOFTMAX_EXTRA  # paths the sizes above do not reach
            for N, dtype, causal in shapes:
                for direction in ("fwd", "bwd"):
                    add(group, direction, f"{SOFTMAX_ROWS}x{N} {dtype}{' causal' if causal else ''}",
                        R=SOFTMAX_ROWS, N=N, dtype=dtype, causal=causal)
        elif group == "adamw":
            for kind in ADAMW_KINDS:
                add(group, "step", kind, dtype=kind)
    return out


# ------------------------------------------------------------------------------------------------ workers
# Everything below that touches Triton runs in pool processes (spawned: fresh interpreters) started without
# TRITON_INTERPRET, which would otherwise patch triton.language and break every compile.
def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set so it stops warning
    import torch

    torch.set_num_threads(1)  # the pool is the parallelism


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class MissingPiece(Exception):
    """A group cannot be captured here (a module another change brings has not landed): reported as skipped."""


def _tutorial() -> Any:
    if not TUTORIAL.exists():
        raise MissingPiece(f"{TUTORIAL} is missing (the tutorial reference kernel lives in the source checkout)")
    spec = importlib.util.spec_from_file_location("hotpath_tutorial_attention", TUTORIAL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Triton resolves a kernel's globals through its module
    spec.loader.exec_module(module)
    return module


_CAPTURED: dict[str, list[Any]] = {}


def _launches(case: dict[str, Any]) -> list[Any]:
    """The launches one case makes, recorded from the real launcher with CPU tensors (cached per worker)."""
    if case["id"] in _CAPTURED:
        return _CAPTURED[case["id"]]
    import torch

    from bench import sm90

    group, p = case["group"], case["params"]
    if group in ("attention", "decode", "reference"):
        from kernels import flash_attention as A

        dt = _torch_dtype(p["dtype"])
        q = torch.empty(p["B"], p["H"], p["T"], p["D"], dtype=dt)  # (B, H, T, D)
        k, v = (torch.empty(p["B"], p["H"], p["S"], p["D"], dtype=dt) for _ in range(2))  # (B, H, S, D)
        scale = p["D"] ** -0.5
        if group == "reference":
            launches = sm90.capture(_tutorial().tutorial_attention_forward, q, k, v, p["causal"], scale)
        elif case["direction"] == "fwd":
            launches = sm90.capture(A.attention_forward, q, k, v, p["causal"], scale)
        else:
            o, do = torch.empty_like(q), torch.empty_like(q)
            lse = torch.empty(p["B"], p["H"], p["T"], dtype=torch.float32)  # (B, H, T)
            launches = sm90.capture(A.attention_backward, do, q, k, v, o, lse, p["causal"], scale,
                                    deterministic=p.get("deterministic", False))
    elif group == "softmax":
        from kernels import fused_softmax as S

        x = torch.empty(p["R"], p["N"], dtype=_torch_dtype(p["dtype"]))
        if case["direction"] == "fwd":
            launches = sm90.capture(S.softmax_forward, x, 1.0, p["causal"])
        else:
            launches = sm90.capture(S.softmax_backward, x, torch.empty_like(x), 1.0, p["causal"])
    elif group == "adamw":
        from bench import adamw_host

        launches = list(adamw_host.capture_step(p["dtype"]))
    else:
        raise ValueError(f"unknown group {group}")
    _CAPTURED[case["id"]] = launches
    return launches


def _config_dict(launch: Any, config: Any) -> dict[str, Any]:
    if config is not None:
        out = {k: v for k, v in config.kwargs.items() if isinstance(v, (int, float, str, bool))}
        return {**out, "num_warps": config.num_warps, "num_stages": config.num_stages}
    # a launch with fixed meta-parameters: its tile sizes and warps, as the launcher passed them
    return {k: v for k, v in launch.kwargs.items()
            if isinstance(v, int) and not isinstance(v, bool) and (k.startswith("BLOCK") or k.startswith("num_"))}


def _config_label(cfg: dict[str, Any]) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in cfg.items() if not k.startswith("num_"))
    extra = " ".join(f"{k[4]}{v}" for k, v in cfg.items() if k in ("num_warps", "num_stages"))
    return " ".join(x for x in (tiles, extra) if x)


def _smem_estimate(launch: Any, config: Any) -> Optional[int]:
    """The autotune estimate of shared memory (the kernel module's SMEM_ESTIMATES[name]), None if there is none."""
    if config is None:
        return None
    module = sys.modules.get(launch.fn.fn.__module__)
    estimate = getattr(module, "SMEM_ESTIMATES", {}).get(launch.name)
    return None if estimate is None else int(estimate({**launch.named_args(), **config.all_kwargs()}, config))


def _base_row(case: dict[str, Any], li: int, ci: int, launch: Any, config: Any) -> dict[str, Any]:
    cfg = _config_dict(launch, config)
    label = _config_label(cfg)
    return {
        "id": f"{case['id']} | {li}:{launch.name} | {label}", "group": case["group"],
        "direction": case["direction"], "kernel": launch.name, "launch": li, "config_index": ci,
        "case": case["label"], "params": case["params"], "config": cfg, "config_label": label,
        "autotuned": config is not None, "smem_estimate": None,
    }


def plan_case(case: dict[str, Any]) -> dict[str, Any]:
    """Capture one case: the compile jobs of its kept configs and the rows of the configs autotune prunes."""
    jobs, rows = [], []
    try:
        launches = _launches(case)
        kept_by_launch = [launch.pruned_configs() for launch in launches]
    except MissingPiece as e:
        return {"case": case, "skipped": str(e), "jobs": [], "rows": []}
    except Exception as e:  # noqa: BLE001 - a launcher or prune hook that fails is a row of the report, not a crash
        row = {"id": f"{case['id']} | capture", "group": case["group"], "direction": case["direction"],
               "kernel": "(launcher)", "launch": -1, "config_index": -1, "case": case["label"],
               "params": case["params"], "config": {}, "config_label": "", "autotuned": False, "smem_estimate": None,
               "status": "error", "error": _one_line(e)}
        return {"case": case, "skipped": None, "jobs": [], "rows": [row]}
    for li, (launch, kept) in enumerate(zip(launches, kept_by_launch)):
        for ci, config in enumerate(launch.configs()):
            if config is None or config in kept:
                jobs.append((case, li, ci))
                continue
            row = {**_base_row(case, li, ci, launch, config), "status": "pruned"}
            try:
                row["smem_estimate"] = _smem_estimate(launch, config)
            except Exception as e:  # noqa: BLE001 - a failing estimate is reported on its row
                row.update(status="error", error=f"SMEM_ESTIMATES: {_one_line(e)}")
            rows.append(row)
    return {"case": case, "skipped": None, "jobs": jobs, "rows": rows}


def _one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()] or [""]
    return f"{type(e).__name__}: {lines[-1][:300]}"


def compile_row(job: tuple[dict[str, Any], int, int]) -> dict[str, Any]:
    """Compile one launch x config for sm_90a and read everything the report shows from ptxas and the SASS."""
    from bench import sm90

    case, li, ci = job
    launch = _launches(case)[li]
    config = launch.configs()[ci]
    row = _base_row(case, li, ci, launch, config)
    started = time.perf_counter()
    try:
        row["smem_estimate"] = _smem_estimate(launch, config)
        compiled = sm90.compile_launch(launch, config)
        instrs, labels = sm90.parse_sass(sm90.sass(compiled.kernel))
    except Exception as e:  # noqa: BLE001 - a kernel that fails to compile is a row of the report, not a crash
        return {**row, "status": "error", "error": _one_line(e), "compile_s": round(time.perf_counter() - started, 2)}
    st = compiled.stats
    loops = sm90.find_loops(instrs, labels)
    hot = sm90.hot_loop(loops)
    return {
        **row, "status": "ok", "registers": st["registers"], "spill_store_bytes": st["spill_store_bytes"],
        "spill_load_bytes": st["spill_load_bytes"], "stack_frame_bytes": st["stack_frame_bytes"],
        "shared_bytes": st["shared_bytes"], "num_warps": st["num_warps"],
        "num_stages": int(getattr(compiled.kernel.metadata, "num_stages", 0)),
        "occupancy": sm90.occupancy(st["registers"], st["shared_bytes"], st["num_warps"]),
        "sass": sm90.sass_counts(instrs), "dots_16bit": sm90.dots_16bit(compiled.kernel),
        "loops": [lp.as_dict() for lp in loops], "inner_loop": hot.instructions if hot else None,
        "compile_s": round(time.perf_counter() - started, 2),
    }


def adamw_host_times() -> dict[str, Any]:
    """Host time per FusedAdamW step (launch stubbed), from bench/adamw_host.py, per kind; or why not."""
    from bench import adamw_host

    out: dict[str, Any] = {}
    for kind in ADAMW_KINDS:
        try:
            out[kind] = adamw_host.host_time_per_step(kind)
        except Exception as e:  # noqa: BLE001 - the compiles still run; the failure is recorded in the report
            out[kind] = {"error": _one_line(e)}
    return out


# ------------------------------------------------------------------------------------------------ run
def run_report(selected: list[dict[str, Any]], jobs: int, progress: bool = True) -> dict[str, Any]:
    """Plan and compile every case in a pool of `jobs` fresh processes; the rows in case order."""
    from tqdm import tqdm

    with multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init) as pool:
        host = None
        if any(c["group"] == "adamw" for c in selected):
            # timed first, while no compile competes for the cores
            host = pool.apply(adamw_host_times)
        plans = pool.map(plan_case, selected, chunksize=1)
        compile_jobs = [job for plan in plans for job in plan["jobs"]]
        rows = [row for plan in plans for row in plan["rows"]]
        bar = tqdm(total=len(compile_jobs), desc="compiling for sm_90a", unit="kernel", disable=not progress,
                   file=sys.stderr)
        for row in pool.imap_unordered(compile_row, compile_jobs, chunksize=1):
            rows.append(row)
            bar.update()
        bar.close()
    order = {c["id"]: i for i, c in enumerate(selected)}
    rows.sort(key=lambda r: (order[f"{r['group']}/{r['direction']} {r['case']}"], r["launch"], r["config_index"]))
    skipped = [{"group": p["case"]["group"], "case": p["case"]["label"], "reason": p["skipped"]}
               for p in plans if p["skipped"]]
    return {"rows": rows, "skipped": skipped, "adamw_host": host, "compiles": len(compile_jobs)}


# ------------------------------------------------------------------------------------------------ table
def _kb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _row_cells(r: dict[str, Any]) -> list[str]:
    head = [r["kernel"] + ("" if r["launch"] <= 0 else f" #{r['launch']}"), r["case"], r["config_label"] or "-"]
    if r["status"] == "pruned":
        est = "" if r["smem_estimate"] is None else f" (estimate {_kb(r['smem_estimate'])} KB)"
        return head + [f"pruned by autotune{est}"] + [""] * 10
    if r["status"] != "ok":
        return head + [f"compile error: {r['error']}"] + [""] * 10
    s, occ = r["sass"], r["occupancy"]
    loops = ", ".join(str(lp["instructions"]) if lp.get("innermost", True) else f"({lp['instructions']})"
                      for lp in r["loops"]) or "-"
    return head + [
        str(r["registers"]), f"{r['spill_store_bytes']}/{r['spill_load_bytes']}",
        f"{_kb(r['shared_bytes'])} ({_kb(r['smem_estimate'])})", f"{occ['ctas_per_sm']} ({occ['limiter']})",
        str(s["hgmma"]), f"{s['utmaldg']}/{s['utmastg']}", str(s["ldgsts"]), f"{s['ldg128']}/{s['stg128']}",
        f"{s['ldl']}/{s['stl']}", "-" if r["inner_loop"] is None else str(r["inner_loop"]), loops,
    ]


COLUMNS = ["kernel", "case", "config", "regs", "spill B st/ld", "smem KB (est.)", "CTAs/SM (limit)", "HGMMA",
           "TMA ld/st", "cp.async", "16-B ld/st", "LDL/STL", "inner loop", "loops"]
_TITLES = {"attention/fwd": "Attention forward (B=1, H=2, T=S=8192)",
           "attention/bwd": "Attention backward (B=1, H=2, T=S=8192)",
           "decode/fwd": "Decode attention (B=1, H=2, S=8192)", "softmax/fwd": "Softmax forward",
           "softmax/bwd": "Softmax backward", "adamw/step": "FusedAdamW step",
           "reference/fwd": "Reference: Triton fused-attention tutorial forward (tests/fixtures/tutorial_attention.py)"}


def _host_line(h: Any) -> str:
    if not isinstance(h, dict) or "median_ms" not in h:
        return str(h)
    parts = [f"median {h['median_ms']:.3f} ms"]
    if "min_ms" in h and "max_ms" in h:
        parts[0] += f" (min {h['min_ms']:.3f}, max {h['max_ms']:.3f})"
    parts += [f"{h[k]} {k.replace('_', ' ')}" for k in ("launches_per_step", "programs_per_step") if k in h]
    return ", ".join(parts)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Static sm_90a kernel report", "",
        f"> {NOTE} Generated by `python -m bench.kernel_report` on {doc['date']} with Triton {doc['triton']} "
        f"on {m.get('cpu')} ({m.get('cores')} cores, load average {doc.get('load_average_at_start')} at the "
        f"start): {doc['compiles']} compiles in {doc['wall_s']:.0f} s with {doc['jobs']} worker processes"
        f"{', --quick subset' if doc['quick'] else ''}.", "",
        "Columns: registers per thread; spill bytes stored/loaded; shared memory compiled (autotune estimate); "
        "CTAs per SM on Hopper and the resource that limits it; counts in the SASS of HGMMA (wgmma), TMA "
        "loads/stores (UTMALDG/UTMASTG), cp.async (LDGSTS), 16-byte global loads/stores and local-memory "
        "spill instructions (LDL/STL); SASS instructions per iteration of the hot inner loop and of every loop in "
        "address order (in parentheses: a loop with loops inside). The hot loop is the innermost loop with the most "
        "matrix instructions and, among equals, the fewest instructions (an unmasked steady state rather than its "
        "masked copy).", "",
    ]
    sections: dict[str, list[dict[str, Any]]] = {}
    for r in doc["rows"]:
        sections.setdefault(f"{r['group']}/{r['direction']}", []).append(r)
    for key, rows in sections.items():
        lines += [f"## {_TITLES.get(key, key)}", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
        lines.append("")
    host = doc.get("adamw_host")
    if host and "skipped" not in host:
        lines += ["## FusedAdamW host time per step (GPT-2 124M, this CPU, launches recorded instead of run)", ""]
        lines += [f"- {kind}: {_host_line(h)}" for kind, h in host.items()] + [""]
    if doc["skipped"]:
        lines += ["## Not reported", ""]
        lines += [f"- {s['group']} {s['case']}: {s['reason']}" for s in doc["skipped"]] + [""]
    failing = [r for r in doc["rows"] if r.get("violations")]
    verdict = f"{len(failing)} rows break a budget:" if failing else "Every row is within budget."
    lines += ["## Budgets (bench/kernel_budgets.toml)", "", verdict, ""]
    lines += [f"- `{r['id']}`: " + "; ".join(r["violations"]) for r in failing]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> Any:
    p = cli.parser("python -m bench.kernel_report",
                   "Compile every Triton kernel x autotune config for sm_90a on this CPU and report registers, "
                   "spills, shared memory, occupancy, SASS instruction counts and inner-loop lengths.")
    p.add_argument("--only", action="append", choices=GROUPS, help="report only this group (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="attention, decode and reference at D=128 bf16 only (softmax and AdamW in full)")
    p.add_argument("--out", default=None,
                   help=f"JSON report (default: {DEFAULT_OUT} for a full run; a partial run, --only or --quick, "
                        f"writes under {PARTIAL_DIR}/ so it never replaces the committed report)")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown table here")
    p.add_argument("--baseline", default=str(DEFAULT_OUT),
                   help="committed report the inner-loop budget compares with (default: %(default)s)")
    p.add_argument("--jobs", type=cli.positive_int, default=os.cpu_count() or 1,
                   help="compile processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _load_baseline(path: str) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return {}
    try:
        return {r["id"]: r for r in json.loads(p.read_text())["rows"]}
    except (ValueError, KeyError, TypeError) as e:
        raise cli.UserError(f"baseline {p} is not a kernel report ({e}; pass --baseline another file)") from None


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bench.kernel_budgets import load_budgets, violations
    from common.machine import machine_info

    baseline = _load_baseline(args.baseline)
    budgets = load_budgets()
    groups = tuple(g for g in GROUPS if not args.only or g in args.only)
    selected = cases(groups, quick=args.quick)
    if args.out is None:
        partial = groups != GROUPS or args.quick
        args.out = str(PARTIAL_DIR / f"kernels-sm90-{'-'.join(groups)}{'-quick' if args.quick else ''}.json"
                       if partial else DEFAULT_OUT)
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work competing for the cores
    print(f"kernel report: {len(selected)} cases, {args.jobs} compile processes", flush=True)
    result = run_report(selected, args.jobs, progress=not args.no_progress)
    wall = time.perf_counter() - started
    for row in result["rows"]:
        row["violations"] = violations(row, budgets, baseline)
    info = machine_info()
    doc = {
        "schema": 1, "note": NOTE, "target": "sm_90a", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "triton": info.get("triton"), "torch": info.get("torch"), "machine": info,
        "command": "python -m bench.kernel_report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "groups": sorted({c["group"] for c in selected}), "quick": args.quick, "jobs": args.jobs,
        "compiles": result["compiles"], "wall_s": round(wall, 1),
        "load_average_at_start": None if load is None else round(load, 2), "adamw_host": result["adamw_host"],
        "skipped": result["skipped"], "rows": result["rows"],
    }
    write_json_atomic(args.out, doc)
    table = markdown(doc)
    print(table)
    if args.markdown:
        write_text_atomic(args.markdown, table)
    errors = [r for r in doc["rows"] if r["status"] == "error"]
    failing = {r["id"] for r in doc["rows"] if r["violations"]}
    print(f"wrote {args.out}{' and ' + args.markdown if args.markdown else ''}: {len(doc['rows'])} rows, "
          f"{result['compiles']} compiles in {wall:.0f} s wall with {args.jobs} processes on {info.get('cores')} "
          f"cores (load average {doc['load_average_at_start']} at the start: other work on the machine slows it); "
          f"{len(errors)} errors, {len(failing)} rows over budget, {len(doc['skipped'])} cases skipped")
    return 1 if errors else 0


if __name__ == "__main__":
    cli.run(main)
