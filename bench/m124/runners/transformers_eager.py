"""transformers' GPT2LMHeadModel in PyTorch eager fp32, greedy through `generate` as its docs run it."""
from __future__ import annotations


class HfEngine:
    def __init__(self, folder: str, threads: int, *, ort: bool = False):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        if ort:  # Optimum's ONNX export with past, in ONNX Runtime
            import onnxruntime as rt
            from optimum.onnxruntime import ORTModelForCausalLM

            so = rt.SessionOptions()
            so.intra_op_num_threads = threads
            self.model = ORTModelForCausalLM.from_pretrained(folder, session_options=so,
                                                             provider="CPUExecutionProvider")
            self.note = "ORTModelForCausalLM.generate, Optimum's export with past"
        else:
            from transformers import GPT2LMHeadModel

            self.model = GPT2LMHeadModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
            self.note = f"generate(), attention {self.model.config._attn_implementation}"

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        torch = self.torch
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()


def load(options: dict, threads: int) -> HfEngine:
    return HfEngine(options["path"], threads, ort=options.get("ort", False))
