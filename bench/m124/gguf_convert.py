"""`python -m bench.m124.gguf_convert LLAMA_CPP_DIR HF_FOLDER OUT.gguf OUTTYPE`: llama.cpp's own
`convert_hf_to_gguf.py` (from the llama.cpp tree vendored in the llama-cpp-python sdist) on our GPT-2 folder.

Our tokenizer is a byte-level BPE with GPT-2's pre-tokenizer but its own merges, so the converter's fingerprint of
the tokenizer (a hash of how it splits a test text) is unknown to it and it refuses the vocabulary. Its `gpt-2`
pre-tokenizer type is the one that matches (ByteLevel, GPT-2's split regex), so this driver answers `gpt-2` where
the converter asks, and runs the converter otherwise unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    llama_dir, hf, out, outtype = sys.argv[1:5]
    sys.path[:0] = [str(Path(llama_dir) / "gguf-py"), llama_dir]
    import convert_hf_to_gguf as conv

    def gpt2_pre(self: object, tokenizer: object) -> str:
        return "gpt-2"

    # newer trees keep the model classes in the `conversion` package, older ones in the script itself
    base = sys.modules.get("conversion.base") or conv
    patched = 0
    for name in ("TextModel", "Model"):
        cls = getattr(base, name, None)
        if cls is not None and hasattr(cls, "get_vocab_base_pre"):
            cls.get_vocab_base_pre = gpt2_pre
            patched += 1
    if not patched:
        raise SystemExit("convert_hf_to_gguf has no get_vocab_base_pre to answer (the converter changed)")
    sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", outtype]
    conv.main()


if __name__ == "__main__":
    main()
