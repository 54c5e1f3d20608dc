"""python -m export.to_trt and export.trt_runtime on CPU: everything around TensorRT (which is not installed here).

The TensorRT calls themselves run against a recording fake of the `tensorrt` module, which checks the call sequence
(strongly typed network, parser, profiles, sparse flag, timing cache, serialization); the real engine tests are
marked gpu and need TensorRT.
"""
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export import to_trt, trt_build, trt_runtime
from export.to_trt import default_plan_path, onnx_precision, plan_build
from export.trt_build import Profile, custom_profile, default_profiles, parse_shapes
from export.trt_runtime import check_compatible, metadata_path, read_engine_metadata, select_profile
from common import cli
from common.cli import UserError
from model.gpt import GPTConfig

CFG = GPTConfig.preset("tiny", vocab_size=512, n_kv_head=2)  # block 64, 2 layers, kv 2, head_dim 16


def test_default_profiles_prefill_and_decode():
    prefill, decode = default_profiles(CFG, max_batch=8, max_seq=64)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.shapes["input_ids"] == {"min": [1, 1], "opt": [4, 32], "max": [8, 64]}
    assert prefill.shapes["past_key_values.1.value"] == {"min": [1, 2, 0, 16], "opt": [4, 2, 0, 16],
                                                         "max": [8, 2, 0, 16]}
    assert decode.shapes["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [8, 1]}
    assert decode.shapes["attention_mask"] == {"min": [1, 2], "opt": [4, 33], "max": [8, 64]}
    assert decode.shapes["past_key_values.0.key"]["max"] == [8, 2, 63, 16]
    assert len(prefill.shapes) == 3 + 2 * CFG.n_layer
    (full,) = default_profiles(CFG, max_batch=2, max_seq=16, kv_cache=False)
    assert set(full.shapes) == {"input_ids", "attention_mask", "position_ids"}
    for bad, msg in ((dict(max_seq=65), "above the model's context of 64"), (dict(max_batch=0), "at least 1"),
                     (dict(max_seq=0), "at least 1")):
        with pytest.raises(UserError, match=msg):
            default_profiles(CFG, **bad)


def test_custom_shapes_with_globs_and_checks():
    lo = parse_shapes("input_ids:1x1,attention_mask:1x1,position_ids:1x1,past_key_values.*:1x2x0x16", "--min-shapes")
    opt = parse_shapes("input_ids:2x8,attention_mask:2x8,position_ids:2x8,past_key_values.*:2x2x0x16", "--opt-shapes")
    hi = parse_shapes("input_ids:4x64,attention_mask:4x64,position_ids:4x64,past_key_values.*:4x2x0x16", "x")
    p = custom_profile(CFG, lo, opt, hi)
    assert p.shapes["past_key_values.1.key"] == {"min": [1, 2, 0, 16], "opt": [2, 2, 0, 16], "max": [4, 2, 0, 16]}
    with pytest.raises(UserError, match="not NAME:DxDx"):
        parse_shapes("input_ids=1x1", "--min-shapes")
    with pytest.raises(UserError, match="no shape for input past_key_values.0.key"):
        custom_profile(CFG, {k: v for k, v in lo.items() if not k.startswith("past")}, opt, hi)
    with pytest.raises(UserError, match="above the model's context of 64"):
        custom_profile(CFG, lo, opt, {**hi, "input_ids": (4, 65)})
    with pytest.raises(UserError, match="fixed dims"):
        custom_profile(CFG, {**lo, "past_key_values.*": (1, 3, 0, 16)}, opt, hi)
    with pytest.raises(UserError, match="has 3 dims"):
        custom_profile(CFG, {**lo, "input_ids": (1, 1, 1)}, opt, hi)
    with pytest.raises(UserError, match="min <= opt <= max"):
        custom_profile(CFG, {**lo, "input_ids": (8, 1)}, opt, hi)


def test_plan_names():
    assert default_plan_path(Path("d/ckpt.pt"), "fp32") == Path("d/ckpt.plan")
    assert default_plan_path(Path("d/ckpt.pt"), "fp16") == Path("d/ckpt.fp16.plan")
    assert default_plan_path(Path("d/ckpt.fp16.onnx"), "fp16") == Path("d/ckpt.fp16.plan")
    assert default_plan_path(Path("d/ckpt.int8-static.onnx"), "int8") == Path("d/ckpt.int8-static.int8.plan")
    assert metadata_path("d/ckpt.fp16.plan") == Path("d/ckpt.fp16.plan.json")


def _qdq_model(zero_point_type):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("zp", zero_point_type, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[scale, zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.slow
def test_onnx_precision_detection(tmp_path, onnx_export):
    assert onnx_precision(onnx_export[0]) == "fp32"
    for zp_type, want in ((TensorProto.INT8, "int8"), (TensorProto.UINT8, "uint8-qdq"),
                          (TensorProto.FLOAT8E4M3FN, "fp8")):
        path = tmp_path / f"{want}.onnx"
        onnx.save(_qdq_model(zp_type), str(path))
        assert onnx_precision(path) == want


@pytest.mark.slow
def test_prepare_onnx_precision_rules(onnx_export, monkeypatch, tmp_path):
    src = onnx_export[0]
    assert to_trt.prepare_onnx(src, "fp32", say=lambda m: None) == src
    monkeypatch.setattr(to_trt, "precision_preparer", lambda precision: None)  # no plugin installed
    with pytest.raises(UserError, match="int8 needs a Q/DQ model: python -m quantize .* --mode int8-static"):
        to_trt.prepare_onnx(src, "int8", say=lambda m: None)
    with pytest.raises(UserError, match="fp16 engine needs an fp16 ONNX"):
        to_trt.prepare_onnx(src, "fp16", say=lambda m: None)
    with pytest.raises(UserError, match="fp8 Q/DQ"):
        to_trt.prepare_onnx(src, "fp8", say=lambda m: None)
    calls = []
    monkeypatch.setattr(to_trt, "precision_preparer",
                        lambda precision: lambda path: calls.append((path, precision)) or path)
    to_trt.prepare_onnx(src, "int8", say=lambda m: None)
    to_trt.prepare_onnx(src, "fp16", say=lambda m: None)
    assert calls == [(src, "int8"), (src, "fp16")]
    uint8 = tmp_path / "u8.onnx"
    onnx.save(_qdq_model(TensorProto.UINT8), str(uint8))
    with pytest.raises(UserError, match="int8 symmetric"):
        to_trt.prepare_onnx(uint8, "int8", say=lambda m: None)


# stands in for a serialized engine: binary, like a real plan (a text file is refused as not an engine)
FAKE_ENGINE = b"\x00\x01hotpath-test-engine\xff"


def _meta(**over):
    meta = trt_build.engine_metadata(
        trt_version="10.9.0.34", gpu={"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        precision="fp16", sparsity=False, profiles=default_profiles(CFG, max_batch=4, max_seq=64),
        source=Path("ckpt.pt"), source_sha256="ab" * 32, onnx_path=Path("ckpt.fp16.onnx"),
        onnx_meta={"source_sha256": "ab" * 32, "dtype": "fp16", "kv_cache": True, "config": CFG.to_dict()},
        workspace_gib=4.0, timing_cache=Path("trt_timing.cache"), build_seconds=12.3)
    meta.update(over)
    return meta


def test_engine_metadata_roundtrip_and_compatibility(tmp_path):
    plan = tmp_path / "m.plan"
    trt_build.write_plan(plan, FAKE_ENGINE, _meta())
    meta = read_engine_metadata(plan)
    assert meta["format"] == "hotpath-trt" and meta["precision"] == "fp16" and meta["tensorrt_version"] == "10.9.0.34"
    assert [p["name"] for p in meta["profiles"]] == ["prefill", "decode"]
    assert meta["source"]["sha256"] == "ab" * 32 and meta["config"]["n_layer"] == 2
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    check_compatible(meta, trt_version="10.9.0.34", gpu=gpu)  # same: accepted
    with pytest.raises(UserError, match="built with TensorRT 10.9.0.34 but this is TensorRT 11.0.0.1"):
        check_compatible(meta, trt_version="11.0.0.1", gpu=gpu)
    with pytest.raises(UserError, match="built for NVIDIA H100 80GB HBM3 .* this GPU is NVIDIA A100"):
        check_compatible(meta, trt_version="10.9.0.34", gpu={"name": "NVIDIA A100-SXM4-80GB",
                                                            "compute_capability": "8.0"})
    (tmp_path / "bad.plan").write_bytes(b"x")
    with pytest.raises(UserError, match="was not built by python -m export.to_trt"):
        read_engine_metadata(tmp_path / "bad.plan")
    metadata_path(tmp_path / "bad.plan").write_text('{"format": "other"}')
    with pytest.raises(UserError, match="not a hotpath TensorRT engine"):
        read_engine_metadata(tmp_path / "bad.plan")


def test_select_profile():
    profiles = _meta()["profiles"]
    past0, past9 = (2, 2, 0, 16), (2, 2, 9, 16)
    assert select_profile(profiles, {"input_ids": (2, 10), "past_key_values.0.key": past0}) == 0
    assert select_profile(profiles, {"input_ids": (2, 1), "past_key_values.0.key": past9}) == 1
    with pytest.raises(UserError, match="fit none of the engine's profiles"):
        select_profile(profiles, {"input_ids": (5, 1), "past_key_values.0.key": past9})


def test_trt_engine_refuses_other_version_or_gpu(tmp_path, monkeypatch):
    plan = tmp_path / "m.plan"
    trt_build.write_plan(plan, FAKE_ENGINE, _meta())
    fake = types.SimpleNamespace(__version__="10.13.0.35", Builder=object)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_runtime, "current_gpu", lambda device=0: {"name": "NVIDIA H100 80GB HBM3",
                                                                     "compute_capability": "9.0"})
    with pytest.raises(UserError, match="TensorRT 10.9.0.34 but this is TensorRT 10.13.0.35"):
        trt_runtime.TrtEngine(plan)
    fake.__version__ = "10.9.0.34"
    monkeypatch.setattr(trt_runtime, "current_gpu", lambda device=0: {"name": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(UserError, match="this GPU is NVIDIA L4"):
        trt_runtime.TrtEngine(plan)
    with pytest.raises(UserError, match="does not exist"):
        trt_runtime.TrtEngine(tmp_path / "none.plan")


@pytest.mark.slow
def test_missing_tensorrt_says_which_how_and_where_the_onnx_is(onnx_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where TensorRT is installed
    out = tmp_path / "m.plan"
    code, err = _cli([str(onnx_export[0]), "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "TensorRT is not installed" in err and "pip install" in err
    assert f"the ONNX model is at {onnx_export[0]}" in err
    assert not out.exists() and not metadata_path(out).exists()
    with pytest.raises(UserError, match="TensorRT is not installed"):
        trt_runtime.TrtEngine(_write_fake_plan(tmp_path))


@pytest.mark.slow
def test_missing_gpu_says_so(onnx_export, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(to_trt, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.9.0.34"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _cli([str(onnx_export[0]), "--out", str(tmp_path / "m.plan")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "no CUDA GPU" in err and f"the ONNX model is at {onnx_export[0]}" in err


def _write_fake_plan(tmp_path):
    plan = tmp_path / "fake.plan"
    trt_build.write_plan(plan, FAKE_ENGINE, _meta())
    return plan


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.run(to_trt.main, argv)
    return exc.value.code, capsys.readouterr().err


# ------------------------------------------------------------------------------------- a recording fake TensorRT
class FakeTrt(types.SimpleNamespace):
    """Just the documented names build_serialized uses, recording what it is asked to do."""

    def __init__(self):
        calls = []
        self.calls = calls
        self.__version__ = "10.9.0.34"

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                calls.append(("Logger", level))

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                calls.append(("set_shape", name, list(lo), list(opt), list(hi)))

        class Cache:
            def __init__(self, blob):
                self.blob = blob

            def serialize(self):
                return self.blob + b"+new"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls.append(("workspace", pool, size))

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def add_optimization_profile(self, p):
                calls.append(("add_profile",))

            def create_timing_cache(self, blob):
                calls.append(("timing_cache_in", bytes(blob)))
                self.cache = Cache(bytes(blob))
                return self.cache

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("set_timing_cache", ignore_mismatch))

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("create_network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build", network))
                return b"ENGINE"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse", Path(path).name))
                return True

            def parse(self, model, path):
                proto = onnx.load_from_string(bytes(model))
                calls.append(("parse", Path(path).name))
                calls.append(("parsed_inputs", [i.name for i in proto.graph.input]))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(SPARSE_WEIGHTS="SPARSE_WEIGHTS")


@pytest.mark.slow
def test_build_with_a_fake_tensorrt_writes_plan_json_and_timing_cache(onnx_export, tmp_path, monkeypatch, capsys):
    fake = FakeTrt()
    monkeypatch.setattr(to_trt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(to_trt, "current_gpu", lambda: {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                                                        "index": 0})
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    out = tmp_path / "tiny.plan"
    assert to_trt.main([str(onnx_export[0]), "--out", str(out), "--timing-cache", str(cache), "--sparsity",
                        "--max-batch", "4", "--max-seq", "32", "--workspace", "2"]) == 0
    assert out.read_bytes() == b"ENGINE" and cache.read_bytes() == b"old+new"
    meta = json.loads(metadata_path(out).read_text())
    assert meta["tensorrt_version"] == "10.9.0.34" and meta["gpu"]["name"] == "NVIDIA H100 80GB HBM3"
    assert meta["precision"] == "fp32" and meta["sparsity"] is True and meta["onnx"]["kv_cache"] is True
    assert meta["profiles"][1]["shapes"]["past_key_values.0.key"]["max"][2] == 31
    names = [c[0] for c in fake.calls]
    assert ("create_network", 1 << 1) in fake.calls  # strongly typed
    assert ("flag", "SPARSE_WEIGHTS") in fake.calls and ("workspace", "WORKSPACE", 2 << 30) in fake.calls
    assert names.count("add_profile") == 2 and ("timing_cache_in", b"old") in fake.calls
    assert names.index("parse") < names.index("set_shape") < names.index("build")
    n_inputs = len(meta["profiles"][0]["shapes"])
    assert names.count("set_shape") == 2 * n_inputs
    # the export's logits_to_keep input is frozen to 0 before parsing: the profiles cover every input TensorRT sees
    parsed_inputs = next(c[1] for c in fake.calls if c[0] == "parsed_inputs")
    assert "logits_to_keep" not in parsed_inputs and sorted(parsed_inputs) == sorted(meta["profiles"][0]["shapes"])
    assert "2:4 sparse" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_input_one_line_exit_2(tmp_path, tiny_ckpt, onnx_export, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_ckpt.read_bytes()[:4000])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(_qdq_model(TensorProto.INT8), str(foreign))
    src = str(onnx_export[0])
    cases = [
        ([str(tmp_path / "missing.pt")], "does not exist"),
        ([str(corrupt)], "truncated or not a PyTorch checkpoint"),
        ([str(foreign)], "is not a hotpath export"),
        ([src, "--precision", "int4"], "unknown precision 'int4'"),
        ([src, "--max-seq", "65"], "above the model's context of 64"),
        ([src, "--max-batch", "0"], "--max-batch 0 must be at least 1"),
        ([src, "--min-shapes", "input_ids:1x1"], "go together"),
        ([src, "--workspace", "0"], "must be positive"),
        ([str(tmp_path / "notes.txt")], "does not exist"),
    ]
    (tmp_path / "x.txt").write_text("hi")
    cases.append(([str(tmp_path / "x.txt")], "neither a hotpath checkpoint"))
    before = set(tmp_path.iterdir())
    for argv, message in cases:
        code, err = _cli(argv + ["--out", str(tmp_path / "o.plan")], capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert set(tmp_path.iterdir()) == before


@pytest.mark.slow
def test_plan_build_validates_before_work(onnx_export, tmp_path):
    plan = plan_build(onnx_export[0], precision="fp16", out=None)
    assert plan.out.name == "tiny.fp16.plan" and plan.timing_cache.name == "trt_timing.cache"
    assert [p.name for p in plan.profiles] == ["prefill", "decode"]
    assert isinstance(plan.profiles[0], Profile)


@pytest.mark.slow
@pytest.mark.gpu
def test_engine_matches_onnx_runtime(onnx_export, tmp_path):
    """Never run on the development machines (no TensorRT): build, load and compare with ONNX Runtime."""
    pytest.importorskip("tensorrt")
    import torch

    from export.onnx_runtime import OnnxDecoder

    plan = to_trt.build_engine(onnx_export[0], out=tmp_path / "m.plan", max_batch=2, say=lambda m: None)
    engine = trt_runtime.TrtEngine(plan)
    dec = OnnxDecoder(onnx_export[0], providers=["CPUExecutionProvider"])
    ids = np.array([[3, 4, 5, 6]], dtype=np.int64)
    ref, _ = dec.forward(ids)
    feeds = {"input_ids": torch.from_numpy(ids).cuda(), "attention_mask": torch.ones(1, 4, dtype=torch.long).cuda(),
             "position_ids": torch.arange(4).view(1, 4).cuda()}
    for i, (k, v) in enumerate(dec.empty_past(1)):
        feeds[f"past_key_values.{i}.key"] = torch.from_numpy(k).cuda()
        feeds[f"past_key_values.{i}.value"] = torch.from_numpy(v).cuda()
    out = engine.infer(feeds)
    np.testing.assert_allclose(out["logits"].float().cpu().numpy(), ref, atol=1e-3, rtol=1e-3)
