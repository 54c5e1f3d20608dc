"""Build a TensorRT engine from a hotpath checkpoint or exported ONNX:
`python -m export.to_trt ckpt.pt|model.onnx [--precision fp32|fp16|bf16|int8|fp8] [--sparsity]
[--max-batch N --max-seq N | --min-shapes S --opt-shapes S --max-shapes S] [--timing-cache PATH] [--workspace GiB]
[--out PATH]`.

This module is the command: it validates the arguments, prepares the ONNX to build from, and hands it to
:mod:`export.trt_build` (profiles, the TensorRT build, the plan and its JSON). TensorRT cannot be installed on
hotpath's development machines; everything here is tested on CPU.

Precision lives in the ONNX, the TensorRT 11 way (strongly typed networks; TensorRT 11 has no precision builder flags
and no INT8 calibrators, and TensorRT 10 builds the same ONNX as a strongly typed network too):

- fp32: the exported decoder (``ckpt.onnx``, exported and validated here if missing or stale);
- fp16: a checkpoint is exported with ``--dtype fp16`` (validated); an fp32 ``.onnx`` is cast by the ``fp16``
  precision plugin;
- bf16: exported from the checkpoint in bfloat16 (ONNX Runtime's CPU provider has no bf16 kernels, so not validated);
- int8: a Q/DQ ``.onnx`` (``python -m quantize MODEL --mode int8-static``); a checkpoint or fp32 ``.onnx`` is
  quantized by the ``int8`` precision plugin;
- fp8: a Q/DQ ``.onnx`` with FLOAT8E4M3FN quantization (written by a quantizer with FP8 support).

Precision plugins: the entry-point group ``hotpath.onnx_precision`` maps a precision name (``fp16``, ``int8``) to a
:class:`PrecisionPreparer`, a callable taking an fp32 hotpath ``.onnx`` and returning the path of the same model in
that precision. hotpath's own pyproject.toml registers ``quantize.precision:prepare_fp16`` and
``quantize.precision:prepare_int8``; export/ never imports quantize/ (which builds on export/). Without a plugin,
the precision needs a ready-made ``.onnx`` and the error says how to write one.

``--sparsity`` sets ``BuilderFlag.SPARSE_WEIGHTS`` (2:4 structured sparse weights, as ``python -m quantize.prune
--method 2:4`` writes). Two optimization profiles: prefill (past 0, 1..max_seq new tokens) and decode (1 new token,
past 1..max_seq-1), or one custom profile from ``--min/--opt/--max-shapes``. The timing cache (default
``trt_timing.cache`` beside the plan) is loaded before and saved after every build. Output: ``<stem>[.precision].plan``
beside the source and ``<plan>.json`` (TensorRT version, GPU, precision, profiles, source hashes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

from common import cli
from common.errors import UserError
from common.files import existing_file, sha256_file

from .onnx_meta import gpt_config, read_hotpath_metadata
from .trt_build import (DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_GIB, Profile, Shapes, build_serialized, custom_profile,
                        default_profiles, engine_metadata, parse_shapes, two_four_fraction, write_plan)
from .trt_runtime import current_gpu, import_tensorrt, metadata_path

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
PLUGIN_GROUP = "hotpath.onnx_precision"

Say = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ precision plugins
class PrecisionPreparer(Protocol):
    """What a ``hotpath.onnx_precision`` entry point loads to: given an fp32 hotpath ``.onnx`` (KV-cache decoder
    with hotpath metadata), write the same model in the entry point's precision (fp16 casts, or int8 symmetric Q/DQ
    nodes) and return its path. The output keeps the hotpath metadata. Bad input raises UserError."""

    def __call__(self, fp32_onnx: Path, /) -> str | os.PathLike: ...


def precision_preparer(precision: str) -> Optional[PrecisionPreparer]:
    """The installed ``hotpath.onnx_precision`` plugin for `precision`, or None when none is registered."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=PLUGIN_GROUP, name=precision):
        prepare: PrecisionPreparer = entry_point.load()
        return prepare
    return None


