"""bench/gpu_suite.py and bench/gpu/: the CPU-side logic (FLOP and byte formulas, cases, rows, CLI, the driver)
without a GPU.

The timed part needs CUDA; here tiny cases run through the same code on CPU with a fake timer (`FakeClock`: time
moves only when a stub kernel or a fake `do_bench` says so), so per-section budgets, the warm-up (compile) region,
skip logic, progress lines, the summary and failure handling are exercised exactly.
"""
import json
import re

import pytest
import torch

from bench import gpu_suite as gs
from bench import harness
from bench.gpu import adamw as gadamw
from bench.gpu import attention as attn
from bench.gpu import context as gctx
from bench.gpu import decode as gdec
from bench.gpu import softmax as gsoft
from bench.gpu import train_step as gtrain


def test_attention_flops():
    # 4 * B * H * T * S * D forward
    assert attn.attention_flops(1, 1, 1, 1, 1, causal=False) == 4
    assert attn.attention_flops(2, 16, 1024, 1024, 128, causal=False) == 4 * 2 * 16 * 1024 * 1024 * 128
    assert attn.attention_flops(2, 16, 1024, 1024, 128, causal=True) == 2 * 2 * 16 * 1024 * 1024 * 128
    fwd = attn.attention_flops(4, 8, 512, 512, 64, causal=True)
    assert attn.attention_flops(4, 8, 512, 512, 64, causal=True, direction="bwd") == 2.5 * fwd
    with pytest.raises(ValueError):
        attn.attention_flops(1, 1, 1, 1, 1, causal=False, direction="both")


def test_throughput_units():
    assert gctx.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert gctx.gbps(1e9, 1000.0) == pytest.approx(1.0)
    # decode KV read: K and V, bf16, B=32, 16 kv heads, S=8192, D=128 -> 2 GiB
    assert attn.kv_read_bytes(32, 16, 8192, 128, 2) == 2 * 32 * 16 * 8192 * 128 * 2 == 2 ** 31


def test_cases_cover_the_issue():
    cases = attn.attention_cases(quick=False)
    assert all(c.kind == "train" for c in cases)  # decode shapes are the decode section's
    assert {c.D for c in cases} == {64, 128} and {c.causal for c in cases} == {True, False}
    assert sorted({c.T for c in cases}) == [512, 1024, 2048, 4096, 8192, 16384]
    assert all(c.T == c.S and c.B * c.T == 16384 and c.H * c.D == 2048 for c in cases)
    assert cases[0].D == 128  # D = 128 before D = 64: a spent budget cuts D = 64 first
    quick = attn.attention_cases(quick=True)
    assert 0 < len(quick) < len(cases)
    assert len({c.name for c in cases}) == len(cases)


def test_decode_cases_cover_the_issue():
    cases = gdec.decode_cases()
    assert {c.T for c in cases} == {1, 16} and {c.S for c in cases} == {4096, 8192, 16384, 32768}
    assert {c.B for c in cases} == {1, 8} and {c.H_kv for c in cases} == {8, 32}
    assert all(c.H == 32 and c.D == 128 for c in cases)
    assert (cases[0].T, cases[0].B) == (1, 1)  # batch-1 single-token decode first
    assert [c.T for c in cases] == sorted(c.T for c in cases)
    assert len({c.name for c in cases}) == len(cases)
    assert 0 < len(gdec.decode_cases(quick=True)) < len(cases)
    # KV bytes: K and V, bf16 = 2 * B * H_kv * S * D * 2
    assert gdec.DecodeCase(8, 32, 8, 1, 32768, 128).kv_bytes() == 2 * 8 * 8 * 32768 * 128 * 2


