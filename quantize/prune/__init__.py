"""Pruning: `python -m quantize.prune ckpt.pt --method magnitude|2:4|heads|neurons --sparsity S`. See docs/quantize.md.

    methods    the four methods: keep-masks (magnitude, 2:4) or a smaller GPT (heads, neurons), and checks
    finetune   masked fine-tuning on model/'s training pieces, the sparsity pattern held fixed
    pipeline   prune_checkpoint: load, prune, fine-tune, save, measure against the original
    __main__   the command line
"""
from __future__ import annotations

from typing import Any

from .finetune import finetune
from .methods import (BLOCK_LINEARS, METHODS, SCOPES, apply_masks, block_linears, check_sparsity, count_nonzero,
                      count_params, magnitude_masks, prune_heads, prune_neurons, structured_importance,
                      two_four_masks, verify_2_4)
from .pipeline import default_output, prune_checkpoint

__all__ = ["BLOCK_LINEARS", "METHODS", "SCOPES", "apply_masks", "block_linears", "check_sparsity", "count_nonzero",
           "count_params", "default_output", "finetune", "format_prune_report", "magnitude_masks", "main",
           "prune_checkpoint", "prune_heads", "prune_neurons", "structured_importance", "two_four_masks",
           "verify_2_4"]


def __getattr__(name: str) -> Any:
    # the CLI resolves on first use: importing __main__ here would make `python -m quantize.prune` warn that the
    # module was imported before it ran
    if name in ("main", "format_prune_report", "build_parser"):
        from . import __main__ as cli_module

        return getattr(cli_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
