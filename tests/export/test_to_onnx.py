"""python -m export.to_onnx: the graph, its metadata, validation, failure naming, bad input."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from export import onnx_meta
from export.onnx_meta import read_hotpath_metadata, set_metadata_props
from export.to_onnx import export_onnx, failed_path, main, save_model
from export.validate import TOLERANCES, Tolerance
from common import cli
from common.cli import UserError
from tests.helpers import ROOT


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.slow
def test_export_writes_a_validated_kv_decoder(onnx_export, tiny_model):
    path, report = onnx_export
    model, _, _ = tiny_model
    cfg = model.config
    assert report["ok"] and report["validation"]["passed"]
    checks = {c["name"]: c for c in report["validation"]["checks"]}
    assert set(checks) == {"random prefill", "last-token prefill", "random decode", "left-padded batch",
                           "corpus text", "greedy 32"}
    assert checks["greedy 32"]["greedy_match"] == checks["greedy 32"]["greedy_total"] == 32
    assert checks["last-token prefill"]["positions"] == 2  # one per row: the graph returned the last position only
    for name in ("random prefill", "last-token prefill", "random decode", "left-padded batch", "corpus text"):
        assert checks[name]["max_abs_diff"] < 1e-4 and checks[name]["top1_agreement"] == 1.0
    assert not list(path.parent.glob(".*"))  # no temporary leftovers

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ins = {i.name: _dims(i) for i in proto.graph.input}
    outs = {o.name: _dims(o) for o in proto.graph.output}
    kv, d = cfg.n_kv_head, cfg.head_dim
    assert ins["input_ids"] == ["batch", "sequence_length"]
    assert ins["attention_mask"] == ["batch", "total_sequence_length"]
    assert ins["position_ids"] == ["batch", "sequence_length"]
    assert outs["logits"] == ["batch", "logits_sequence_length", cfg.vocab_size]
    assert ins["logits_to_keep"] == []  # an int64 scalar
    assert next(i for i in proto.graph.input if i.name == "logits_to_keep").type.tensor_type.elem_type == \
        onnx.TensorProto.INT64
    default = [i for i in proto.graph.initializer if i.name == "logits_to_keep"]  # may be left out: 0, every position
    assert len(default) == 1 and onnx.numpy_helper.to_array(default[0]) == 0
    for i in range(cfg.n_layer):
        for kind in ("key", "value"):
            assert ins[f"past_key_values.{i}.{kind}"] == ["batch", kv, "past_sequence_length", d]
            assert outs[f"present.{i}.{kind}"] == ["batch", kv, "total_sequence_length", d]
    assert len(ins) == 4 + 2 * cfg.n_layer and len(outs) == 1 + 2 * cfg.n_layer


@pytest.mark.slow
def test_metadata_makes_the_file_self_contained(onnx_export, tiny_model, tiny_ckpt):
    path, _ = onnx_export
    model, tokenizer, _ = tiny_model
    meta = read_hotpath_metadata(path)
    assert meta["config"] == model.config.to_dict()
    assert meta["tokenizer"] == tokenizer.to_str()
    assert meta["kv_cache"] is True and meta["dtype"] == "fp32"
    assert meta["version"] == onnx_meta.hotpath_version() != "unknown"
    assert meta["source_sha256"] == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert onnx_meta.gpt_config(meta) == model.config
    assert onnx_meta.tokenizer_of(meta).encode("def f(x):").ids == tokenizer.encode("def f(x):").ids
    # a new file with the props copied (what quantize does) reads the same
    other = _plain_onnx()
    set_metadata_props(other, meta["props"])
    assert read_hotpath_metadata(other)["config"] == meta["config"]


def _plain_onnx():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_foreign_or_corrupt_onnx_is_refused(tmp_path):
    from export.onnx_runtime import OnnxDecoder

    plain = tmp_path / "plain.onnx"
    onnx.save(_plain_onnx(), str(plain))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    for p in (plain, junk):
        with pytest.raises(UserError, match="is not a hotpath export"):
            read_hotpath_metadata(p)
        with pytest.raises(UserError, match="hotpath export"):
            OnnxDecoder(p)
    with pytest.raises(UserError, match="does not exist"):
        read_hotpath_metadata(tmp_path / "missing.onnx")


@pytest.mark.slow
def test_external_data_save_runs_the_same(onnx_export, decoder, tmp_path):
    import onnx_ir as ir

    from export.onnx_runtime import OnnxDecoder

    files = save_model(ir.load(str(onnx_export[0])), tmp_path / "ext.onnx", external=True)
    assert [f.name for f in files] == ["ext.onnx", "ext.onnx.data"]
    weights = (tmp_path / "ext.onnx.data").stat().st_size
    assert weights > 400_000 and (tmp_path / "ext.onnx").stat().st_size < onnx_export[0].stat().st_size - weights // 2
    ext = OnnxDecoder(tmp_path / "ext.onnx")
    ids = np.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(ext.forward(ids)[0], decoder.forward(ids)[0])
    assert read_hotpath_metadata(tmp_path / "ext.onnx")["kv_cache"]


@pytest.mark.slow
def test_fp16_failed_validation_is_kept_and_named(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """One fp16 export: its real accuracy passes the fp16 tolerance; with an impossible tolerance the CLI keeps the
    file as *.failed.onnx, leaves an existing good file alone, and exits 1."""
    import export.to_onnx as to_onnx
    from export.onnx_runtime import OnnxDecoder

    out = tmp_path / "m.fp16.onnx"
    out.write_bytes(b"previous good export")
    (tmp_path / "m.fp16.onnx.data").write_bytes(b"previous good weights")
    real = TOLERANCES["fp16"]
    monkeypatch.setitem(to_onnx.TOLERANCES, "fp16", Tolerance(logits_rel=1e-12, top1=1.0, greedy=32))
    monkeypatch.setattr(to_onnx, "EXTERNAL_DATA_BYTES", 0)  # as a model over 2 GB: weights in a .data file
    json_path = tmp_path / "r.json"
    assert main([str(tiny_ckpt), "--dtype", "fp16", "--out", str(out), "--json", str(json_path)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "failed validation" in err
    assert out.read_bytes() == b"previous good export"
    assert (tmp_path / "m.fp16.onnx.data").read_bytes() == b"previous good weights"
    kept = failed_path(out)
    assert kept.name == "m.fp16.failed.onnx" and kept.exists()
    assert (tmp_path / "m.fp16.failed.onnx.data").stat().st_size > 100_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16.failed.onnx", "m.fp16.failed.onnx.data",
                                                          "m.fp16.onnx", "m.fp16.onnx.data", "r.json"]
    import json

    from export.validate import Check, ValidationReport

    report = json.loads(json_path.read_text())
    assert report["ok"] is False and report["path"] == str(kept) and report["external_data"] is True
    checks = [Check(**c) for c in report["validation"]["checks"]]
    assert ValidationReport("fp16", real, checks).rejudge(real)  # real fp16 accuracy ok
    assert max(c.max_abs_diff for c in checks if c.max_abs_diff is not None) < 0.05
    dec = OnnxDecoder(kept)
    assert dec.dtype == np.float16 and read_hotpath_metadata(kept)["dtype"] == "fp16"
    assert dec.empty_past(2)[0][0].dtype == np.float16


@pytest.mark.slow
def test_patched_model_without_kv_cache_exports(tiny_model, tmp_path):
    """The in-memory API, a kernels-patched model (translation table passed), and the logits-only graph."""
    import copy

    from export.onnx_runtime import OnnxDecoder
    from export.to_onnx import is_patched
    from model.generate import generate

    model, tokenizer, _ = tiny_model
    model = copy.deepcopy(model)
    try:
        import kernels

        kernels.patch(model)
        assert is_patched(model)
    except ImportError:  # kernels (triton) not installed: the plain model still covers the API
        pass
    report = export_onnx(model, tmp_path / "nokv.onnx", kv_cache=False, tokenizer=tokenizer)
    assert report.ok, report.summary()
    assert report.validation.greedy == (32, 32)
    assert report.genai_config is None and not (tmp_path / "genai_config.json").exists()  # GenAI needs a cache
    dec = OnnxDecoder(report.path)
    assert not dec.kv_cache and dec.input_names == ["input_ids", "attention_mask", "position_ids"]
    assert dec.has_logits_to_keep  # an overridable initializer: ONNX Runtime does not list it among the inputs
    ids = np.array([tokenizer.encode("def f(x):").ids])
    full, _ = dec.forward(ids)
    last, _ = dec.forward(ids, logits_to_keep=1)
    assert last.shape == (1, 1, full.shape[-1]) and np.allclose(last, full[:, -1:], atol=1e-5)
    prompt = tokenizer.encode("import os\n").ids
    assert dec.generate(prompt, 10) == generate(model, prompt, 10)
    with pytest.raises(ValueError, match="without a KV cache"):
        dec.forward(np.array([[1]]), past=[])


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.run(main, argv)
    err = capsys.readouterr().err
    return exc.value.code, err


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_ckpt, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_ckpt.read_bytes()[:5000])
    cases = [
        ([str(tmp_path / "missing.pt")], "does not exist"),
        ([str(corrupt)], "truncated or not a PyTorch checkpoint"),
        ([str(tiny_ckpt), "--dtype", "int3"], "unknown dtype"),
        ([str(tiny_ckpt), "--opset", "11"], "--opset 11 is outside"),
        ([str(tiny_ckpt), "--out", str(tmp_path)], "is a folder"),
    ]
    before = set(tmp_path.iterdir())
    for argv, message in cases:
        code, err = _cli(argv + ["--out", str(tmp_path / "x.onnx")] if "--out" not in argv else argv, capsys)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
        assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before


@pytest.mark.slow
def test_module_entry_point_reports_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export.to_onnx", str(tmp_path / "nope.pt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: checkpoint") and len(proc.stderr.strip().splitlines()) == 1


def test_shape_helpers():
    from export.to_onnx import default_out_path, dynamic_shapes, io_names

    assert default_out_path(Path("a/ckpt.pt")) == Path("a/ckpt.onnx")
    assert default_out_path(Path("a/ckpt.pt"), "fp16") == Path("a/ckpt.fp16.onnx")
    ins, outs = io_names(2)
    assert ins[3:] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                       "past_key_values.1.value", "logits_to_keep"]
    assert outs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert "past_key_values" not in dynamic_shapes(2, kv_cache=False)
