"""CTranslate2's Generator on a model converted by its own converter (float32 or int8), greedy `generate_batch`."""
from __future__ import annotations

from pathlib import Path


class Ct2Engine:
    def __init__(self, folder: str, threads: int):
        import ctranslate2
        from tokenizers import Tokenizer

        self.generator = ctranslate2.Generator(folder, device="cpu", intra_threads=threads, inter_threads=1)
        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.id_to_token = tok.id_to_token  # CTranslate2 takes token strings
        self.note = f"ctranslate2 {ctranslate2.__version__} Generator.generate_batch"

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        tokens = [[self.id_to_token(i) for i in p] for p in prompts]
        res = self.generator.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, sampling_topk=1,
                                            beam_size=1, include_prompt_in_result=False)
        return [r.sequences_ids[0] for r in res]


def load(options: dict, threads: int) -> Ct2Engine:
    return Ct2Engine(options["path"], threads)
