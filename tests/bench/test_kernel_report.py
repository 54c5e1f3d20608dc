"""The static sm_90a kernel report (bench/kernel_report.py, bench/sm90.py) and its budgets (bench/kernel_budgets.toml).

Fast: the SASS loop finder and the occupancy calculator on small hand-made inputs, the budget checks on hand-made
rows, the case list and the CLI conventions.
Slow: the report runs once per session in a fresh process (no TRITON_INTERPRET; the session's Triton cache from
tests/conftest.py) and every row of it is held to the budgets, the inner loops against the committed report
bench/results/kernels-sm90.json. The test runs the `--quick` subset (every config at D=128 bf16 for attention,
decode and the tutorial reference; softmax and AdamW in full): on the 2-core development VM the full report took
2.1 minutes at load average 0.9 and 6-8 minutes shared with other work (load 4.5-7); --quick 1.3-2.9 minutes.
"""
import json
import os
import subprocess
import sys

import pytest

from bench import kernel_budgets, kernel_report, sm90
from tests.helpers import ROOT

COMMITTED_PATH = ROOT / kernel_report.DEFAULT_OUT
COMMITTED = json.loads(COMMITTED_PATH.read_text()) if COMMITTED_PATH.exists() else {"rows": []}
BASELINE = {r["id"]: r for r in COMMITTED["rows"]}
BUDGETS = kernel_budgets.load_budgets()
QUICK_CASES = {c["id"] for c in kernel_report.cases(quick=True)}


def _case_id(row):
    return f"{row['group']}/{row['direction']} {row['case']}"


# rows of the committed report that the session's --quick run must reproduce
CHECKED_IDS = [r["id"] for r in COMMITTED["rows"] if _case_id(r) in QUICK_CASES]


# ------------------------------------------------------------------------------------------------ SASS loops
def _sass(*body: str) -> str:
    """nvdisasm-like text: `label:` lines and instructions, numbered 16 bytes apart."""
    lines, addr = [".text.k:"], 0
    for item in body:
        if item.endswith(":"):
            lines.append(item)
        else:
            lines.append(f"        /*{addr:04x}*/                   {item} ;  /* 0x000000000000 */")
            lines.append("                                                      /* 0x000fe20000000000 */")
            addr += 16
    return "\n".join(lines)


def _loops(text):
    instrs, labels = sm90.parse_sass(text)
    return sm90.find_loops(instrs, labels)


def test_loop_finder_single_loop_and_unreachable_trap():
    text = _sass("MOV R1, c[0x0][0x28]",
                 ".L_x_0:", "IADD3 R2, R2, 0x1, RZ", "ISETP.GE.AND P0, PT, R2, 0x10, PT", "@!P0 BRA `(.L_x_0)",
                 "EXIT",
                 ".L_x_1:", "BRA `(.L_x_1)")  # the self-branch ptxas puts after the last EXIT: never reached
    (loop,) = _loops(text)
    assert (loop.header, loop.end, loop.instructions, loop.mma, loop.innermost) == (0x10, 0x30, 3, 0, True)


def test_loop_finder_steady_state_and_diagonal_loops():
    """Two loops in a row doing the same matrix work: both innermost, the leaner (unmasked) one is the hot one."""
    text = _sass("MOV R1, c[0x0][0x28]",
                 ".L_x_0:", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24", "FFMA R3, R4, R5, R6",
                 "@P0 BRA `(.L_x_0)",
                 ".L_x_1:", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24", "ISETP.GE.AND P1, PT, R2, R7, PT",
                 "FSEL R3, R3, -INF, P1", "FFMA R3, R4, R5, R6", "@P0 BRA `(.L_x_1)",
                 "EXIT")
    steady, diagonal = _loops(text)
    assert (steady.instructions, diagonal.instructions) == (3, 5)
    assert steady.mma == diagonal.mma == 1 and steady.innermost and diagonal.innermost
    assert sm90.hot_loop([steady, diagonal]) is steady
    assert sm90.hot_loop([]) is None


