"""bench/gpu_suite.py and bench/gpu/: the CPU-side logic (FLOP and byte formulas, cases, rows, CLI) without a GPU.

The timed part needs CUDA; here a tiny case runs through the same code on CPU with a fake timer, so the row
building, skip logic and failure handling are exercised.
"""
import json

import pytest
import torch

from bench import gpu_suite as gs
from bench import harness
from bench.gpu import attention as attn
from bench.gpu import context as gctx


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
    train = [c for c in cases if c.kind == "train"]
    decode = [c for c in cases if c.kind == "decode"]
    assert {c.D for c in train} == {64, 128} and {c.causal for c in train} == {True, False}
    assert sorted({c.T for c in train}) == [512, 1024, 2048, 4096, 8192, 16384]
    assert all(c.T == c.S and c.B * c.T == 16384 and c.H * c.D == 2048 for c in train)
    assert any(c.T == 1 and c.S == 8192 and c.B == 32 for c in decode)
    assert cases[0].kind == "decode"  # run first, before a time budget could cut them
    quick = attn.attention_cases(quick=True)
    assert 0 < len(quick) < len(cases)
    assert len({c.name for c in cases}) == len(cases)


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
    ctx = gctx.Context(device="cpu", torch_device="cpu", budget_s=0.0, bench=lambda fn, grad_to_none=None: [1, 1, 1])
    attn.run_attention_case(ctx, attn.AttnCase(1, 1, 1, 4, 4, 16, False), dtype=torch.float32, variants=["eager"])
    assert [r["skipped"] for r in ctx.rows] == ["suite time budget spent"] * 2


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


def test_sections_and_cli_without_gpu(tmp_path, capsys, monkeypatch):
    assert [n for n, _ in gs.parse_sections(None)][0] == "attention"
    assert [n for n, _ in gs.parse_sections("attention")] == ["attention"]
    with pytest.raises(ValueError, match="unknown section"):
        gs.parse_sections("attention,nope")
    assert gs.main(["--sections", "nope"]) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert gs.main(["--out", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "error: no CUDA GPU (run this on a GPU machine)" in err and not out.exists()


def test_main_writes_json_atomically(tmp_path, monkeypatch):
    """With a stand-in section and CUDA faked, main() runs the sections and writes one JSON file."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gs, "machine_info", lambda: {"gpu": "fake"})

    def fake_section(ctx):
        ctx.add("case", "variant", "fwd_ms", 1.0, "ms")

    monkeypatch.setattr(gs, "SECTIONS", [("attention", fake_section)])
    out = tmp_path / "sub" / "r.json"
    assert gs.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"] == {"gpu": "fake"} and data["rows"][0]["device"] == "fake"
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temporary left behind
