"""hotpath's PyTorch model (eager fp32) from its checkpoint, greedy with the KV cache as `model.generate` runs it."""
from __future__ import annotations


class TorchEngine:
    def __init__(self, path: str, threads: int):
        import torch

        from common.cli import flush_denormals
        from model import load_checkpoint

        flush_denormals()  # as every hotpath command does
        torch.set_num_threads(threads)
        self.torch = torch
        self.model, _, _ = load_checkpoint(path)
        self.model.eval()
        self.note = "eager, KV cache, last-position logits"

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        torch = self.torch
        with torch.inference_mode():
            logits, past = self.model(torch.tensor(prompts), use_cache=True, logits_to_keep=1)
            out = []
            for i in range(new_tokens):
                token = logits[:, -1].argmax(-1, keepdim=True)
                out.append(token)
                if i + 1 < new_tokens:
                    logits, past = self.model(token, past_key_values=past, use_cache=True, logits_to_keep=1)
            return torch.cat(out, dim=1).tolist()


def load(options: dict, threads: int) -> TorchEngine:
    return TorchEngine(options["path"], threads)