def test_loop_finder_nested_loops():
    text = _sass(".L_x_0:", "MOV R2, RZ",
                 ".L_x_1:", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "IADD3 R2, R2, 0x1, RZ", "@P1 BRA `(.L_x_1)",
                 "IADD3 R3, R3, 0x1, RZ", "@P0 BRA `(.L_x_0)",
                 "EXIT")
    outer, inner = _loops(text)
    assert (outer.header, outer.instructions, outer.innermost) == (0x00, 6, False)
    assert (inner.header, inner.instructions, inner.mma, inner.innermost) == (0x10, 3, 1, True)
    assert sm90.hot_loop([outer, inner]) is inner


def test_loop_finder_ignores_barrier_waits_and_jumps_back_from_slow_paths():
    """Triton's mbarrier waits: try once inline, on failure branch to an out-of-line retry loop placed after the
    kernel, which jumps back. The retry is not a work loop, the jump back is not a loop at all, and the out-of-line
    code does not count in the loop that waits."""
    text = _sass("SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3", "@!P0 BRA `(.L_x_9)",  # wait before the loop
                 ".L_x_5:",
                 ".L_x_0:", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3", "@!P0 BRA `(.L_x_8)",
                 ".L_x_7:", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24", "UTMALDG.2D [UR8], [UR10]",
                 "@P1 BRA `(.L_x_0)",
                 "EXIT",
                 ".L_x_8:", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3", "@!P0 BRA `(.L_x_8)", "BRA `(.L_x_7)",
                 ".L_x_9:", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3", "@!P0 BRA `(.L_x_9)", "BRA `(.L_x_5)",
                 ".L_x_10:", "BRA `(.L_x_10)")
    (loop,) = _loops(text)
    assert (loop.header, loop.end, loop.instructions, loop.mma) == (0x20, 0x60, 5, 1)
    counts = sm90.sass_counts(sm90.parse_sass(text)[0])
    assert counts["hgmma"] == 1 and counts["utmaldg"] == 1 and counts["ldgsts"] == 0


def test_sass_counts_vector_and_spill_instructions():
    text = _sass("LDG.E.128 R4, desc[UR4][R2.64]", "LDG.E.128.CONSTANT R8, desc[UR4][R2.64+0x10]",
                 "LDG.E R12, desc[UR4][R2.64]", "STG.E.128 desc[UR4][R6.64], R4", "LDGSTS.E.BYPASS.128 [R3], [R4.64]",
                 "STL [R1], R5", "LDL R5, [R1]", "LDL.64 R6, [R1+0x8]", "HMMA.16816.F32 R4, R8, R12, R4",
                 "UTMASTG.2D [UR4], [UR6]", "EXIT")
    c = sm90.sass_counts(sm90.parse_sass(text)[0])
    assert c == {"instructions": 11, "hgmma": 0, "hmma": 1, "utmaldg": 0, "utmastg": 1, "ldgsts": 1, "ldgsts128": 1,
                 "ldg": 3, "stg": 1, "ldg128": 2, "stg128": 1, "ldl": 2, "stl": 1}


# ------------------------------------------------------------------------------------------------ occupancy
@pytest.mark.parametrize("regs, smem, warps, ctas, limiter", [
    (255, 0, 8, 1, "regs"),          # 256 x 32 registers per warp: 8 warps fill the register file
    (168, 0, 4, 3, "regs"),          # 168 x 32 = 5376 per warp (a multiple of 256): 12 warps
    (233, 0, 4, 2, "regs"),          # 233 rounds up to 240 per thread: 7680 per warp, 8 warps
    (32, 0, 1, 32, "ctas"),          # tiny CTAs: 32 per SM at most
    (24, 0, 4, 16, "warps"),         # 64 warps per SM
    (64, 100 * 1024, 4, 2, "smem"),  # 101 KB with the reserved 1 KB: two fit in 228 KB
    (64, 227 * 1024, 4, 1, "smem"),  # the largest a CTA may use
    (64, 227 * 1024 + 1, 4, 0, "smem"),  # cannot launch
    (40, 16 * 1024 + 1, 2, 13, "smem"),  # rounded up to the 128-byte allocation unit: 16.125 + 1 KB per CTA
])
def test_occupancy_hopper_rules(regs, smem, warps, ctas, limiter):
    occ = sm90.occupancy(regs, smem, warps)
    assert (occ["ctas_per_sm"], occ["limiter"]) == (ctas, limiter)
    assert occ["warps_per_sm"] == ctas * warps


