"""Convert a Hugging Face GPT-2 or Llama-family folder (`save_pretrained`) into a hotpath checkpoint.

`python -m model.from_hf DIR --out ckpt.pt`. Reads `config.json`, the safetensors (or `pytorch_model.bin`)
weights and `tokenizer.json` straight from the folder: transformers itself is not needed to convert.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from common import cli
from .checkpoint import save_checkpoint
from .gpt import GPT, GPTConfig


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise cli.UserError(f"{folder} has no model.safetensors or pytorch_model.bin (save it with save_pretrained)")


def gpt2_config(hf: dict) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise cli.UserError(f"GPT-2 activation {act!r} is not supported (hotpath uses tanh-approximated GELU)")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], mlp_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
                     norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos="learned", mlp="gelu",
                     bias=True, tie_embeddings=True)


def gpt2_state(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
           "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"], "lm_head.weight": sd["wte.weight"]}
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        # GPT-2's Conv1D stores weights as (in, out): transpose to nn.Linear's (out, in)
        qkv_w, qkv_b = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]
        for name, w, bias in zip(("q", "k", "v"), qkv_w.chunk(3, 0), qkv_b.chunk(3, 0)):
            out[f"{b}attn.{name}_proj.weight"], out[f"{b}attn.{name}_proj.bias"] = w, bias
        pairs = {"ln_1": "ln_1", "ln_2": "ln_2"}
        for src, dst in pairs.items():
            out[f"{b}{dst}.weight"], out[f"{b}{dst}.bias"] = sd[f"{h}{src}.weight"], sd[f"{h}{src}.bias"]
        for src, dst in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
            out[f"{b}{dst}.weight"], out[f"{b}{dst}.bias"] = sd[f"{h}{src}.weight"].t(), sd[f"{h}{src}.bias"]
    return out


def llama_config(hf: dict) -> GPTConfig:
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise cli.UserError(f"RoPE scaling {rope.get('rope_type')!r} is not supported (plain RoPE only)")
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise cli.UserError("attention_bias and mlp_bias must agree (hotpath has one bias switch)")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                     n_layer=hf["num_hidden_layers"], n_head=heads,
                     n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=hf["hidden_size"],
                     head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                     mlp_hidden=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                     pos="rope", rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), mlp="swiglu",
                     bias=bias, tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def llama_state(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    out = {"wte.weight": sd["embed_tokens.weight"], "ln_f.weight": sd["norm.weight"],
           "lm_head.weight": sd["embed_tokens.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]}
    names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
             "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
             "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
             "mlp.down_proj": "mlp.down_proj"}
    for i in range(cfg.n_layer):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                key = f"layers.{i}.{src}.{kind}"
                if key in sd:
                    out[f"blocks.{i}.{dst}.{kind}"] = sd[key]
    return out


ARCHITECTURES = {"gpt2": (gpt2_config, gpt2_state), "llama": (llama_config, llama_state),
                 "mistral": (llama_config, llama_state)}


def convert(folder: str | Path, tokenizer_path: str | Path | None = None) -> tuple[GPT, Tokenizer]:
    """Returns (model, tokenizer) with weights identical to the Hugging Face model's."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise cli.UserError(f"{folder} has no config.json (pass a folder written by save_pretrained)")
    hf = json.loads((folder / "config.json").read_text())
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise cli.UserError(f"model_type {kind!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    make_config, make_state = ARCHITECTURES[kind]
    cfg = make_config(hf)
    state = make_state(load_hf_weights(folder), cfg)
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise cli.UserError(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tok_file = Path(tokenizer_path) if tokenizer_path else folder / "tokenizer.json"
    if not tok_file.exists():
        raise cli.UserError(f"no tokenizer at {tok_file} (save a fast tokenizer to the folder or pass --tokenizer)")
    return model.eval(), Tokenizer.from_file(str(tok_file))


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m model.from_hf", "Convert a Hugging Face GPT-2/Llama folder to a hotpath checkpoint.")
    p.add_argument("folder")
    p.add_argument("--out", default=None, help="checkpoint path (default: FOLDER/ckpt.pt)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one in FOLDER)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer = convert(args.folder, args.tokenizer)
    out = args.out or str(Path(args.folder) / "ckpt.pt")
    save_checkpoint(out, model, tokenizer, {"source": "huggingface", "hf_folder": str(args.folder)})
    cfg = model.config
    print(f"wrote {out}: {cfg.n_layer} layers, {cfg.n_embd} wide, {model.num_params() / 1e6:.1f}M parameters")
    return 0


if __name__ == "__main__":
    cli.run(main)
