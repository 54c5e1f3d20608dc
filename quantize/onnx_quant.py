"""ONNX quantization of a hotpath decoder with ONNX Runtime's own tools (nothing here re-implements them).

=================  ==========================================================================================
mode               what ONNX Runtime tool, with which settings
=================  ==========================================================================================
``fp16``           `onnxruntime.transformers.float16.convert_float_to_float16`: weights and most ops in fp16;
                   normalization, softmax, reductions, pow/exp/log/sqrt (the ops whose intermediates overflow
                   or lose too much in fp16) stay fp32 behind casts. Inputs and outputs as export's own fp16
                   decoder has them (what `export.onnx_runtime.OnnxDecoder` and serve expect): past/present
                   key-values fp16, logits fp32; `hotpath.dtype` = "fp16".
``int8-dynamic``   `quantize_dynamic`: int8 weights per output channel, activations quantized per call
                   (uint8) -> `DynamicQuantizeLinear` + `MatMulInteger` on the CPU provider; the token embedding
                   (`Gather`) stored 8-bit too (a float one is 147 MiB at 124M, and the pages a prefill's random
                   rows fault in can cover most of it).
``int8-static``    `quantize_static` in Q/DQ format (what TensorRT and GPU runtimes consume): int8 symmetric
                   activations and weights, weights per channel; activation ranges from a calibration pass over
                   real corpus text (`CalibrationMethod` MinMax / Entropy / Percentile), ranges cached as JSON
                   (`calibration_cache_path`) for reuse; `exclude` keeps sensitive nodes in fp32.
``int4-weight``    `MatMulNBitsQuantizer`: 4-bit block-wise symmetric weights for every MatMul with a constant
                   weight (`MatMulNBits`), and the token embedding (`GatherBlockQuantized`).
=================  ==========================================================================================

Every graph goes through `quant_pre_process` (shape inference + ONNX Runtime's graph optimizations) first, as
ONNX Runtime recommends; that also constant-folds the transposed tied embedding into the head's MatMul weight so
that the language-model head, the largest matmul of a small GPT, is quantized too. The hotpath metadata props
(`hotpath.config`, `hotpath.tokenizer`, ...) are copied onto every output, plus `hotpath.quantization`.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import onnx
import torch

from common.errors import UserError
from common.files import OUTPUT_MODE, atomic_path, existing_file
from common.machine import release_free_heap
from export.genai_config import write_genai_config
from export.onnx_check import check_onnx_file
from export.onnx_meta import gpt_config, parse_hotpath_metadata, read_metadata_props, set_metadata_props, tokenizer_of
from export.tied_weights import untied_proto
from export.to_onnx import EXTERNAL_DATA_BYTES, data_path, move_into_place

from . import report as R

ONNX_MODES = ("fp16", "int8-dynamic", "int8-static", "int4-weight")
CALIB_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_CALIB_BYTES = 2_000_000  # corpus read for calibration: plenty of windows, quick to tokenize
# op types kept in fp32 by the fp16 mode: their intermediates overflow fp16 (sum of squares, exp) or need range
FP16_KEEP_FP32_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                      "SkipSimplifiedLayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt",
                      "Reciprocal", "Exp", "Log", "Erf", "CumSum", "Range", "Min", "Max", "TopK")


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet_ort():
    """ONNX Runtime's quantization tools log warnings through `logging` for every unquantizable node, and their
    sessions (default options) warn that the export's logits_to_keep default is an initializer that is also an input
    (on purpose: it is overridable)."""
    import onnxruntime

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)  # errors only
    try:
        yield
    finally:
        root.setLevel(level)
        onnxruntime.set_default_logger_severity(2)  # ONNX Runtime's default: warnings


def default_output(src: Path, mode: str) -> Path:
    """`model.onnx` -> `model.int8-static.onnx`, `ckpt.pt` -> `ckpt.int8-static.onnx` (beside the input)."""
    return src.with_name(f"{src.stem}.{mode}.onnx")


def _load_onnx(path: Path) -> onnx.ModelProto:
    check_onnx_file(path)  # export's gate: a cut file, or external data outside its folder, before onnx reads it
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError and friends for a cut or foreign file
        if "hard link" in str(e):  # onnx refuses external data with several links (a possible hardlink attack)
            raise UserError(f"{path}'s external data file has several hard links, which onnx refuses to read "
                            "(copy it instead of linking it)") from e
        raise UserError(f"{path} is truncated or not an ONNX model ({type(e).__name__}); re-export it") from e


def _hotpath_metadata(model: onnx.ModelProto, path: Path) -> dict[str, Any]:
    """The decoded hotpath metadata of a loaded source model (a UserError when it has none)."""
    return parse_hotpath_metadata(read_metadata_props(model), str(path))


def _save(model: onnx.ModelProto, out: Path, props: dict[str, str]) -> Path:
    """Metadata props written onto `model` (replacing same keys), saved atomically as export saves: into a temporary
    folder beside `out`, then moved into place, the external data first and the graph last (onnx appends to an
    external data file that exists, so writing in place doubled a re-quantized file's data). Weights over
    export.to_onnx.EXTERNAL_DATA_BYTES go to `<out>.data` (ONNX Runtime maps them instead of copying them out of a
    parsed protobuf: GPT-2 124M int8-dynamic peak RSS 613 -> 495 MiB); a smaller output removes a stale one."""
    set_metadata_props(model, props)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    large = weights > EXTERNAL_DATA_BYTES or model.ByteSize() > 1_900_000_000
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp = tmpdir / out.name
        if large:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_path(out).name)
        else:
            onnx.save_model(model, str(tmp))
        for f in tmpdir.iterdir():
            os.chmod(f, OUTPUT_MODE)  # onnx writes external data 0600
        move_into_place(tmpdir, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    if not large:
        data_path(out).unlink(missing_ok=True)
    return out


def pre_process(src: Path, dst: Path) -> Path:
    """ONNX Runtime's `quant_pre_process` (symbolic shape inference + graph optimizations); falls back to ONNX
    shape inference alone when the symbolic pass cannot follow the graph. `src` must hold its weights inline
    (:func:`quantization_input`): the fallback's scratch copies lose external data that lies beside a file."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # the symbolic pass saves scratch files (sym_shape_infer_temp.onnx + external data) in the working directory
    src, dst = Path(src).resolve(), Path(dst).resolve()
    with _quiet_ort(), contextlib.chdir(dst.parent):
        try:
            quant_pre_process(str(src), str(dst))
        except Exception:  # noqa: BLE001 - symbolic inference gives up on some exporter patterns, any error type
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def quantization_input(source: onnx.ModelProto, src: Path, scratch: Path) -> Path:
    """What `pre_process` reads: the file `src` itself when it is one file in the exporter's form, else `source`
    (`src` as loaded, weights in memory) written to `scratch` with its weights inline and its tied embedding / LM
    head untied (:func:`export.tied_weights.untied_proto`), the form ONNX Runtime's quantizers know."""
    model = untied_proto(source)
    if model is source and not any(t.data_location == onnx.TensorProto.EXTERNAL
                                   for t in check_onnx_file(src).graph.initializer):
        return src
    onnx.save(model, str(scratch))
    return scratch


def match_nodes(model: onnx.ModelProto, patterns: Sequence[str]) -> list[str]:
    """Node names matching any of `patterns` (exact names, or fnmatch globs like '*lm_head*' / op types)."""
    names = []
    for pat in patterns:
        hits = [n.name for n in model.graph.node if fnmatch.fnmatchcase(n.name, pat) or n.op_type == pat]
        if not hits:
            sample = ", ".join(n.name for n in model.graph.node if n.op_type == "MatMul")[:200]
            raise UserError(f"--exclude {pat!r} matches no node (MatMul nodes are named like: {sample})")
        names += hits
    return sorted(set(names))


def list_nodes(src_onnx: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(name, op type, weight) of every MatMul/Gemm/Gather in the graph as quantized (after `pre_process`): the
    names `exclude` takes. The weight column is the constant input's shape, or "activation" for the attention."""
    src = existing_file(src_onnx, "model")
    source = _load_onnx(src)
    _hotpath_metadata(source, src)
    with tempfile.TemporaryDirectory(prefix="hotpath-quant.") as tmp:
        given = quantization_input(source, src, Path(tmp) / "in.onnx")
        pre = onnx.load(str(pre_process(given, Path(tmp) / "pre.onnx")))
    shapes = {i.name: "x".join(map(str, i.dims)) for i in pre.graph.initializer}
    rows = []
    for n in pre.graph.node:
        if n.op_type in ("MatMul", "Gemm", "Gather"):
            w = n.input[1] if n.op_type != "Gather" else n.input[0]
            rows.append((n.name, n.op_type, shapes.get(w, "activation")))
    return rows


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose second input is not a constant weight (the attention matmuls: q.k^T and p.v)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in consts]


# ---------------------------------------------------------------------------------------------- calibration
class CorpusCalibrationReader:
    """Feeds for ONNX Runtime's calibrators: `samples` windows of real training text (never the held-out split),
    each a prefill of the model's context with an empty KV cache, taken at evenly spread offsets."""

    def __init__(self, prefill: R.OrtPrefill, ids: Any, block: int, samples: int, batch_size: int = 1):
        from model.data import eval_windows

        available = (len(ids) - 1) // block
        if samples < 1:
            raise UserError(f"--calib-samples {samples} must be at least 1")
        if available < samples:
            raise UserError(f"the calibration text has {len(ids):,} tokens, {available} windows of {block}: fewer "
                            f"than --calib-samples {samples} (pass more text with --corpus or lower --calib-samples)")
        windows = [w[0].numpy() for w in eval_windows(ids, block, samples)]
        self.feeds = [prefill.feeds(np.stack(windows[i:i + batch_size]))
                      for i in range(0, len(windows), batch_size)]
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


def calibration_tokens(meta: dict[str, Any], corpus: Optional[list[str]] = None,
                       corpus_bytes: Optional[int] = None) -> torch.Tensor:
    """The training split's token ids (torch int64) of the calibration text, encoded with the model's tokenizer."""
    data = R.load_token_data(tokenizer_of(meta), None, corpus, corpus_bytes or DEFAULT_CALIB_BYTES)
    return data.train


def default_calib_cache(out: Path, method: str, samples: int, op_types: Sequence[str] = ("MatMul", "Gemm"),
                        quantize_attention: bool = False) -> Path:
    """Beside the output; the name holds what changes the set of calibrated tensors or their ranges."""
    tag = "" if sorted(op_types) == ["Gemm", "MatMul"] else "-" + "-".join(sorted(op_types))
    tag += "-attention" if quantize_attention else ""
    return out.with_name(f"{out.name.removesuffix('.onnx')}.calib-{method}-{samples}{tag}.json")


# ---------------------------------------------------------------------------------------------- the modes
def quantize_onnx(src_onnx: str | os.PathLike, mode: str, out: str | os.PathLike | None = None, *,
                  calib_method: str = "minmax", calib_samples: int = DEFAULT_CALIB_SAMPLES,
                  calib_cache: str | os.PathLike | None = None, recalibrate: bool = False,
                  exclude: Iterable[str] = (), corpus: Optional[list[str]] = None, corpus_bytes: Optional[int] = None,
                  block_size: int = 32, accuracy_level: Optional[int] = 4, per_channel: bool = True,
                  quantize_embedding: bool = True, quantize_attention: bool = False,
                  op_types: Sequence[str] = ("MatMul", "Gemm"), threads: Optional[int] = None) -> Path:
    """Quantize the hotpath ONNX decoder `src_onnx` with `mode`; returns the output path.

    `out` defaults to `<src stem>.<mode>.onnx` beside the input. Options by mode:
    int8-static: calib_method (minmax|entropy|percentile), calib_samples (windows of the context), calib_cache (JSON
    path; default beside the output, reused when newer than the source), recalibrate, exclude (node names/globs),
    corpus / corpus_bytes (calibration text; default the built-in corpus), quantize_attention (also Q/DQ the two
    activation-by-activation attention matmuls; default off: more accurate, and faster on the CPU provider),
    op_types (the op types given Q/DQ; measured on `small`: adding "Add" quantizes the residual stream and costs
    +170% perplexity for no speedup). int8-dynamic: per_channel, exclude, quantize_embedding (the token embedding
    Gather as well: GPT-2 124M peak RSS 467 -> 357 MiB, `small` perplexity -0.02%).
    int4-weight: block_size (a power of 2 >= 16), accuracy_level (MatMulNBits compute: 4 = int8 activations,
    None = fp32), quantize_embedding (the token embedding Gather as well). fp16: exclude (nodes kept fp32).
    """
    src = existing_file(src_onnx, "model")
    if mode not in ONNX_MODES:
        raise UserError(f"unknown mode {mode!r} (choose from {', '.join(ONNX_MODES)})")
    out = Path(out) if out is not None else default_output(src, mode)
    import onnxruntime

    source = _load_onnx(src)
    meta = _hotpath_metadata(source, src)
    exclude = list(exclude or ())
    details: dict = {"mode": mode, "tool": "onnxruntime " + onnxruntime.__version__}

    with tempfile.TemporaryDirectory(prefix="hotpath-quant.") as tmpdir:
        tmp = Path(tmpdir)
        if mode == "fp16":
            model = _fp16(source, exclude, details)
        else:
            # the model as loaded (weights in memory, external data included), with the tied embedding / LM head in
            # the exporter's own form, the one ONNX Runtime's quantizers know
            given = quantization_input(source, src, tmp / "in.onnx")
            # from here on each step reads its input from a file: no copy of the weights is held across ONNX
            # Runtime's passes (GPT-2 124M int8-dynamic --no-eval: peak RSS 4083 -> 3180 MiB)
            del source
            release_free_heap()
            pre = pre_process(given, tmp / "pre.onnx")
            release_free_heap()
            excluded = match_nodes(onnx.load(str(pre)), exclude) if exclude else []
            if excluded:
                details["excluded_nodes"] = excluded
            if mode == "int8-dynamic":
                model = _int8_dynamic(pre, tmp / "q.onnx", excluded, per_channel, quantize_embedding, details)
            elif mode == "int8-static":
                model = _int8_static(pre, tmp / "q.onnx", src, out, meta, excluded, details, calib_method=calib_method,
                                     calib_samples=calib_samples, calib_cache=calib_cache, recalibrate=recalibrate,
                                     corpus=corpus, corpus_bytes=corpus_bytes, threads=threads,
                                     quantize_attention=quantize_attention, op_types=list(op_types))
            else:
                model = _int4_weight(onnx.load(str(pre)), excluded, block_size, accuracy_level, quantize_embedding,
                                     details)
        props = {**meta["props"], "hotpath.quantization": json.dumps(details)}
        if mode == "fp16":
            props["hotpath.dtype"] = "fp16"  # weights and KV cache, as export's own fp16 decoder
        _save(model, out, props)
    write_genai_config(out)  # a quantized decoder runs in ONNX Runtime GenAI as the fp32 one does
    return out


def _fp16(source: onnx.ModelProto, exclude: list[str], details: dict) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    node_block = match_nodes(source, exclude) if exclude else []
    details.update({"kept_fp32_ops": list(FP16_KEEP_FP32_OPS), "kept_fp32_nodes": node_block,
                    "io": "past/present fp16, logits fp32 (as export --dtype fp16)"})
    with _quiet_ort():
        return convert_float_to_float16(source, keep_io_types=["logits"],
                                        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS)),
                                        node_block_list=node_block or None)


