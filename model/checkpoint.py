"""Checkpoint I/O. A `ckpt.pt` is self-contained: weights, config, tokenizer and training metadata.

Loaded with `torch.load(weights_only=True)`: a checkpoint holding pickled code is refused, never executed.
Writes go to a temporary file renamed into place, so an interrupted save never leaves a half-written checkpoint;
with `keep_prev` the checkpoint it replaces stays beside it as `<name>.prev.pt` (training's periodic saves).
The same content can be written as safetensors (config, tokenizer and metadata as JSON strings in its header).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from tokenizers import Tokenizer

from common.cli import UserError, atomic_path, existing_file
from .gpt import GPT, GPTConfig

FORMAT = "hotpath-ckpt"
FORMAT_VERSION = 1


def save_checkpoint(
    path: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    meta: Optional[dict[str, Any]] = None,
    extra: Optional[dict[str, Any]] = None,
    keep_prev: bool = False,
) -> Path:
    """Write model weights, config, tokenizer and `meta` (plain JSON-able values). `extra` holds
    resumable training state (optimizer state dict, step, RNG states) and must also be weights-only loadable.
    With `keep_prev`, the file being replaced becomes `prev_path(path)`; at every moment both names hold a complete
    checkpoint (or none yet): the new file is written and flushed to disk first, then the old one is linked to the
    .prev name, then the new one is renamed over `path`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_safetensors(path, model, tokenizer, meta)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "tokenizer": tokenizer.to_str(),
        "meta": dict(meta or {}),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
        _fsync(tmp)  # a node lost right after the rename must not leave an empty file under the real name
        if keep_prev and path.exists():
            _link_prev(path)
    return path


def prev_path(path: str | Path) -> Path:
    """Where `save_checkpoint(keep_prev=True)` keeps the checkpoint it replaced: ckpt.pt -> ckpt.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _link_prev(path: Path) -> None:
    """Make prev_path(path) the file now at `path`, atomically (a hard link renamed into place; a copy where the
    file system has no hard links)."""
    with atomic_path(prev_path(path)) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, validated; raises UserError with a one-line reason."""
    path = existing_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} holds pickled objects that weights-only loading refuses ({first}); "
            "only load checkpoints you trust, re-saved as a hotpath checkpoint"
        ) from e
    except Exception as e:  # torch raises many types for a cut or foreign file
        raise UserError(f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__}); "
                        "re-save or re-download it") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a hotpath checkpoint "
                        "(convert Hugging Face models with python -m model.from_hf)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer hotpath (format {payload['format_version']}); upgrade hotpath")
    missing = {"config", "model", "tokenizer"} - set(payload)
    if missing:
        raise UserError(f"{path} lacks {', '.join(sorted(missing))}; it is not a complete hotpath checkpoint")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Returns (model in eval mode, tokenizer, meta)."""
    payload = read_checkpoint(path)
    try:
        cfg = GPTConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has an invalid model config ({e})") from e
    model = GPT(cfg)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise UserError(f"{path} weights do not match its config ({str(e).splitlines()[0]})") from e
    tokenizer = Tokenizer.from_str(payload["tokenizer"])
    return model.to(device).eval(), tokenizer, payload.get("meta", {})


def save_safetensors(path: str | Path, model: GPT, tokenizer: Tokenizer,
                     meta: Optional[dict[str, Any]] = None) -> Path:
    from safetensors.torch import save_file

    state = _unwrap(model).state_dict()
    # safetensors refuses shared storage: tied lm_head is restored from the config on load
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()
               if not (model.config.tie_embeddings and k == "lm_head.weight")}
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "tokenizer": tokenizer.to_str(),
        "meta": json.dumps(meta or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:  # the library checks header length and offsets vs. size
        raise UserError(f"{path} is truncated or not a safetensors file ({e}); re-save or re-download it") from e
    if header.get("format") != FORMAT:
        raise UserError(f"{path} is not a hotpath safetensors checkpoint (no hotpath header)")
    # the header's strings are as untrusted as the weights: each must decode to what save_safetensors wrote
    fields: dict[str, Any] = {}
    for key, kind in (("config", dict), ("meta", dict)):
        try:
            fields[key] = json.loads(header[key] if key == "config" else header.get(key, "{}"))
        except (KeyError, ValueError) as e:
            raise UserError(f"{path} has no valid {key!r} in its safetensors header ({type(e).__name__}); "
                            "re-save it with hotpath") from e
        if not isinstance(fields[key], kind):
            raise UserError(f"{path}: its safetensors header {key!r} is not a JSON object; re-save it with hotpath")
    if not isinstance(header.get("tokenizer"), str):
        raise UserError(f"{path} has no tokenizer in its safetensors header; re-save it with hotpath")
    config = fields["config"]
    if config.get("tie_embeddings") and "lm_head.weight" not in tensors and "wte.weight" in tensors:
        tensors["lm_head.weight"] = tensors["wte.weight"]
    return {"format": FORMAT, "config": config, "model": tensors, "tokenizer": header["tokenizer"],
            "meta": fields["meta"]}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP or torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model
