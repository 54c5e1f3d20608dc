"""llama.cpp through llama-cpp-python's `Llama` on a GGUF from llama.cpp's own converter (F32, Q8_0, Q4_0)."""
from __future__ import annotations


class LlamaEngine:
    def __init__(self, path: str, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.note = f"llama-cpp-python {llama_cpp.__version__} Llama.generate"

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        if len(prompts) != 1:
            raise NotImplementedError("llama_cpp.Llama generates one sequence at a time")
        self.llm.reset()  # no reuse of the previous call's prompt cache: every call prefills its prompt
        out = []
        for token in self.llm.generate(prompts[0], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=False):
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return [out]


def load(options: dict, threads: int) -> LlamaEngine:
    return LlamaEngine(options["path"], threads)
