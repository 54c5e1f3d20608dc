"""The 124M workload's harness (bench/m124, bench.peers): its pure parts on made-up rows, and the worker protocol
on the session's tiny model with hotpath's own runners (fresh processes, no peer installs)."""
import json

import pytest

from bench.m124.rounds import Variant, run_rounds
from bench.m124.summary import GOALS, MB, judge, judge_all, matching_prefix, spread, summarize, table_markdown
from bench.m124.workload import QUICK, Workload, inputs
from bench.peers import BEGIN, END, update_readme


def test_spread_is_median_and_min_max_without_nan():
    assert spread([3.0, 1.0, 2.0, float("nan")]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([]) is None
    assert matching_prefix([1, 2, 3], [1, 2, 4]) == 2


def test_inputs_are_deterministic_and_avoid_eos():
    a, b = inputs(50257, Workload()), inputs(50257, Workload())
    assert a == b and len(a["batch"]) == 8 and len(a["b1"][0]) == 128 and len(a["prefill"][0]) == 512
    assert min(min(p) for p in a["batch"]) >= 1


def row(name, kind, precision, **metrics):
    r = {"variant": name, "kind": kind, "precision": precision, "error": None}
    for k in ("prefill_ms", "decode_b1_ms", "decode_b8_tok_s", "peak_rss_mib"):
        r[k] = {"median": metrics[k], "min": metrics[k], "max": metrics[k], "n": 1} if k in metrics else None
    return r


ROWS = [
    row("hotpath ORT fp32", "hotpath", "fp32", decode_b1_ms=27.0, prefill_ms=800.0, decode_b8_tok_s=120.0,
        peak_rss_mib=1100.0),
    row("hotpath int8-dynamic", "hotpath", "int8", decode_b1_ms=12.0, prefill_ms=600.0, decode_b8_tok_s=200.0,
        peak_rss_mib=400.0),
    row("llama.cpp F32", "peer", "fp32", decode_b1_ms=30.0),
    row("CTranslate2 float32", "peer", "fp32", decode_b1_ms=34.0, prefill_ms=880.0, decode_b8_tok_s=97.0),
    row("llama.cpp Q8_0", "peer", "int8", decode_b1_ms=12.2),
    row("CTranslate2 int8", "peer", "int8", decode_b1_ms=26.0, prefill_ms=600.0, decode_b8_tok_s=149.0),
]


def test_goals_ratio_against_the_right_peer():
    by = {g.label: g for g in GOALS}
    fp32 = judge(by["decode b1 fp32 <= 0.9x the fastest peer fp32"], ROWS)
    assert fp32["peer"] == "llama.cpp F32" and fp32["ratio"] == pytest.approx(0.9) and fp32["met"]
    q8 = judge(by["decode b1 8-bit <= 0.9x llama.cpp Q8_0"], ROWS)
    assert q8["ratio"] == pytest.approx(12 / 12.2) and not q8["met"]
    assert q8["verdict"] == f"missed: {12 / 12.2 / 0.9:.3f}x to go"
    prefill = judge(by["prefill 1x512 fp32 >= 1.1x CTranslate2 float32 speed"], ROWS)  # speed: 880 / 800 = 1.1
    assert prefill["ratio"] == pytest.approx(1.1) and prefill["met"]
    b8 = judge(by["decode b8 int8 >= 1.2x CTranslate2 int8 tokens/s"], ROWS)
    assert b8["ratio"] == pytest.approx(200 / 149) and b8["met"]
    rss = judge(by["peak RSS fp32 <= 1.0 GB"], ROWS)
    assert rss["target"] == pytest.approx(1000 * MB) and not rss["met"] and "1.15x the limit" in rss["verdict"]
    four = judge(by["decode b1 4-bit <= 0.9x best of onnxruntime-genai int4 and llama.cpp Q4_0"], ROWS)
    assert four["met"] is None and "no hotpath int4" in four["verdict"]
    assert len(judge_all(ROWS)) == len(GOALS)


def test_table_lists_failed_variants_with_reason():
    v = [Variant("a", "hotpath_ort", precision="fp32"), Variant("b", "llamacpp", kind="peer", error="no wheel")]
    runs = {"a": [{"prefill_ms": [5.0, 7.0], "decode_b1_ms": [1.0], "decode_b8_tok_s": [], "peak_rss_mib": 90.0,
                   "tokens": [1, 2], "note": "n"}], "b": []}
    rows = summarize(v, runs)
    assert rows[0]["prefill_ms"] == {"median": 6.0, "min": 5.0, "max": 7.0, "n": 2}
    md = table_markdown(rows)
    assert "| a | 1.0 (1.0-1.0) | 6 (5-7) | - | 90 (90-90) |" in md and "not run: no wheel" in md


def test_readme_section_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n")
    update_readme(readme, "table one")
    update_readme(readme, "table two")
    text = readme.read_text()
    assert text.count(BEGIN) == 1 and "table two" in text and "table one" not in text and text.endswith(END + "\n")


@pytest.mark.slow
def test_worker_protocol_on_tiny_model(tiny_ckpt, tiny_onnx, tmp_path):
    """Each variant in its own process, interleaved rounds; the ORT worker imports no torch itself; fp32 torch and
    ORT pick the same greedy tokens; a broken variant is reported with its reason while the others run."""
    w = Workload(**{**QUICK.to_dict(), "threads": 1})
    variants = [Variant("hotpath torch fp32", "hotpath_torch", {"path": str(tiny_ckpt)}),
                Variant("hotpath ORT fp32", "hotpath_ort", {"path": str(tiny_onnx)}),
                Variant("broken", "hotpath_ort", {"path": str(tmp_path / "missing.onnx")})]
    lines = []
    runs = run_rounds(variants, w, vocab_size=512, rounds=2, progress=lines.append)
    assert [len(runs[n]) for n in ("hotpath torch fp32", "hotpath ORT fp32", "broken")] == [2, 2, 0]
    assert "missing.onnx" in variants[2].error
    for res in runs["hotpath torch fp32"] + runs["hotpath ORT fp32"]:
        assert len(res["prefill_ms"]) == len(res["decode_b1_ms"]) == len(res["decode_b8_tok_s"]) == w.repeats
        assert res["peak_rss_mib"] > 10 and len(res["tokens"]) == w.decode_steps
        json.dumps(res)
    rows = summarize(variants, runs)
    assert rows[1]["greedy_match"] == f"{w.decode_steps}/{w.decode_steps}"
    assert "not run: " in table_markdown(rows)


def test_cached_files_are_made_again_when_older_than_what_makes_them(tmp_path):
    """As make does: a missing target, or one older than any source, is stale; the code lists are real files."""
    import os

    from bench.m124.model import code_files, is_stale

    src, out = tmp_path / "src.py", tmp_path / "model.onnx"
    src.write_text("x")
    assert is_stale(out, [src])
    out.write_text("y")
    os.utime(src, (1000, 1000))
    os.utime(out, (2000, 2000))
    assert not is_stale(out, [src])
    os.utime(src, (3000, 3000))
    assert is_stale(out, [src])
    files = code_files("export")
    assert any(f.name == "to_onnx.py" for f in files) and all(f.suffix == ".py" for f in files)
