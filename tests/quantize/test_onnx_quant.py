"""ONNX modes through ONNX Runtime's tools: outputs load in export's OnnxDecoder (what serve runs), keep the
hotpath metadata, and stay close to fp32 (SQNR of logits, perplexity delta); calibration cache reuse; CLI report."""
import importlib.util
import json

import numpy as np
import onnx
import pytest

from export.onnx_meta import read_metadata_props
from quantize import perplexity_onnx, quantize_onnx
from quantize import report as R

from tests.helpers import sqnr_db

pytestmark = pytest.mark.slow  # every test needs an ONNX export

# fp16 and int8 keep logits close; 4-bit weights on a 64-wide model are coarser
MIN_SQNR = {"fp16": 40, "int8-dynamic": 15, "int8-static": 12, "int4-weight": 8}
MAX_PPL_INCREASE = {"fp16": 0.5, "int8-dynamic": 5, "int8-static": 8, "int4-weight": 15}


def _decoder(path):
    from export.onnx_runtime import OnnxDecoder

    return OnnxDecoder(path, threads=2)


@pytest.fixture(scope="module")
def fp32_run(tiny_onnx):
    dec = _decoder(tiny_onnx)
    ids = np.random.default_rng(0).integers(0, dec.config.vocab_size, (2, 24))
    logits, _ = dec.forward(ids, np.ones_like(ids), np.broadcast_to(np.arange(24), (2, 24)).copy(), dec.empty_past(2))
    return ids, logits, perplexity_onnx(tiny_onnx, windows=4, corpus_bytes=400_000)["ppl"]


@pytest.mark.parametrize("mode", ["fp16", "int8-dynamic", "int8-static", "int4-weight"])
def test_mode_runs_in_ort_with_kv_cache(tiny_onnx, fp32_run, mode, tmp_path):
    ids, ref_logits, ref_ppl = fp32_run
    out = quantize_onnx(tiny_onnx, mode, out=tmp_path / f"tiny.{mode}.onnx", calib_samples=4, corpus_bytes=400_000)
    assert out.exists() and out.name == f"tiny.{mode}.onnx"
    props = read_metadata_props(out)
    src_props = read_metadata_props(tiny_onnx)
    for key in ("hotpath.config", "hotpath.tokenizer", "hotpath.version", "hotpath.source_sha256", "hotpath.kv_cache"):
        assert props[key] == src_props[key], key
    assert json.loads(props["hotpath.quantization"])["mode"] == mode
    dec = _decoder(out)
    assert dec.dtype == (np.float16 if mode == "fp16" else np.float32)
    assert props["hotpath.dtype"] == ("fp16" if mode == "fp16" else "fp32")
    # prefill 16 tokens, then 8 cached decode steps: the same logits as one pass (the cache works)
    B, T = ids.shape
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    full, _ = dec.forward(ids, np.ones_like(ids), pos, dec.empty_past(B))
    assert full.dtype == np.float32 and full.shape == ref_logits.shape
    # the quantized graph keeps the logits_to_keep input: generation's prefill gets the last position only
    assert dec.has_logits_to_keep
    last, _ = dec.forward(ids, logits_to_keep=1)
    assert last.shape == (B, 1, full.shape[-1])
    if mode == "int8-dynamic":  # activations are quantized per call: the LM head's input scale now covers 1 row
        assert sqnr_db(full[:, -1:], last) > 25
    else:
        np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    logits, past = dec.forward(ids[:, :16], np.ones((B, 16), np.int64), pos[:, :16], dec.empty_past(B))
    steps = [logits]
    for t in range(16, T):
        logits, past = dec.forward(ids[:, t:t + 1], np.ones((B, t + 1), np.int64), pos[:, t:t + 1], past)
        steps.append(logits)
    assert sqnr_db(full, np.concatenate(steps, axis=1)) > (25 if mode.startswith("int8") else 35)
    assert sqnr_db(ref_logits, full) > MIN_SQNR[mode]
    ppl = perplexity_onnx(out, windows=4, corpus_bytes=400_000)["ppl"]
    assert 100 * (ppl / ref_ppl - 1) < MAX_PPL_INCREASE[mode]


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static", "int4-weight", "fp16"])
def test_mode_runs_on_an_ort_target_export(tiny_ort_onnx, mode, tmp_path):
    """The ort-target graph (GroupQueryAttention, FastGelu) quantizes too: the MatMuls are
    quantized, the contrib ops kept (fp16: ONNX Runtime has an fp16 GQA CPU kernel), and the output runs with its
    shared in-place cache."""
    ref = _decoder(tiny_ort_onnx)
    ids = np.random.default_rng(0).integers(0, ref.config.vocab_size, (2, 24))
    ref_logits, _ = ref.forward(ids)
    ref_ppl = perplexity_onnx(tiny_ort_onnx, windows=4, corpus_bytes=400_000)["ppl"]
    out = quantize_onnx(tiny_ort_onnx, mode, out=tmp_path / f"tiny.ort.{mode}.onnx", calib_samples=4,
                        corpus_bytes=400_000)
    assert read_metadata_props(out)["hotpath.target"] == "ort"
    ops = {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "FastGelu"} <= ops
    if mode != "fp16":
        assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearMatMul", "DequantizeLinear"}
    dec = _decoder(out)
    assert dec.shared_cache and dec.dtype == (np.float16 if mode == "fp16" else np.float32)
    logits, _ = dec.forward(ids)
    assert sqnr_db(ref_logits, logits) > MIN_SQNR[mode]
    ppl = perplexity_onnx(out, windows=4, corpus_bytes=400_000)["ppl"]
    assert 100 * (ppl / ref_ppl - 1) < MAX_PPL_INCREASE[mode]
    # the in-place cache path: a prefill step gives the prefill's last logits
    cache = dec.new_cache(slots=2, max_len=32)
    step = dec.step(cache, 1, ids[:1, :16], np.array([0]))
    full, _ = dec.forward(ids[:1, :16], logits_to_keep=1)
    assert sqnr_db(full[:, -1], step) > 40
    assert [len(t) for t in dec.generate_batch([ids[0, :5].tolist(), ids[1, :9].tolist()], 6)] == [6, 6]


