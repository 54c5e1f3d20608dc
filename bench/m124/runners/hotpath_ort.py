"""hotpath's ONNX decoders (fp32, int8, int4, fp16) through `export.onnx_runtime.OnnxDecoder`, without torch."""
from __future__ import annotations


class OrtEngine:
    def __init__(self, path: str, threads: int):
        from export.onnx_runtime import OnnxDecoder

        self.decoder = OnnxDecoder(path, providers=["CPUExecutionProvider"], threads=threads)
        # ort-target files step one shared in-place KV buffer; generic ones concatenate past + new
        self.note = f"OnnxDecoder.generate_batch ({self.decoder.target} graph)"

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        return self.decoder.generate_batch(prompts, new_tokens)


def load(options: dict, threads: int) -> OrtEngine:
    return OrtEngine(options["path"], threads)
