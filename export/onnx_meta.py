"""hotpath metadata inside an `.onnx` file: what makes the file alone enough to serve the model.

Every `.onnx` hotpath writes (export, and quantize, which copies these props onto its outputs) carries these
``metadata_props``; all values are strings:

===========================  =====================================================================
``hotpath.config``           the ``GPTConfig`` as JSON
``hotpath.tokenizer``        the tokenizer as its JSON string (``tokenizers.Tokenizer.to_str()``)
``hotpath.version``          the hotpath version that wrote the file
``hotpath.source_sha256``    SHA-256 of the source checkpoint file (or of the weights, for an in-memory model)
``hotpath.kv_cache``         ``"1"``: a decoder with past/present key-values; ``"0"``: logits only
``hotpath.dtype``            ``"fp32"``, ``"fp16"`` (or ``"bf16"``, for TensorRT): weights and KV cache
``hotpath.target``           ``"generic"`` (standard ONNX ops, left padding; the default when absent) or ``"ort"``
                             (ONNX Runtime contrib ops, GroupQueryAttention: right padding, a cache that past and
                             present may share)
``hotpath.meta``             optional: the checkpoint's training metadata as JSON
===========================  =====================================================================

Reading needs only ``onnx`` (``load_external_data=False``: the weights are not read) or an ONNX Runtime session's
``custom_metadata_map``; both go through :func:`parse_hotpath_metadata`.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from common.errors import UserError
from common.version import hotpath_version

if TYPE_CHECKING:
    import onnx
    from tokenizers import Tokenizer

    from model.config import GPTConfig

PathOrProto = Union[str, os.PathLike, "onnx.ModelProto"]

PREFIX = "hotpath."
CONFIG, TOKENIZER, VERSION, SOURCE_SHA256, KV_CACHE, DTYPE, TARGET = (
    "hotpath.config", "hotpath.tokenizer", "hotpath.version", "hotpath.source_sha256", "hotpath.kv_cache",
    "hotpath.dtype", "hotpath.target")
REQUIRED = (CONFIG, TOKENIZER, KV_CACHE)
# the decoder's int64 scalar input: 0 = logits for every position, k > 0 = the last k positions only. It has a
# default of 0 (an initializer of the same name), so a caller may leave it out. Exports before it have no such
# input and always return every position (OnnxDecoder slices those afterwards).
LOGITS_TO_KEEP = "logits_to_keep"
DTYPES = ("fp32", "fp16", "bf16")
GRAPH_TARGETS = ("generic", "ort")


def make_hotpath_metadata(config: Union[GPTConfig, Mapping[str, Any]], tokenizer: Union[Tokenizer, str], *,
                          source_sha256: str, kv_cache: bool, dtype: str, target: str = "generic"
                          ) -> dict[str, str]:
    """The metadata_props dict for an export. `config`: GPTConfig or dict; `tokenizer`: Tokenizer or JSON str."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    tok = tokenizer if isinstance(tokenizer, str) else tokenizer.to_str()
    return {
        CONFIG: json.dumps(cfg, sort_keys=True),
        TOKENIZER: tok,
        VERSION: hotpath_version(),
        SOURCE_SHA256: source_sha256,
        KV_CACHE: "1" if kv_cache else "0",
        DTYPE: dtype,
        TARGET: target,
    }


def set_metadata_props(model_proto: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Write (or overwrite) `props` into an onnx.ModelProto's metadata_props."""
    existing = {p.key: p for p in model_proto.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = key, value


def parse_hotpath_metadata(props: Mapping[str, str], source: str = "the model") -> dict[str, Any]:
    """Validate raw metadata props and decode them.

    Returns ``{"config": dict, "tokenizer": str, "version": str, "source_sha256": str, "kv_cache": bool,
    "dtype": str, "target": str, "props": {every key: value}}``; raises UserError when `props` are not a hotpath
    export's.
    """
    missing = [k for k in REQUIRED if k not in props]
    if missing:
        raise UserError(f"{source} is not a hotpath export (no {', '.join(missing)} metadata; "
                        "export a checkpoint with python -m export.to_onnx)")
    try:
        config = json.loads(props[CONFIG])
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise UserError(f"{source} is not a hotpath export (its hotpath.config is not valid JSON: {e}; "
                        "re-export it with python -m export.to_onnx)") from e
    dtype = props.get(DTYPE, "fp32")
    target = props.get(TARGET, "generic")  # files written before targets existed are generic
    if target not in GRAPH_TARGETS:
        raise UserError(f"{source} has hotpath.target {target!r}, which this hotpath does not know (use a newer "
                        "hotpath or re-export the model)")
    return {
        "config": config,
        "tokenizer": props[TOKENIZER],
        "version": props.get(VERSION, "unknown"),
        "source_sha256": props.get(SOURCE_SHA256, ""),
        "kv_cache": props[KV_CACHE] == "1",
        "dtype": dtype,
        "target": target,
        "props": dict(props),
    }


def read_metadata_props(path_or_proto: PathOrProto) -> dict[str, str]:
    """All metadata_props of an .onnx path or onnx.ModelProto (weights are not loaded)."""
    import onnx

    if isinstance(path_or_proto, onnx.ModelProto):
        model = path_or_proto
    else:  # a file: refused when cut, foreign, or its external data points outside its folder
        from .onnx_check import check_onnx_file

        model = check_onnx_file(path_or_proto)
    return {p.key: p.value for p in model.metadata_props}


def read_hotpath_metadata(path_or_proto: PathOrProto) -> dict[str, Any]:
    """Decoded hotpath metadata of an .onnx path or ModelProto (see :func:`parse_hotpath_metadata`).

    Raises UserError("... is not a hotpath export ...") for any ONNX file without it, or for a non-ONNX file."""
    source = "the ONNX model" if not isinstance(path_or_proto, (str, os.PathLike)) else str(path_or_proto)
    return parse_hotpath_metadata(read_metadata_props(path_or_proto), source)


def graph_without_logits_to_keep(path: str | os.PathLike) -> Optional[bytes]:
    """The graph at `path` with its logits_to_keep input frozen to a constant 0 (every position's logits), serialized
    with any external weights still referred to by name; None when it has no such input. For TensorRT, which would
    take that scalar as a shape tensor needing profile values."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name == LOGITS_TO_KEEP]
    if not inputs:
        return None
    model.graph.input.remove(inputs[0])
    for init in [i for i in model.graph.initializer if i.name == LOGITS_TO_KEEP]:  # the export's default
        model.graph.initializer.remove(init)
    model.graph.initializer.append(helper.make_tensor(LOGITS_TO_KEEP, onnx.TensorProto.INT64, [], [0]))
    return model.SerializeToString()


def gpt_config(meta: Mapping[str, Any]) -> GPTConfig:
    """GPTConfig from decoded metadata."""
    from model.config import GPTConfig

    try:
        return GPTConfig.from_dict(dict(meta["config"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"the hotpath.config metadata is not a valid GPTConfig ({e}); re-export the model") from e


def tokenizer_of(meta: Mapping[str, Any]) -> Tokenizer:
    """tokenizers.Tokenizer from decoded metadata."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(meta["tokenizer"])
    except Exception as e:  # tokenizers raises its own Exception type
        raise UserError(f"the hotpath.tokenizer metadata is not a valid tokenizer ({e}); re-export the model") from e
