"""Triton Inference Server model repositories for hotpath's exported decoders, and a linter for them.

    python -m serve.triton_repo model.onnx --out repo/ [--name NAME] [--max-batch-size 8] [--instances 2]
    python -m serve.triton_repo model.plan --out repo/          # TensorRT engine built by export.to_trt
    python -m serve.triton_repo --check repo/                   # lint any repository (exit 1 on findings)

Writes `repo/NAME/config.pbtxt` and `repo/NAME/1/model.onnx` (or `model.plan`): platform `onnxruntime_onnx` or
`tensorrt_plan`, every input and output of the graph with its data type and dims (batch dimension implicit,
`max_batch_size` > 0), dynamic batching, an instance group (CPU or GPU).

The config is built and checked with Triton's own schema: the `ModelConfig` protobuf (`model_config.proto`) whose
generated module `tritonclient` ships as `tritonclient/grpc/model_config_pb2.py`. Importing it through
`tritonclient.grpc` demands grpcio (the `[grpc]` extra), but the generated module itself needs only `protobuf`, so
it is loaded from its file when grpcio is absent: the exact schema Triton parses `config.pbtxt` with, no copy.

`--check` parses every `config.pbtxt` with that schema (protobuf text format, as Triton does) and matches every
declared tensor against the model's signature: for ONNX, the graph's inputs and outputs (names, element types, ranks,
fixed dims; weights are not loaded); for a TensorRT plan, which only TensorRT can open, the ONNX it was built from as
recorded in its `.plan.json`. Also: platform/backend, `name` = folder, a numeric version folder holding the model
file, dynamic batching only with `max_batch_size` > 0, the batch dim dynamic in the graph, instance groups.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common import cli
from common.cli import UserError
from export.onnx_check import check_onnx_file

PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".plan": ("tensorrt_plan", "model.plan")}
BACKEND_OF = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}

# ONNX TensorProto element type -> Triton DataType name
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                  7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                  12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}


def model_config_pb2():
    """Triton's ModelConfig protobuf module as tritonclient ships it (see the module docstring)."""
    try:
        from tritonclient.grpc import model_config_pb2 as mc  # with the [grpc] extra

        return mc
    except (ImportError, RuntimeError):
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("Triton's model-config schema comes with tritonclient, which is not installed "
                        "(pip install 'tritonclient[http]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.exists():
        raise UserError(f"this tritonclient has no {path.name} (pip install -U 'tritonclient[http]')")
    name = "hotpath_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    sys.modules[name] = module
    return module


# ------------------------------------------------------------------------------------------------ signature
@dataclass
class Tensor:
    name: str
    dtype: str  # Triton DataType name, e.g. TYPE_FP32
    shape: list  # ints for fixed dims, str (dim_param) or None for dynamic ones


@dataclass
class Signature:
    inputs: list[Tensor]
    outputs: list[Tensor]
    source: str


def onnx_signature(path: Path) -> Signature:
    """Inputs and outputs of an ONNX graph (the weights, internal or external, are not loaded; external data must
    stay inside the model's folder, since the repository hands the file to Triton)."""
    proto = check_onnx_file(path)
    init = {i.name for i in proto.graph.initializer}

    def tensors(values):
        out = []
        for v in values:
            if v.name in init:
                continue
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            out.append(Tensor(v.name, ONNX_TO_TRITON.get(tt.elem_type, f"ONNX_TYPE_{tt.elem_type}"), dims))
        return out

    return Signature(tensors(proto.graph.input), tensors(proto.graph.output), str(path))


def plan_signature(plan: Path) -> Signature:
    """A TensorRT plan's tensors, taken from the ONNX it was built from (recorded in export's `<plan>.json`)."""
    from export.trt_runtime import metadata_path, read_engine_metadata

    meta = read_engine_metadata(plan)  # one-line UserError when the JSON is missing or not export's
    try:
        onnx_path = Path(meta["onnx"]["path"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{metadata_path(plan)} does not record the ONNX the plan came from ({e}); rebuild the "
                        "plan") from e
    if not onnx_path.exists():
        raise UserError(f"{onnx_path}, the ONNX {plan.name} was built from, is gone (keep it beside the plan, or "
                        "rebuild)")
    sig = onnx_signature(onnx_path)
    sig.source = f"{onnx_path} (source of {plan.name})"
    return sig


# ------------------------------------------------------------------------------------------------ writing
def build_config(name: str, platform: str, sig: Signature, *, max_batch_size: int, instances: int, kind: str,
                 max_queue_delay_us: int, filename: str):
    mc = model_config_pb2()
    cfg = mc.ModelConfig(name=name, platform=platform, max_batch_size=max_batch_size,
                         default_model_filename=filename)
    cut = 1 if max_batch_size > 0 else 0

    def dims(t: Tensor):
        return [d if isinstance(d, int) and d > 0 else -1 for d in t.shape[cut:]]

    for t in sig.inputs:
        cfg.input.add(name=t.name, data_type=mc.DataType.Value(t.dtype), dims=dims(t))
    for t in sig.outputs:
        cfg.output.add(name=t.name, data_type=mc.DataType.Value(t.dtype), dims=dims(t))
    if max_batch_size > 0:
        pref = sorted({b for b in (max_batch_size // 2, max_batch_size) if b > 0})
        cfg.dynamic_batching.preferred_batch_size.extend(pref)
        cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.Kind.Value(f"KIND_{kind.upper()}"))
    cfg.version_policy.latest.num_versions = 1
    return cfg


def write_repo(model: str | Path, out: str | Path, *, name: Optional[str] = None, max_batch_size: int = 8,
               instances: int = 1, kind: Optional[str] = None, max_queue_delay_us: int = 100,
               version: int = 1) -> Path:
    """Write a Triton model repository for an exported `.onnx` or `.plan`; returns the model folder."""
    from google.protobuf import text_format

    model = cli.existing_file(model, "model")
    if model.suffix not in PLATFORMS:
        raise UserError(f"{model.name} is not an .onnx or .plan file (export one with python -m export.to_onnx or "
                        "python -m export.to_trt)")
    platform, filename = PLATFORMS[model.suffix]
    sig = onnx_signature(model) if model.suffix == ".onnx" else plan_signature(model)
    if max_batch_size < 0 or instances < 1 or version < 1:
        raise UserError("--max-batch-size must be >= 0, --instances and --version >= 1")
    if max_batch_size > 0:
        fixed = [t.name for t in sig.inputs + sig.outputs if not t.shape or isinstance(t.shape[0], int)]
        if fixed:
            raise UserError(f"{fixed[0]} has a fixed first dimension, so Triton cannot batch it (re-export with a "
                            "dynamic batch axis, or pass --max-batch-size 0)")
    kind = kind or ("gpu" if platform == "tensorrt_plan" else "cpu")
    name = name or model.stem.replace(".", "_")
    cfg = build_config(name, platform, sig, max_batch_size=max_batch_size, instances=instances, kind=kind,
                       max_queue_delay_us=max_queue_delay_us, filename=filename)
    root = Path(out) / name
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} exists and is not a folder (pick another --out or --name)")
    vdir = root / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    with cli.atomic_path(vdir / filename) as tmp:
        shutil.copyfile(model, tmp)
    if model.suffix == ".onnx":  # external weights keep the file name the graph refers to
        for pattern in (model.name + ".data", model.stem + ".onnx_data"):
            for ext in sorted(model.parent.glob(pattern)):
                shutil.copyfile(ext, vdir / ext.name)
    text = "# written by python -m serve.triton_repo; check with python -m serve.triton_repo --check\n"
    text += text_format.MessageToString(cfg)
    with cli.atomic_path(root / "config.pbtxt") as tmp:
        tmp.write_text(text)
    return root


# ------------------------------------------------------------------------------------------------ checking
@dataclass
class ModelReport:
    name: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_model(folder: Path) -> ModelReport:
    """Lint one model folder of a repository (`folder/config.pbtxt`, `folder/<version>/<model file>`)."""
    from google.protobuf import text_format

    mc = model_config_pb2()
    rep = ModelReport(folder.name)
    try:
        cfg = text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        rep.problems.append(f"config.pbtxt does not parse as Triton's ModelConfig: {e}")
        return rep
    if cfg.name and cfg.name != folder.name:
        rep.problems.append(f"name {cfg.name!r} differs from the folder name {folder.name!r} (Triton refuses that)")
    platform = cfg.platform or {v: k for k, v in BACKEND_OF.items()}.get(cfg.backend, "")
    if platform not in BACKEND_OF:
        rep.problems.append(f"platform {cfg.platform!r} / backend {cfg.backend!r} is not onnxruntime_onnx or "
                            "tensorrt_plan (the formats hotpath exports)")
        return rep
    if cfg.platform and cfg.backend and BACKEND_OF[cfg.platform] != cfg.backend:
        rep.problems.append(f"platform {cfg.platform} and backend {cfg.backend} disagree")
    filename = cfg.default_model_filename or PLATFORMS[".onnx" if platform == "onnxruntime_onnx" else ".plan"][1]
    versions = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        rep.problems.append("no numeric version folder (Triton loads models from <model>/<version>/)")
        return rep
    model_file = versions[-1] / filename
    if not model_file.exists():
        rep.problems.append(f"{model_file.relative_to(folder)} is missing")
        return rep
    if cfg.WhichOneof("scheduling_choice") == "dynamic_batching" and cfg.max_batch_size <= 0:
        rep.problems.append("dynamic_batching needs max_batch_size > 0")
    for g in cfg.instance_group:
        if g.count < 0:
            rep.problems.append(f"instance_group count {g.count} is negative")
        if platform == "tensorrt_plan" and g.kind == mc.ModelInstanceGroup.KIND_CPU:
            rep.problems.append("a TensorRT plan cannot run on KIND_CPU instances")
    try:
        sig = onnx_signature(model_file) if platform == "onnxruntime_onnx" else plan_signature(model_file)
    except UserError as e:
        rep.problems.append(str(e))
        return rep
    rep.notes.append(f"tensors checked against {sig.source}")
    dtype_name = {v: k for k, v in mc.DataType.items()}
    batched = cfg.max_batch_size > 0

    def match(kind: str, declared, actual: dict[str, Tensor]):
        for t in declared:
            g = actual.get(t.name)
            if g is None:
                rep.problems.append(f"{kind} {t.name!r} is not in the model (it has {', '.join(sorted(actual))})")
                continue
            dt = dtype_name.get(t.data_type, str(t.data_type))
            if dt != g.dtype:
                rep.problems.append(f"{kind} {t.name}: data_type {dt}, the model has {g.dtype}")
            shape = list(g.shape)
            if batched:
                if not shape:
                    rep.problems.append(f"{kind} {t.name}: a scalar cannot carry the batch dimension")
                    continue
                if isinstance(shape[0], int) and shape[0] < cfg.max_batch_size:
                    rep.problems.append(f"{kind} {t.name}: the model's batch dim is fixed at {shape[0]}, below "
                                        f"max_batch_size {cfg.max_batch_size}")
                shape = shape[1:]
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            if len(dims) != len(shape):
                rep.problems.append(f"{kind} {t.name}: dims {dims} have rank {len(dims)}, the model's "
                                    f"{'non-batch ' if batched else ''}shape {shape} has rank {len(shape)}")
                continue
            for i, (d, m) in enumerate(zip(dims, shape)):
                if isinstance(m, int) and m > 0 and d != m:
                    rep.problems.append(f"{kind} {t.name}: dim {i} is {d} in the config, fixed at {m} in the model")

    match("input", cfg.input, {t.name: t for t in sig.inputs})
    match("output", cfg.output, {t.name: t for t in sig.outputs})
    declared = {t.name for t in cfg.input}
    missing = [t.name for t in sig.inputs if t.name not in declared]
    if missing:
        rep.problems.append(f"the model's input(s) {', '.join(missing)} are not declared (Triton needs every "
                            "required input)")
    return rep


def check_repo(repo: str | Path) -> list[ModelReport]:
    repo = Path(repo)
    if not repo.is_dir():
        raise UserError(f"{repo} is not a folder (pass a Triton model repository)")
    folders = sorted(p for p in repo.iterdir() if p.is_dir() and (p / "config.pbtxt").exists())
    if not folders:
        if (repo / "config.pbtxt").exists():
            folders = [repo]  # a single model folder
        else:
            raise UserError(f"{repo} holds no <model>/config.pbtxt (is it a Triton model repository?)")
    return [check_model(f) for f in folders]


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m serve.triton_repo", "Write (or --check) a Triton Inference Server model repository "
                                                  "for an exported .onnx or TensorRT .plan.")
    p.add_argument("model", help="an exported .onnx or .plan (with --check: the repository folder)")
    p.add_argument("--out", default=None, help="the repository folder to write (default: triton_repo/ beside MODEL)")
    p.add_argument("--check", action="store_true", help="lint a repository: parse each config.pbtxt with Triton's "
                                                        "schema and match every tensor against the model")
    p.add_argument("--name", default=None, help="model name (default: the file stem)")
    p.add_argument("--max-batch-size", type=cli.non_negative_int, default=8,
                   help="Triton max_batch_size (0 = no batching)")
    p.add_argument("--instances", type=cli.positive_int, default=1, help="model instances (instance_group count)")
    p.add_argument("--kind", choices=["cpu", "gpu"], default=None, help="instance kind (default: gpu for a plan, "
                                                                        "cpu for ONNX)")
    p.add_argument("--max-queue-delay-us", type=cli.non_negative_int, default=100,
                   help="dynamic batching delay in microseconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check:
        reports = check_repo(args.model)
        for r in reports:
            print(f"{r.name}: {'ok' if r.ok else f'{len(r.problems)} problem(s)'}"
                  + (f" ({'; '.join(r.notes)})" if r.notes else ""))
            for prob in r.problems:
                print(f"  - {prob}")
        bad = sum(not r.ok for r in reports)
        print(f"checked {len(reports)} model(s): {'all ok' if not bad else f'{bad} with problems'}")
        return 1 if bad else 0
    out = Path(args.out) if args.out else Path(args.model).parent / "triton_repo"
    root = write_repo(args.model, out, name=args.name, max_batch_size=args.max_batch_size, instances=args.instances,
                      kind=args.kind, max_queue_delay_us=args.max_queue_delay_us)
    reports = check_repo(out)
    mine = [r for r in reports if r.name == root.name]
    status = "checked ok" if mine and mine[0].ok else "CHECK FAILED: " + "; ".join(mine[0].problems if mine else [])
    print(f"wrote {root}/config.pbtxt and {root}/1/ ({status}); run it with: "
          f"tritonserver --model-repository {out}")
    return 0 if mine and mine[0].ok else 1


if __name__ == "__main__":
    cli.run(main)
