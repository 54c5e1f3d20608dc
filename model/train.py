"""Train the reference GPT: `python -m model.train --preset small --steps 600 --out runs/small/ckpt.pt`.

AdamW (torch's or hotpath's FusedAdamW), linear warmup then cosine decay, gradient clipping and accumulation,
bf16 autocast on GPU, periodic validation, resume, and data parallelism under `torchrun` (gloo on CPU, NCCL on
GPU). This is the one place in `model/` that composes the model with `kernels/` (`--kernels`, `--optimizer fused`).

Preemption-safe: the full training state (weights, optimizer, step, data order, RNG states) is saved atomically
every `--save-every` steps, the save before it kept as `<name>.prev.pt`; SIGTERM or a first Ctrl-C finishes the
current step, saves and exits 0 (every DDP rank stops at the same step; only rank 0 writes); a second Ctrl-C exits
at once. `--resume auto` continues from `--out` when it exists, so a scheduler can re-run the same command line after
any kill. With `--out x.safetensors` the resumable state goes to `x.resume.pt` beside it (safetensors holds no
optimizer state); the safetensors file itself is written at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from types import FrameType
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from common import cli
from common.version import hotpath_version

from .checkpoint import load_checkpoint, prev_path, read_checkpoint, save_checkpoint
from .corpus import EmptyCorpusError, build_corpus
from .data import TokenData, evaluate_loss, random_batch, unigram_perplexity
from .gpt import GPT, GPTConfig
from .tokenizer import train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m model.train", "Train the reference GPT on the built-in corpus or your text files.")
    p.add_argument("--preset", default="small", choices=sorted(GPTConfig.PRESETS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set n_layer=2 --set pos=rope")
    p.add_argument("--out", default="runs/small/ckpt.pt", help="checkpoint to write (.pt, or .safetensors)")
    p.add_argument("--steps", type=cli.positive_int, default=600,
                   help="optimizer steps in total (a resumed run continues to it)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step and save, keeping the --steps schedule (resume later with --resume)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="sequences per micro-batch (per process)")
    p.add_argument("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--block-size", type=int, default=None, help="training sequence length (default: the context)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=None, help="floor of the cosine decay (default lr/10)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    p.add_argument("--optimizer", choices=["adamw", "fused"], default="adamw",
                   help="torch.optim.AdamW, or kernels.FusedAdamW (Triton)")
    p.add_argument("--kernels", action="store_true", help="run attention on hotpath's Triton kernels (kernels.patch)")
    p.add_argument("--eval-every", type=cli.positive_int, default=100)
    p.add_argument("--save-every", type=cli.positive_int, default=None,
                   help="save the resumable state every N steps (default: --eval-every); the previous save is kept "
                        "as <name>.prev.pt")
    p.add_argument("--eval-windows", type=cli.positive_int, default=64, help="validation windows per evaluation")
    cli.add_corpus_args(p, default_corpus="the stdlib source")
    p.add_argument("--vocab-size", type=cli.positive_int, default=4096)
    p.add_argument("--resume", default=None, metavar="CKPT|auto",
                   help="checkpoint to continue from (weights, optimizer, step, data order, RNG); 'auto': from "
                        "--out's state if it exists, else start fresh")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    d = Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(d.local_rank)
    return d


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs as GPTConfig keyword arguments, each value parsed as its field's type."""
    out: dict[str, Any] = {}
    fields = GPTConfig.__dataclass_fields__
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise cli.UserError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        default = fields[key].default
        if isinstance(default, bool):
            out[key] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            out[key] = type(default)(raw)
        elif default is None:
            out[key] = int(raw) if raw.isdigit() else raw
        else:
            out[key] = raw
    return out


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from `lr` to `min_lr` at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if args.optimizer == "fused":
        from kernels import FusedAdamW

        return FusedAdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def state_path(out: str | Path) -> Path:
    """Where the resumable training state goes: `--out` itself, or `x.resume.pt` beside `x.safetensors`."""
    out = Path(out)
    return out.with_suffix(".resume.pt") if out.suffix == ".safetensors" else out


