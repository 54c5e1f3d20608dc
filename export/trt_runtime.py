"""Run a TensorRT engine (`.plan`) built by `python -m export.to_trt`, from and to torch CUDA tensors.

NOTE: TensorRT cannot be installed on hotpath's development machines and has never run here. The engine-facing code
below follows NVIDIA's documented Python API for TensorRT 10.x and 11.x (``Runtime.deserialize_cuda_engine``,
``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype``,
``IExecutionContext.set_optimization_profile_async / set_input_shape / get_tensor_shape / set_tensor_address /
execute_async_v3``) and is kept thin; everything around it (metadata, the version/GPU check, profile selection,
feed checking) is plain Python tested on CPU.

Every plan has a JSON beside it (``model.plan.json``) recording the TensorRT version, the GPU, the precision, the
optimization profiles and the source. A plan only runs on the TensorRT version and the GPU model it was built with,
so :class:`TrtEngine` compares that JSON with what it finds and refuses a mismatch with one clear line, before
TensorRT would fail with a less readable error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.cli import UserError

FORMAT = "hotpath-trt"
FORMAT_VERSION = 1
INSTALL_HINT = ("install TensorRT 10 or 11 from NVIDIA on a machine with a CUDA GPU: "
                "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12 (or see "
                "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html)")


def metadata_path(plan: str | os.PathLike) -> Path:
    """The JSON beside a plan: model.plan -> model.plan.json."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def read_engine_metadata(plan: str | os.PathLike) -> dict[str, Any]:
    path = metadata_path(plan)
    if not path.exists():
        raise UserError(f"{path} is missing: {Path(plan).name} was not built by python -m export.to_trt "
                        "(rebuild it with python -m export.to_trt MODEL)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rebuild the engine with python -m export.to_trt") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a hotpath TensorRT engine description; rebuild with python -m export.to_trt")
    # the fields read before and after TensorRT, with their types: a hand-edited or hostile JSON is one line here
    for key, kind in (("gpu", dict), ("profiles", list), ("config", dict), ("onnx", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise UserError(f"{path}: {key!r} is a {type(meta[key]).__name__}, not a {kind.__name__}; rebuild the "
                            "engine with python -m export.to_trt")
    if not all(isinstance(p, dict) and isinstance(p.get("shapes"), dict) for p in meta.get("profiles", [])):
        raise UserError(f"{path}: its profiles are not {{name, shapes}} objects; rebuild the engine with "
                        "python -m export.to_trt")
    return meta


# file signatures of formats a renamed file is most likely to be; a TensorRT plan is binary and starts with none
_FOREIGN_SIGNATURES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                       b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive (a PyTorch .pt checkpoint?)",
                       b"\x1f\x8b": "gzip data", b"\x7fELF": "an ELF binary"}


def check_plan_bytes(plan: str | os.PathLike) -> None:
    """Refuse (UserError, one line) a `.plan` that is plainly another kind of file (empty, text, an image, an
    archive) before handing it to TensorRT, whose deserializer reports only a magic-tag mismatch in its log.

    TensorRT does not document its plan header, so this rejects what is recognisably not a plan rather than
    recognising a plan."""
    path = Path(plan)
    with open(path, "rb") as f:
        head = f.read(4096)
    what = next((name for sig, name in _FOREIGN_SIGNATURES.items() if head.startswith(sig)), None)
    if not head:
        what = "empty"
    elif what is None and b"\0" not in head:
        try:
            head.decode("utf-8")
            what = "text"
        except UnicodeDecodeError:
            pass
    if what is not None:
        raise UserError(f"{path} is not a TensorRT engine (it is {what}); rebuild it with python -m export.to_trt")


def check_compatible(meta: Mapping[str, Any], *, trt_version: str, gpu: Mapping[str, Any],
                     plan: str = "the engine") -> None:
    """Refuse an engine built by another TensorRT version or for another GPU model (UserError, one line).

    gpu: {"name": ..., "compute_capability": "9.0"} of the GPU this process would run it on."""
    built_trt = str(meta.get("tensorrt_version", "?"))
    if built_trt != str(trt_version):
        raise UserError(f"{plan} was built with TensorRT {built_trt} but this is TensorRT {trt_version}; engines "
                        "only run on the version that built them (rebuild it here with python -m export.to_trt)")
    built_gpu = meta.get("gpu") or {}
    if (built_gpu.get("name"), str(built_gpu.get("compute_capability"))) != (gpu.get("name"),
                                                                           str(gpu.get("compute_capability"))):
        raise UserError(f"{plan} was built for {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}) "
                        f"but this GPU is {gpu.get('name')} (sm {gpu.get('compute_capability')}); engines are "
                        "specific to the GPU model (rebuild it here with python -m export.to_trt)")


def select_profile(profiles: Sequence[Mapping[str, Any]], shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the first profile whose [min, max] ranges hold every given input shape; UserError if none.

    profiles: [{"name": str, "shapes": {input: {"min": [...], "opt": [...], "max": [...]}}}] as in the JSON."""
    for index, profile in enumerate(profiles):
        ranges = profile["shapes"]
        if all(name in ranges and len(shape) == len(ranges[name]["min"]) and
               all(lo <= d <= hi for d, lo, hi in zip(shape, ranges[name]["min"], ranges[name]["max"]))
               for name, shape in shapes.items()):
            return index
    described = "; ".join(f"{p['name']}: " + ", ".join(f"{n} {r['min']}..{r['max']}"
                                                        for n, r in list(p["shapes"].items())[:3])
                          for p in profiles)
    given = ", ".join(f"{n} {list(s)}" for n, s in list(shapes.items())[:3])
    raise UserError(f"input shapes ({given}) fit none of the engine's profiles ({described}); rebuild with larger "
                    "--max-batch/--max-seq")


def import_tensorrt() -> Any:
    """The tensorrt module, or UserError saying it is missing and how to install it."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or the PyPI stub failing at import
        raise UserError(f"TensorRT is not installed ({type(e).__name__}: {str(e)[:120]}); {INSTALL_HINT}") from e
    if not hasattr(trt, "Builder"):
        raise UserError(f"the installed tensorrt package is a stub without the TensorRT library; {INSTALL_HINT}")
    return trt


def current_gpu(device: int = 0) -> dict[str, Any]:
    """{"name", "compute_capability", "index"} of a CUDA device, or UserError without a GPU."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU is available (TensorRT engines are built and run on an NVIDIA GPU; run this on "
                        "a GPU machine)")
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}", "index": device}


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for name, tdt in (("int64", torch.int64), ("bf16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdt
    if dtype not in table:
        raise UserError(f"the engine has a tensor of TensorRT type {dtype} that hotpath does not map to torch")
    return table[dtype]


class TrtEngine:
    """A deserialized engine and one execution context. ``infer(feeds)`` takes and returns torch CUDA tensors by
    the exported names (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` ->
    ``logits``, ``present.{i}.key|value``); the optimization profile (prefill or decode) is chosen from the shapes.
    """

    def __init__(self, plan_path: str | os.PathLike, *, device: int = 0):
        self.path = Path(plan_path)
        if not self.path.is_file():
            raise UserError(f"TensorRT engine {self.path} does not exist (build it with python -m export.to_trt)")
        self.metadata = read_engine_metadata(self.path)
        check_plan_bytes(self.path)  # a renamed image or text file is refused here, not by TensorRT
        trt = import_tensorrt()
        gpu = current_gpu(device)
        check_compatible(self.metadata, trt_version=trt.__version__, gpu=gpu, plan=str(self.path))
        import torch

        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialize {self.path} (see the TensorRT log above; rebuild it)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profiles = self.metadata.get("profiles", [])
        self._profile = 0
        self._dummy = torch.zeros(1, dtype=torch.uint8, device=self.device)  # address for empty tensors

    def __repr__(self) -> str:
        return f"TrtEngine({str(self.path)!r}, precision={self.metadata.get('precision')})"

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run once. feeds: {input name: torch tensor}; returns {output name: new torch CUDA tensor}."""
        torch = self._torch
        missing = [n for n in self.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.inputs]
        if missing or extra:
            raise ValueError(f"engine inputs are {self.inputs}; missing {missing}, unexpected {extra}")
        stream = torch.cuda.current_stream(self.device)
        if self.profiles:
            index = select_profile(self.profiles, {n: tuple(t.shape) for n, t in feeds.items()})
            if index != self._profile:
                self.context.set_optimization_profile_async(index, stream.cuda_stream)
                self._profile = index
        keep = []
        for name in self.inputs:
            t = feeds[name].to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            out[name] = t
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed (see the TensorRT log)")
        stream.synchronize()
        del keep
        return out
