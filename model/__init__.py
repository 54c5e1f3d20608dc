"""hotpath's reference model: GPT config and module, tokenizer, corpus, checkpoints, generation."""
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, save_safetensors
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "load_checkpoint", "read_checkpoint", "save_checkpoint", "save_safetensors"]
