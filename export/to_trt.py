"""Build a TensorRT engine from a hotpath checkpoint or exported ONNX:
`python -m export.to_trt ckpt.pt|model.onnx [--precision fp32|fp16|bf16|int8|fp8] [--sparsity]
[--max-batch N --max-seq N | --min-shapes S --opt-shapes S --max-shapes S] [--timing-cache PATH] [--workspace GiB]
[--out PATH]`.

NOTE: TensorRT cannot be installed on hotpath's development machines; the build below has never run here. It follows
NVIDIA's documented Python API (TensorRT 10.x and 11.x) and is kept thin; everything around it (source preparation,
precision checks, shape profiles, argument validation, the metadata JSON, the missing-TensorRT path) is tested on CPU.

Precision lives in the ONNX, the TensorRT 11 way (strongly typed networks; TensorRT 11 has no precision builder flags
and no INT8 calibrators, and TensorRT 10 builds the same ONNX as a strongly typed network too):

- fp32: the exported decoder (``ckpt.onnx``, exported and validated here if missing or stale);
- fp16: a checkpoint is exported with ``--dtype fp16`` (validated); an fp32 ``.onnx`` is cast by
  ``quantize.quantize_onnx(..., "fp16")``;
- bf16: exported from the checkpoint in bfloat16 (ONNX Runtime's CPU provider has no bf16 kernels, so not validated);
- int8: a Q/DQ ``.onnx`` (``python -m quantize MODEL --mode int8-static``); a checkpoint or fp32 ``.onnx`` is
  quantized with ``quantize.quantize_onnx(..., "int8-static")`` when the quantize package is present;
- fp8: a Q/DQ ``.onnx`` with FLOAT8E4M3FN quantization (written by a quantizer with FP8 support).

``--sparsity`` sets ``BuilderFlag.SPARSE_WEIGHTS`` (2:4 structured sparse weights, as ``python -m quantize.prune
--method 2:4`` writes). Two optimization profiles: prefill (past 0, 1..max_seq new tokens) and decode (1 new token,
past 1..max_seq-1), or one custom profile from ``--min/--opt/--max-shapes``. The timing cache (default
``trt_timing.cache`` beside the plan) is loaded before and saved after every build. Output: ``<stem>[.precision].plan``
beside the source and ``<plan>.json`` (TensorRT version, GPU, precision, profiles, source hashes).
"""
from __future__ import annotations

import fnmatch
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from common import cli
from common.cli import UserError
from common.files import sha256_file

from .onnx_meta import gpt_config, read_hotpath_metadata
from .trt_runtime import FORMAT, FORMAT_VERSION, current_gpu, import_tensorrt, metadata_path

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_GIB = 4.0

Shape = tuple[int, ...]


# ------------------------------------------------------------------------------------------------ profiles
@dataclass
class Profile:
    name: str
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # input -> {"min", "opt", "max"}

    def add(self, name: str, lo: Shape, opt: Shape, hi: Shape) -> "Profile":
        self.shapes[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        return self

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": self.shapes}


def input_specs(config, kv_cache: bool = True) -> dict[str, tuple]:
    """Per input, the symbolic shape: ints are fixed dims, strings name the dynamic axes."""
    specs: dict[str, tuple] = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "total"),
                               "position_ids": ("batch", "seq")}
    if kv_cache:
        for i in range(config.n_layer):
            for kind in ("key", "value"):
                specs[f"past_key_values.{i}.{kind}"] = ("batch", config.n_kv_head, "past", config.head_dim)
    return specs


def _shape(spec: tuple, dims: dict[str, int]) -> Shape:
    return tuple(d if isinstance(d, int) else dims[d] for d in spec)