def _prepare_with_plugin(fp32_onnx: Path, precision: str, say: Say, missing: str) -> Path:
    """Run the `precision` plugin on `fp32_onnx`; UserError(`missing`) when none is installed."""
    prepare = precision_preparer(precision)
    if prepare is None:
        raise UserError(missing)
    name = f"{getattr(prepare, '__module__', '?')}.{getattr(prepare, '__qualname__', '?')}"
    say(f"preparing {precision} ONNX from {fp32_onnx.name} with the {PLUGIN_GROUP} plugin {name}")
    return Path(prepare(fp32_onnx))


# ------------------------------------------------------------------------------------------------ sources
def onnx_precision(path: Path) -> str:
    """What an ONNX file holds: int8 / fp8 (Q/DQ nodes), uint8-qdq (asymmetric, unusable by TensorRT), else the
    hotpath.dtype metadata (fp32 / fp16)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    quant = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if quant:
        inits = {i.name: i for i in model.graph.initializer}
        fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
        types = set()
        for n in quant:
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
                types.add(inits[n.input[2]].data_type)
            if n.op_type == "QuantizeLinear":
                for a in n.attribute:
                    if a.name == "output_dtype":
                        types.add(a.i)
        if types & fp8:
            return "fp8"
        if onnx.TensorProto.UINT8 in types:
            return "uint8-qdq"
        return "int8"
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("hotpath.dtype", "fp32")


def default_plan_path(source: Path, precision: str) -> Path:
    """ckpt.pt -> ckpt.plan; fp16 -> ckpt.fp16.plan; ckpt.fp16.onnx + fp16 -> ckpt.fp16.plan (no doubled tag)."""
    stem = source.stem
    if precision != "fp32" and not stem.endswith(f".{precision}"):
        stem += f".{precision}"
    return source.with_name(stem + ".plan")


def _fresh_export(onnx_path: Path, ckpt_sha: str, dtype: str) -> bool:
    """Is onnx_path a hotpath export of this very checkpoint, in `dtype`? Then it is reused."""
    if not onnx_path.is_file():
        return False
    try:
        meta = read_hotpath_metadata(onnx_path)
    except UserError:
        return False
    return bool(meta["source_sha256"] == ckpt_sha and meta["dtype"] == dtype and meta["kv_cache"])


def prepare_onnx(source: Path, precision: str, say: Say = print) -> Path:
    """The ONNX to build from, holding `precision` (exported, cast or quantized as needed). Raises UserError."""
    from .to_onnx import default_out_path, export_onnx

    if source.suffix == ".onnx":
        have = onnx_precision(source)
        if have == "uint8-qdq":
            raise UserError(f"{source} has uint8 (asymmetric) Q/DQ; TensorRT needs int8 symmetric Q/DQ "
                            "(python -m quantize MODEL --mode int8-static writes it)")
        if have == precision:
            return source
        if precision == "fp16" and have == "fp32":
            return _prepare_with_plugin(source, "fp16", say, f"{source} is fp32 and no {PLUGIN_GROUP} plugin for "
                                        "fp16 is installed; an fp16 engine needs an fp16 ONNX (export the checkpoint "
                                        "with python -m export.to_onnx CKPT --dtype fp16, pass the checkpoint, or "
                                        f"python -m quantize {source} --mode fp16)")
        if precision == "int8" and have == "fp32":
            return _int8(source, say)
        if precision in ("int8", "fp8"):
            raise UserError(f"{source} holds {have}, not {precision} Q/DQ nodes; {precision} engines are built from a "
                            f"Q/DQ model (python -m quantize MODEL --mode int8-static for int8)")
        raise UserError(f"{source} holds {have}; a {precision} engine needs a {precision} model (pass the checkpoint, "
                        f"or python -m export.to_onnx CKPT --dtype {precision})")

    # a checkpoint: reuse or make the export
    from model.checkpoint import read_checkpoint

    read_checkpoint(source)  # one-line UserError for a missing or corrupt checkpoint before any work
    sha = sha256_file(source)
    if precision in ("fp32", "fp16", "int8"):
        dtype = "fp16" if precision == "fp16" else "fp32"
        out = default_out_path(source, dtype)
        if _fresh_export(out, sha, dtype):
            say(f"reusing {out} (a {dtype} export of this checkpoint)")
        else:
            report = export_onnx(source, out, dtype=dtype, progress=say)
            say(report.summary())
            if not report.ok:
                raise UserError(f"the ONNX export failed validation (kept as {report.path}); fix that before "
                                "building an engine")
        return _int8(out, say) if precision == "int8" else out
    if precision == "bf16":
        out = source.with_suffix(".bf16.onnx")
        if _fresh_export(out, sha, "bf16"):
            say(f"reusing {out}")
            return out
        say("note: bf16 exports are not validated with ONNX Runtime (its CPU provider has no bf16 kernels)")
        return export_onnx(source, out, dtype="bf16", validate=False, progress=say).path
    raise UserError("fp8 engines are built from an FP8 Q/DQ .onnx, not a checkpoint (quantize to FP8 first, then "
                    "python -m export.to_trt MODEL.onnx --precision fp8)")


def _int8(fp32_onnx: Path, say: Say) -> Path:
    return _prepare_with_plugin(fp32_onnx, "int8", say, f"int8 needs a Q/DQ model: python -m quantize {fp32_onnx} "
                                "--mode int8-static, then python -m export.to_trt MODEL.int8-static.onnx "
                                f"--precision int8 (no {PLUGIN_GROUP} plugin for int8 is installed to do it here)")


# ------------------------------------------------------------------------------------------------ the build
@dataclass
class BuildPlan:
    source: Path
    precision: str
    sparsity: bool
    profiles: list[Profile]
    out: Path
    timing_cache: Path
    workspace_gib: float


def plan_build(source: str | os.PathLike, *, precision: str, sparsity: bool = False,
               max_batch: int = DEFAULT_MAX_BATCH, max_seq: Optional[int] = None,
               shapes: Optional[tuple[Shapes, Shapes, Shapes]] = None, timing_cache: str | os.PathLike | None = None,
               workspace_gib: float = DEFAULT_WORKSPACE_GIB, out: str | os.PathLike | None = None) -> BuildPlan:
    """Validate every argument against the source (cheap: metadata and config only) before any work."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if not workspace_gib > 0:
        raise UserError(f"--workspace {workspace_gib} GiB must be positive")
    path = existing_file(source, "model")
    if path.suffix == ".onnx":
        meta = read_hotpath_metadata(path)
        config, kv_cache = gpt_config(meta), meta["kv_cache"]
    elif path.suffix in CHECKPOINT_SUFFIXES:
        from model.checkpoint import read_checkpoint
        from model.gpt import GPTConfig

        payload = read_checkpoint(path)
        try:
            config = GPTConfig.from_dict(payload["config"])
        except (TypeError, ValueError) as e:
            raise UserError(f"{path} has an invalid model config ({e})") from e
        kv_cache = True
    else:
        raise UserError(f"{path} is neither a hotpath checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) nor an .onnx "
                        "export")
    if shapes is not None:
        profiles = [custom_profile(config, *shapes, kv_cache=kv_cache)]
    else:
        profiles = default_profiles(config, max_batch=max_batch, max_seq=max_seq, kv_cache=kv_cache)
    plan_out = Path(out) if out is not None else default_plan_path(path, precision)
    if plan_out.is_dir():
        raise UserError(f"--out {plan_out} is a folder (pass a file path ending in .plan)")
    cache = Path(timing_cache) if timing_cache is not None else plan_out.parent / "trt_timing.cache"
    if cache.is_dir():
        raise UserError(f"--timing-cache {cache} is a folder (pass a file path)")
    return BuildPlan(path, precision, sparsity, profiles, plan_out, cache, workspace_gib)