# ------------------------------------------------------------------------------------------------ budgets
def _row(**over):
    row = {"id": "attention/fwd D128 bf16 causal | 0:_k | BLOCK_M=128 w8 s3", "group": "attention",
           "direction": "fwd", "kernel": "_k", "params": {"D": 128}, "status": "ok", "autotuned": True,
           "registers": 200, "spill_store_bytes": 0, "spill_load_bytes": 0, "shared_bytes": 100_000,
           "smem_estimate": 100_000, "dots_16bit": 2, "inner_loop": 400,
           "loops": [{"start": "0x0100", "instructions": 400}],
           "sass": {"hgmma": 12, "hmma": 0, "ldg": 4, "ldg128": 4, "stg": 2, "stg128": 2}}
    row.update(over)
    return row


def test_budgets_file_has_a_reason_per_budget():
    assert set(BUDGETS) >= {"no_spills", "attention_registers", "shared_memory", "smem_estimate", "wgmma",
                            "inner_loop", "adamw_registers"}
    assert all(len(b["reason"].splitlines()) == 1 for b in BUDGETS.values())


def test_budget_checks_catch_each_regression():
    ok = _row()
    assert kernel_budgets.violations(ok, BUDGETS, {ok["id"]: ok}) == []
    cases = {
        "no_spills": _row(spill_store_bytes=4),
        "attention_registers": _row(registers=233),
        "shared_memory": _row(shared_bytes=227 * 1024 + 1, smem_estimate=300_000),
        "smem_estimate": _row(smem_estimate=99_999),
        "wgmma": _row(sass={**ok["sass"], "hgmma": 0, "hmma": 8}),
        "inner_loop": _row(inner_loop=421, loops=[{"start": "0x0100", "instructions": 421}]),
    }
    for name, row in cases.items():
        found = kernel_budgets.violations(row, BUDGETS, {ok["id"]: ok})
        assert [v.split(":")[0] for v in found] == [name], (name, found)
    assert kernel_budgets.violations(_row(inner_loop=420, loops=[]), BUDGETS, {ok["id"]: ok}) == []  # 5% allowed
    assert "smem_estimate" in kernel_budgets.violations(_row(smem_estimate=None), BUDGETS)[0]
    # backward spills are allowed (not forward, softmax, AdamW, decode); D=64 has no register budget
    assert kernel_budgets.violations(_row(direction="bwd", spill_store_bytes=8), BUDGETS) == []
    assert kernel_budgets.violations(_row(params={"D": 64}, registers=255), BUDGETS) == []
    adamw = _row(group="adamw", direction="step", params={"dtype": "fp32"}, registers=65, autotuned=False,
                 dots_16bit=0, smem_estimate=None)
    assert [v.split(":")[0] for v in kernel_budgets.violations(adamw, BUDGETS)] == ["adamw_registers"]
    softmax = _row(group="softmax", params={"N": 1024}, registers=30, autotuned=False, dots_16bit=0,
                   sass={**ok["sass"], "ldg": 5})
    assert [v.split(":")[0] for v in kernel_budgets.violations(softmax, BUDGETS)] == ["softmax_vector_access"]
    pipelined = {**ok["sass"], "ldg": 0, "ldg128": 0, "ldgsts": 12, "ldgsts128": 12}  # cp.async loads
    assert kernel_budgets.violations({**softmax, "sass": pipelined}, BUDGETS) == []
    narrow = {**pipelined, "ldgsts128": 11}
    assert kernel_budgets.violations({**softmax, "sass": narrow}, BUDGETS)[0].startswith("softmax_vector_access")
    assert kernel_budgets.violations(_row(status="error", error="boom"), BUDGETS) == ["error: boom"]
    assert kernel_budgets.violations(_row(group="reference", registers=255, spill_store_bytes=8), BUDGETS) == []


