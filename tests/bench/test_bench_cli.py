"""`python -m bench --quick`: the smoke version of `make bench`, end to end in a subprocess."""
import json
import subprocess
import sys

import pytest

from bench.harness import Results
from bench.suites.variants import inference_variants
from bench.table import suite_table
from common.timing import Timing
from tests.helpers import ROOT

REQUIRED = {"suite", "case", "variant", "metric", "value", "unit", "device"}


def test_timing_rows_carry_median_and_spread():
    r = Results(device="cpu")
    t = Timing(median=0.5, low=0.4, high=0.8, repeats=5)
    assert r.add_timing("s", "c", "v", "rate", t, 100, "tokens/s") == pytest.approx(200)
    assert r.add_timing("s", "c", "v", "lat", t, 10, "ms/token") == pytest.approx(50)
    rate, lat = r.rows
    assert rate["low"] == pytest.approx(125) and rate["high"] == pytest.approx(250)
    assert lat["low"] == pytest.approx(40) and lat["high"] == pytest.approx(80)
    assert REQUIRED <= set(rate)


def test_table_ratio_against_baseline():
    rows = [{"suite": "inference", "variant": v, "metric": "prefill tokens/s", "value": x, "case": "c"}
            for v, x in [("torch eager fp32", 100.0), ("ort fp32", 300.0), ("ort int8 dynamic", 600.0)]]
    header, body = suite_table(rows, "inference")
    assert header[-2:] == ["× torch eager fp32", "× ort fp32"]
    assert body[2][-2:] == ["6.00×", "2.00×"]


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [path] = list(out.glob("*-quick.json"))
    doc = json.loads(path.read_text())
    assert doc["machine"]["cores"] and doc["machine"]["torch"]
    for row in doc["rows"]:
        assert REQUIRED <= set(row), row
    measured = {r["variant"] for r in doc["rows"] if r["suite"] == "inference"}
    skipped = {s["variant"] for s in doc["skipped"] if s["suite"] == "inference"}
    # every variant is either measured or listed with its reason, never silently dropped
    from bench.suites.common import Context

    names = set(inference_variants(Context(checkpoint=path, quick=True, threads=1)))
    assert names == measured | skipped, (names, measured, skipped)
    for core in ("torch eager fp32", "ort fp32", "ort int8 dynamic", "ort int8 static (Q/DQ)", "ort int4 weight-only"):
        assert core in measured, [s for s in doc["skipped"] if s["variant"] == core]
    ppl = {r["variant"]: r["value"] for r in doc["rows"] if r["metric"] == "perplexity"}
    assert abs(ppl["ort fp32"] / ppl["torch eager fp32"] - 1) < 1e-3  # same model, two runtimes
    assert {"train", "inference", "gpt2-124m", "serve"} <= {r["suite"] for r in doc["rows"]}
    # the real-size workload's path (made through transformers + model.from_hf, a tiny GPT-2 in the quick run)
    gpt2 = {(r["variant"], r["metric"]) for r in doc["rows"] if r["suite"] == "gpt2-124m"}
    assert {("hotpath ORT fp32", "decode latency"), ("hotpath int8-dynamic", "prefill latency"),
            ("hotpath torch fp32", "peak memory")} <= gpt2, gpt2
    report = (out / "REPORT.md").read_text()
    assert "| variant |" in report and (out / "speed_vs_quality.png").stat().st_size > 1000
    # the report regenerates from the JSON alone
    (out / "REPORT.md").unlink()
    r = subprocess.run([sys.executable, "-m", "bench.report", str(path), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (out / "REPORT.md").exists(), r.stderr


@pytest.mark.slow
def test_report_rejects_foreign_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    r = subprocess.run([sys.executable, "-m", "bench.report", str(bad), "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "rows" in r.stderr


@pytest.mark.parametrize("target", ["ort", "generic"])
def test_ort_memory_times_generation_and_reports_memory(target, tiny_onnx, tiny_ort_onnx, capsys):
    """bench.ort_memory runs OnnxDecoder with the memory settings asked for (here: no arena) and reports RSS parts
    and medians."""
    from bench.ort_memory import main as ort_memory

    path = tiny_ort_onnx if target == "ort" else tiny_onnx
    assert ort_memory([str(path), "--threads", "1", "--arena", "off", "--prompt", "8", "--prefill", "16",
                       "--decode-steps", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["arena"] is False and row["prefill_ms"] > 0 and row["decode_ms"] > 0
    assert row["peak_rss_mib"] >= row["rss_session_mib"] >= row["rss_imports_mib"] > 0
    assert row["session_anon_mib"] > 0 and row["end_file_mib"] > 0


def test_a_workers_peak_rss_is_its_own_not_its_parents():
    """A worker started by a large process reports its own high-water mark (Linux's ru_maxrss survives exec, so
    every 124M worker of make bench once read its parent's 1079 MiB)."""
    from common.machine import peak_rss_mib

    ballast = bytearray(400 * 2**20)  # touched: resident in this process
    ballast[::4096] = b"x" * len(ballast[::4096])
    assert peak_rss_mib() > 400
    r = subprocess.run([sys.executable, "-c", "from common.machine import peak_rss_mib; print(peak_rss_mib())"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    del ballast
    assert float(r.stdout) < 200, r.stdout
