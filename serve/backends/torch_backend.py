"""Eager PyTorch backend: the reference GPT from a hotpath checkpoint, optionally on hotpath's kernels
(`kernels.patch`) and/or quantized to int8 (`quantize.torch_quant.quantize_model`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, cast

import torch
from tokenizers import Tokenizer

from common.cli import UserError
from model.checkpoint import load_checkpoint
from model.gpt import GPTConfig

from .base import BaseBackend, KVCache, eos_of

QUANT_MODES = ("int8-weight", "int8-dynamic")


class TorchBackend(BaseBackend):
    name = "torch"

    def __init__(self, path: str | Path | None, *, device: str = "cpu", kernels: bool = False,
                 quantize: Optional[str] = None, model: Optional[torch.nn.Module] = None,
                 tokenizer: Optional[Tokenizer] = None):
        """Load the checkpoint at `path`, or serve `model` (a GPT, possibly torch.compile'd) with its `tokenizer`."""
        if model is None:
            if path is None:
                raise ValueError("TorchBackend needs a checkpoint path or a model")
            model, tokenizer, _ = load_checkpoint(path, device=device)
        if tokenizer is None:
            raise ValueError("TorchBackend(model=...) needs the model's tokenizer too")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        notes = [str(self.device)]
        if quantize:
            if quantize not in QUANT_MODES:
                raise UserError(f"--quantize {quantize} is not a mode (choose from {', '.join(QUANT_MODES)})")
            try:
                from quantize.torch_quant import quantize_model
            except ImportError as e:
                raise UserError(f"--quantize {quantize} needs quantize.torch_quant, which this install lacks "
                                f"({e}); serve the fp32 checkpoint or an int8 .onnx instead") from e
            self.model = quantize_model(self.model, quantize).eval()
            notes.append(quantize)
        else:
            notes.append(str(next(self.model.parameters()).dtype).replace("torch.", ""))
        if kernels:
            try:
                import kernels as hotpath_kernels
            except ImportError as e:
                raise UserError(f"--kernels needs hotpath's kernels package and triton ({e}); "
                                "pip install triton") from e
            hotpath_kernels.patch(self.model)
            notes.append("kernels.patch")
        cfg = cast(GPTConfig, model.config)
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        self.max_context = cfg.block_size
        self.eos_id = eos_of(tokenizer)
        assert cfg.n_kv_head is not None and cfg.head_dim is not None  # GPTConfig.__post_init__ fills them
        self.n_layer, self.kv_heads, self.head_dim = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        # the cache holds what the attention produces: the activations' dtype (int8 modes keep float activations)
        self.kv_dtype = next(model.parameters()).dtype
        self.description = f"torch ({', '.join(notes)})"

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: Optional[KVCache], logits_to_keep: int = 0) -> tuple[torch.Tensor, KVCache]:
        dev = self.device
        logits, present = self.model(input_ids.to(dev), attention_mask=attention_mask.to(dev),
                                     position_ids=position_ids.to(dev), past_key_values=past, use_cache=True,
                                     logits_to_keep=logits_to_keep)
        return logits.float(), list(present)