# ------------------------------------------------------------------------------------------------ cases, CLI
def test_cases_cover_the_issue():
    full = kernel_report.cases()
    by_group = {g: [c for c in full if c["group"] == g] for g in kernel_report.GROUPS}
    # D x dtype x causal x (fwd, bwd, bwd deterministic)
    assert len(by_group["attention"]) == 2 * 2 * 2 * 3
    assert sum(c["params"].get("deterministic", False) for c in by_group["attention"]) == 2 * 2 * 2
    assert {c["params"]["T"] for c in by_group["decode"]} == {1, 16}
    assert sorted({c["params"]["N"] for c in by_group["softmax"]}) == [1024 << i for i in range(7)]
    assert any(c["params"]["causal"] for c in by_group["softmax"])
    assert [c["label"] for c in by_group["adamw"]] == ["fp32", "bf16-master"]
    assert len(by_group["reference"]) == 8
    assert len({c["id"] for c in full}) == len(full)
    quick = kernel_report.cases(quick=True)
    attn = [c for c in quick if c["group"] in ("attention", "decode", "reference")]
    assert attn and all(c["params"]["D"] == 128 and c["params"]["dtype"] == "bf16" for c in attn)
    assert [c for c in quick if c["group"] in ("softmax", "adamw")] == by_group["softmax"] + by_group["adamw"]
    assert kernel_report.cases(("softmax",)) == by_group["softmax"]


def test_a_failing_launcher_is_a_failing_row():
    case = {"group": "nope", "direction": "fwd", "label": "x", "params": {}, "id": "nope/fwd x"}
    plan = kernel_report.plan_case(case)
    (row,) = plan["rows"]
    assert plan["jobs"] == [] and row["status"] == "error" and "unknown group" in row["error"]
    assert kernel_budgets.violations({**row, "group": "softmax"}, BUDGETS)[0].startswith("error: ValueError")


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        kernel_report.main(["--help"])
    assert e.value.code == 0 and "--only" in capsys.readouterr().out
    for bad in (["--only", "everything"], ["--jobs", "0"], ["--bogus"]):
        with pytest.raises(SystemExit) as e:
            kernel_report.main(bad)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, (bad, err)


def test_markdown_says_it_is_a_static_prediction():
    doc = {"machine": {"cpu": "cpu", "cores": 2}, "date": "d", "triton": "3.9.0", "compiles": 1, "wall_s": 1.0,
           "jobs": 2, "quick": False, "adamw_host": None, "skipped": [],
           "rows": [{**_row(), "case": "D128 bf16 causal", "launch": 0, "config_label": "BLOCK_M=128 w8 s3",
                     "occupancy": {"ctas_per_sm": 1, "limiter": "regs"}, "violations": ["no_spills: x"],
                     "sass": {**_row()["sass"], "utmaldg": 0, "utmastg": 0, "ldgsts": 3, "ldl": 0, "stl": 0}}]}
    text = kernel_report.markdown(doc)
    assert kernel_report.NOTE in text and "measured on a GPU" in text
    assert "| _k | D128 bf16 causal | BLOCK_M=128 w8 s3 | 200 | 0/0 |" in text
    assert "1 rows break a budget" in text and "no_spills: x" in text


