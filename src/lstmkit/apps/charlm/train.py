"""`lstmkit train`: a character-level language model, end to end.

    ids (B, T) -> embedding (B, T, E) -> lstmkit.LSTM (B, T, H) -> linear (B, T, V)

Truncated backpropagation through time: the training text is cut into B parallel
streams (one per batch row); each step trains on the next T characters of every
stream and hands the final (h, c) on, detached, to the next step, so the model sees
context far beyond T while gradients stay T steps long.

Data-parallel: under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) every rank trains
its own B streams of the text with DistributedDataParallel, which averages the
gradients; rank 0 evaluates, writes checkpoints and draws the progress bar.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...config import ENGINE_NAMES
from ...cli import run_guarded
from .model import (
    CONFIG, CURVE, HISTORY, LN2, TRAINER, WEIGHTS, CharLM, RunError, adam, bptt_step, build_vocab, encode,
    load_weights, model_from_config, read_config, read_text, save_weights, text_fingerprint,
    unigram_bpc, use_fused_adam, write_json,
)

# Built-in defaults. Options default to None so that `--resume` can tell "not given"
# (take the run's value) from "given" (must agree with the run).
DEFAULTS = dict(embed_size=64, hidden_size=256, num_layers=2, dropout=0.0, seq_len=64,
                batch_size=32, lr=2e-3, clip=1.0, seed=0, val_frac=0.05, lr_decay_steps=0)
# --lr-decay-steps -1: the step at which the steps that fit in --minutes are counted, from the
# step rate since step FIT_AT_STEP // 5 (after the compile, and after a fresh install's
# compiling second process: counted from step 10 to 50, a fresh clone's demo fitted 2,230 steps
# and ran 3,501), and the share of the remaining time they may fill (the rest: evaluations and
# checkpoints).
FIT_AT_STEP, FIT_SHARE = 250, 0.9
LR_FLOOR = 0.05  # the cosine ends at lr * LR_FLOOR


def lr_at(cfg: dict, step: int) -> float:
    """The learning rate of step `step` (0-based): cosine from lr to lr * LR_FLOOR over
    lr_decay_steps steps, constant after them; constant lr when lr_decay_steps <= 0."""
    n, lr = cfg["lr_decay_steps"], cfg["lr"]
    if n <= 0:
        return lr
    low = lr * LR_FLOOR
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * min(step, n) / n))


# The options that define a run: resuming with any of them changed is an error.
RUN_KEYS = tuple(DEFAULTS) + ("world_size", "text_sha256", "text_chars")


def build_parser(prog="lstmkit train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a character-level LSTM language model.")
    p.add_argument("--text", nargs="+", metavar="PATH", help="UTF-8 text file(s) to train on")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints, config, loss curve")
    d = DEFAULTS
    p.add_argument("--hidden-size", type=int, help=f"LSTM hidden size (default {d['hidden_size']})")
    p.add_argument("--num-layers", type=int, help=f"stacked LSTM layers (default {d['num_layers']})")
    p.add_argument("--embed-size", type=int, help=f"character embedding size (default {d['embed_size']})")
    p.add_argument("--dropout", type=float, help=f"dropout between LSTM layers (default {d['dropout']})")
    p.add_argument("--seq-len", type=int, help=f"BPTT length T: characters per stream per step (default {d['seq_len']})")
    p.add_argument("--batch-size", type=int, help=f"parallel streams B per process (default {d['batch_size']})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {d['lr']})")
    p.add_argument("--lr-decay-steps", type=int,
                   help="cosine decay of the learning rate to 1/20 of --lr over this many steps, then constant; "
                        "0: constant (default); -1: over the steps that fit in --minutes, as measured at step "
                        f"{FIT_AT_STEP} (the number is then stored in the run, so --resume continues it exactly)")
    p.add_argument("--clip", type=float, help=f"gradient norm clip (default {d['clip']})")
    p.add_argument("--seed", type=int, help=f"random seed (default {d['seed']})")
    p.add_argument("--val-frac", type=float, help=f"held-out fraction at the end of the text (default {d['val_frac']})")
    p.add_argument("--steps", type=int, default=2000, help="stop after this many steps in total; 0: no limit (default 2000)")
    p.add_argument("--minutes", type=float, default=None, help="also stop after this many minutes of this session")
    p.add_argument("--eval-every", type=int, default=200, help="held-out evaluation every N steps (default 200)")
    p.add_argument("--eval-chars", type=int, default=100_000, help="held-out characters scored per evaluation (default 100000)")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--engine", default="auto", choices=ENGINE_NAMES,
                   help="lstmkit.LSTM engine (default auto: the fastest available)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (torch.set_num_threads; the Numba engine follows it); 0: torch's default. "
                        "On a busy machine 1 can be many times faster")
    p.add_argument("--malloc", default="kept", choices=("kept", "default"),
                   help="kept (default): glibc keeps freed memory for the next step instead of returning it "
                        "to the system and faulting it in again (mallopt; the process's setting from then on); "
                        "default: leave glibc's own setting")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same configuration)")
    p.add_argument("--overwrite", action="store_true", help="start over in a --out that already holds a run")
    p.add_argument("--compare-torch", action="store_true",
                   help="also train torch.nn.LSTM from the same weights on the same data; print both chars/s")
    return p


# ---- distributed setup ----------------------------------------------------------------------
def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def pick_device(name: str, world: int, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda: no CUDA device available")
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local_rank if world > 1 else 0)
    return dev


# ---- configuration and the run directory ---------------------------------------------------
def resolve_config(args, rank: int, world: int) -> tuple[dict, list[str], list[Path]]:
    """The run's configuration dict, its text, and the text paths. Checks every input
    and the run directory before anything is written."""
    out = Path(args.out)
    old = None
    if (out / CONFIG).exists():
        old = read_config(out)
        if not args.resume and not args.overwrite:
            raise RunError(f"{out} already holds a run; use --resume to continue it, "
                           "--overwrite to start over, or another --out")
    elif args.resume:
        raise RunError(f"--resume: {out} holds no run to resume (no {CONFIG})")
    if args.resume and args.overwrite:
        raise RunError("--resume and --overwrite contradict each other")

    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    base = {**DEFAULTS, **old} if args.resume else DEFAULTS
    cfg = {k: given.get(k, base[k]) for k in DEFAULTS}

    paths = args.text if args.text else (old.get("text_paths") if args.resume else None)
    if not paths:
        raise RunError("--text PATH is required")
    paths = [Path(p) for p in paths]
    texts = [read_text(p) for p in paths]
    text = "\n".join(texts)
    cfg.update(world_size=world, text_sha256=text_fingerprint(text), text_chars=len(text),
               text_paths=[str(p.resolve()) for p in paths])

    if args.resume:
        if cfg["lr_decay_steps"] == -1 and old.get("lr_decay_steps", 0) > 0:
            cfg["lr_decay_steps"] = old["lr_decay_steps"]  # -1 was decided in the run: that number
        for k in RUN_KEYS:
            if k in old and old[k] != cfg[k]:
                if k.startswith("text_"):
                    raise RunError(f"--resume: configuration mismatch with {out}: the text differs "
                                   f"from the one it was trained on")
                raise RunError(f"--resume: configuration mismatch with {out}: it was trained with "
                               f"{k}={old[k]!r}, this run asks for {k}={cfg[k]!r}")
        cfg["vocab"] = old["vocab"]
    else:
        cfg["vocab"] = build_vocab(text)

    _check_values(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to {out}: {e.strerror or e}") from None
    return cfg, text, paths


def _check_values(cfg: dict) -> None:
    for k in ("embed_size", "hidden_size", "num_layers", "seq_len", "batch_size"):
        if cfg[k] <= 0:
            raise RunError(f"--{k.replace('_', '-')} must be positive, got {cfg[k]}")
    if not 0 <= cfg["dropout"] < 1:
        raise RunError(f"--dropout must be in [0, 1), got {cfg['dropout']}")
    if not 0 < cfg["val_frac"] < 1:
        raise RunError(f"--val-frac must be in (0, 1), got {cfg['val_frac']}")
    if cfg["lr"] <= 0 or cfg["clip"] <= 0:
        raise RunError("--lr and --clip must be positive")
    if cfg["lr_decay_steps"] < -1:
        raise RunError(f"--lr-decay-steps must be >= -1, got {cfg['lr_decay_steps']}")


# ---- data -----------------------------------------------------------------------------------
class Streams:
    """The training text as B*world parallel streams; rank r owns rows [r*B, (r+1)*B).

    step k of an epoch trains on columns [k*T, (k+1)*T) of every stream, targets shifted
    by one character. At the start of each epoch the carried state is reset.
    """

    def __init__(self, ids: torch.Tensor, batch: int, seq_len: int, rank: int, world: int):
        S = batch * world
        L = (len(ids) - 1) // S  # characters per stream
        self.chunks = L // seq_len  # steps per epoch
        if self.chunks < 1:
            need = S * seq_len + 1
            raise RunError(f"training text too short: {len(ids)} chars, batch_size x seq_len x processes "
                           f"needs at least {need}; use a smaller --batch-size/--seq-len or more text")
        rows = slice(rank * batch, (rank + 1) * batch)
        self.x = ids[: S * L].view(S, L)[rows]  # (B, L)
        self.y = ids[1 : S * L + 1].view(S, L)[rows]  # (B, L) next characters
        self.T = seq_len

    def batch(self, step: int):
        k = step % self.chunks
        cols = slice(k * self.T, (k + 1) * self.T)
        return self.x[:, cols], self.y[:, cols], k == 0  # (B, T), (B, T), new epoch?


@torch.no_grad()
def evaluate(model: CharLM, ids: torch.Tensor, seq_len: int, batch: int, device) -> float:
    """Bits per character on ids, carrying the state through consecutive chunks."""
    was_training = model.training
    model.eval()
    n = len(ids) - 1
    B = max(1, min(max(batch, 64), n // seq_len))  # forward only: many streams are cheap
    L = n // B
    x = ids[: B * L].view(B, L).to(device)
    y = ids[1 : B * L + 1].view(B, L).to(device)
    total, state, T = 0.0, None, 4 * seq_len  # no backward: longer chunks, fewer calls
    with torch.inference_mode():
        for t in range(0, L, T):
            logits, state = model(x[:, t : t + T], state)
            total += F.cross_entropy(logits.flatten(0, 1), y[:, t : t + T].flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (B * L) / LN2


# ---- progress -------------------------------------------------------------------------------
class Progress:
    """One status line redrawn in place on stderr (only when stderr is a terminal);
    `log` lines print above it, always."""

    def __init__(self, total: int | None, start: int, enabled: bool, seconds: float | None = None):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.seconds = seconds  # a time limit, when there is one
        self.last = ""

    def update(self, step: int, text: str) -> None:
        if not self.tty:
            return
        head = f"step {step}"
        if self.seconds and not self.total:
            left = max(0.0, self.seconds - (time.perf_counter() - self.t0))
            head = f"step {step}, {fmt_time(left)} left"
        if self.total:
            frac = min(1.0, step / self.total)
            done = int(20 * frac)
            rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else 0
            head = f"{100 * frac:3.0f}% [{'#' * done}{'.' * (20 - done)}] {step}/{self.total} eta {fmt_time(eta)}"
        self.last = f"{head}  {text}"
        sys.stderr.write("\r" + self.last + "\033[K")
        sys.stderr.flush()

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K")
        print(line, file=sys.stderr, flush=True)
        if self.tty and self.last:
            sys.stderr.write(self.last)
            sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.last = ""  # later log lines don't redraw a finished bar


def fmt_time(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# ---- loss curve -----------------------------------------------------------------------------
def write_curve(out: Path, history: dict) -> str | None:
    """loss.png from the history; returns a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"loss curve not written: matplotlib is not installed (pip install 'lstmkit[train]')"
    fig, ax = plt.subplots(figsize=(7, 4))
    tr, ev = history["train"], history["eval"]
    if tr:
        ax.plot([r[0] for r in tr], [r[1] for r in tr], lw=1, label="train (bits/char)")
    if ev:
        ax.plot([r[0] for r in ev], [r[1] for r in ev], "o-", label="held-out bpc")
    if history.get("unigram_bpc"):
        ax.axhline(history["unigram_bpc"], ls="--", color="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per character")
    ax.set_title("lstmkit char-LM")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / CURVE
    tmp = out / (CURVE + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None


# ---- the trainer ----------------------------------------------------------------------------
STOP_CODES = {None: 0, "steps": 1, "time": 2, "interrupted": 3}  # all-reduced with MAX across ranks


class Trainer:
    """One training run: `Trainer(args)` checks every input and builds the data, model and
    optimizer (setup); `start()` resumes the run in --out or starts it fresh; `step()` trains
    one step of truncated BPTT; `evaluate()` scores the held-out text; `checkpoint()` writes
    what resuming needs; `train()` does all of it until a stop condition and returns a summary."""

    def __init__(self, args, log: bool = True):
        self.args = args
        self.rank, self.world, local_rank = dist_env()
        self.main_rank = self.rank == 0
        self.out = Path(args.out)
        self.cfg, self.text, _ = resolve_config(args, self.rank, self.world)
        _check_session_args(args, self.world)
        self.device = pick_device(args.device, self.world, local_rank)
        self._split_text()
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        cfg = self.cfg
        # Same seed everywhere: identical initial weights on every rank (DDP also broadcasts).
        torch.manual_seed(cfg["seed"])
        self.net = model_from_config(cfg, engine=args.engine).to(self.device)  # plain: eval, checkpoints
        self.model = self.net  # what trains: the DDP wrapper under torchrun
        self.optimizer = adam(self.net.parameters(), cfg["lr"], self.device)
        torch.manual_seed(cfg["seed"] + 1 + self.rank)  # dropout masks differ across ranks
        self.B, self.T = cfg["batch_size"], cfg["seq_len"]
        self.state = self.zero_state()
        self.step_count, self.chars_before = 0, 0
        self.history = {"train": [], "eval": [], "unigram_bpc": self.baseline}
        self.log = log
        self.twin = None
        self.curve_warned = False

    def _split_text(self) -> None:
        # Split before the vocabulary is used: the held-out text is the end of the text.
        cfg = self.cfg
        self.ids = encode(self.text, cfg["vocab"])
        n_val = max(2, int(len(self.ids) * cfg["val_frac"]))
        self.train_ids, self.val_ids = self.ids[:-n_val], self.ids[-n_val:]
        self.eval_ids = self.val_ids[: self.args.eval_chars + 1]
        self.streams = Streams(self.train_ids.to(self.device), cfg["batch_size"], cfg["seq_len"],
                               self.rank, self.world)
        self.baseline = unigram_bpc(self.train_ids, self.eval_ids[1:], len(cfg["vocab"]))

    def zero_state(self):
        L, H = self.cfg["num_layers"], self.cfg["hidden_size"]
        return (torch.zeros(L, self.B, H, device=self.device), torch.zeros(L, self.B, H, device=self.device))

    # ---- resume or start ----
    def start(self) -> None:
        if self.args.resume:
            self.resume()
        elif self.main_rank:
            for name in (WEIGHTS, TRAINER, HISTORY, CURVE):  # --overwrite: only our own files
                (self.out / name).unlink(missing_ok=True)
            write_json(self.out / CONFIG, self.cfg)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.args.compare_torch:
            from .compare import TorchTwin

            self.twin = TorchTwin(self.cfg, self.net, self.optimizer, self.state, self.device)
        args = self.args
        self.say = Progress(args.steps or None, self.step_count, enabled=self.main_rank and self.log,
                            seconds=60 * args.minutes if args.minutes else None)

    def resume(self) -> None:
        out = self.out
        if not (out / TRAINER).exists() or not (out / WEIGHTS).exists():
            raise RunError(f"--resume: {out} has no checkpoint yet (stopped before the first one); "
                           "use --overwrite to start over")
        load_weights(out, self.net)
        saved = torch.load(out / TRAINER, map_location="cpu", weights_only=True)
        meta_step = _weights_step(out)
        if meta_step is not None and meta_step != saved["step"]:
            raise RunError(f"{out}: {WEIGHTS} (step {meta_step}) and {TRAINER} (step {saved['step']}) disagree")
        self.optimizer.load_state_dict(saved["optimizer"])
        use_fused_adam(self.optimizer, self.device)
        self.step_count, self.chars_before = saved["step"], saved["chars"]
        if self.args.steps and self.step_count >= self.args.steps:
            raise RunError(f"{out} is already at step {self.step_count}; "
                           f"pass --steps above {self.step_count} to train on")
        torch.set_rng_state(saved["rng"][self.rank])
        self.state = (saved["h"][self.rank].to(self.device), saved["c"][self.rank].to(self.device))
        if (out / HISTORY).exists():
            self.history = json.loads((out / HISTORY).read_text())
        self.history["unigram_bpc"] = self.baseline

    # ---- one step, evaluation, checkpoint ----
    def step(self) -> tuple[float, float]:
        """One step of truncated BPTT on the next batch: (loss, seconds)."""
        t0 = time.perf_counter()
        x, y, new_epoch = self.streams.batch(self.step_count)  # (B, T), (B, T)
        if new_epoch:
            self.state = self.zero_state()
        lr = lr_at(self.cfg, self.step_count)
        optimizers = [self.optimizer] + ([self.twin.optimizer] if self.twin is not None else [])
        for group in (g for opt in optimizers for g in opt.param_groups):
            group["lr"] = lr
        loss, self.state = bptt_step(self.model, self.optimizer, x, y, self.state, self.cfg["clip"])
        loss_v = loss.item()
        seconds = time.perf_counter() - t0
        self.step_count += 1
        if self.twin is not None:  # the same step with torch.nn.LSTM, timed the same way
            self.twin.step(x, y, new_epoch, self.zero_state, loss_v, seconds)
        return loss_v, seconds

    def evaluate(self) -> float:
        return evaluate(self.net, self.eval_ids, self.T, self.B, self.device)

    def checkpoint(self, chars: int) -> None:
        # Every rank's carried state and RNG, so a resumed DDP run continues exactly.
        rngs, hs, cs = [torch.get_rng_state()], [self.state[0].cpu()], [self.state[1].cpu()]
        if self.world > 1:
            import torch.distributed as dist

            gathered = [None] * self.world
            dist.all_gather_object(gathered, (rngs[0], hs[0], cs[0]))
            rngs, hs, cs = (list(z) for z in zip(*gathered))
        if not self.main_rank:
            return
        out = self.out
        torch.save({"step": self.step_count, "chars": chars, "optimizer": self.optimizer.state_dict(),
                    "rng": rngs, "h": hs, "c": cs}, out / (TRAINER + ".tmp"))
        os.replace(out / (TRAINER + ".tmp"), out / TRAINER)
        save_weights(out, self.net, step=self.step_count)
        write_json(out / HISTORY, self.history, indent=None)
        msg = write_curve(out, self.history)
        if msg and not self.curve_warned:
            self.say.log(msg)
            self.curve_warned = True

    # ---- the loop ----
    def train(self) -> dict:
        """Train until --steps, --minutes or Ctrl-C/SIGTERM; returns the summary."""
        self.start()
        self._log_start()
        loop = _Loop(self)
        with _stop_on_signals() as stop, _threads(self.args.threads), _closing(self.say):
            self.model.train()
            if self.twin is not None:
                self.twin.train()
            while not loop.run_step(stop):
                pass
        return self._finish(loop)

    def _log_start(self) -> None:
        from ...engines import auto_engine_name

        if self.args.malloc == "kept" and keep_freed_memory():
            self.say.log(f"malloc: glibc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim "
                         f"threshold {TRIM_THRESHOLD >> 20} MiB; --malloc default leaves its setting)")

        args, cfg, net = self.args, self.cfg, self.net
        self.engine = (auto_engine_name(self.ids[:1].float().to(self.device)) if args.engine == "auto"
                       else args.engine)
        n_params = sum(p.numel() for p in net.parameters())
        self.say.log(f"lstmkit train: {len(self.text):,} chars ({len(self.train_ids):,} train, "
                     f"{len(self.val_ids):,} held out), vocab {len(cfg['vocab'])}, {n_params:,} parameters, "
                     f"engine {self.engine}, device {self.device}"
                     + (f", {self.world} processes" if self.world > 1 else ""))
        self.say.log(f"unigram baseline on the held-out text: {self.baseline:.3f} bpc")
        busy = _busy_hint(self.device, args.threads or torch.get_num_threads())
        if busy:
            self.say.log(busy)

    def _finish(self, loop: "_Loop") -> dict:
        elapsed = time.perf_counter() - loop.t_start
        why, val_bpc, out = loop.why, loop.val_bpc, self.out
        summary = {"step": self.step_count, "stopped": why, "val_bpc": val_bpc, "unigram_bpc": self.baseline,
                   "chars_per_s": (loop.chars - self.chars_before) / max(loop.train_time, 1e-9),
                   "seconds": elapsed, "engine": self.engine, "model": self.net, "out": str(out)}
        if self.twin is not None:
            summary["compare"] = self.twin.report(self.engine, self.B * self.T)
            if self.main_rank:
                write_json(out / "compare.json", {k: v for k, v in summary["compare"].items()})
                for line in summary["compare"]["lines"]:
                    self.say.log(line)
        if self.main_rank and self.say.enabled:
            self.say.log(f"{'interrupted' if why == 'interrupted' else 'done'}: step {self.step_count}, "
                         f"held-out {val_bpc:.3f} bpc (unigram {self.baseline:.3f}), {fmt_time(elapsed)}, "
                         f"checkpoint in {out}" + ("; continue with --resume" if why == "interrupted" else ""))
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
        return summary


class _Loop:
    """The bookkeeping of one session's loop: counters, the log window, when to stop."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.t_start = time.perf_counter()
        self.train_time, self.chars = 0.0, trainer.chars_before
        self.window = {"loss": 0.0, "n": 0, "chars": 0, "time": 0.0}
        self.wrapup = {"eval": 0.0, "ckpt": 0.0}  # seconds the last evaluation / checkpoint took
        history = trainer.history
        self.val_bpc = history["eval"][-1][1] if history["eval"] else None
        self.why = None
        self.fit_from = None  # (step, train_time) where --lr-decay-steps -1 starts counting the step rate
        self.start_step = trainer.step_count

    def run_step(self, stop: dict) -> bool:
        """Train one step, then log, evaluate and checkpoint when due; True when the run stops."""
        trainer = self.trainer
        loss_v, dt = trainer.step()
        step_chars = trainer.B * trainer.T * trainer.world
        self.chars += step_chars
        self.train_time += dt
        w = self.window
        w["loss"] += loss_v
        w["n"] += 1
        w["chars"] += step_chars
        w["time"] += dt
        if trainer.cfg["lr_decay_steps"] == -1:
            if trainer.step_count == FIT_AT_STEP // 5:  # the rate is counted from here
                self.fit_from = (trainer.step_count, self.train_time)
            elif trainer.step_count == FIT_AT_STEP:
                self._fit_decay_to_time()
        self.why = why = self._stop_reason(stop["why"])
        self._after_step(loss_v, why)
        return why is not None

    def _fit_decay_to_time(self) -> None:
        """--lr-decay-steps -1: decay over the steps this session's step rate fits in --minutes
        (without --minutes: constant lr). The number goes into the run's config, so a resumed
        run continues the same schedule; every rank takes rank 0's."""
        trainer, args = self.trainer, self.trainer.args
        steps = 0
        if args.minutes is not None:
            step0, time0 = self.fit_from or (self.start_step, 0.0)  # (resumed past its start: the session's steps)
            rate = (trainer.step_count - step0) / max(self.train_time - time0, 1e-9)  # steps per second
            left = 60 * args.minutes - (time.perf_counter() - self.t_start)
            steps = trainer.step_count + int(max(0.0, left) * FIT_SHARE * rate)
        if trainer.world > 1:
            import torch.distributed as dist

            n = torch.tensor([steps if trainer.main_rank else 0], device=trainer.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            steps = int(n.item())
        trainer.cfg["lr_decay_steps"] = steps
        if trainer.main_rank:
            write_json(trainer.out / CONFIG, trainer.cfg)
            trainer.say.log(f"step {trainer.step_count}: learning rate decays over {steps} steps "
                            f"(those that fit in --minutes at this rate)" if steps else
                            "no --minutes: constant learning rate")

    def _stop_reason(self, why):
        # Every rank must agree, or DDP would hang in the next all-reduce.
        trainer, args = self.trainer, self.trainer.args
        if why is None and args.steps and trainer.step_count >= args.steps:
            why = "steps"
        if why is None and args.minutes is not None:
            # The time limit includes the final evaluation and checkpoint: stop when they
            # would not fit any more (before the first evaluation, guess it from the step
            # rate: no backward pass, so about 2x the training chars/s).
            finish = self.wrapup["eval"] or len(trainer.eval_ids) / (
                2 * (self.chars - trainer.chars_before) / max(self.train_time, 1e-9))
            if time.perf_counter() - self.t_start + finish + self.wrapup["ckpt"] >= 60 * args.minutes:
                why = "time"
        if trainer.world > 1:
            import torch.distributed as dist

            code = torch.tensor([STOP_CODES[why]], device=trainer.device)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            why = {v: k for k, v in STOP_CODES.items()}[int(code.item())]
        return why

    def _after_step(self, loss_v: float, why) -> None:
        trainer, args, step, w = self.trainer, self.trainer.args, self.trainer.step_count, self.window
        cps = w["chars"] / max(w["time"], 1e-9)
        if step % 10 == 0 or why:
            trainer.history["train"].append([step, w["loss"] / w["n"] / LN2, round(cps)])
            w.update(loss=0.0, n=0, chars=0, time=0.0)
        if trainer.main_rank and (step % args.eval_every == 0 or why):
            te = time.perf_counter()
            self.val_bpc = trainer.evaluate()
            self.wrapup["eval"] = time.perf_counter() - te
            trainer.history["eval"].append([step, self.val_bpc, round(self.chars), round(self.train_time, 2)])
            trainer.say.log(f"step {step}: loss {loss_v:.3f} ({loss_v / LN2:.3f} bpc), "
                            f"held-out {self.val_bpc:.3f} bpc, "
                            f"{(self.chars - trainer.chars_before) / max(self.train_time, 1e-9):,.0f} chars/s, "
                            f"{fmt_time(time.perf_counter() - self.t_start)}")
        if step % args.ckpt_every == 0 or why:
            tc = time.perf_counter()
            trainer.checkpoint(self.chars)
            self.wrapup["ckpt"] = time.perf_counter() - tc
        vb = f"{self.val_bpc:.3f}" if self.val_bpc is not None else "-"
        trainer.say.update(step, f"loss {loss_v:.3f} bpc {loss_v / LN2:.3f} held-out {vb} {cps:,.0f} chars/s")


def _check_session_args(args, world: int) -> None:
    """The options that only concern this session (not the run's configuration)."""
    if args.compare_torch and world > 1:
        raise RunError("--compare-torch runs in a single process, not under torchrun")
    if args.steps < 0 or (args.steps == 0 and not args.minutes):
        raise RunError("--steps must be positive (0 means no limit, and then needs --minutes)")
    if args.threads < 0:
        raise RunError(f"--threads must be >= 0, got {args.threads}")
    if args.eval_every <= 0 or args.ckpt_every <= 0 or args.eval_chars < 1:
        raise RunError("--eval-every, --ckpt-every and --eval-chars must be positive")


@contextlib.contextmanager
def _stop_on_signals():
    """Ctrl-C / SIGTERM set stop["why"]: the loop finishes the step, writes a checkpoint and
    exits. A second Ctrl-C quits at once."""
    stop = {"why": None}

    def on_signal(sig, frame):
        if stop["why"] == "interrupted" and sig == signal.SIGINT:
            raise KeyboardInterrupt
        stop["why"] = "interrupted"

    old_handlers = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        yield stop
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)


# A training step allocates and frees the same big arrays at every step (activations, gradients,
# logits). glibc's default returns freed memory at the top of its heap to the system once more
# than a threshold is free, and serves blocks above another threshold by mmap: the next step's
# arrays are then fresh pages, each written first by a page fault (thousands a step; the main
# job's torch.nn.LSTM ran 24-35 thousand chars/s against 33-55 with these kept, BENCHMARKS.md).
# Fixed thresholds keep the memory in the heap (and turn off glibc's moving mmap threshold).
MMAP_THRESHOLD = 32 << 20  # glibc's largest
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (MMAP_THRESHOLD, TRIM_THRESHOLD) for the rest of the
    process; False where the C library is not glibc or refuses."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@contextlib.contextmanager
def _threads(n: int):
    """torch's CPU thread count set to n (0: unchanged) for the block."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _closing(progress: Progress):
    try:
        yield
    finally:
        progress.close()


def run(argv=None, *, log=True) -> dict:
    """Train; returns a summary dict (with the trained model under "model").
    Raises RunError for bad input."""
    return Trainer(build_parser().parse_args(argv), log=log).train()


def _busy_hint(device, threads: int) -> str | None:
    """Threads that wait on each other at every step crawl when another program holds a
    core (see BENCHMARKS.md, threads), so say so when the machine is busy."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if device.type == "cpu" and threads > 1 and load > cores:
        return (f"note: the machine is busy (load {load:.1f} on {cores} cores) and training uses {threads} threads; "
                "--threads 1 may be much faster")
    return None


def _weights_step(out: Path):
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS), framework="pt") as f:
        meta = f.metadata() or {}
    return int(meta["step"]) if "step" in meta else None


def main(argv=None) -> int:
    def body() -> int:
        summary = run(argv)
        return 130 if summary["stopped"] == "interrupted" else 0

    return run_guarded("lstmkit train", body, (RunError,))


if __name__ == "__main__":
    sys.exit(main())
