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
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...config import ENGINE_NAMES
from .model import (
    CONFIG, CURVE, HISTORY, LN2, TRAINER, WEIGHTS, CharLM, RunError, build_vocab, encode,
    load_weights, model_from_config, read_config, read_text, save_weights, text_fingerprint,
    unigram_bpc, write_json,
)

# Built-in defaults. Options default to None so that `--resume` can tell "not given"
# (take the run's value) from "given" (must agree with the run).
DEFAULTS = dict(embed_size=64, hidden_size=256, num_layers=2, dropout=0.0, seq_len=64,
                batch_size=32, lr=2e-3, clip=1.0, seed=0, val_frac=0.05)
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


# ---- the training loop ----------------------------------------------------------------------
def run(argv=None, *, log=True) -> dict:
    """Train; returns a summary dict (with the trained model under "model").
    Raises RunError for bad input."""
    args = build_parser().parse_args(argv)
    rank, world, local_rank = dist_env()
    main_rank = rank == 0
    out = Path(args.out)
    cfg, text, _ = resolve_config(args, rank, world)
    if args.compare_torch and world > 1:
        raise RunError("--compare-torch runs in a single process, not under torchrun")
    if args.steps < 0 or (args.steps == 0 and not args.minutes):
        raise RunError("--steps must be positive (0 means no limit, and then needs --minutes)")
    device = pick_device(args.device, world, local_rank)
    if args.threads < 0:
        raise RunError(f"--threads must be >= 0, got {args.threads}")
    if args.eval_every <= 0 or args.ckpt_every <= 0 or args.eval_chars < 1:
        raise RunError("--eval-every, --ckpt-every and --eval-chars must be positive")

    # Split before the vocabulary is used: the held-out text is the end of the text.
    ids = encode(text, cfg["vocab"])
    n_val = max(2, int(len(ids) * cfg["val_frac"]))
    train_ids, val_ids = ids[:-n_val], ids[-n_val:]
    eval_ids = val_ids[: args.eval_chars + 1]
    streams = Streams(train_ids.to(device), cfg["batch_size"], cfg["seq_len"], rank, world)
    baseline = unigram_bpc(train_ids, eval_ids[1:], len(cfg["vocab"]))

    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    # Same seed everywhere: identical initial weights on every rank (DDP also broadcasts).
    torch.manual_seed(cfg["seed"])
    model = model_from_config(cfg, engine=args.engine).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    torch.manual_seed(cfg["seed"] + 1 + rank)  # dropout masks differ across ranks

    V, B, T, L, H = len(cfg["vocab"]), cfg["batch_size"], cfg["seq_len"], cfg["num_layers"], cfg["hidden_size"]
    zeros = lambda: (torch.zeros(L, B, H, device=device), torch.zeros(L, B, H, device=device))  # noqa: E731
    state = zeros()
    step, chars_before = 0, 0
    history = {"train": [], "eval": [], "unigram_bpc": baseline}

    if args.resume:
        if not (out / TRAINER).exists() or not (out / WEIGHTS).exists():
            raise RunError(f"--resume: {out} has no checkpoint yet (stopped before the first one); "
                           "use --overwrite to start over")
        load_weights(out, model)
        tr = torch.load(out / TRAINER, map_location="cpu", weights_only=True)
        meta_step = _weights_step(out)
        if meta_step is not None and meta_step != tr["step"]:
            raise RunError(f"{out}: {WEIGHTS} (step {meta_step}) and {TRAINER} (step {tr['step']}) disagree")
        opt.load_state_dict(tr["optimizer"])
        step, chars_before = tr["step"], tr["chars"]
        if args.steps and step >= args.steps:
            raise RunError(f"{out} is already at step {step}; pass --steps above {step} to train on")
        torch.set_rng_state(tr["rng"][rank])
        state = (tr["h"][rank].to(device), tr["c"][rank].to(device))
        if (out / HISTORY).exists():
            history = json.loads((out / HISTORY).read_text())
        history["unigram_bpc"] = baseline
    elif main_rank:
        for name in (WEIGHTS, TRAINER, HISTORY, CURVE):  # --overwrite: only our own files
            (out / name).unlink(missing_ok=True)
        write_json(out / CONFIG, cfg)

    net = model  # the plain module: evaluation, checkpoints
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    twin = None
    if args.compare_torch:  # the same model and optimizer state with torch.nn.LSTM inside
        twin = model_from_config(cfg, lstm_cls=torch.nn.LSTM).to(device)
        twin.load_state_dict(net.state_dict())
        twin_opt = torch.optim.Adam(twin.parameters(), lr=cfg["lr"])
        twin_opt.load_state_dict(opt.state_dict())
        twin_state = tuple(s.clone() for s in state)
        times = {"lstmkit": [], "torch": []}
        last = {"lstmkit": float("nan"), "torch": float("nan")}

    from ...engines import auto_engine_name

    engine = auto_engine_name(ids[:1].float().to(device)) if args.engine == "auto" else args.engine
    say = Progress(args.steps or None, step, enabled=main_rank and log,
                   seconds=60 * args.minutes if args.minutes else None)
    n_params = sum(p.numel() for p in net.parameters())
    say.log(f"lstmkit train: {len(text):,} chars ({len(train_ids):,} train, {len(val_ids):,} held out), "
            f"vocab {V}, {n_params:,} parameters, engine {engine}, device {device}"
            + (f", {world} processes" if world > 1 else ""))
    say.log(f"unigram baseline on the held-out text: {baseline:.3f} bpc")
    busy = _busy_hint(device, args.threads or torch.get_num_threads())
    if busy:
        say.log(busy)

    # Ctrl-C / SIGTERM: finish the step, write a checkpoint, exit. A second Ctrl-C quits now.
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

    def checkpoint():
        # Every rank's carried state and RNG, so a resumed DDP run continues exactly.
        rngs, hs, cs = [torch.get_rng_state()], [state[0].cpu()], [state[1].cpu()]
        if world > 1:
            import torch.distributed as dist

            gathered = [None] * world
            dist.all_gather_object(gathered, (rngs[0], hs[0], cs[0]))
            rngs, hs, cs = (list(z) for z in zip(*gathered))
        if not main_rank:
            return
        torch.save({"step": step, "chars": chars, "optimizer": opt.state_dict(), "rng": rngs,
                    "h": hs, "c": cs}, out / (TRAINER + ".tmp"))
        os.replace(out / (TRAINER + ".tmp"), out / TRAINER)
        save_weights(out, net, step=step)
        write_json(out / HISTORY, history, indent=None)
        msg = write_curve(out, history)
        if msg and not warned["curve"]:
            say.log(msg)
            warned["curve"] = True

    warned = {"curve": False}
    wrapup = {"eval": 0.0, "ckpt": 0.0}  # seconds the last evaluation / checkpoint took
    t_start = time.perf_counter()
    train_time, chars = 0.0, chars_before
    window = {"loss": 0.0, "n": 0, "chars": 0, "time": 0.0}
    val_bpc = history["eval"][-1][1] if history["eval"] else None

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model.train()
        if twin is not None:
            twin.train()
        while True:
            # ---- one step of truncated BPTT ----
            t0 = time.perf_counter()
            x, y, new_epoch = streams.batch(step)  # (B, T), (B, T)
            if new_epoch:
                state = zeros()
            logits, state = model(x, state)  # (B, T, V)
            state = (state[0].detach(), state[1].detach())  # carry the state, not the graph
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
            opt.step()
            loss_v = loss.item()
            dt = time.perf_counter() - t0
            step += 1
            chars += B * T * world
            train_time += dt
            window["loss"] += loss_v
            window["n"] += 1
            window["chars"] += B * T * world
            window["time"] += dt

            if twin is not None:  # the same step with torch.nn.LSTM, timed the same way
                t1 = time.perf_counter()
                if new_epoch:
                    twin_state = zeros()
                tl, twin_state = twin(x, twin_state)
                twin_state = (twin_state[0].detach(), twin_state[1].detach())
                tloss = F.cross_entropy(tl.flatten(0, 1), y.flatten())
                twin_opt.zero_grad(set_to_none=True)
                tloss.backward()
                torch.nn.utils.clip_grad_norm_(twin.parameters(), cfg["clip"])
                twin_opt.step()
                last["torch"], last["lstmkit"] = tloss.item(), loss_v
                times["torch"].append(time.perf_counter() - t1)
                times["lstmkit"].append(dt)

            # ---- stop? (every rank must agree, or DDP would hang in the next all-reduce) ----
            why = stop["why"]
            if why is None and args.steps and step >= args.steps:
                why = "steps"
            if why is None and args.minutes is not None:
                # The time limit includes the final evaluation and checkpoint: stop when they
                # would not fit any more (before the first evaluation, guess it from the step
                # rate: no backward pass, so about 2x the training chars/s).
                finish = wrapup["eval"] or len(eval_ids) / (2 * (chars - chars_before) / max(train_time, 1e-9))
                if time.perf_counter() - t_start + finish + wrapup["ckpt"] >= 60 * args.minutes:
                    why = "time"
            if world > 1:
                import torch.distributed as dist

                code = torch.tensor([{None: 0, "steps": 1, "time": 2, "interrupted": 3}[why]], device=device)
                dist.all_reduce(code, op=dist.ReduceOp.MAX)
                why = {0: None, 1: "steps", 2: "time", 3: "interrupted"}[int(code.item())]

            # ---- log, evaluate, checkpoint ----
            cps = window["chars"] / max(window["time"], 1e-9)
            if step % 10 == 0 or why:
                history["train"].append([step, window["loss"] / window["n"] / LN2, round(cps)])
                window.update(loss=0.0, n=0, chars=0, time=0.0)
            if main_rank and (step % args.eval_every == 0 or why):
                te = time.perf_counter()
                val_bpc = evaluate(net, eval_ids, T, B, device)
                wrapup["eval"] = time.perf_counter() - te
                history["eval"].append([step, val_bpc, round(chars), round(train_time, 2)])
                say.log(f"step {step}: loss {loss_v:.3f} ({loss_v / LN2:.3f} bpc), held-out {val_bpc:.3f} bpc, "
                        f"{(chars - chars_before) / max(train_time, 1e-9):,.0f} chars/s, "
                        f"{fmt_time(time.perf_counter() - t_start)}")
            if step % args.ckpt_every == 0 or why:
                tc = time.perf_counter()
                checkpoint()
                wrapup["ckpt"] = time.perf_counter() - tc
            vb = f"{val_bpc:.3f}" if val_bpc is not None else "-"
            say.update(step, f"loss {loss_v:.3f} bpc {loss_v / LN2:.3f} held-out {vb} {cps:,.0f} chars/s")
            if why:
                break

    finally:
        torch.set_num_threads(threads_before)
        say.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    elapsed = time.perf_counter() - t_start
    session_chars = chars - chars_before
    summary = {"step": step, "stopped": why, "val_bpc": val_bpc, "unigram_bpc": baseline,
               "chars_per_s": session_chars / max(train_time, 1e-9), "seconds": elapsed,
               "engine": engine, "model": net, "out": str(out)}
    if twin is not None:
        summary["compare"] = _compare_report(times, last, engine, B * T)
        if main_rank:
            write_json(out / "compare.json", {k: v for k, v in summary["compare"].items()})
            for line in summary["compare"]["lines"]:
                say.log(line)
    if main_rank and log:
        say.log(f"{'interrupted' if why == 'interrupted' else 'done'}: step {step}, held-out {val_bpc:.3f} bpc "
                f"(unigram {baseline:.3f}), {fmt_time(elapsed)}, checkpoint in {out}"
                + ("; continue with --resume" if why == "interrupted" else ""))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return summary