def test_variants_skip_materialising_ones_at_long_t():
    short = attn.AttnCase(4, 16, 16, 4096, 4096, 128, True)
    long = attn.AttnCase(1, 16, 16, 16384, 16384, 128, True)
    assert set(attn.variants_for(short)) == set(attn.ATTN_VARIANTS)
    assert {"sdpa_math", "eager", "torch_compile"}.isdisjoint(attn.variants_for(long))
    assert {"hotpath_triton", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"} <= set(attn.variants_for(long))
    gqa = attn.AttnCase(32, 32, 8, 1, 8192, 128, False, kind="decode")
    assert "sdpa_efficient" not in attn.variants_for(gqa) and "sdpa_flash" in attn.variants_for(gqa)
    assert attn.directions_for(gqa) == ("fwd",) and attn.directions_for(short) == ("fwd", "bwd")


def test_row_and_throughput_rows():
    r = harness.row("gpu", "c", "v", "m", 1.5, "ms", "dev", B=2)
    assert list(r)[:7] == ["suite", "case", "variant", "metric", "value", "unit", "device"] and r["B"] == 2
    ctx = gctx.Context(device="fake-gpu")
    case = attn.AttnCase(2, 4, 4, 1024, 1024, 64, True)
    attn.throughput_rows(ctx, case, "hotpath_triton", "bwd", [0.9, 1.0, 1.2])
    ms, tf = ctx.rows
    assert ms["metric"] == "bwd_ms" and ms["value"] == 1.0 and ms["p20_ms"] == 0.9 and ms["p80_ms"] == 1.2
    assert tf["unit"] == "TFLOP/s"
    assert tf["value"] == pytest.approx(attn.attention_flops(2, 4, 1024, 1024, 64, True, "bwd") / 1e-3 / 1e12)
    dec = attn.AttnCase(32, 16, 16, 1, 8192, 128, False, kind="decode")
    attn.throughput_rows(ctx, dec, "sdpa_flash", "fwd", [1.0, 1.0, 1.0])
    assert ctx.rows[-1]["unit"] == "GB/s" and ctx.rows[-1]["value"] == pytest.approx(2 ** 31 / 1e-3 / 1e9)
    assert all(r["suite"] == "gpu" and r["device"] == "fake-gpu" for r in ctx.rows)


def test_ratio_rows():
    ctx = gctx.Context(device="d")
    ctx.add("c", "hotpath_triton", "fwd_ms", 1.0, "ms")
    ctx.add("c", "sdpa_flash", "fwd_ms", 1.5, "ms")
    ctx.add("c", "eager", "fwd_ms", None, "ms", skipped="x")
    gctx.ratio_rows(ctx, "c")
    (r,) = [r for r in ctx.rows if r["metric"].startswith("speedup")]
    assert r["metric"] == "speedup_vs_sdpa_flash_fwd" and r["value"] == pytest.approx(1.5) and r["unit"] == "x"


def test_attention_case_runs_on_cpu_with_a_fake_timer():
    """The timing loop end to end on a tiny CPU case: every variant gives rows or a `skipped` row, never a crash."""
    calls = []

    def fake_bench(fn, grad_to_none=None):
        fn()
        calls.append(grad_to_none is not None)
        return [1.0, 1.0, 1.0]

    ctx = gctx.Context(device="cpu", torch_device="cpu", bench=fake_bench)
    case = attn.AttnCase(1, 2, 2, 16, 16, 16, True)
    attn.run_attention_case(ctx, case, dtype=torch.float32,
                          variants=["hotpath_triton", "sdpa_cudnn", "sdpa_math", "eager"])
    by = {(r["variant"], r["metric"]): r for r in ctx.rows}
    for v in ("hotpath_triton", "sdpa_math", "eager"):
        assert by[(v, "fwd_ms")]["value"] == 1.0 and (v, "bwd_tflops") in by, v
    assert by[("sdpa_cudnn", "fwd_ms")]["value"] is None and by[("sdpa_cudnn", "fwd_ms")]["skipped"]  # no CPU cuDNN
    assert ("hotpath_triton", "speedup_vs_eager_fwd") in by
    assert True in calls  # the backward timing resets grads


def test_time_budget_skips():
    ctx = gctx.Context(device="cpu", torch_device="cpu", bench=lambda fn, grad_to_none=None: [1, 1, 1])
    ctx.begin_section("attention", 0.0)
    attn.run_attention_case(ctx, attn.AttnCase(1, 1, 1, 4, 4, 16, False), dtype=torch.float32, variants=["eager"])
    assert [r["skipped"] for r in ctx.rows] == ["attention time budget spent (0 s)"] * 2


def test_check_attention_on_cpu():
    ctx = gctx.Context(device="cpu", torch_device="cpu")
    attn.check_attention(ctx, {torch.float32: [(1, 2, 1, 5, 9, 16, True)]})
    assert ctx.failures == 0
    assert {r["metric"] for r in ctx.rows} == {"o_max_abs_err", "dq_max_abs_err", "dk_max_abs_err",
                                               "dv_max_abs_err"}


def test_eager_and_in_dtype_attention_match_reference():
    import kernels

    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    want = kernels.attention_ref(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(attn.eager_attention(q, k, v, True, 0.3), want)
    torch.testing.assert_close(attn.attention_in_dtype(q, k, v, True, 0.3), want)


def test_machine_info_on_cpu():
    info = gs.machine_info()
    assert info["torch"] == torch.__version__ and info["cpu"] and info["cpu_count"] >= 1
    json.dumps(info, default=str)



# ------------------------------------------------------------------------------------------------ the driver
class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


def fake_do_bench(clock, runs=4):
    """A do_bench stand-in: calls fn `runs` times and returns the fake-clock ms per call (p20 = p50 = p80)."""
    def bench(fn, grad_to_none=None):
        t0 = clock()
        for _ in range(runs):
            fn()
        ms = (clock() - t0) / runs * 1e3
        return [ms, ms, ms]

    return bench


def stub_kernel(clock, compile_s, run_s, calls):
    """A kernel whose first call compiles (compile_s) and every call runs (run_s), on the fake clock."""
    def kernel(*args, **kwargs):
        if not calls:
            clock.advance(compile_s)
        calls.append(clock())
        clock.advance(run_s)
        return torch.zeros(1)

    return kernel


def fake_ctx(clock, **kw):
    return gctx.Context(device="fake-gpu", torch_device="cpu", clock=clock, bench=fake_do_bench(clock), **kw)


def timing_section(name, n_timings, compile_s=5.0, run_s=0.002, check_s=1.0, budget=60.0, raise_in=None):
    """A stand-in section: two checks taking check_s each, then n_timings timings of one stub kernel each."""
    def checks(ctx):
        if raise_in == "checks":
            raise RuntimeError("checks blew up")
        for i in range(2):
            ctx.clock.advance(check_s)
            ctx.add(f"check {name} {i}", "hotpath_triton", "o_max_abs_err", 0.0, "abs", bound=1e-3, ok=True)

    def timings(ctx):
        if raise_in == "timings":
            raise RuntimeError("timings blew up")
        for i in range(n_timings):
            case = f"{name} case {i}"
            if ctx.out_of_time(case, "hotpath_triton", "fwd_ms"):
                continue
            fn = stub_kernel(ctx.clock, compile_s, run_s, [])
            ctx.warm(fn)
            ms = ctx.measure(fn)
            ctx.add(case, "hotpath_triton", "fwd_ms", ms[1], "ms")

    return gs.Section(name, budget, checks, timings)


def test_budget_stops_timings_not_checks(capsys):
    clock = FakeClock()
    ctx = fake_ctx(clock)
    # checks take 2 x 30 s, more than the whole 20 s budget: they all still run, every timing is skipped
    slow_checks = timing_section("softmax", 3, check_s=30.0, budget=20.0)
    (s,) = gs.run_suite(ctx, [slow_checks], {"softmax": 20.0})
    assert [r["ok"] for r in ctx.rows if "ok" in r] == [True, True]
    skipped = [r for r in ctx.rows if r["metric"] == "fwd_ms"]
    assert len(skipped) == 3 and all(r["value"] is None for r in skipped)
    assert {r["skipped"] for r in skipped} == {"softmax time budget spent (20 s)"}
    assert (s["checks"], s["failed_checks"], s["timed"], s["skipped_budget"]) == (2, 0, 0, 3)
    assert s["status"] == "ok" and s["checks_s"] == pytest.approx(60.0)

    # 2 s of checks, then timings of 5 s compile + 4 x 2 ms runs each: a 20 s budget fits 4 of 6 (2, 7, 12, 17 < 20)
    ctx = fake_ctx(clock)
    (s,) = gs.run_suite(ctx, [timing_section("adamw", 6)], {"adamw": 20.0})
    timed = [r for r in ctx.rows if r["metric"] == "fwd_ms"]
    assert [r["value"] is not None for r in timed] == [True] * 4 + [False] * 2
    assert (s["timed"], s["skipped_budget"], s["skipped_other"]) == (4, 2, 0)
    assert s["elapsed_s"] == pytest.approx(2 + 4 * (5 + 5 * 0.002))  # it overran by the last timing only


def test_compile_time_is_outside_timed_regions_and_reported():
    clock = FakeClock()
    ctx = fake_ctx(clock)
    (s,) = gs.run_suite(ctx, [timing_section("decode", 3, compile_s=7.0, run_s=0.004)], {"decode": 100.0})
    ms = [r["value"] for r in ctx.rows if r["metric"] == "fwd_ms"]
    assert ms == [pytest.approx(4.0)] * 3  # the run time alone: the 7 s compile never lands in a timing
    assert s["compile_s"] == pytest.approx(3 * (7.0 + 0.004))  # warm-up = compile + one run, per timed function
    assert s["checks_s"] == pytest.approx(2.0)
    assert s["elapsed_s"] == pytest.approx(2.0 + 3 * (7.004 + 4 * 0.004))


def test_real_timings_measure_after_warm_up_with_stub_kernels(monkeypatch):
    """The decode section's own timing code with kernels.attention stubbed: compile time (first call) is reported
    and excluded; the KV bandwidth comes from the run time."""
    import kernels

    clock = FakeClock()
    calls = []
    monkeypatch.setattr(kernels, "attention", stub_kernel(clock, 9.0, 0.001, calls))
    ctx = fake_ctx(clock)
    ctx.begin_section("decode", 60.0)
    case = gdec.DecodeCase(1, 4, 2, 1, 64, 16)
    gdec.run_decode_case(ctx, case, torch.float32, variants=["hotpath_triton"], copy=None)
    (ms,) = [r for r in ctx.rows if r["metric"] == "fwd_ms"]
    (bw,) = [r for r in ctx.rows if r["metric"] == "kv_bandwidth"]
    assert ms["value"] == pytest.approx(1.0) and len(calls) == 1 + 4  # one warm-up call, then the timed runs
    assert bw["value"] == pytest.approx(case.kv_bytes(4) / 1e-3 / 1e9) and bw["unit"] == "GB/s"
    assert ctx.compile_s == pytest.approx(9.001)


def test_section_raising_is_recorded_and_others_run(capsys):
    clock = FakeClock()
    ctx = fake_ctx(clock)
    sections = [timing_section("softmax", 2, raise_in="checks"), timing_section("adamw", 2, raise_in="timings"),
                timing_section("decode", 2)]
    summaries = gs.run_suite(ctx, sections, {})
    assert [s["status"] for s in summaries] == ["failed", "failed", "ok"]
    assert summaries[0]["errors"] == ["checks: RuntimeError: checks blew up"]
    assert summaries[0]["timed"] == 2  # its timings still ran
    assert summaries[1]["checks"] == 2 and summaries[1]["timed"] == 0
    assert summaries[2]["timed"] == 2
    errors = [r for r in ctx.rows if r["variant"] == "section"]
    assert [(r["case"], r["metric"], r["ok"]) for r in errors] == [("softmax", "checks_error", False),
                                                                  ("adamw", "timings_error", False)]
    assert ctx.failures == 2
    err = capsys.readouterr().err
    assert "softmax: failed" in err and "checks: RuntimeError: checks blew up" in err


def test_failed_check_marks_the_section():
    clock = FakeClock()
    ctx = fake_ctx(clock)

    def checks(ctx):
        from bench.gpu.checks import check_row

        check_row(ctx, "check x", "hotpath_triton", "o", 1.0, 0.5)

    (s,) = gs.run_suite(ctx, [gs.Section("softmax", 60.0, checks, lambda ctx: None)], {})
    assert s["status"] == "checks failed" and (s["checks"], s["failed_checks"]) == (1, 1) and ctx.failures == 1


def test_progress_line_per_section(capsys):
    clock = FakeClock()
    ctx = fake_ctx(clock)
    gs.run_suite(ctx, [timing_section("softmax", 2), timing_section("attention", 40)],
                 {"softmax": 60.0, "attention": 12.0})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    m = re.fullmatch(r"\[gpu suite\] (\w+): (ok), ([\d.]+) s of ([\d.]+) s budget \(checks ([\d.]+) s, "
                     r"compile ([\d.]+) s\), (\d+) rows, (\d+) timed, (\d+) skipped by budget", lines[1])
    assert m, lines[1]
    assert m.group(1) == "attention" and m.group(4) == "12" and float(m.group(6)) == pytest.approx(10.0, abs=0.1)
    assert (int(m.group(7)), int(m.group(8)), int(m.group(9))) == (42, 2, 38)
    assert lines[0].startswith("[gpu suite] softmax: ok")


@pytest.mark.parametrize("name", ["softmax", "adamw", "train_step", "decode", "attention"])
def test_real_timings_past_budget_allocate_nothing_and_skip_every_timing(name):
    """Each real section's timings with its budget spent: every timing a `skipped` row with the budget reason, on
    full-size shapes (nothing is allocated, or this would take GBs on CPU)."""
    (section,) = gs.parse_sections(name)
    ctx = fake_ctx(FakeClock())
    ctx.begin_section(name, 0.0)
    section.timings(ctx)
    timings = [r for r in ctx.rows if r["metric"].endswith("_ms") or r["metric"] == "copy_bandwidth"]
    assert timings and len(timings) == len(ctx.rows)
    assert {r["skipped"] for r in timings} == {f"{name} time budget spent (0 s)"}
    variants = {r["variant"] for r in timings}
    assert "hotpath_triton" in variants or "hotpath_patch_fused_adamw" in variants or name == "adamw"


@pytest.mark.slow
def test_real_sections_run_their_checks_on_cpu_with_no_budget():
    """softmax, AdamW and decode checks through the real check code (small plans; CPU runs the kernels in
    Triton's interpreter) with a zero budget: checks all run and pass, timings are all skipped."""
    small = {
        "softmax": lambda ctx: gsoft.check_softmax(ctx, [((3, 77), True, 0.5, torch.float32),
                                                          ((2, 5, 33), False, 1.0, torch.float16)]),
        "adamw": gadamw.checks,
        "decode": lambda ctx: gdec.check_decode(ctx, [(1, 4, 2, 1, 37, 16, True, torch.float32),
                                                      (2, 2, 1, 3, 20, 16, True, torch.float16)]),
    }
    sections = [gs.Section(n, 0.0, small[n], s.timings) for n in small for s in gs.parse_sections(n)]
    ctx = fake_ctx(FakeClock())
    summaries = gs.run_suite(ctx, sections, {n: 0.0 for n in small})
    for s in summaries:
        assert s["status"] == "ok" and s["checks"] >= 2 and s["failed_checks"] == 0, s
        assert s["timed"] == 0 and s["skipped_budget"] > 0, s
    assert ctx.failures == 0


@pytest.mark.slow
def test_train_step_check_on_cpu():
    ctx = gctx.Context(device="cpu", torch_device="cpu")
    gtrain.check_train_step(ctx, preset="tiny", steps=2, B=2, T=16)
    rows = [r for r in ctx.rows if r["case"].startswith("check train step")]
    assert [r["metric"] for r in rows] == ["step1_loss_max_abs_err", "step2_loss_max_abs_err"]
    assert all(r["ok"] for r in rows) and ctx.failures == 0
    assert rows[0]["bound"] == pytest.approx(gtrain.CHECK_LOSS_RTOL * rows[0]["reference_loss"])


def test_decode_case_runs_on_cpu_with_a_fake_timer():
    ctx = gctx.Context(device="cpu", torch_device="cpu", bench=lambda fn, grad_to_none=None: (fn(), [1, 2, 3])[1])
    for T in (1, 3):
        case = gdec.DecodeCase(2, 4, 2, T, 40, 16)
        gdec.run_decode_case(ctx, case, torch.float32, copy=10.0)
        by = {(r["variant"], r["metric"]): r for r in ctx.rows if r["case"] == case.name}
        for v in ("hotpath_triton", "sdpa"):
            assert by[(v, "fwd_ms")]["value"] == 2 and by[(v, "fwd_ms")]["p80_ms"] == 3
            bw = by[(v, "kv_bandwidth")]["value"]
            assert bw == pytest.approx(case.kv_bytes(4) / 2e-3 / 1e9)
            assert by[(v, "kv_pct_of_copy")]["value"] == pytest.approx(100 * bw / 10.0)
        if gdec._flash_attn() is None:
            assert by[("flash_attn", "fwd_ms")]["skipped"] == "RuntimeError: flash-attn is not installed"


def test_decode_sdpa_is_bottom_right_causal():
    import kernels

    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    torch.testing.assert_close(gdec._sdpa(q, k, v, 0.25), kernels.attention_ref(q, k, v, causal=True, scale=0.25))
    torch.testing.assert_close(gdec._sdpa(q[:, :, :1], k, v, 0.25),
                               kernels.attention_ref(q[:, :, :1], k, v, causal=True, scale=0.25))


def test_adamw_headline_falls_back_to_eager_with_the_reason():
    """No CUDA here: capture fails, so the headline row is the eager step, with the capture error recorded."""
    ctx = gctx.Context(device="cpu", torch_device="cpu", bench=lambda fn, grad_to_none=None: (fn(), [1, 1, 1])[1])
    gadamw.run_adamw_case(ctx, [torch.Size([7]), torch.Size([3, 5])], case="adamw tiny",
                          variants=(gadamw.HEADLINE, "hotpath_triton"), copy=None)
    head = [r for r in ctx.rows if r.get("headline") and r["metric"] == "step_ms"]
    assert len(head) == 1 and head[0]["variant"] == gadamw.EAGER_FALLBACK and head[0]["value"] == 1
    assert head[0]["capture_error"] and head[0]["goal_ms"] == 1.0 and "floor" in head[0]["notes"]
    assert any(r["variant"] == "hotpath_triton" and r["metric"] == "step_ms" for r in ctx.rows)


def test_adamw_headline_floor_for_gpt2():
    n = sum(torch.Size(s).numel() for s in gadamw.gpt2_param_shapes())
    assert round(n / 1e6, 1) == 124.4
    fields = gadamw.headline_fields(n)
    assert fields["floor_ms"] == pytest.approx(0.81, abs=0.005)  # 124.4M x 28 B at 4.3 TB/s
    assert "floor 0.81 ms" in fields["notes"] and "goal <= 1 ms" in fields["notes"]
    assert gadamw.ADAMW_VARIANTS[0] == gadamw.HEADLINE


# ------------------------------------------------------------------------------------------------ the CLI
def test_parse_sections():
    assert [s.name for s in gs.parse_sections(None)] == ["softmax", "adamw", "train_step", "decode", "attention"]
    assert [s.name for s in gs.parse_sections("attention, decode,attention")] == ["attention", "decode"]
    with pytest.raises(ValueError, match="unknown section"):
        gs.parse_sections("attention,nope")
    with pytest.raises(ValueError, match="unknown section"):
        gs.parse_sections(",")


def test_default_budgets_fit_the_window():
    budgets = gs.parse_budgets(None)
    assert budgets == {"softmax": 60, "adamw": 45, "train_step": 60, "decode": 60, "attention": 200}
    assert sum(budgets.values()) <= 8 * 60
    assert gs.parse_budgets(["attention=300", "softmax=90,decode=0"]) == dict(budgets, attention=300, softmax=90,
                                                                              decode=0)
    for bad in ("attention", "nope=3", "attention=x", "attention=-1", "attention=nan"):
        with pytest.raises(ValueError, match="bad --budget"):
            gs.parse_budgets([bad])


@pytest.mark.parametrize("argv, message", [
    (["--sections", "nope"], "error: unknown section(s) nope (choose from softmax, adamw, train_step, decode, "
                             "attention)"),
    (["--budget", "attention=soon"], "error: bad --budget 'attention=soon' (SECONDS must be a number >= 0)"),
])
def test_cli_user_errors_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # rejected before any GPU work
    assert gs.main(argv) == 2
    assert capsys.readouterr().err == message + "\n"


def test_cli_without_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert gs.main(["--out", str(out), "--quick", "--sections", "decode"]) == 2
    err = capsys.readouterr().err
    assert err == "error: no CUDA GPU (run this on a GPU machine)\n" and not out.exists()


def test_default_out_path():
    assert gs.default_out({"date": "2026-12-02T10:00:00", "gpu": "NVIDIA H200"}) == \
        gs.RESULTS_DIR / "2026-12-02-nvidia-h200.json"
    assert str(gs.RESULTS_DIR) == "bench/results/gpu"


def test_main_runs_sections_in_order_and_writes_json(tmp_path, monkeypatch, capsys):
    """With stand-in sections and CUDA faked, main() runs the sections asked for, in that order, with their
    budgets, prints a progress line each and a summary, and writes one JSON file with the rows and sections."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(gs, "machine_info", lambda: {"gpu": "fake"})
    seen = []

    def section(name, fail=False):
        def timings(ctx):
            seen.append((name, ctx.budget_s))
            ctx.add(f"{name} case", "hotpath_triton", "fwd_ms", 1.0, "ms")

        def checks(ctx):
            from bench.gpu.checks import check_row

            check_row(ctx, f"check {name}", "hotpath_triton", "o", 1.0 if fail else 0.0, 0.5)

        return gs.Section(name, 7.0, checks, timings)

    monkeypatch.setattr(gs, "SECTIONS", [section("softmax"), section("decode"), section("attention")])
    out = tmp_path / "sub" / "r.json"
    assert gs.main(["--out", str(out), "--sections", "attention,softmax", "--budget", "attention=300"]) == 0
    assert seen == [("attention", 300.0), ("softmax", 7.0)]
    data = json.loads(out.read_text())
    assert data["machine"] == {"gpu": "fake"} and {r["device"] for r in data["rows"]} == {"fake"}
    assert [(s["section"], s["status"], s["budget_s"], s["timed"], s["checks"]) for s in data["sections"]] == [
        ("attention", "ok", 300.0, 1, 1), ("softmax", "ok", 7.0, 1, 1)]
    assert {"elapsed_s", "checks_s", "compile_s", "rows", "skipped_budget"} <= set(data["sections"][0])
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary left behind
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 2
    assert "| attention | ok | 300 |" in captured.out and "| softmax | ok | 7 |" in captured.out
    assert "4 rows (0 skipped, 0 failed checks or sections)" in captured.out

    monkeypatch.setattr(gs, "SECTIONS", [section("softmax", fail=True)])
    assert gs.main(["--out", str(out)]) == 1  # a failed check is exit code 1
