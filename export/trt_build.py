"""The TensorRT engine builder behind `python -m export.to_trt`: optimization profiles (default prefill/decode, or one
custom profile from trtexec-style shapes), the build itself, the 2:4 sparsity check, and the plan with its JSON.

NOTE: TensorRT cannot be installed on hotpath's development machines; :func:`build_serialized` has never run here.
It follows NVIDIA's documented Python API (TensorRT 10.x and 11.x) and is kept thin; the rest is plain Python tested
on CPU, and the build's call sequence is tested against a recording fake of the `tensorrt` module.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from common.errors import UserError
from common.files import atomic_path, write_json_atomic

from .onnx_meta import graph_without_logits_to_keep
from .trt_runtime import FORMAT, FORMAT_VERSION, metadata_path

if TYPE_CHECKING:
    from model.gpt import GPTConfig

DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_GIB = 4.0

Shape = tuple[int, ...]
SymbolicShape = tuple[Union[int, str], ...]  # ints are fixed dims, strings name the dynamic axes
Shapes = dict[str, Shape]  # input name (or glob) -> shape, as parse_shapes returns


# ------------------------------------------------------------------------------------------------ profiles
@dataclass
class Profile:
    name: str
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # input -> {"min", "opt", "max"}

    def add(self, name: str, lo: Shape, opt: Shape, hi: Shape) -> "Profile":
        self.shapes[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": self.shapes}


def input_specs(config: GPTConfig, kv_cache: bool = True) -> dict[str, SymbolicShape]:
    """Per input, the symbolic shape: ints are fixed dims, strings name the dynamic axes."""
    specs: dict[str, SymbolicShape] = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "total"),
                                       "position_ids": ("batch", "seq")}
    if kv_cache:
        assert config.n_kv_head is not None and config.head_dim is not None  # GPTConfig.__post_init__ fills them
        for i in range(config.n_layer):
            for kind in ("key", "value"):
                specs[f"past_key_values.{i}.{kind}"] = ("batch", config.n_kv_head, "past", config.head_dim)
    return specs


def _profile(name: str, specs: dict[str, SymbolicShape], ranges: dict[str, tuple[int, int, int]]) -> Profile:
    """A profile whose dynamic axes take (min, opt, max) from `ranges`."""
    profile = Profile(name)
    for input_name, spec in specs.items():
        lo, opt, hi = (tuple(d if isinstance(d, int) else ranges[d][i] for d in spec) for i in range(3))
        profile.add(input_name, lo, opt, hi)
    return profile


def default_profiles(config: GPTConfig, *, max_batch: int = DEFAULT_MAX_BATCH, max_seq: Optional[int] = None,
                     kv_cache: bool = True) -> list[Profile]:
    """Prefill (past 0, 1..max_seq tokens) and decode (1 token, past 1..max_seq-1); logits-only graphs get one
    profile over 1..max_seq tokens. Opt: half the batch and half the sequence."""
    max_seq = config.block_size if max_seq is None else max_seq
    check_limits(config, max_batch, max_seq)
    specs = input_specs(config, kv_cache)
    opt_b, opt_s = max(1, max_batch // 2), max(1, max_seq // 2)
    batch = (1, opt_b, max_batch)
    prefill = _profile("prefill" if kv_cache else "full", specs,
                       {"batch": batch, "seq": (1, opt_s, max_seq), "total": (1, opt_s, max_seq), "past": (0, 0, 0)})
    if not kv_cache or max_seq < 2:
        return [prefill]
    decode = _profile("decode", specs, {"batch": batch, "seq": (1, 1, 1), "total": (2, opt_s + 1, max_seq),
                                        "past": (1, opt_s, max_seq - 1)})
    return [prefill, decode]


def check_limits(config: GPTConfig, max_batch: int, max_seq: int) -> None:
    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch} must be at least 1")
    if max_seq < 1:
        raise UserError(f"--max-seq {max_seq} must be at least 1")
    if max_seq > config.block_size:
        raise UserError(f"--max-seq {max_seq} is above the model's context of {config.block_size} tokens "
                        f"(use --max-seq {config.block_size} or less)")


def parse_shapes(text: str, flag: str) -> Shapes:
    """trtexec syntax: 'input_ids:1x16,attention_mask:1x16,past_key_values.*:1x4x0x16' (globs allowed)."""
    out: Shapes = {}
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


def custom_profile(config: GPTConfig, min_s: Shapes, opt_s: Shapes, max_s: Shapes,
                   kv_cache: bool = True) -> Profile:
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


# ------------------------------------------------------------------------------------------------ build
def build_serialized(trt: Any, onnx_path: Path, profiles: list[Profile], *, sparsity: bool, workspace_gib: float,
                     timing_cache: Optional[Path]) -> bytes:
    """The TensorRT part, thin: parse the ONNX into a strongly typed network, add the profiles, build."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT 11: always strongly typed
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    # TensorRT would take the logits_to_keep scalar as a shape tensor needing its own profile values and host
    # buffer: an engine keeps every position's logits instead (the TensorRT backend slices them)
    frozen = graph_without_logits_to_keep(onnx_path)
    parsed = (parser.parse(frozen, str(onnx_path)) if frozen is not None  # path: where the external data lies
              else parser.parse_from_file(str(onnx_path)))  # reads external data beside the file too
    if not parsed:
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
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
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


# ------------------------------------------------------------------------------------------------ the plan
def engine_metadata(*, trt_version: str, gpu: Mapping[str, Any], precision: str, sparsity: bool,
                    profiles: list[Profile], source: Path, source_sha256: str, onnx_path: Path,
                    onnx_meta: Mapping[str, Any], workspace_gib: float, timing_cache: Optional[Path],
                    build_seconds: float) -> dict[str, Any]:
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


def write_plan(out: Path, blob: bytes, meta: Mapping[str, Any]) -> None:
    """Plan then JSON, each atomically; the JSON last, so a plan without a JSON is refused at load."""
    with atomic_path(out) as tmp:
        tmp.write_bytes(blob)
    write_json_atomic(metadata_path(out), meta, indent=2)