def default_profiles(config, *, max_batch: int = DEFAULT_MAX_BATCH, max_seq: Optional[int] = None,
                     kv_cache: bool = True) -> list[Profile]:
    """Prefill (past 0, 1..max_seq tokens) and decode (1 token, past 1..max_seq-1); logits-only graphs get one
    profile over 1..max_seq tokens. Opt: half the batch and half the sequence."""
    ctx = config.block_size
    max_seq = ctx if max_seq is None else max_seq
    check_limits(config, max_batch, max_seq)
    specs = input_specs(config, kv_cache)
    opt_b, opt_s = max(1, max_batch // 2), max(1, max_seq // 2)
    prefill = Profile("prefill" if kv_cache else "full")
    ranges = {"batch": (1, opt_b, max_batch), "seq": (1, opt_s, max_seq), "total": (1, opt_s, max_seq),
              "past": (0, 0, 0)}
    for name, spec in specs.items():
        prefill.add(name, *(_shape(spec, {k: v[i] for k, v in ranges.items()}) for i in range(3)))
    if not kv_cache:
        return [prefill]
    if max_seq < 2:
        return [prefill]
    decode = Profile("decode")
    ranges = {"batch": (1, opt_b, max_batch), "seq": (1, 1, 1), "total": (2, opt_s + 1, max_seq),
              "past": (1, opt_s, max_seq - 1)}
    for name, spec in specs.items():
        decode.add(name, *(_shape(spec, {k: v[i] for k, v in ranges.items()}) for i in range(3)))
    return [prefill, decode]


def check_limits(config, max_batch: int, max_seq: int) -> None:
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch} must be at least 1")
    if max_seq < 1:
        raise UserError(f"--max-seq {max_seq} must be at least 1")
    if max_seq > config.block_size:
        raise UserError(f"--max-seq {max_seq} is above the model's context of {config.block_size} tokens "
                        f"(use --max-seq {config.block_size} or less)")


def parse_shapes(text: str, flag: str) -> dict[str, Shape]:
    """trtexec syntax: 'input_ids:1x16,attention_mask:1x16,past_key_values.*:1x4x0x16' (globs allowed)."""
    out: dict[str, Shape] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise UserError(f"{flag} item {item!r} is not NAME:DxDx... (e.g. input_ids:1x16)") from None
    if not out:
        raise UserError(f"{flag} is empty (e.g. {flag} input_ids:1x16,attention_mask:1x16)")
    return out


def custom_profile(config, min_s: dict, opt_s: dict, max_s: dict, kv_cache: bool = True) -> Profile:
    """One profile from --min/--opt/--max-shapes; every input must be matched (names or globs), ranks and fixed
    dims must fit the model, min <= opt <= max, and sequence axes stay within the context."""
    specs = input_specs(config, kv_cache)
    ctx = config.block_size
    profile = Profile("custom")
    for name, spec in specs.items():
        picked = []
        for flag, given in (("--min-shapes", min_s), ("--opt-shapes", opt_s), ("--max-shapes", max_s)):
            hits = [pat for pat in given if pat == name] or [pat for pat in given if fnmatch.fnmatchcase(name, pat)]
            if not hits:
                raise UserError(f"{flag} gives no shape for input {name} (inputs: {', '.join(list(specs)[:4])}, ...; "
                                "globs like past_key_values.* work)")
            shape = given[hits[0]]
            if len(shape) != len(spec):
                raise UserError(f"{flag} {name} has {len(shape)} dims; the input has {len(spec)} "
                                f"({'x'.join(str(d) for d in spec)})")
            for d, s in zip(shape, spec):
                if isinstance(s, int) and d != s:
                    raise UserError(f"{flag} {name} {'x'.join(map(str, shape))} does not match the model's fixed "
                                    f"dims {'x'.join(str(x) for x in spec)}")
            picked.append(shape)
        lo, opt, hi = picked
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise UserError(f"shapes for {name} are not min <= opt <= max ({lo}, {opt}, {hi})")
        for axis, s in enumerate(spec):
            if s in ("seq", "total", "past") and hi[axis] > ctx:
                raise UserError(f"--max-shapes {name} axis {axis} = {hi[axis]} is above the model's context of {ctx} "
                                "tokens")
            if s == "batch" and lo[axis] < 1:
                raise UserError(f"--min-shapes {name}: the batch must be at least 1")
        profile.add(name, lo, opt, hi)
    return profile


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