def build_engine(source: str | os.PathLike, *, precision: str = "fp32", sparsity: bool = False,
                 max_batch: int = DEFAULT_MAX_BATCH, max_seq: Optional[int] = None,
                 shapes: Optional[tuple[Shapes, Shapes, Shapes]] = None, timing_cache: str | os.PathLike | None = None,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB, out: str | os.PathLike | None = None,
                 say: Say = print) -> Path:
    """Everything `python -m export.to_trt` does; returns the plan path. UserError for bad input, missing TensorRT
    or GPU (after writing the ONNX, whose path the message gives)."""
    plan = plan_build(source, precision=precision, sparsity=sparsity, max_batch=max_batch, max_seq=max_seq,
                      shapes=shapes, timing_cache=timing_cache, workspace_gib=workspace_gib, out=out)
    onnx_path = prepare_onnx(plan.source, precision, say)
    try:
        trt = import_tensorrt()
        gpu = current_gpu()
    except UserError as e:
        raise UserError(f"{e}; the ONNX model is at {onnx_path}") from e
    if sparsity:
        sparse, total = two_four_fraction(onnx_path)
        say(f"--sparsity: {sparse} of {total} weight matrices are 2:4 sparse"
            + ("" if sparse else " (prune with python -m quantize.prune --method 2:4 first to gain anything)"))
    say(f"building a {precision} TensorRT {trt.__version__} engine on {gpu['name']} "
        f"({len(plan.profiles)} profile(s): {', '.join(p.name for p in plan.profiles)})")
    t0 = time.perf_counter()
    blob = build_serialized(trt, onnx_path, plan.profiles, sparsity=sparsity, workspace_gib=plan.workspace_gib,
                            timing_cache=plan.timing_cache)
    meta = engine_metadata(trt_version=trt.__version__, gpu=gpu, precision=precision, sparsity=sparsity,
                           profiles=plan.profiles, source=plan.source, source_sha256=sha256_file(plan.source),
                           onnx_path=onnx_path, onnx_meta=read_hotpath_metadata(onnx_path),
                           workspace_gib=plan.workspace_gib, timing_cache=plan.timing_cache,
                           build_seconds=time.perf_counter() - t0)
    write_plan(plan.out, blob, meta)
    say(f"wrote {plan.out} ({len(blob) / 2**20:.1f} MiB) and {metadata_path(plan.out).name} in "
        f"{meta['build_seconds']:.1f}s")
    return plan.out


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m export.to_trt", "Build a TensorRT engine (.plan + .plan.json) from a hotpath checkpoint "
                   "or exported ONNX. Needs TensorRT 10/11 and an NVIDIA GPU.")
    p.add_argument("model", help="ckpt.pt (exported to ONNX first) or a hotpath .onnx")
    p.add_argument("--precision", default="fp32", help=f"one of {', '.join(PRECISIONS)} (default fp32)")
    p.add_argument("--sparsity", action="store_true", help="use 2:4 structured-sparse weights (SPARSE_WEIGHTS)")
    p.add_argument("--max-batch", type=int, default=None, help=f"largest batch (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-seq", type=int, default=None, help="longest sequence, past + new (default: the context)")
    p.add_argument("--min-shapes", default=None, help="one custom profile, trtexec syntax: input_ids:1x1,"
                   "attention_mask:1x1,position_ids:1x1,past_key_values.*:1x4x0x16")
    p.add_argument("--opt-shapes", default=None)
    p.add_argument("--max-shapes", default=None)
    p.add_argument("--timing-cache", default=None, help="timing cache file, read and updated (default: "
                   "trt_timing.cache beside the plan)")
    p.add_argument("--workspace", type=float, default=DEFAULT_WORKSPACE_GIB, help="builder workspace in GiB")
    p.add_argument("--out", default=None, help="output .plan (default: beside the input, ckpt[.precision].plan)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    explicit = [args.min_shapes, args.opt_shapes, args.max_shapes]
    shapes = None
    if any(s is not None for s in explicit):
        if not all(s is not None for s in explicit):
            raise UserError("--min-shapes, --opt-shapes and --max-shapes go together (give all three)")
        if args.max_batch is not None or args.max_seq is not None:
            raise UserError("use either --max-batch/--max-seq or --min/--opt/--max-shapes, not both")
        shapes = (parse_shapes(args.min_shapes, "--min-shapes"), parse_shapes(args.opt_shapes, "--opt-shapes"),
                  parse_shapes(args.max_shapes, "--max-shapes"))

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    build_engine(args.model, precision=args.precision, sparsity=args.sparsity,
                 max_batch=args.max_batch if args.max_batch is not None else DEFAULT_MAX_BATCH,
                 max_seq=args.max_seq, shapes=shapes, timing_cache=args.timing_cache, workspace_gib=args.workspace,
                 out=args.out, say=say)
    return 0


if __name__ == "__main__":
    cli.run(main)