def _int8_dynamic(pre: Path, out: Path, excluded: list[str], per_channel: bool, quantize_embedding: bool,
                  details: dict) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm", "Gather"] if quantize_embedding else ["MatMul", "Gemm"]
    details.update({"weights": "int8 symmetric" + (" per channel" if per_channel else " per tensor"),
                    "activations": "uint8 dynamic (per call)", "ops": ops})
    with _quiet_ort():
        quantize_dynamic(str(pre), str(out), op_types_to_quantize=ops, per_channel=per_channel,
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(excluded),
                         extra_options={"MatMulConstBOnly": True})
    return onnx.load(str(out))


def _int8_static(pre: Path, out: Path, src: Path, final_out: Path, meta: dict[str, Any], excluded: list[str],
                 details: dict, *, calib_method: str, calib_samples: int, calib_cache: str | os.PathLike | None,
                 recalibrate: bool, corpus: Optional[list[str]], corpus_bytes: Optional[int], threads: Optional[int],
                 quantize_attention: bool = False, op_types: Sequence[str] = ("MatMul", "Gemm")) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calib_method not in CALIB_METHODS:
        raise UserError(f"unknown --calib-method {calib_method!r} (choose from {', '.join(CALIB_METHODS)})")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calib_method]
    cache = Path(calib_cache) if calib_cache else default_calib_cache(final_out, calib_method, calib_samples,
                                                                      op_types, quantize_attention)
    stale = cache.exists() and (recalibrate or cache.stat().st_mtime < src.stat().st_mtime)
    if stale:
        cache.unlink()
    reused = cache.exists()
    fresh_cache = out.with_name(cache.name)  # in quantize_onnx's temporary folder, beside `out`
    reader = None
    if not reused:
        prefill = R.OrtPrefill(pre, threads=threads, config=gpt_config(meta))
        ids = calibration_tokens(meta, corpus, corpus_bytes)
        reader = CorpusCalibrationReader(prefill, ids, prefill.config.block_size, calib_samples)
        del prefill
        release_free_heap()  # the session's weights and arena, before the calibrator opens its own
    details.update({"format": "QDQ", "weights": "int8 symmetric per channel", "activations": "int8 symmetric",
                    "ops": list(op_types), "attention_matmuls": "int8" if quantize_attention else "float",
                    "calibration": {"method": calib_method, "samples": calib_samples,
                                                               "cache": str(cache), "reused": reused}})
    extra: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True}
    if not quantize_attention:  # the QDQ quantizer ignores MatMulConstBOnly: exclude those nodes by name
        attention = activation_matmuls(onnx.load(str(pre), load_external_data=False))
        excluded = sorted(set(excluded) | set(attention))
        details["attention_nodes_kept_float"] = len(attention)
    if calib_method == "percentile":
        extra["CalibPercentile"] = 99.999
    with _quiet_ort():
        try:
            quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(op_types), per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(excluded), calibrate_method=method, extra_options=extra,
                            calibration_cache_path=str(cache if reused else fresh_cache),
                            use_external_data_format=True)
        except ValueError as e:
            if reused:
                raise UserError(f"calibration cache {cache} does not fit this model ({e}); pass --recalibrate") from e
            raise
    if not reused and fresh_cache.exists():  # ONNX Runtime writes it in place, 0600: moved in whole, 0644
        with atomic_path(cache) as tmp:
            os.replace(fresh_cache, tmp)
    return onnx.load(str(out))


def _int4_weight(pre_model: onnx.ModelProto, excluded: list[str], block_size: int, accuracy_level: Optional[int],
                 quantize_embedding: bool, details: dict) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"--block-size {block_size} must be a power of two, at least 16")
    ops = ("MatMul", "Gather") if quantize_embedding else ("MatMul",)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                       quant_format=QuantFormat.QOperator, op_types_to_quantize=ops,
                                       quant_axes=(("MatMul", 0), ("Gather", 1)), bits=4)
    details.update({"weights": f"int4 symmetric, blocks of {block_size}", "ops": list(ops),
                    "accuracy_level": accuracy_level})
    with _quiet_ort():
        q = MatMulNBitsQuantizer(pre_model, bits=4, block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level, nodes_to_exclude=list(excluded),
                                 quant_format=QuantFormat.QOperator, op_types_to_quantize=ops,
                                 quant_axes=(("MatMul", 0), ("Gather", 1)), algo_config=cfg)
        q.process()
    return q.model.model