def _quantize_api():
    try:
        import quantize

        return getattr(quantize, "quantize_onnx")
    except (ImportError, AttributeError):
        return None


def _fresh_export(onnx_path: Path, ckpt_sha: str, dtype: str) -> bool:
    """Is onnx_path a hotpath export of this very checkpoint, in `dtype`? Then it is reused."""
    if not onnx_path.is_file():
        return False
    try:
        meta = read_hotpath_metadata(onnx_path)
    except UserError:
        return False
    return meta["source_sha256"] == ckpt_sha and meta["dtype"] == dtype and meta["kv_cache"]


def prepare_onnx(source: Path, precision: str, say=print) -> Path:
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
            quantize_onnx = _quantize_api()
            if quantize_onnx is None:
                raise UserError(f"{source} is fp32; an fp16 engine needs an fp16 ONNX (export the checkpoint with "
                                "python -m export.to_onnx CKPT --dtype fp16, or pass the checkpoint)")
            say(f"casting {source.name} to fp16 with quantize.quantize_onnx")
            return Path(quantize_onnx(source, "fp16"))
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


def _int8(fp32_onnx: Path, say) -> Path:
    quantize_onnx = _quantize_api()
    if quantize_onnx is None:
        raise UserError(f"int8 needs a Q/DQ model: python -m quantize {fp32_onnx} --mode int8-static, then "
                        "python -m export.to_trt MODEL.int8-static.onnx --precision int8")
    say(f"quantizing {fp32_onnx.name} to int8 Q/DQ with quantize.quantize_onnx (int8-static, calibrated)")
    return Path(quantize_onnx(fp32_onnx, "int8-static"))


