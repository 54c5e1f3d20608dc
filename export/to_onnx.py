"""Export a hotpath checkpoint to ONNX, validated: `python -m export.to_onnx ckpt.pt [--out PATH]
[--target ort|generic] [--opset N] [--no-kv-cache] [--dtype fp32|fp16] [--no-validate]`.

``--target ort`` (the CLI's default) writes the graph below with ONNX Runtime's contrib ops (GroupQueryAttention with
right padding and a cache past and present may share, FastGelu: :mod:`export.ort_graph`);
``--target generic`` (``export_onnx``'s default) writes standard ONNX ops, for TensorRT and other runtimes.

The default graph is a decoder with a KV cache that serves both prefill (empty past) and decode, with the names
ONNX Runtime GenAI, Optimum and transformers.js use::

    inputs   input_ids (batch, sequence_length) int64
             attention_mask (batch, total_sequence_length) int64      1 = real token, 0 = left padding
             position_ids (batch, sequence_length) int64
             past_key_values.{i}.key|value (batch, kv_heads, past_sequence_length, head_dim)  fp32 or fp16
             logits_to_keep () int64 scalar      0 = logits for every position, k > 0 = the last k only
    outputs  logits (batch, logits_sequence_length, vocab) float32 (always: fp16 exports cast them)
             present.{i}.key|value (batch, kv_heads, total_sequence_length, head_dim)

total_sequence_length = past_sequence_length + sequence_length; logits_sequence_length = sequence_length when
logits_to_keep is 0 (evaluation), min(logits_to_keep, sequence_length) otherwise: a generation prefill passes 1 and
the LM head runs on the last position only (at GPT-2 124M it is ~29% of a 512-token prefill's work and its
512 x 50257 fp32 output 103 MB). ``--no-kv-cache`` writes a logits-only graph with input_ids, attention_mask,
position_ids and logits_to_keep. Exported with ``torch.onnx.export(dynamo=True)``: the example inputs have batch 2,
3 new tokens and a past of 4, so no axis is specialised to 0 or 1; ONNX Runtime runs past length 0 (prefill) and
1-token decode steps with the same graph, which validation checks on every export.

The config, tokenizer, hotpath version, source hash, dtype and KV-cache flag go into the model's metadata
(:mod:`export.onnx_meta`), so the `.onnx` (with its weights file) is enough to serve. Models with over 64 MiB of
weights keep them in ``<name>.onnx.data`` beside the graph: ONNX Runtime maps that file instead of copying the
weights out of a parsed protobuf (GPT-2 124M fp32 peak RSS 1025 -> 698 MiB, docs/export.md "Memory"). A tied
embedding / LM head is stored once (:mod:`export.tied_weights`). A validated KV-cache decoder gets
``genai_config.json`` beside it (:mod:`export.genai_config`: ONNX Runtime GenAI runs it as written). Then
:mod:`export.validate` compares ONNX Runtime with PyTorch; past tolerance the file is kept as
``<stem>.failed.onnx`` and the command exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from common import cli
from common.errors import UserError
from common.files import sha256_file
from model.gpt import GPT, GPTConfig, sdpa_attention

from .genai_config import write_genai_config
from .onnx_meta import LOGITS_TO_KEEP, make_hotpath_metadata
from .ort_graph import TARGETS, OrtKVDecoder, fuse_for_ort
from .ort_graph import translation_table as ort_translation_table
from .tied_weights import share_tied_embedding
from .validate import TOLERANCES, Check, Tolerance, ValidationReport

if TYPE_CHECKING:
    import onnx_ir as ir
    from tokenizers import Tokenizer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIN_OPSET = 18  # the lowest opset torch's dynamo exporter writes
# weights above this go to <name>.onnx.data: ONNX Runtime maps the file (weights read in place, pages shared and
# reclaimable) where inline weights are parsed into protobuf and copied out again (peak ~2x the weights); small
# models stay one file. Also under protobuf's 2 GiB limit, with a margin for the graph itself.
EXTERNAL_DATA_BYTES = 64 * 2**20
EXAMPLE_BATCH, EXAMPLE_NEW, EXAMPLE_PAST = 2, 3, 4  # all >= 2: dynamo specialises dims of size 0 and 1
EXAMPLE_KEEP = 2  # logits_to_keep while tracing: >= 2 and below EXAMPLE_NEW, so neither case is specialised



# ------------------------------------------------------------------------------------------------ graph
class KVDecoder(nn.Module):
    """The exported forward: (input_ids, attention_mask, position_ids, past, logits_to_keep) -> (logits fp32,
    presents)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: list[tuple[torch.Tensor, torch.Tensor]],
                logits_to_keep: int) -> tuple[torch.Tensor, Any]:
        logits, presents = self.model(input_ids, past_key_values=[tuple(p) for p in past_key_values],
                                      attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                                      logits_to_keep=logits_to_keep)
        return logits.float(), presents


