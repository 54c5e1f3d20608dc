"""Artifacts that cannot be turned against the loader: an .onnx whose external data points outside its folder, a
cut .onnx, a .plan that is another file type, a safetensors checkpoint whose header lies. Every hotpath command that
loads one refuses it with one line `error: ...`, exit code 2, and writes nothing."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from common import cli
from common.errors import UserError
from tests.helpers import run_cli

DATA = "tiny.onnx.data"


# ------------------------------------------------------------------------------------------------ hostile files
@pytest.fixture(scope="session")
def external_onnx(tiny_onnx, tmp_path_factory) -> Path:
    """The session's tiny export re-saved with its weights in external data (tiny.onnx + tiny.onnx.data; tensors
    under 1 KiB, such as the shape constants ONNX Runtime's shape inference reads, stay in the graph)."""
    import onnx

    folder = tmp_path_factory.mktemp("external")
    model = onnx.load(str(tiny_onnx))
    onnx.save_model(model, str(folder / "tiny.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA, size_threshold=1024)
    return folder / "tiny.onnx"


def _first_external(model):
    import onnx

    return next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


def hostile_onnx(external_onnx: Path, folder: Path, kind: str) -> tuple[Path, str, str]:
    """A copy of `external_onnx` in `folder` whose first external tensor's location is hostile.
    Returns (path, tensor name, location)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(external_onnx.parent / DATA, folder / DATA)  # the honest weights, so only the location is wrong
    model = onnx.load(str(external_onnx), load_external_data=False)
    tensor = _first_external(model)
    if kind == "dotdot":
        location = "../../etc/passwd"
    elif kind == "absolute":
        location = os.path.abspath(folder / DATA)  # even an existing file: absolute paths are refused
    else:  # a symlink in the folder whose target lies elsewhere
        elsewhere = folder.parent / f"{folder.name}-elsewhere"
        elsewhere.mkdir(exist_ok=True)
        shutil.copyfile(folder / DATA, elsewhere / "secret.data")
        location = "weights.data"
        os.symlink(elsewhere / "secret.data", folder / location)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    path = folder / "hostile.onnx"
    onnx.save_model(model, str(path))
    return path, tensor.name, location


KINDS = ["dotdot", "absolute", "symlink"]


def run_main(main, argv: list[str], capsys) -> str:
    """Run a CLI main() under common.cli.run; assert exit code 2 and one stderr line `error: ...`; return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.run(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def assert_names(line: str, path: Path, tensor: str, location: str) -> None:
    assert str(path) in line and tensor in line and location in line, line
    assert "trust" in line  # says what to do


# ------------------------------------------------------------------------------------------------ ONNX locations
def test_external_copy_loads(external_onnx):
    """The honest external-data export still loads (the check refuses locations, not external data)."""
    from export.onnx_runtime import OnnxDecoder

    dec = OnnxDecoder(external_onnx, threads=1)
    assert dec.forward([[1, 2, 3]])[0].shape[:2] == (1, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_decoder_refuses_escaping_location(external_onnx, tmp_path, kind):
    from export.onnx_runtime import OnnxDecoder

    path, tensor, location = hostile_onnx(external_onnx, tmp_path / "m", kind)
    with pytest.raises(UserError) as exc:
        OnnxDecoder(path, threads=1)
    assert_names(str(exc.value), path, tensor, location)


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_reader_and_session_refuse(external_onnx, tmp_path, kind):
    """read_metadata_props (export validation, to_trt, quantize) and open_session (every ORT user) both check."""
    from export.onnx_meta import read_metadata_props
    from export.ort_session import open_session

    path, tensor, location = hostile_onnx(external_onnx, tmp_path / "m", kind)
    for load in (read_metadata_props, open_session):
        with pytest.raises(UserError) as exc:
            load(path)
        assert_names(str(exc.value), path, tensor, location)


def test_offset_past_end_of_data_refused(external_onnx, tmp_path):
    import onnx

    from export.ort_session import open_session

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(external_onnx.parent / DATA, folder / DATA)
    model = onnx.load(str(external_onnx), load_external_data=False)
    tensor = _first_external(model)
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(10 ** 12)
    if not any(e.key == "offset" for e in tensor.external_data):
        tensor.external_data.add(key="offset", value=str(10 ** 12))
    onnx.save_model(model, str(folder / "m.onnx"))
    with pytest.raises(UserError) as exc:
        open_session(folder / "m.onnx")
    assert tensor.name in str(exc.value) and "too short" in str(exc.value)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_mains_refuse(external_onnx, tmp_path, kind, capsys):
    """export.onnx_runtime, export.to_trt, quantize and serve, through their main() under cli.run."""
    from export.onnx_runtime import main as onnx_runtime_main
    from export.to_trt import main as to_trt_main
    from quantize.__main__ import main as quantize_main
    from serve.__main__ import main as serve_main

    path, tensor, location = hostile_onnx(external_onnx, tmp_path / "m", kind)
    before = sorted(p.name for p in path.parent.iterdir())
    for main, argv in ((onnx_runtime_main, [str(path), "--prompt", "def ", "--threads", "1"]),
                       (to_trt_main, [str(path), "--out", str(path.with_suffix(".plan"))]),
                       (quantize_main, [str(path), "--mode", "int8-dynamic", "--no-eval", "--threads", "1"]),
                       (quantize_main, [str(path), "--mode", "fp16", "--no-eval", "--threads", "1"]),
                       (serve_main, [str(path), "--port", "0", "--threads", "1"])):
        assert_names(run_main(main, argv, capsys), path, tensor, location)
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written


@pytest.mark.slow
def test_cli_processes_refuse_dotdot(external_onnx, tmp_path):
    """The same through fresh interpreters: python -m serve, quantize, export.onnx_runtime."""
    path, tensor, location = hostile_onnx(external_onnx, tmp_path / "m", "dotdot")
    for args in (("serve", str(path), "--port", "0", "--threads", "1"),
                 ("quantize", str(path), "--mode", "int8-dynamic", "--no-eval"),
                 ("export.onnx_runtime", str(path), "--prompt", "x")):
        proc = run_cli(*args, timeout=180)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (args, proc.stderr[-2000:])
        assert_names(lines[0], path, tensor, location)
    assert not list(path.parent.glob("hostile.*.onnx"))


# ------------------------------------------------------------------------------------------------ cut ONNX
def test_truncated_onnx_refused(tiny_onnx, tmp_path, capsys):
    from export.onnx_runtime import main as onnx_runtime_main
    from quantize.__main__ import main as quantize_main
    from serve.__main__ import main as serve_main

    raw = tiny_onnx.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(raw[: len(raw) // 2])
    for main, argv in ((onnx_runtime_main, [str(path), "--prompt", "def ", "--threads", "1"]),
                       (quantize_main, [str(path), "--mode", "int8-dynamic", "--no-eval", "--threads", "1"]),
                       (serve_main, [str(path), "--port", "0", "--threads", "1"])):
        line = run_main(main, argv, capsys)
        assert str(path) in line and "truncated" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.onnx"]


# ------------------------------------------------------------------------------------------------ foreign .plan
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))


def _plan_json(plan: Path) -> None:
    from export.trt_runtime import FORMAT, FORMAT_VERSION, metadata_path

    metadata_path(plan).write_text(json.dumps({
        "format": FORMAT, "format_version": FORMAT_VERSION, "tensorrt_version": "10.9.0", "precision": "fp32",
        "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}, "profiles": [], "config": {}}))


@pytest.mark.parametrize("content", [PNG, b"just some text\nrenamed to .plan\n"], ids=["png", "text"])
def test_foreign_plan_refused_before_tensorrt(tmp_path, content, capsys):
    """A PNG or text file renamed model.plan, beside a well-formed JSON: refused from its bytes, before TensorRT
    (which is not installed here: without the check the error would be 'TensorRT is not installed')."""
    from export.trt_runtime import TrtEngine
    from serve.__main__ import main as serve_main

    plan = tmp_path / "model.plan"
    plan.write_bytes(content)
    _plan_json(plan)
    with pytest.raises(UserError) as exc:
        TrtEngine(plan)
    assert "not a TensorRT engine" in str(exc.value) and str(plan) in str(exc.value)
    line = run_main(serve_main, [str(plan), "--port", "0", "--threads", "1"], capsys)
    assert "not a TensorRT engine" in line


@pytest.mark.parametrize("json_text", ["\x89PNG\r\n", "[1, 2]", '{"format": "hotpath-trt", "gpu": "H100", '
                                       '"profiles": 3, "config": []}'], ids=["png", "list", "wrong-types"])
def test_foreign_plan_json_refused(tmp_path, json_text, capsys):
    from export.trt_runtime import metadata_path, read_engine_metadata
    from serve.__main__ import main as serve_main

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00\x01" * 64)
    metadata_path(plan).write_text(json_text)
    with pytest.raises(UserError):
        read_engine_metadata(plan)
    line = run_main(serve_main, [str(plan), "--port", "0", "--threads", "1"], capsys)
    assert str(metadata_path(plan)) in line


def test_plan_without_json_refused(tmp_path, capsys):
    from serve.__main__ import main as serve_main

    plan = tmp_path / "model.plan"
    plan.write_bytes(PNG)
    line = run_main(serve_main, [str(plan), "--port", "0", "--threads", "1"], capsys)
    assert "model.plan.json is missing" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.plan"]


# ------------------------------------------------------------------------------------------------ safetensors
@pytest.fixture(scope="module")
def tiny_safetensors(tiny_model, tmp_path_factory) -> Path:
    from model.checkpoint import save_checkpoint

    model, tokenizer, meta = tiny_model
    return save_checkpoint(tmp_path_factory.mktemp("st") / "tiny.safetensors", model, tokenizer, meta)


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _lie(raw: bytes, how: str) -> bytes:
    header, body = _split(raw)
    if how == "header-length":
        return struct.pack("<Q", len(raw) * 4) + raw[8:]
    if how == "offsets":
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] = len(body) * 8
        return _join(header, body)
    if how == "cut":
        return raw[: len(raw) // 2]
    meta = header["__metadata__"]
    if how == "no-config":
        del meta["config"]
    elif how == "config-not-json":
        meta["config"] = "{not json"
    elif how == "config-list":
        meta["config"] = "[1, 2]"
    elif how == "meta-not-json":
        meta["meta"] = "{"
    return _join(header, body)


SIZE_LIES = ["header-length", "offsets", "cut"]
HEADER_LIES = ["no-config", "config-not-json", "config-list", "meta-not-json"]


@pytest.mark.parametrize("how", SIZE_LIES + HEADER_LIES)
def test_lying_safetensors_refused(tiny_safetensors, tmp_path, how, capsys):
    from model.eval import main as eval_main
    from model.generate import main as generate_main

    path = tmp_path / "lie.safetensors"
    path.write_bytes(_lie(tiny_safetensors.read_bytes(), how))
    for main, argv in ((eval_main, [str(path), "--windows", "1", "--json", str(tmp_path / "out.json")]),
                       (generate_main, [str(path), "--prompt", "def ", "--max-new-tokens", "2"])):
        line = run_main(main, argv, capsys)
        assert str(path) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lie.safetensors"]  # no out.json


@pytest.mark.slow
def test_lying_safetensors_cli_process(tiny_safetensors, tmp_path):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(_lie(tiny_safetensors.read_bytes(), "config-not-json"))
    proc = run_cli("model.generate", str(path), "--prompt", "x", timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
