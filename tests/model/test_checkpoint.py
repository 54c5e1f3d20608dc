import os

import pytest
import torch

from model import load_checkpoint, save_checkpoint
from common.cli import UserError
from model.checkpoint import read_checkpoint
from tests.helpers import run_cli


def test_round_trip_pt_and_safetensors(tiny_model, tmp_path):
    model, tok, meta = tiny_model
    x = torch.randint(0, model.config.vocab_size, (1, 9))
    for name in ("copy.pt", "copy.safetensors"):
        path = save_checkpoint(tmp_path / name, model, tok, {"note": "x"})
        again, tok2, meta2 = load_checkpoint(path)
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        assert tok2.encode("def f(x): pass").ids == tok.encode("def f(x): pass").ids
        assert meta2["note"] == "x"
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_checkpoint_is_self_contained(tiny_ckpt):
    payload = read_checkpoint(tiny_ckpt)
    assert payload["format"] == "hotpath-ckpt"
    assert {"config", "model", "tokenizer", "meta", "optimizer"} <= set(payload)
    assert payload["meta"]["step"] == 80 and payload["meta"]["val_ppl"] > 1


def test_truncated_checkpoint(tiny_ckpt, tmp_path):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(tiny_ckpt.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated"):
        load_checkpoint(bad)


def test_foreign_checkpoint(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(UserError, match="not a hotpath checkpoint"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "hotpath-ckpt", "payload": Evil()}, path)
    with pytest.raises(UserError, match="pickled"):
        load_checkpoint(path)


@pytest.mark.slow
@pytest.mark.parametrize("make_bad", ["missing", "truncated", "foreign", "text"])
def test_cli_bad_checkpoint_one_line_exit_2(make_bad, tiny_ckpt, tmp_path):
    path = tmp_path / "bad.pt"
    if make_bad == "truncated":
        path.write_bytes(tiny_ckpt.read_bytes()[:3000])
    elif make_bad == "foreign":
        torch.save([1, 2, 3], path)
    elif make_bad == "text":
        path.write_text("hello")
    r = run_cli("model.eval", str(path))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_safetensors_with_foreign_header(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="not a hotpath"):
        load_checkpoint(path)