# ------------------------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("causal", [True, False])
def test_tutorial_reference_kernel_is_attention(causal):
    """The reference row's kernel computes attention (run once in Triton's interpreter, fp16, against float64), so
    the report compares hotpath's forward with a real attention kernel. Its lse is in base 2, as the tutorial's."""
    import torch
    import triton

    from kernels.flash_attention import attention_ref
    from tests.fixtures import tutorial_attention as R
    from tests.tolerances import assert_half_within_torch_error

    B, H, T, D = 1, 2, 256, 64
    gen = torch.Generator().manual_seed(1 + causal)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).half() for _ in range(3))
    o, lse = torch.full_like(q, float("nan")), torch.full((B, H, T), float("nan"))

    def desc(t):
        return R.TensorDescriptor(t, shape=[B * H * T, D], strides=[D, 1], block_shape=[1, D])

    descs = dict(q_desc=desc(q), k_desc=desc(k), v_desc=desc(v), o_desc=desc(o))
    meta = dict(BLOCK_M=128, BLOCK_N=64, HEAD_DIM=D)
    R._set_block_shapes({**descs, **meta})
    triton.jit(R._tutorial_attn_fwd)[(T // 128, B * H)](*descs.values(), lse, D ** -0.5 * 1.4426950408889634, H, T,
                                                       CAUSAL=causal, **meta)
    ref = attention_ref(q.double(), k.double(), v.double(), causal=causal, scale=D ** -0.5)
    torch_half = attention_ref(q, k, v, causal=causal, scale=D ** -0.5)
    assert_half_within_torch_error(o, torch_half, ref, torch.float16)
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / 0.6931471805599453, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ the real report
@pytest.fixture(scope="session")
def report(tmp_path_factory):
    """`python -m bench.kernel_report --quick` in a fresh process, once per session."""
    out = tmp_path_factory.mktemp("kernel-report") / "kernels-sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # caches: tests/conftest.py's
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--quick", "--no-progress", "--out", str(out),
                           "--baseline", str(COMMITTED_PATH)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    # exit 1: some row failed to compile (the row tests below say which); no JSON at all: the report crashed
    assert proc.returncode in (0, 1) and out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    doc["by_id"] = {r["id"]: r for r in doc["rows"]}
    return doc




@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_report_is_complete(report):
    """Every group captured (none skipped for a missing piece), the committed report covers the same cases."""
    assert report["skipped"] == [], report["skipped"]
    assert {r["group"] for r in report["rows"]} == set(kernel_report.GROUPS)
    assert COMMITTED["rows"] and COMMITTED["note"].startswith("Static prediction")
    assert report["adamw_host"] and "skipped" not in report["adamw_host"]
    assert all("median_ms" in h for h in report["adamw_host"].values()), report["adamw_host"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_report_finds_the_tutorial_loops(report):
    """The tutorial kernel, causal: an unmasked steady-state loop and a masked diagonal loop, both with wgmma; the
    hot loop is the steady state; every K/V tile by TMA."""
    rows = [r for r in report["rows"] if r["group"] == "reference" and r["case"] == "D128 bf16 causal"
            and r["config"].get("BLOCK_N") == 64]
    assert rows
    for r in rows:
        assert r["status"] == "ok" and len(r["loops"]) == 2 and all(lp["mma"] > 0 for lp in r["loops"])
        assert r["inner_loop"] == min(lp["instructions"] for lp in r["loops"]) and r["sass"]["utmaldg"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("row_id", CHECKED_IDS)
def test_row_within_budgets(report, row_id):
    row = report["by_id"].get(row_id)
    assert row is not None, (f"{row_id} is in the committed report but no longer produced: regenerate "
                             f"{kernel_report.DEFAULT_OUT} with python -m bench.kernel_report")
    assert kernel_budgets.violations(row, BUDGETS, BASELINE) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_new_rows_within_budgets(report):
    """Rows the committed report does not have yet (a new config or kernel) meet every budget but the inner-loop
    one, which has nothing to compare with."""
    new = [r for r in report["rows"] if r["id"] not in BASELINE]
    bad = {r["id"]: kernel_budgets.violations(r, BUDGETS, BASELINE) for r in new}
    assert not {k: v for k, v in bad.items() if v}


def test_autotune_pruning_and_smem_estimate_interface(monkeypatch):
    """A launch's configs are those the autotuner's own pruning keeps; the estimate comes from the kernel module's
    SMEM_ESTIMATES[kernel name](named args + config kwargs, config)."""
    import types

    import triton
    from triton.runtime.jit import JITFunction  # not triton.jit: this process runs under TRITON_INTERPRET

    def _k(x_ptr, n, BLOCK: "triton.language.constexpr"):  # never compiled or run
        pass

    module = types.ModuleType("fake_kernel_module")
    module.SMEM_ESTIMATES = {"_k": lambda args, cfg: args["BLOCK"] * args["n"] * cfg.num_stages}
    monkeypatch.setitem(sys.modules, module.__name__, module)
    _k.__module__ = module.__name__
    configs = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=2) for b in (32, 64, 128)]
    prune = lambda cfgs, nargs, **kw: [c for c in cfgs if c.kwargs["BLOCK"] <= nargs["n"]]  # noqa: E731
    tuner = triton.autotune(configs, key=["n"], prune_configs_by={"early_config_prune": prune})(JITFunction(_k))
    launch = sm90.Launch(fn=tuner.fn, args=(None, 64), kwargs={}, autotuner=tuner)
    assert launch.configs() == configs and launch.pruned_configs() == configs[:2]
    assert launch.named_args() == {"x_ptr": None, "n": 64}
    assert kernel_report._smem_estimate(launch, configs[1]) == 64 * 64 * 2
    assert kernel_report._smem_estimate(launch, None) is None