def resolve_resume(resume: Optional[str], out: str | Path) -> Optional[Path]:
    """The checkpoint `--resume` names; for 'auto', the state at `--out` when there is one (None: start fresh).
    An existing state that does not load is an error naming it and its .prev.pt, never silently replaced."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    path = state_path(out)
    if not path.exists():
        return None
    try:
        read_checkpoint(path)
    except cli.UserError as e:
        prev = prev_path(path)
        fallback = (f"resume from the previous save with --resume {prev}" if prev.exists()
                    else f"there is no previous save at {prev}")
        raise cli.UserError(f"--resume auto: {path} does not load: {e}; {fallback}, or move {path} away "
                            "to start fresh") from e
    return path


def remove_stale_temps(path: Path) -> None:
    """Temporary files a killed save left beside `path` (and its .prev.pt): only a live save could still need one,
    and this run is the one writing `path`."""
    for target in (path, prev_path(path)):
        for tmp in target.parent.glob(f".{target.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


class StopRequest:
    """SIGTERM or a first SIGINT asks training to stop after the current step; a second SIGINT raises
    KeyboardInterrupt at once. Installed only in the main thread; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def agree_to_stop(requested: bool, ddp: Dist, device: torch.device) -> bool:
    """True on every rank when any rank was asked to stop: ranks must leave the loop at the same step, or the
    others hang in the next gradient all-reduce. One tiny all-reduce per step."""
    if ddp.world == 1:
        return requested
    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def rng_state(gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """This process's RNG states as one uint8 vector: the data order generator, torch's CPU RNG (dropout), and the
    CUDA RNG on GPU."""
    parts = [gen.get_state(), torch.get_rng_state()]
    if device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    return torch.cat(parts)


def set_rng_state(state: torch.Tensor, gen: torch.Generator, device: torch.device) -> None:
    n_gen, n_cpu = len(gen.get_state()), len(torch.get_rng_state())
    gen.set_state(state[:n_gen].clone())
    torch.set_rng_state(state[n_gen:n_gen + n_cpu].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[n_gen + n_cpu:].clone(), device)


def gather_rng_states(gen: torch.Generator, ddp: Dist, device: torch.device) -> torch.Tensor:
    """(world, n) uint8: every rank's RNG states, so a resumed data-parallel run draws the same batches (collective:
    every rank calls it)."""
    mine = rng_state(gen, device)
    if ddp.world == 1:
        return mine[None]
    comm = device if device.type == "cuda" else torch.device("cpu")  # NCCL moves CUDA tensors only
    parts = [torch.empty_like(mine, device=comm) for _ in range(ddp.world)]
    dist.all_gather(parts, mine.to(comm))
    return torch.stack([t.cpu() for t in parts])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ddp = setup_distributed(args.device)
    torch.manual_seed(args.seed + ddp.rank)
    device = torch.device(args.device if not args.device.startswith("cuda") or ddp.world == 1
                          else f"cuda:{ddp.local_rank}")

    save_every = args.save_every or args.eval_every
    state_out = state_path(args.out)
    resume_path = resolve_resume(args.resume, args.out)
    resume = read_checkpoint(resume_path) if resume_path else None
    try:
        corpus = build_corpus(args.corpus, max_bytes=args.corpus_bytes)
    except (EmptyCorpusError, FileNotFoundError) as e:
        raise cli.UserError(f"{e} (pass text files with --corpus, or leave it out for the built-in corpus)") from e
    if resume_path is not None:
        model, tokenizer, meta = load_checkpoint(resume_path)
        cfg = model.config
    else:
        try:
            tokenizer = train_tokenizer(corpus.train, args.vocab_size)
        except ValueError as e:
            raise cli.UserError(f"--vocab-size: {e} (pass 257 or more)") from e
        try:
            cfg = GPTConfig.preset(args.preset, vocab_size=tokenizer.get_vocab_size(), **parse_overrides(args.set))
        except (ValueError, TypeError) as e:
            raise cli.UserError(f"invalid model config: {e}") from e
        model = GPT(cfg)
        meta = {}
    data = TokenData.encode(corpus, tokenizer)
    block = args.block_size or cfg.block_size
    if block > cfg.block_size:
        raise cli.UserError(f"--block-size {block} exceeds the model context {cfg.block_size}")
    if len(data.train) <= block + 1 or len(data.val) <= block + 1:
        raise cli.UserError(f"the corpus is too small: {len(data.train)} train / {len(data.val)} validation tokens "
                            f"for windows of {block} (add text or lower --block-size)")

    model.to(device).train()
    if args.kernels:
        import kernels

        kernels.patch(model)
    optimizer = make_optimizer(model, args)
    start_step = 0
    gen = torch.Generator().manual_seed(args.seed + 1000 * ddp.rank)
    if resume:
        if "optimizer" in resume:
            optimizer.load_state_dict(resume["optimizer"])
        start_step = int(meta.get("step", 0))
        states = resume.get("rng_states")
        if states is not None and len(states) == ddp.world:
            set_rng_state(states[ddp.rank], gen, device)
        elif "data_rng" in resume and ddp.world == 1:  # checkpoints from before rng_states
            gen.set_state(resume["data_rng"])
    net: torch.nn.Module = model
    if ddp.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    tokens_per_step = args.batch_size * block * args.grad_accum * ddp.world
    unigram = unigram_perplexity(data.train, data.val, cfg.vocab_size)
    if ddp.main and not args.quiet:
        print(f"model: {args.preset} {cfg.n_layer}L {cfg.n_embd}d, {model.num_params() / 1e6:.2f}M params; "
              f"{len(data.train):,} train / {len(data.val):,} val tokens; {ddp.world} process(es) on {device}; "
              f"unigram val ppl {unigram:.1f}")

    def evaluate() -> float:
        with autocast:
            return evaluate_loss(model, data.val, block, max_windows=args.eval_windows, device=device)

    val_loss = float(meta.get("val_loss", float("nan")))
    stop = min(args.stop_at or args.steps, args.steps)
    tokens_before = int(meta.get("tokens_seen", 0))

    def save(done: int, elapsed: float, final: bool) -> Optional[dict[str, Any]]:
        """Save the state after `done` steps. Collective (every rank calls it at the same step); rank 0 writes
        the resumable state to `state_out` (the previous save kept as .prev.pt) and, at the end of a run, the
        safetensors `--out`. Returns the metadata on rank 0."""
        rng_states = gather_rng_states(gen, ddp, device)
        if not ddp.main:
            return None
        steps_run = done - start_step
        info = {
            "hotpath_version": hotpath_version(),
            "step": done,
            "tokens_seen": tokens_before + tokens_per_step * steps_run,
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss) if val_loss == val_loss else None,
            "unigram_val_ppl": unigram,
            "train_tokens_per_s": tokens_per_step * steps_run / elapsed if steps_run else None,
            "losses_tail": losses[-10:],
            "args": {k: v for k, v in vars(args).items() if k not in ("debug",)},
            "world_size": ddp.world,
        }
        extra = {"optimizer": optimizer.state_dict(), "rng_states": rng_states}
        save_checkpoint(state_out, model, tokenizer, info, extra=extra, keep_prev=True)
        if final and state_out != Path(args.out):
            save_checkpoint(args.out, model, tokenizer, info)
        return info

    if ddp.main:
        remove_stale_temps(state_out)
        remove_stale_temps(Path(args.out))
    bar = tqdm(range(start_step, stop), initial=start_step, total=args.steps, disable=not ddp.main or args.quiet,
               unit="step", dynamic_ncols=True)
    t0, losses = time.perf_counter(), []
    stopped_at: Optional[int] = None
    request = StopRequest()
    with request.installed():
        for step in bar:
            lr = lr_at(step, args.steps, warmup, args.lr, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(args.grad_accum):
                x, y = random_batch(data.train, args.batch_size, block, gen)
                x, y = x.to(device), y.to(device)
                last_micro = micro == args.grad_accum - 1  # DDP all-reduces gradients on the last micro-batch only
                sync = (net.no_sync() if isinstance(net, DistributedDataParallel) and not last_micro
                        else contextlib.nullcontext())
                with sync, autocast:
                    logits = net(x)
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                (loss / args.grad_accum).backward()
                loss_sum += loss.item() / args.grad_accum
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_sum)
            done = step + 1
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tokens_per_step * (done - start_step) / elapsed:,.0f}")
            last = done == stop
            if done % args.eval_every == 0 or last:
                if ddp.main:
                    val_loss = evaluate()
                    bar.write(f"step {done}: train loss {loss_sum:.3f}, val loss {val_loss:.3f}, "
                              f"val ppl {math.exp(val_loss):.1f}")
                if ddp.world > 1:
                    dist.barrier()
            if last:
                break  # the end-of-run save below
            stopping = agree_to_stop(request.signal_name is not None, ddp, device)
            if stopping or done % save_every == 0:
                save(done, time.perf_counter() - t0, final=False)
            if stopping:
                stopped_at = done
                break
        bar.close()
        if stopped_at is not None:
            if ddp.main:
                by = request.signal_name or "a signal to another rank"
                print(f"stopped by {by} after step {stopped_at} of {args.steps}: saved {state_out} (run the same "
                      "command with --resume auto to continue)", file=sys.stderr)
        else:
            if ddp.main and args.kernels:
                import kernels

                kernels.unpatch(model)
            info = save(stop, time.perf_counter() - t0, final=True)
            if info is not None and not args.quiet:
                ppl = f"{info['val_ppl']:.2f}" if info["val_ppl"] else "n/a"
                print(f"saved {args.out}: step {stop}, val ppl {ppl} (unigram {unigram:.1f}), "
                      f"{info['train_tokens_per_s'] or 0:,.0f} train tokens/s")
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    cli.run(main)
