"""Preemption-safe training: periodic atomic saves, SIGTERM/SIGINT, `--resume auto`, real processes killed with
SIGKILL at random moments. Every wait is bounded."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from model import load_checkpoint
from model.checkpoint import read_checkpoint
from model.train import StopRequest, main

from tests.helpers import ROOT, TINY_CORPUS_BYTES

TINY = ["--preset", "tiny", "--corpus-bytes", str(TINY_CORPUS_BYTES), "--vocab-size", "512", "--batch-size", "4",
        "--quiet"]
START_S = 180  # a cold `python -m model.train` on a loaded 2-core machine: imports, tokenizer, first steps


def _train(*args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model.train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = START_S, poll: float = 0.05) -> bool:
    """Poll `predicate` until it holds (True), or the process ends or the time is up (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def _temp_files(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.*.tmp"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_the_checkpoint(tmp_path):
    """Kill a real training process with SIGKILL during startup, during steps and during saves; the file at --out is
    always absent (before the first save) or a complete checkpoint, and the same command line (`--resume auto`)
    finishes the run with the weights of an uninterrupted one."""
    seed = int(time.time())
    rng = random.Random(seed)
    out = tmp_path / "ckpt.pt"
    steps = 12
    args = [*TINY, "--steps", str(steps), "--save-every", "2", "--eval-every", "100", "--warmup", "2"]
    cmd = [*args, "--resume", "auto", "--out", str(out)]
    last_step, kills, caught_in_save = 0, [], 0
    modes = ["startup", "save", "step", "save", "step"]
    for mode in modes:
        proc = _train(*cmd, stderr=subprocess.DEVNULL)
        try:
            if mode == "startup":
                time.sleep(rng.uniform(0.0, 3.0))
            elif mode == "save":  # kill the moment a temporary file shows up: mid-save
                if _wait_for(lambda: bool(_temp_files(out)), proc, poll=0.001):
                    caught_in_save += 1
            else:  # kill after training has visibly progressed, at a random time inside the following steps
                _wait_for(lambda: out.exists() and read_checkpoint(out)["meta"]["step"] > last_step, proc)
                time.sleep(rng.uniform(0.0, 1.5))
            proc.kill()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        kills.append(mode)
        if out.exists():
            model, _, meta = load_checkpoint(out)  # a UserError here means a broken checkpoint
            assert meta["step"] % 2 == 0 or meta["step"] == steps, (seed, kills, meta["step"])
            assert meta["step"] >= last_step, (seed, kills)
            last_step = meta["step"]
        else:
            assert last_step == 0, f"{out} vanished after a save (seed {seed}, kills {kills})"
    assert last_step > 0, f"no periodic save happened in {len(modes)} attempts (seed {seed})"
    # the same command line, run to the end, continues from the last save
    r = subprocess.run([sys.executable, "-m", "model.train", *cmd], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_checkpoint(out)["meta"]["step"] == steps
    assert not _temp_files(out), "temporary files of killed saves were left behind"
    # the uninterrupted reference runs as a process too: the CLI flushes subnormals, which changes the last bits
    straight = subprocess.run([sys.executable, "-m", "model.train", *args, "--out", str(tmp_path / "straight.pt")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    _assert_same_weights(tmp_path / "straight.pt", out)
    print(f"seed {seed}: killed {kills}, {caught_in_save} kill(s) while a temporary file existed")


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    out = tmp_path / "ckpt.pt"
    args = [*TINY, "--steps", "400", "--save-every", "3", "--eval-every", "100"]
    proc = _train(*args, "--out", str(out))
    try:
        assert _wait_for(out.exists, proc), "no periodic save appeared"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, err[-2000:]
    m = re.search(r"SIGTERM.*step (\d+) of 400.*saved (\S+)", err)
    assert m, err[-2000:]
    step = int(m.group(1))
    assert Path(m.group(2)) == out and 0 < step < 400
    assert read_checkpoint(out)["meta"]["step"] == step
    assert (tmp_path / "ckpt.prev.pt").exists()
    # one more step: exactly one save, whatever `step` is modulo --save-every, so .prev.pt is the SIGTERM save
    main([*args, "--resume", "auto", "--stop-at", str(step + 1), "--out", str(out)])
    assert read_checkpoint(out)["meta"]["step"] == step + 1
    assert read_checkpoint(tmp_path / "ckpt.prev.pt")["meta"]["step"] == step


def test_second_ctrl_c_exits_at_once():
    """A first SIGINT only asks for a stop after the current step; a second one raises KeyboardInterrupt at once
    (the CLI then prints `error: interrupted`, exit 130). In-process: a real process finishes a tiny model's step
    and save too fast for a second signal to land reliably before it exits."""
    before = signal.getsignal(signal.SIGINT)
    request = StopRequest()
    with request.installed():
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while request.signal_name is None and time.monotonic() < deadline:
            time.sleep(0.001)  # the handler runs between bytecodes of the main thread
        assert request.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_refuses_a_corrupt_checkpoint(tmp_path):
    out = tmp_path / "ckpt.pt"
    common = [*TINY, "--steps", "2", "--eval-every", "100", "--resume", "auto", "--out", str(out)]
    main(common)  # nothing at --out: a fresh run
    assert read_checkpoint(out)["meta"]["step"] == 2
    out.write_bytes(out.read_bytes()[:1000])  # cut, as a full disk would leave a non-atomic write
    with pytest.raises(UserError) as e:
        main(common)
    message = str(e.value)
    assert str(out) in message and "ckpt.prev.pt" in message and "\n" not in message
    assert len(out.read_bytes()) == 1000, "the corrupt checkpoint was overwritten"


@pytest.mark.slow
def test_safetensors_output_keeps_its_resumable_state_beside_it(tmp_path):
    out = tmp_path / "m.safetensors"
    common = [*TINY, "--eval-every", "100", "--save-every", "1", "--resume", "auto", "--out", str(out)]
    main([*common, "--steps", "3"])
    _, _, meta = load_checkpoint(out)
    assert meta["step"] == 3
    assert read_checkpoint(tmp_path / "m.resume.pt")["meta"]["step"] == 3
    assert read_checkpoint(tmp_path / "m.resume.prev.pt")["meta"]["step"] == 2
    assert "optimizer" in read_checkpoint(tmp_path / "m.resume.pt")
    main([*common, "--steps", "4"])
    assert load_checkpoint(out)[2]["step"] == 4


def _children_with_rank(pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers under `pid` (read from /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            for var in env:
                if var.startswith(b"RANK="):
                    ranks[int(var[5:])] = int(entry.name)
    return ranks


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads worker ranks from /proc")
def test_ddp_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "ddp.pt"
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "model.train", *TINY,
                             "--steps", "400", "--save-every", "2", "--eval-every", "100", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(out.exists, proc, timeout=240), "no periodic save appeared"
        workers = _children_with_rank(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGTERM)  # only rank 1 hears it; rank 0 must stop at the same step
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, err[-3000:]
    m = re.search(r"step (\d+) of 400.*saved", err)
    assert m, err[-2000:]
    meta = read_checkpoint(out)["meta"]
    assert meta["step"] == int(m.group(1)) < 400 and meta["world_size"] == 2
