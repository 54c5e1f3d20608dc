"""onnxruntime-genai's Generator on hotpath's own ONNX file, with the genai_config.json hotpath writes."""
from __future__ import annotations

import numpy as np


class GenaiEngine:
    def __init__(self, folder: str, threads: int):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(folder)  # threads: session_options in the folder's genai_config.json
        self.note = f"onnxruntime-genai {getattr(og, '__version__', '')} Generator, {threads} threads via genai_config"

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        og = self.og
        B, P = len(prompts), len(prompts[0])
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=P + new_tokens, min_length=P + new_tokens, do_sample=False,
                                  batch_size=B)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return [[int(t) for t in gen.get_sequence(b)[P:]] for b in range(B)]

def load(options: dict, threads: int) -> GenaiEngine:
    return GenaiEngine(options["path"], threads)
