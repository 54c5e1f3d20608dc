"""`make profile`: py-spy flame graphs (SVG) of a training step loop and of the server under load.

Written to bench/results/profiles/: train.svg (the `small` model training on CPU) and serve.svg (the server while
concurrent streaming clients load it). py-spy samples the real processes from outside, so nothing is instrumented.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import cli

from .checkpoint import ensure_checkpoint


def py_spy() -> str:
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not exe:
        raise cli.UserError("py-spy is not installed (pip install py-spy)")
    return exe


def profile_training(ckpt: Path, out: Path, steps: int) -> Path:
    svg = out / "train.svg"
    cmd = [py_spy(), "record", "--format", "flamegraph", "--rate", "100", "--output", str(svg), "--",
           sys.executable, "-m", "model.train", "--resume", str(ckpt), "--steps", str(steps + _trained(ckpt)),
           "--eval-every", "100000", "--quiet", "--out", str(out / "profiled-train.pt")]
    subprocess.run(cmd, check=True, capture_output=True)
    (out / "profiled-train.pt").unlink(missing_ok=True)
    return svg


def _trained(ckpt: Path) -> int:
    from model.checkpoint import read_checkpoint

    return int(read_checkpoint(ckpt)["meta"].get("step", 0))


def profile_server(ckpt: Path, out: Path, seconds: int) -> Path:
    from serve.loadgen import DEFAULT_PROMPTS, run_load, spawned_server_process

    svg = out / "serve.svg"
    with spawned_server_process(str(ckpt)) as (url, server):
        spy = subprocess.Popen([py_spy(), "record", "--format", "flamegraph", "--rate", "100", "--duration",
                                str(seconds), "--pid", str(server.pid), "--output", str(svg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + seconds
        while time.time() < deadline and spy.poll() is None:
            run_load(url, DEFAULT_PROMPTS, concurrency=8, max_tokens=32, requests=16)
        spy.wait(timeout=seconds + 60)
    return svg


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m bench.profile", "py-spy flame graphs of training and of the server under load.")
    p.add_argument("--out", default="bench/results/profiles")
    p.add_argument("--quick", action="store_true", help="the tiny model, short recordings")
    p.add_argument("--only", choices=["train", "serve"], default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(args.quick)
    if args.only in (None, "train"):
        print(f"wrote {profile_training(ckpt, out, steps=5 if args.quick else 20)}")
    if args.only in (None, "serve"):
        print(f"wrote {profile_server(ckpt, out, seconds=5 if args.quick else 20)}")
    return 0


if __name__ == "__main__":
    cli.run(main)
