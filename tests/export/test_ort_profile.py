"""`python -m export.ort_profile`: ONNX Runtime's real profiler over the session's tiny exports, its trace split by
phase and op type."""
import json

import pytest

from common.errors import UserError
from export.ort_profile import main, matmul_flops, profile, split_trace


@pytest.mark.parametrize("target", ["ort", "generic"])
def test_profile_splits_prefill_and_decode_by_op_type(target, tiny_onnx, tiny_ort_onnx, tmp_path):
    path = tiny_ort_onnx if target == "ort" else tiny_onnx
    trace = tmp_path / "trace.json"
    r = profile(path, prefill=12, decode=3, runs=2, threads=1, trace=trace)
    assert r["target"] == target
    phases = {p["phase"]: p for p in r["phases"]}
    assert set(phases) == {"prefill", "decode"}
    assert phases["prefill"]["runs"] == 2 and phases["decode"]["runs"] == 6  # the warm-up round left out
    for p in phases.values():
        ops = {row["op"]: row for row in p["ops"]}
        assert "MatMul" in ops and ops["MatMul"]["gflops"] > 0
        assert ("GroupQueryAttention" in ops) == (target == "ort")
        assert p["call_ms"] >= 0.99 * p["ms_per_run"]  # the Python call wraps the graph run
        assert 0 < p["kernel_share"] <= 1.0 and sum(row["share"] for row in p["ops"]) == pytest.approx(
            p["kernel_share"])
        assert [row["ms_per_run"] for row in p["ops"]] == sorted((row["ms_per_run"] for row in p["ops"]), reverse=True)
    # 12 tokens of prefill do more matmul work per run than one decode token
    def matmul_work(p):
        return p["matmul_gflops"] * p["ms_per_run"] * p["matmul_share"]
    assert matmul_work(phases["prefill"]) > 5 * matmul_work(phases["decode"])
    assert any(e.get("name") == "model_run" for e in json.loads(trace.read_text()))


def test_matmul_flops_from_the_recorded_shapes():
    args = {"input_type_shape": [{"float": [2, 5, 64]}, {"float": [64, 192]}],
            "output_type_shape": [{"float": [2, 5, 192]}]}
    assert matmul_flops(args) == 2 * 2 * 5 * 192 * 64
    assert matmul_flops({}) == 0


def test_split_trace_attributes_nodes_to_their_run_and_skips_warm_up():
    events = [{"name": "model_run", "cat": "Session", "ts": 0, "dur": 100},
              {"name": "model_run", "cat": "Session", "ts": 200, "dur": 50},
              {"name": "a_kernel_time", "cat": "Node", "ts": 10, "dur": 80, "args": {"op_name": "MatMul"}},
              {"name": "a_kernel_time", "cat": "Node", "ts": 210, "dur": 30,
               "args": {"op_name": "MatMul", "input_type_shape": [{"float": [1, 8]}],
                        "output_type_shape": [{"float": [1, 4]}]}},
              {"name": "b_kernel_time", "cat": "Node", "ts": 245, "dur": 5, "args": {"op_name": "Add"}}]
    phases = split_trace(events, [None, "decode"])
    (only,) = phases.values()
    s = only.summary()
    assert s["runs"] == 1 and s["ms_per_run"] == pytest.approx(0.05) == s["call_ms"]
    assert [r["op"] for r in s["ops"]] == ["MatMul", "Add"]
    assert s["kernel_share"] == pytest.approx(35 / 50) and s["ops"][0]["gflops"] == pytest.approx(64 / 30e3)
    with pytest.raises(ValueError, match="2 graph runs, 3 were made"):
        split_trace(events, [None, "a", "b"])


def test_cli_json_and_a_too_long_request(tiny_ort_onnx, capsys):
    assert main([str(tiny_ort_onnx), "--prefill", "8", "--decode", "2", "--runs", "1", "--threads", "1",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [p["phase"] for p in r["phases"]] == ["prefill", "decode"]
    with pytest.raises(UserError, match="exceed the model context"):
        main([str(tiny_ort_onnx), "--prefill", "100000"])


def test_a_folder_as_trace_is_refused_before_profiling(tiny_ort_onnx, tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        main([str(tiny_ort_onnx), "--prefill", "8", "--decode", "1", "--runs", "1", "--trace", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
