"""Sizes are computed in MiB (2**20 bytes) and labelled MiB, in every report that prints one."""
from pathlib import Path

from bench.table import suite_table
from export.to_onnx import ExportReport
from quantize.report import format_report


def test_quantize_report_says_mib():
    text = format_report({"what": "quantize int8-dynamic", "size_before": 3 * 2**20, "size_after": 2**20})
    assert "3.00 MiB -> 1.00 MiB" in text and " MB" not in text


def test_export_summary_says_mib():
    r = ExportReport(path=Path("m.onnx"), ok=True, dtype="fp32", kv_cache=True, opset=18, source_sha256="",
                     file_bytes=5 * 2**20)
    assert "(5.0 MiB, fp32" in r.summary() and " MB" not in r.summary()


def test_bench_table_columns_say_mib():
    rows = [{"suite": "inference", "variant": "ort fp32", "metric": m, "value": 1.0, "unit": "MiB"}
            for m in ("peak memory", "file size")]
    header, _ = suite_table(rows, "inference")
    assert "peak MiB" in header and "file MiB" in header and not any(h.endswith(" MB") for h in header)