def _busy_hint(device, threads: int) -> str | None:
    """Threads that wait on each other at every step crawl when another program holds a
    core (measured: 8-17x slower with 2 threads than with 1 on a loaded 2-core machine)."""
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


def _compare_report(times: dict, last: dict, engine: str, chars_per_step: int) -> dict:
    # Medians over the steps after a short warm-up: robust to a noisy, shared machine.
    skip = min(3, max(0, len(times["lstmkit"]) - 1))
    med = {k: statistics.median(v[skip:]) for k, v in times.items()}
    cps = {k: chars_per_step / v for k, v in med.items()}
    ratio = cps["lstmkit"] / cps["torch"]
    lines = [
        f"throughput (median of {len(times['lstmkit']) - skip} interleaved steps): "
        f"lstmkit.LSTM [{engine}] {cps['lstmkit']:,.0f} chars/s, torch.nn.LSTM {cps['torch']:,.0f} chars/s "
        f"-> lstmkit is {ratio:.2f}x torch",
        f"final train loss: lstmkit {last['lstmkit']:.4f}, torch.nn.LSTM {last['torch']:.4f}",
    ]
    return {"engine": engine, "lstmkit_chars_per_s": cps["lstmkit"], "torch_chars_per_s": cps["torch"],
            "ratio": ratio, "steps": len(times["lstmkit"]) - skip, "loss_lstmkit": last["lstmkit"],
            "loss_torch": last["torch"], "lines": lines}


def main(argv=None) -> int:
    try:
        summary = run(argv)
    except RunError as e:
        print(f"lstmkit train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lstmkit train: interrupted", file=sys.stderr)
        return 130
    return 130 if summary["stopped"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