class LogitsOnly(nn.Module):
    """The exported forward without a cache: (input_ids, attention_mask, position_ids, logits_to_keep) -> logits
    fp32."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                logits_to_keep: int) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep).float()


def io_names(n_layer: int, kv_cache: bool = True) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph, in order."""
    inputs, outputs = ["input_ids", "attention_mask", "position_ids"], ["logits"]
    if kv_cache:
        inputs += [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
        outputs += [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return inputs + [LOGITS_TO_KEEP], outputs


def axis_names(n_layer: int, kv_cache: bool = True) -> dict[str, dict[int, str]]:
    """Per input and output name, its dynamic axes' names (the ONNX dim_params)."""
    bt = {0: "batch", 1: "sequence_length"}
    names: dict[str, dict[int, str]] = {"input_ids": bt, "attention_mask": {0: "batch", 1: "total_sequence_length"},
                                        "position_ids": bt, "logits": {0: "batch", 1: "logits_sequence_length"}}
    if kv_cache:
        for i in range(n_layer):
            for kv in ("key", "value"):
                names[f"past_key_values.{i}.{kv}"] = {0: "batch", 2: "past_sequence_length"}
                names[f"present.{i}.{kv}"] = {0: "batch", 2: "total_sequence_length"}
    return names


def dynamic_shapes(n_layer: int, kv_cache: bool = True) -> dict[str, Any]:
    """Dynamic axes for torch.onnx.export, all ``Dim.DYNAMIC`` (what the exporter makes of axis names; the int input
    logits_to_keep needs a Dim, and then the exporter takes no names: :func:`_name_axes` writes them afterwards)."""
    from torch.export import Dim

    axes = axis_names(n_layer, kv_cache)
    shapes: dict[str, Any] = {n: dict.fromkeys(axes[n], Dim.DYNAMIC)
                              for n in ("input_ids", "attention_mask", "position_ids")}
    if kv_cache:
        past = dict.fromkeys(axes["past_key_values.0.key"], Dim.DYNAMIC)
        shapes["past_key_values"] = [(past, past) for _ in range(n_layer)]
    shapes[LOGITS_TO_KEEP] = Dim.DYNAMIC
    return shapes


def example_inputs(config: GPTConfig, kv_cache: bool, dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> tuple[Any, ...]:
    B, T = EXAMPLE_BATCH, EXAMPLE_NEW
    P = EXAMPLE_PAST if kv_cache else 0
    keep = EXAMPLE_KEEP  # traced as a symbolic int: an int64 scalar input of the graph
    if config.block_size < P + T:
        raise UserError(f"the model context of {config.block_size} is below {P + T} tokens; too small to export")
    ids = torch.randint(0, config.vocab_size, (B, T), device=device)
    mask = torch.ones(B, P + T, dtype=torch.long, device=device)
    pos = torch.arange(P, P + T, device=device).expand(B, T).contiguous()
    if not kv_cache:
        return ids, mask, pos, keep
    assert config.n_kv_head is not None and config.head_dim is not None  # filled by GPTConfig.__post_init__
    shape = (B, config.n_kv_head, P, config.head_dim)
    past = [(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))
            for _ in range(config.n_layer)]
    return ids, mask, pos, past, keep


def is_patched(model: nn.Module) -> bool:
    """Has something (kernels.patch) swapped an attention module's attn_fn? Checked without importing kernels."""
    for module in model.modules():
        fn = module.__dict__.get("attn_fn")
        if fn is not None and fn is not sdpa_attention:
            return True
        if isinstance(module, nn.Softmax) and "forward" in module.__dict__:
            return True
    return False


def translation_table(model: nn.Module) -> Optional[dict]:
    """kernels.onnx_translation_table() for a patched model (the kernels own their ops' ONNX form); None for a
    plain one."""
    if not is_patched(model):
        return None
    import kernels

    return kernels.onnx_translation_table()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings and log lines (torchvision ops, dim renames); errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def export_program(model: GPT, *, kv_cache: bool = True, dtype: str = "fp32",
                   opset: Optional[int] = None, target: str = "generic") -> ir.Model:
    """torch.onnx.export (dynamo) of `model` in `dtype`; returns the onnx_ir Model (not yet saved).

    target "generic": standard ONNX ops only; "ort" (KV cache only): ONNX Runtime contrib ops (:mod:`.ort_graph`)."""
    cfg = model.config
    device = next(model.parameters()).device
    net = model
    if DTYPES[dtype] != next(model.parameters()).dtype:
        net = copy.deepcopy(model).to(DTYPES[dtype])
    was_training = net.training
    net.eval()
    ort = target == "ort"
    if ort and not kv_cache:
        raise ValueError("the ort target is a KV-cache decoder (a logits-only graph is written with target generic)")
    if ort and is_patched(net):
        raise UserError("the ort target writes attention as ONNX Runtime's GroupQueryAttention; export a model "
                        "without kernels.patch() (or use --target generic)")
    wrapper: nn.Module = (OrtKVDecoder(net) if ort else KVDecoder(net)) if kv_cache else LogitsOnly(net)
    inputs, outputs = io_names(cfg.n_layer, kv_cache)
    kwargs: dict[str, Any] = {}
    if opset is not None:
        kwargs["opset_version"] = opset
    table = ort_translation_table() if ort else translation_table(net)
    if table:
        kwargs["custom_translation_table"] = table
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                wrapper, example_inputs(cfg, kv_cache, DTYPES[dtype], device), dynamo=True,
                dynamic_shapes=dynamic_shapes(cfg.n_layer, kv_cache), input_names=inputs, output_names=outputs,
                verbose=False, **kwargs)
    except UserError:
        raise
    except Exception as e:  # the exporter raises many types; one line here, the traceback under --debug
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UserError(f"torch.onnx.export failed ({type(e).__name__}: {first}); rerun with --debug for the "
                        "traceback") from e
    finally:
        net.train(was_training)
    assert program is not None  # dynamo=True always returns an ONNXProgram
    ir_model = program.model
    names = axis_names(cfg.n_layer, kv_cache)
    if ort:  # present is the shared max-length buffer when bound as past, else past + new
        for name in names:
            if name.startswith("present."):
                names[name] = {0: "batch", 2: "present_sequence_length"}
    _name_axes(ir_model, names)
    if ort:  # before the default below: onnxscript's optimizer would fold an input that has an initializer
        ir_model.doc_string = "ORT fusions: " + ", ".join(f"{k} {v}" for k, v in fuse_for_ort(ir_model).items())
    _default_logits_to_keep(ir_model)
    share_tied_embedding(ir_model)  # one stored copy of a tied embedding / LM head (export.tied_weights)
    return ir_model


def _default_logits_to_keep(ir_model: ir.Model) -> None:
    """Give the logits_to_keep input a default of 0 (an initializer of the same name: ONNX Runtime's overridable
    initializer), so a runtime that does not know the input (onnxruntime-genai's Generator, Triton, older callers)
    may leave it out and gets every position, as before; hotpath's callers feed it."""
    import numpy as np
    import onnx_ir as ir

    value = next(v for v in ir_model.graph.inputs if v.name == LOGITS_TO_KEEP)
    value.const_value = ir.tensor(np.array(0, dtype=np.int64), name=LOGITS_TO_KEEP)
    ir_model.graph.register_initializer(value)


def _name_axes(ir_model: ir.Model, names: dict[str, dict[int, str]]) -> None:
    """Give the graph's inputs and outputs their axis names (the exporter writes torch's symbols, s0, s1, and
    expressions such as 'past + sequence' for present.*), the way ONNX Runtime GenAI and Optimum name them."""
    import onnx_ir as ir

    for value in [*ir_model.graph.inputs, *ir_model.graph.outputs]:
        axes = names.get(value.name or "")
        if axes and value.shape is not None:
            dims = list(value.shape)
            for axis, name in axes.items():
                dims[axis] = ir.SymbolicDim(name)
            value.shape = ir.Shape(dims)


# ------------------------------------------------------------------------------------------------ files
def sha256_weights(model: nn.Module) -> str:
    """A hash of an in-memory model's weights (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_out_path(source: Path, dtype: str = "fp32") -> Path:
    """Beside the input, the transform in the name: ckpt.pt -> ckpt.onnx, fp16: ckpt.fp16.onnx."""
    return source.with_suffix(".onnx" if dtype == "fp32" else f".{dtype}.onnx")


def failed_path(path: Path) -> Path:
    """Where an export that failed validation is kept: model.onnx -> model.failed.onnx."""
    return path.with_name(f"{path.stem}.failed{path.suffix or '.onnx'}")


def data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def save_model(ir_model: ir.Model, path: Path, *, external: Optional[bool] = None) -> list[Path]:
    """Save an onnx_ir Model to `path` atomically: into a temporary folder beside it, then renamed into place (the
    external data first, the graph last). external=None: external data when the weights pass EXTERNAL_DATA_BYTES."""
    import onnx_ir as ir

    path = Path(path)
    if external is None:
        external = _initializer_bytes(ir_model) > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        ir.save(ir_model, tmp, external_data=data_path(path).name if external else None)
        return move_into_place(tmpdir, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def move_into_place(tmpdir: Path, path: Path, final: Optional[Path] = None) -> list[Path]:
    """Move tmpdir/<path.name> and its external data to `final` (default `path`), the graph file last. Moving to
    another name (``*.failed.onnx``) renames the data file to match and points the graph at it, so the kept file
    never overwrites the data of a good export beside it."""
    final = final or path
    graph = tmpdir / path.name
    data = tmpdir / data_path(path).name
    moved = []
    if data.exists():
        if final.name != path.name:
            _relocate_external_data(graph, data_path(final).name)
        os.replace(data, data_path(final))
        moved.append(data_path(final))
    os.replace(graph, final)
    return [final, *moved]


def _relocate_external_data(graph_path: Path, new_location: str) -> None:
    """Point every external tensor of the graph file at `new_location` (rewrites the graph file only)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = new_location
    onnx.save(model, str(graph_path))


def _initializer_bytes(ir_model: ir.Model) -> int:
    total = 0
    for init in ir_model.graph.initializers.values():
        if init.const_value is not None:
            total += init.const_value.nbytes
    return total


# ------------------------------------------------------------------------------------------------ API
@dataclass
class ExportReport:
    path: Path  # the written file (``*.failed.onnx`` when validation failed)
    ok: bool  # True when validation passed (or was skipped)
    dtype: str
    kv_cache: bool
    opset: int
    source_sha256: str
    target: str = "generic"  # "ort" (ONNX Runtime contrib ops) or "generic" (standard ONNX)
    files: list[Path] = field(default_factory=list)  # the graph, then any external data
    file_bytes: int = 0
    external_data: bool = False
    export_seconds: float = 0.0
    validation: Optional[ValidationReport] = None
    notes: list[str] = field(default_factory=list)
    genai_config: Optional[Path] = None  # genai_config.json beside the file (a validated KV-cache decoder)

    def summary(self) -> str:
        size = f"{self.file_bytes / 2**20:.1f} MiB" + (" (external data)" if self.external_data else "")
        head = (f"{'wrote' if self.ok else 'FAILED validation, kept'} {self.path} ({size}, {self.dtype}, "
                f"{'KV cache' if self.kv_cache else 'no KV cache'}, target {self.target}, opset {self.opset}, "
                f"exported in {self.export_seconds:.1f}s)")
        if self.genai_config is not None:
            head += f"\n  ONNX Runtime GenAI config: {self.genai_config}"
        if self.validation is None:
            lines = [f"  note: {n}" for n in self.notes] or ["  validation skipped (--no-validate)"]
            return "\n".join([head, *lines])
        v = self.validation
        g, n = v.greedy
        tail = (f"  summary: max|diff| {v.max_abs_diff:.2e}, top-1 {v.min_top1:.3f}, greedy {g}/{n}, "
                f"validated in {v.seconds:.1f}s: {'PASS' if v.passed else 'FAIL'}")
        return "\n".join([head, v.table(), tail])

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "dtype": self.dtype, "kv_cache": self.kv_cache,
                "target": self.target,
                "opset": self.opset, "source_sha256": self.source_sha256, "files": [str(f) for f in self.files],
                "file_bytes": self.file_bytes, "external_data": self.external_data,
                "export_seconds": self.export_seconds, "notes": list(self.notes),
                "validation": self.validation.to_dict() if self.validation else None,
                "genai_config": str(self.genai_config) if self.genai_config else None}