def test_quantized_files_are_smaller(tiny_onnx, tmp_path):
    size = R.file_bytes(tiny_onnx)
    int8 = quantize_onnx(tiny_onnx, "int8-dynamic", out=tmp_path / "d.onnx")
    int4 = quantize_onnx(tiny_onnx, "int4-weight", out=tmp_path / "w4.onnx")
    assert R.file_bytes(int8) < 0.6 * size
    assert R.file_bytes(int4) < R.file_bytes(int8)
    graph = onnx.load(str(int4)).graph
    assert {"MatMulNBits", "GatherBlockQuantized"} <= {n.op_type for n in graph.node}


def test_static_is_qdq_symmetric_and_reuses_calibration(tiny_onnx, tmp_path):
    out = tmp_path / "s.onnx"
    quantize_onnx(tiny_onnx, "int8-static", out=out, calib_samples=4, calib_method="entropy", corpus_bytes=400_000)
    details = json.loads(read_metadata_props(out)["hotpath.quantization"])
    cache = details["calibration"]["cache"]
    assert details["calibration"]["reused"] is False and cache.endswith(".calib-entropy-4.json")
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # Q/DQ format, as TensorRT consumes
    zero_points = [i for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    assert any(onnx.numpy_helper.to_array(i).ndim == 1 and onnx.numpy_helper.to_array(i).size > 1
               for i in model.graph.initializer if i.name.endswith("_scale"))  # per-channel weight scales
    # second run: the ranges come from the cache, no calibration pass, same graph
    quantize_onnx(tiny_onnx, "int8-static", out=out, calib_samples=4, calib_method="entropy", corpus=["/nonexistent"])
    again = json.loads(read_metadata_props(out)["hotpath.quantization"])
    assert again["calibration"]["reused"] is True


def test_outputs_have_one_mode_and_run_in_onnxruntime_genai(tiny_onnx, tmp_path):
    """Every file an export and a quantize write is 0644 (under the usual umask), the calibration cache ONNX Runtime
    writes included; the quantized decoder gets its own genai_config.json, which GenAI runs when installed."""
    from common.files import OUTPUT_MODE
    from export.onnx_runtime import OnnxDecoder

    from tests.helpers import genai_greedy

    out = quantize_onnx(tiny_onnx, "int8-static", out=tmp_path / "s.onnx", calib_samples=4, corpus_bytes=400_000)
    written = sorted(tmp_path.iterdir()) + sorted(tiny_onnx.parent.iterdir())
    assert {p.name for p in written} >= {"s.onnx", "s.calib-minmax-4.json", "genai_config.json", tiny_onnx.name}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(OUTPUT_MODE) for p in written}
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "s.onnx"
    assert config["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        prompt = [5, 17, 33, 101, 7]
        assert genai_greedy(tmp_path, prompt, 8) == OnnxDecoder(out).generate(prompt, 8)


def test_exclude_keeps_nodes_in_float(tiny_onnx, tmp_path):
    from quantize.onnx_quant import match_nodes, pre_process

    pre = onnx.load(str(pre_process(tiny_onnx, tmp_path / "pre.onnx")))
    matmuls = [n.name for n in pre.graph.node if n.op_type == "MatMul"]
    last = matmuls[-1]  # the language-model head
    out = quantize_onnx(tiny_onnx, "int8-dynamic", out=tmp_path / "x.onnx", exclude=[last])
    names = {n.name for n in onnx.load(str(out)).graph.node}
    assert last in names  # still a float MatMul under its own name
    assert match_nodes(pre, [last]) == [last]


def test_cli_reports_and_gates(tiny_onnx, tmp_path, capsys):
    from quantize.__main__ import main

    out = tmp_path / "g.onnx"
    assert main([str(tiny_onnx), "--mode", "int8-dynamic", "--out", str(out), "--eval-windows", "4",
                 "--corpus-bytes", "400000", "--latency-repeats", "1", "--max-ppl-increase", "50"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    for word in ("file size", "perplexity", "top-1 agrees", "KL ", "latency", "peak memory",
                 "x faster" if "faster" in text else "x slower"):
        assert word in text
    assert "4/4" in captured.err  # the evaluation's progress bar (windows)
    # a gate below any possible change fails with exit 1 and says by how much
    assert main([str(tiny_onnx), "--mode", "int8-dynamic", "--out", str(out), "--eval-windows", "4",
                 "--corpus-bytes", "400000", "--latency-repeats", "0", "--max-ppl-increase", "-99"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("error: perplexity rose") and "over --max-ppl-increase -99%" in err
    r = json.loads(_json_run(main, tiny_onnx, out, capsys))
    assert {"size_before", "size_after", "ppl_before", "ppl_after", "top1_agreement", "kl_per_token", "latency",
            "peak_rss_mib"} <= set(r)
    assert r["kl_per_token"] >= 0 and 50 < r["peak_rss_mib"] < 100_000
    assert r["latency"]["shape"] == [8, 64]  # batch 8 x the tiny context


def _json_run(main, src, out, capsys):
    assert main([str(src), "--mode", "fp16", "--out", str(out), "--eval-windows", "2", "--corpus-bytes", "400000",
                 "--latency-repeats", "1", "--json"]) == 0
    return capsys.readouterr().out


def test_checkpoint_input_is_exported_first(tiny_ckpt, tmp_path):
    from quantize import run_quantization

    out = tmp_path / "ck.int8-dynamic.onnx"
    r = run_quantization(tiny_ckpt, "int8-dynamic", out, windows=2, latency_repeats=1)
    assert r["output"] == str(out) and out.exists()
    assert r["size_after"] < r["size_before"] and 0 < r["top1_agreement"] <= 1
    assert r["latency"]["runtime"] == "onnxruntime CPU" and r["latency"]["speedup"] > 0
    import hashlib

    props = read_metadata_props(out)
    assert props["hotpath.source_sha256"] == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert props["hotpath.target"] == "ort"  # exported for ONNX Runtime: the in-place KV cache the server runs


def test_list_nodes_names_what_exclude_takes(tiny_onnx, tmp_path, capsys):
    from quantize.__main__ import main

    assert main([str(tiny_onnx), "--list-nodes"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    head = [name for name, op, w in rows if op == "MatMul" and w.endswith("x512")]  # n_embd x vocab: the LM head
    assert len(head) == 1 and any(w == "activation" for _, _, w in rows)
    out = quantize_onnx(tiny_onnx, "int8-static", out=tmp_path / "e.onnx", exclude=head, calib_samples=2,
                        corpus_bytes=400_000)
    assert json.loads(read_metadata_props(out)["hotpath.quantization"])["excluded_nodes"] == head


def test_quantizing_again_replaces_the_output_and_its_data_whole(tiny_onnx, tmp_path, monkeypatch):
    """A second quantization to the same path (make bench's re-made cache) leaves one copy of the weights: onnx
    appends to an existing external data file, so the output is written in a folder of its own and moved into place;
    an output small enough to keep its weights inline removes the data file an earlier one left."""
    import quantize.onnx_quant as Q

    out = tmp_path / "tiny.int8-dynamic.onnx"
    data = out.with_name(out.name + ".data")
    monkeypatch.setattr(Q, "EXTERNAL_DATA_BYTES", 0)  # the tiny model's weights as external data, as at 124M
    quantize_onnx(tiny_onnx, "int8-dynamic", out=out)
    first = data.stat().st_size
    quantize_onnx(tiny_onnx, "int8-dynamic", out=out)
    assert data.stat().st_size == first and oct(data.stat().st_mode & 0o777) == "0o644"
    assert not list(tmp_path.glob(".tiny*"))  # no temporary folder left
    R.OrtPrefill(out, threads=1)(np.zeros((1, 4), np.int64))  # graph and data agree
    monkeypatch.undo()
    quantize_onnx(tiny_onnx, "int8-dynamic", out=out)
    assert not data.exists()
    R.OrtPrefill(out, threads=1)(np.zeros((1, 4), np.int64))
