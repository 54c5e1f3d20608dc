"""`genai_config.json` beside a hotpath decoder, so ONNX Runtime GenAI runs it with no hand edits::

    import onnxruntime_genai as og
    model = og.Model("folder/with/the/export")        # reads folder/genai_config.json
    gen = og.Generator(model, og.GeneratorParams(model))
    gen.append_tokens([[1, 2, 3]]); gen.generate_next_token()

The format is ONNX Runtime GenAI's (https://onnxruntime.ai/docs/genai/reference/config.html): a ``model`` section
(type, context length, vocab size, special token ids, the decoder's file, shape and I/O names) and a ``search``
section (generation defaults). The I/O names are read from the written graph itself, not assumed, so the file
names what the graph has. GenAI reads exactly ``genai_config.json`` in the model's folder: one folder holds one,
naming the last decoder written there; keep variants in their own folders to run several.

The defaults are greedy search (``do_sample`` false) over the model's whole context. ``past_present_share_buffer``
follows the graph: true for an ort-target export (``hotpath.target`` "ort": GroupQueryAttention writes the new
keys and values into a preallocated max-length buffer that past and present share), false for a generic one
(present = concat(past, new)).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from common.files import write_text_atomic

from .onnx_check import load_graph
from .onnx_meta import gpt_config, parse_hotpath_metadata, tokenizer_of

FILENAME = "genai_config.json"
# GenAI's generic decoder-only type: inputs and outputs by the names below, the architecture (here learned positions,
# tanh GELU) all inside the graph. Its "gpt2" type expects the old combined past_%d / present_%d cache instead
# ("Model input was not found" on a graph with separate keys and values).
MODEL_TYPE = "llama"


def config_path(onnx_path: str | os.PathLike) -> Path:
    return Path(onnx_path).with_name(FILENAME)


def _io_names(inputs: list[str], outputs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """GenAI's input/output name mapping, each name checked against the graph's."""
    want_in = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
    ins = {key: name for key, name in want_in.items() if name in inputs}
    outs = {"logits": "logits"} if "logits" in outputs else {}
    if "past_key_values.0.key" in inputs and "present.0.key" in outputs:
        ins.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
        outs.update(present_key_names="present.%d.key", present_value_names="present.%d.value")
    return ins, outs


def make_genai_config(onnx_path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The genai_config dict for a hotpath decoder file, or None when the graph is not a KV-cache decoder
    (GenAI's Generator needs past/present)."""
    path = Path(onnx_path)
    graph = load_graph(path)
    meta = parse_hotpath_metadata({p.key: p.value for p in graph.metadata_props}, str(path))
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]
    ins, outs = _io_names(inputs, outputs)
    if "past_key_names" not in ins or "input_ids" not in ins or "logits" not in outs:
        return None
    cfg = gpt_config(meta)
    from model.tokenizer import eos_id

    eos = eos_id(tokenizer_of(meta))
    eos = 0 if eos is None else eos  # GenAI requires an id; a tokenizer without <|endoftext|> never emits it anyway
    return {
        "model": {
            "type": MODEL_TYPE,
            "context_length": cfg.block_size,
            "vocab_size": cfg.vocab_size,
            "bos_token_id": eos,  # GPT-2's convention: <|endoftext|> opens, ends and pads
            "eos_token_id": eos,
            "pad_token_id": eos,
            "decoder": {
                "filename": path.name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.n_kv_head,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.n_embd,
                "num_hidden_layers": cfg.n_layer,
                "inputs": ins,
                "outputs": outs,
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": cfg.block_size,
            "min_length": 0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
            "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True,
            "past_present_share_buffer": meta["target"] == "ort",
        },
    }


def write_genai_config(onnx_path: str | os.PathLike) -> Optional[Path]:
    """Write genai_config.json beside `onnx_path` (atomically, 0644); returns its path, or None for a graph GenAI
    cannot run as a decoder (no KV cache)."""
    config = make_genai_config(onnx_path)
    if config is None:
        return None
    out = config_path(onnx_path)
    write_text_atomic(out, json.dumps(config, indent=2) + "\n")
    return out