def _load_source(checkpoint_or_model: str | os.PathLike | GPT, tokenizer: Optional[Tokenizer],
                 meta: Optional[dict[str, Any]]) -> tuple[GPT, Tokenizer, dict[str, Any], Optional[Path], str]:
    """(model, tokenizer, meta, source path or None, sha256)."""
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        from model.checkpoint import load_checkpoint

        path = cli.existing_file(checkpoint_or_model, "checkpoint")
        model, tok, ckpt_meta = load_checkpoint(path)
        return model, tokenizer or tok, meta if meta is not None else ckpt_meta, path, sha256_file(path)
    if not isinstance(checkpoint_or_model, GPT):
        raise TypeError(f"export_onnx takes a checkpoint path or a model.GPT, not {type(checkpoint_or_model)}")
    if tokenizer is None:
        raise ValueError("exporting an in-memory model needs its tokenizer (tokenizer=...): the .onnx carries it")
    return checkpoint_or_model, tokenizer, dict(meta or {}), None, sha256_weights(checkpoint_or_model)


def check_opset(opset: Optional[int]) -> None:
    if opset is None:
        return
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset} is outside {MIN_OPSET}..{newest}, what the dynamo exporter and this onnx "
                        "write (omit --opset for the default)")


def export_onnx(checkpoint_or_model: str | os.PathLike | GPT, out_path: str | os.PathLike | None = None, *,
                opset: Optional[int] = None, kv_cache: bool = True, dtype: str = "fp32", validate: bool = True,
                tokenizer: Optional[Tokenizer] = None, meta: Optional[dict[str, Any]] = None,
                tolerance: Optional[Tolerance] = None, progress: Optional[Callable[[str], None]] = None,
                target: str = "generic") -> ExportReport:
    """Export a checkpoint path or an in-memory ``model.GPT`` (then pass `tokenizer`) to ONNX, then validate it.

    out_path: default beside the checkpoint (``ckpt.onnx``, fp16 ``ckpt.fp16.onnx``); required for a model.
    Returns an ExportReport; when validation fails, ``report.ok`` is False and the file is kept as
    ``<stem>.failed.onnx`` (``report.path``) — an existing good file at out_path is left untouched.
    Raises UserError for bad input (missing/corrupt checkpoint, unknown dtype, opset out of range).
    progress: a callable taking one status line (the CLI prints them), or None.
    target: "generic" (standard ONNX ops: TensorRT, any runtime) or "ort" (ONNX Runtime contrib ops, right-padded
    KV cache that may be shared between past and present; :mod:`export.ort_graph`). A logits-only export
    (kv_cache=False) is always generic.
    """
    say = progress or (lambda _msg: None)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r} (use {' or '.join(TARGETS)})")
    notes = []
    if target == "ort" and not kv_cache:
        target = "generic"
        notes.append("a logits-only graph has no attention cache to hand to GroupQueryAttention: written as generic")
    if target == "ort" and dtype == "bf16":
        raise UserError("bf16 is for TensorRT, which runs the generic target (use --target generic --dtype bf16)")
    if dtype == "bf16" and validate:
        validate = False
        notes.append("bf16 is not validated: ONNX Runtime's CPU provider has no bf16 kernels (TensorRT builds it)")
    check_opset(opset)
    model, tok, _meta, src_path, sha = _load_source(checkpoint_or_model, tokenizer, meta)
    if out_path is None:
        if src_path is None:
            raise ValueError("out_path is required when exporting an in-memory model")
        out_path = default_out_path(src_path, dtype)
    out_path = Path(out_path)
    if out_path.exists() and out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder (pass a file path ending in .onnx)")
    cfg = model.config

    say(f"exporting {src_path or 'model'} ({model.num_params() / 1e6:.2f}M params, {dtype}, "
        f"{'KV cache' if kv_cache else 'no KV cache'}, target {target}) with torch.onnx.export (dynamo)")
    t0 = time.perf_counter()
    ir_model = export_program(model, kv_cache=kv_cache, dtype=dtype, opset=opset, target=target)
    if target == "ort":
        notes.append(f"{ir_model.doc_string}; GroupQueryAttention {cfg.n_layer}" + (
            " (packed QKV)" if cfg.pos == "learned" else " (rotary q/k and separate q/k/v stay standard ops)"))
    props = make_hotpath_metadata(cfg, tok, source_sha256=sha, kv_cache=kv_cache, dtype=dtype, target=target)
    if _meta:
        props["hotpath.meta"] = json.dumps(_meta, sort_keys=True, default=str)  # the checkpoint's training meta
    for key, value in props.items():
        ir_model.metadata_props[key] = value
    ir_model.doc_string = f"hotpath GPT decoder ({cfg.n_layer} layers, {dtype})"
    opset_used = ir_model.opset_imports.get("", 0)
    external = _initializer_bytes(ir_model) > EXTERNAL_DATA_BYTES

    import onnx_ir as ir

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        tmp = tmpdir / out_path.name
        ir.save(ir_model, tmp, external_data=data_path(out_path).name if external else None)
        del ir_model
        export_seconds = time.perf_counter() - t0
        report = ExportReport(path=out_path, ok=True, dtype=dtype, kv_cache=kv_cache, opset=opset_used, target=target,
                              source_sha256=sha, external_data=external, export_seconds=export_seconds,
                              file_bytes=sum(f.stat().st_size for f in tmpdir.iterdir()), notes=notes)
        if validate:
            from .onnx_runtime import OnnxDecoder
            from .validate import validate_decoder

            say("validating: ONNX Runtime against PyTorch (random inputs, padding, corpus text, greedy 32)")
            tol = tolerance or TOLERANCES[dtype]
            try:
                decoder = OnnxDecoder(tmp, providers=["CPUExecutionProvider"])
                report.validation = validate_decoder(decoder, model, tok, dtype, tolerance=tol)
                del decoder
            except Exception as e:  # noqa: BLE001 - ONNX Runtime refusing or failing on the graph fails validation
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                report.validation = ValidationReport(dtype, tol, [Check("ONNX Runtime run", passed=False,
                                                                        why=f"{type(e).__name__}: {first}")])
            report.ok = report.validation.passed
        final = out_path if report.ok else failed_path(out_path)
        report.files = move_into_place(tmpdir, out_path, final)
        report.path = final
        if report.ok:  # a failed file gets none: GenAI would run it
            report.genai_config = write_genai_config(final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return report


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m export.to_onnx", "Export a hotpath checkpoint to ONNX (KV-cache decoder), validated "
                   "against PyTorch with ONNX Runtime.")
    p.add_argument("checkpoint", help="a hotpath checkpoint (.pt or .safetensors)")
    p.add_argument("--out", default=None, help="output .onnx (default: beside the checkpoint, ckpt.onnx / "
                   "ckpt.fp16.onnx)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (>= {MIN_OPSET}; default: the exporter's)")
    p.add_argument("--no-kv-cache", action="store_true", help="export a logits-only graph without past/present")
    p.add_argument("--dtype", default="fp32", help="fp32 (default) or fp16 (weights, activations and KV cache); "
                   "bf16 is written for TensorRT but cannot be validated with ONNX Runtime on CPU")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="ort (default): ONNX Runtime contrib ops (GroupQueryAttention with a cache that past and "
                   "present may share, FastGelu); generic: standard ONNX ops only, for "
                   "TensorRT and other runtimes (the default for --dtype bf16 and --no-kv-cache)")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch validation")
    cli.add_json_arg(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dtype not in DTYPES:
        raise UserError(f"unknown dtype {args.dtype!r} (use --dtype fp32 or --dtype fp16)")
    if args.dtype == "bf16":
        print("note: bf16 exports are not validated (ONNX Runtime's CPU provider has no bf16 kernels)",
              file=sys.stderr)
    check_opset(args.opset)
    cli.existing_file(args.checkpoint, "checkpoint")

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = export_onnx(args.checkpoint, args.out, opset=args.opset, kv_cache=not args.no_kv_cache,
                         dtype=args.dtype, validate=not args.no_validate, progress=progress,
                         target=args.target or ("generic" if args.dtype == "bf16" or args.no_kv_cache else "ort"))
    cli.emit(args.json, report.to_dict(), report.summary)
    if not report.ok:
        print(f"error: {report.path} failed validation against PyTorch (see the table above; the file is kept "
              "for inspection)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
