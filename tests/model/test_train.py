import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from model import load_checkpoint
from model.checkpoint import read_checkpoint
from model.train import lr_at, main

from tests.helpers import ROOT, TINY_CORPUS_BYTES, run_cli

TINY = ["--preset", "tiny", "--corpus-bytes", str(TINY_CORPUS_BYTES), "--vocab-size", "512", "--batch-size", "4",
        "--quiet"]


def test_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_training_learns_beyond_unigram(tiny_ckpt):
    meta = read_checkpoint(tiny_ckpt)["meta"]
    assert meta["val_ppl"] < meta["unigram_val_ppl"]
    assert meta["losses_tail"][-1] < math.log(512)  # below a uniform guess over the vocabulary


@pytest.mark.slow
def test_same_seed_same_run(tmp_path):
    for name in ("a.pt", "b.pt"):
        main([*TINY, "--steps", "4", "--eval-every", "4", "--seed", "7", "--out", str(tmp_path / name)])
    a, b = read_checkpoint(tmp_path / "a.pt"), read_checkpoint(tmp_path / "b.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    """8 steps straight == 4 steps, stop, resume to 8 (weights, optimizer, schedule and data order restored)."""
    common = [*TINY, "--steps", "8", "--eval-every", "100", "--warmup", "2"]
    main([*common, "--out", str(tmp_path / "straight.pt")])
    main([*common, "--stop-at", "4", "--out", str(tmp_path / "half.pt")])
    assert read_checkpoint(tmp_path / "half.pt")["meta"]["step"] == 4
    main([*common, "--resume", str(tmp_path / "half.pt"), "--out", str(tmp_path / "resumed.pt")])
    straight, resumed = read_checkpoint(tmp_path / "straight.pt"), read_checkpoint(tmp_path / "resumed.pt")
    assert resumed["meta"]["step"] == 8
    for k in straight["model"]:
        torch.testing.assert_close(resumed["model"][k], straight["model"][k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_gradient_accumulation_equals_bigger_batch(tmp_path):
    torch.manual_seed(0)
    main([*TINY, "--steps", "2", "--batch-size", "2", "--grad-accum", "2", "--eval-every", "100",
          "--out", str(tmp_path / "acc.pt")])
    model, _, meta = load_checkpoint(tmp_path / "acc.pt")
    assert meta["tokens_seen"] == 2 * 2 * 2 * model.config.block_size


@pytest.mark.slow
def test_two_process_data_parallel(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "ddp.pt"
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "model.train", *TINY,
                        "--steps", "3", "--eval-every", "3", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = read_checkpoint(out)["meta"]
    assert meta["world_size"] == 2
    assert meta["tokens_seen"] == 3 * 2 * 4 * 64


@pytest.mark.slow
def test_cli_trains_and_writes_safetensors(tmp_path):
    out = tmp_path / "m.safetensors"
    r = run_cli("model.train", *TINY[:-1], "--steps", "2", "--eval-every", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "saved" in r.stdout and out.exists()
    model, tok, meta = load_checkpoint(out)
    assert meta["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--corpus", "EMPTY"], "no text"),
    (["--corpus", "/nonexistent/file.txt"], "does not exist"),
    (["--steps", "0"], "--steps"),
    (["--set", "n_layer"], "KEY=VALUE"),
    (["--set", "n_head=5"], "invalid model config"),
])
def test_cli_bad_input(args, message, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    out = tmp_path / "never.pt"
    r = run_cli("model.train", *TINY, "--steps", "2", *args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_fused_optimizer_and_kernels_track_the_reference(tmp_path):
    """`--optimizer fused --kernels` (Triton kernels; in the interpreter on CPU) follows the reference run."""
    common = [*TINY, "--steps", "2", "--batch-size", "2", "--eval-every", "100", "--seed", "3"]
    main([*common, "--out", str(tmp_path / "ref.pt")])
    main([*common, "--optimizer", "fused", "--kernels", "--out", str(tmp_path / "fused.pt")])
    ref, fused = read_checkpoint(tmp_path / "ref.pt"), read_checkpoint(tmp_path / "fused.pt")
    assert ref["meta"]["losses_tail"] == pytest.approx(fused["meta"]["losses_tail"], rel=1e-4)
    for k in ref["model"]:
        torch.testing.assert_close(fused["model"][k], ref["model"][k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_resume_from_a_periodic_save_continues_exactly(tmp_path):
    """A run saving every 3 steps keeps its step-6 save as ckpt.prev.pt; resuming from that periodic save reaches
    the weights of the uninterrupted run (optimizer, schedule, data order and RNG state all saved)."""
    common = [*TINY, "--steps", "8", "--eval-every", "100", "--warmup", "2"]
    main([*common, "--out", str(tmp_path / "straight.pt")])
    main([*common, "--save-every", "3", "--out", str(tmp_path / "ckpt.pt")])
    periodic = read_checkpoint(tmp_path / "ckpt.prev.pt")
    assert periodic["meta"]["step"] == 6 and "optimizer" in periodic
    main([*common, "--resume", str(tmp_path / "ckpt.prev.pt"), "--out", str(tmp_path / "resumed.pt")])
    straight = read_checkpoint(tmp_path / "straight.pt")
    for other in ("ckpt.pt", "resumed.pt"):  # saving does not disturb training; resuming from a save is exact
        weights = read_checkpoint(tmp_path / other)["model"]
        for k in straight["model"]:
            torch.testing.assert_close(weights[k], straight["model"][k], rtol=1e-6, atol=1e-7)