# ------------------------------------------------------------------------------------------------ build
def engine_metadata(*, trt_version: str, gpu: dict, precision: str, sparsity: bool, profiles: list[Profile],
                    source: Path, source_sha256: str, onnx_path: Path, onnx_meta: dict, workspace_gib: float,
                    timing_cache: Optional[Path], build_seconds: float) -> dict[str, Any]:
    """The JSON written beside a plan (read back by trt_runtime.TrtEngine)."""
    from common.version import hotpath_version

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tensorrt_version": trt_version,
        "gpu": {k: gpu[k] for k in ("name", "compute_capability") if k in gpu},
        "precision": precision, "sparsity": sparsity,
        "profiles": [p.to_dict() for p in profiles],
        "source": {"path": str(Path(source).resolve()), "sha256": source_sha256,
                   "checkpoint_sha256": onnx_meta.get("source_sha256", "")},
        "onnx": {"path": str(Path(onnx_path).resolve()), "dtype": onnx_meta.get("dtype"),
                 "kv_cache": onnx_meta.get("kv_cache")},
        "config": onnx_meta.get("config"),
        "hotpath_version": hotpath_version(),
        "workspace_gib": workspace_gib,
        "timing_cache": str(timing_cache) if timing_cache else None,
        "build_seconds": round(build_seconds, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_serialized(trt, onnx_path: Path, profiles: list[Profile], *, sparsity: bool, workspace_gib: float,
                     timing_cache: Optional[Path]) -> bytes:
    """The TensorRT part, thin: parse the ONNX into a strongly typed network, add the profiles, build."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT 11: always strongly typed
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if sparsity:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, s in p.shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    if cache is not None:
        with cli.atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def two_four_fraction(onnx_path: Path) -> tuple[int, int]:
    """(2:4-sparse weight matrices, all 2-D weight matrices) in an ONNX file: what --sparsity can use."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    sparse = total = 0
    for init in model.graph.initializer:
        if len(init.dims) != 2 or init.dims[-1] % 4 or init.data_type not in (1, 10, 16):
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        total += 1
        for mat in (w, w.T):  # the reduction axis depends on how the exporter laid out the MatMul
            if mat.shape[-1] % 4 == 0 and ((mat.reshape(-1, 4) != 0).sum(-1) <= 2).all():
                sparse += 1
                break
    return sparse, total


@dataclass
class BuildPlan:
    source: Path
    precision: str
    sparsity: bool
    profiles: list[Profile]
    out: Path
    timing_cache: Optional[Path]
    workspace_gib: float


def build_engine(source, *, precision: str = "fp32", sparsity: bool = False, max_batch: int = DEFAULT_MAX_BATCH,
                 max_seq: Optional[int] = None, shapes: Optional[tuple[dict, dict, dict]] = None,
                 timing_cache=None, workspace_gib: float = DEFAULT_WORKSPACE_GIB, out=None, say=print) -> Path:
    """Everything `python -m export.to_trt` does; returns the plan path. UserError for bad input, missing TensorRT
    or GPU (after writing the ONNX, whose path the message gives)."""
    plan = plan_build(source, precision=precision, sparsity=sparsity, max_batch=max_batch, max_seq=max_seq,
                      shapes=shapes, timing_cache=timing_cache, workspace_gib=workspace_gib, out=out)
    onnx_path = prepare_onnx(plan.source, precision, say)
    try:
        trt = import_tensorrt()
    except UserError as e:
        raise UserError(f"{e}; the ONNX model is at {onnx_path}") from e
    try:
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
    say(f"wrote {plan.out} ({len(blob) / 1e6:.1f} MB) and {metadata_path(plan.out).name} in "
        f"{meta['build_seconds']:.1f}s")
    return plan.out


def write_plan(out: Path, blob: bytes, meta: dict) -> None:
    """Plan then JSON, each atomically; the JSON last, so a plan without a JSON is refused at load."""
    with cli.atomic_path(out) as tmp:
        tmp.write_bytes(blob)
    with cli.atomic_path(metadata_path(out)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def plan_build(source, *, precision: str, sparsity: bool = False, max_batch: int = DEFAULT_MAX_BATCH,
               max_seq: Optional[int] = None, shapes: Optional[tuple[dict, dict, dict]] = None, timing_cache=None,
               workspace_gib: float = DEFAULT_WORKSPACE_GIB, out=None) -> BuildPlan:
    """Validate every argument against the source (cheap: metadata and config only) before any work."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if not workspace_gib > 0:
        raise UserError(f"--workspace {workspace_gib} GiB must be positive")
    source = cli.existing_file(source, "model")
    if source.suffix == ".onnx":
        meta = read_hotpath_metadata(source)
        config, kv_cache = gpt_config(meta), meta["kv_cache"]
    elif source.suffix in CHECKPOINT_SUFFIXES:
        from model.checkpoint import read_checkpoint
        from model.gpt import GPTConfig

        payload = read_checkpoint(source)
        try:
            config = GPTConfig.from_dict(payload["config"])
        except (TypeError, ValueError) as e:
            raise UserError(f"{source} has an invalid model config ({e})") from e
        kv_cache = True
    else:
        raise UserError(f"{source} is neither a hotpath checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) nor an .onnx "
                        "export")
    if shapes is not None:
        profiles = [custom_profile(config, *shapes, kv_cache=kv_cache)]
    else:
        profiles = default_profiles(config, max_batch=max_batch, max_seq=max_seq, kv_cache=kv_cache)
    out = Path(out) if out is not None else default_plan_path(source, precision)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder (pass a file path ending in .plan)")
    cache = Path(timing_cache) if timing_cache is not None else out.parent / "trt_timing.cache"
    if cache.is_dir():
        raise UserError(f"--timing-cache {cache} is a folder (pass a file path)")
    return BuildPlan(source, precision, sparsity, profiles, out, cache, workspace_gib)


# ------------------------------------------------------------------------------------------------ CLI
def build_parser():
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


def main(argv: list[str] | None = None) -> int:
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
