import pytest
import torch

transformers = pytest.importorskip("transformers")

from model import load_checkpoint  # noqa: E402
from model.from_hf import convert  # noqa: E402
from model.tokenizer import train_tokenizer  # noqa: E402

from tests.helpers import run_cli  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs `python -m model.from_hf`


def hf_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    tied = kind == "llama-tied"
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x * 2\n"] * 50, vocab_size=300)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-tied"])
def test_converted_model_has_identical_logits(kind, tokenizer, tmp_path):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ours, tok = convert(tmp_path)
    x = torch.randint(0, 300, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    # through the CLI and a saved checkpoint too
    r = run_cli("model.from_hf", str(tmp_path), "--out", str(tmp_path / "ckpt.pt"))
    assert r.returncode == 0, r.stderr
    loaded, _, meta = load_checkpoint(tmp_path / "ckpt.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    assert meta["source"] == "huggingface"


def test_unsupported_or_incomplete_folder(tmp_path):
    r = run_cli("model.from_hf", str(tmp_path))
    assert r.returncode == 2 and "config.json" in r.stderr
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    r = run_cli("model.from_hf", str(tmp_path))
    assert r.returncode == 2 and "not supported" in r.stderr
