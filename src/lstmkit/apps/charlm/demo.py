"""`lstmkit demo`: the embedded default. Trains a char-LM on the Python standard
library's own .py sources (there with every Python install: no download), for about
5 minutes, then prints samples and the held-out bits per character next to a
unigram baseline. Everything goes to ./lstmkit-demo/.
"""
from __future__ import annotations

import argparse
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

from ...cli import run_guarded
from ...config import ENGINE_NAMES
from . import train
from .model import CONFIG, RunError, read_config, write_json
from .sample import generate

# Sized for 5 minutes on 2 CPU cores (a few thousand steps): a 2-layer LSTM of 256. Side by
# side with 192 it learned enough more per step to pay for its slower steps.
# A high Adam learning rate because there are only a few thousand steps, decayed (cosine) over
# the steps that fit in the time budget: at a constant rate the held-out loss swung by +-0.07
# bpc from one evaluation to the next, and the end of the run landed anywhere in that range.
MODEL = ["--hidden-size", "256", "--num-layers", "2", "--embed-size", "64",
         "--seq-len", "64", "--batch-size", "32", "--lr", "3e-3", "--lr-decay-steps", "-1", "--clip", "1.0",
         "--seed", "0"]
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
PRIMES = [("def ", 0.5), ("class ", 0.8), ("import ", 1.0)]


def stdlib_sources() -> list[Path]:
    """The standard library's .py files, without site-packages and the test suites
    (tests are most of the bytes but mostly one long style of code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if not SKIP_DIRS & set(p.relative_to(root).parts)]
    return files


def build_corpus(path: Path, seed: int = 0) -> int:
    """stdlib sources concatenated in a fixed shuffled order, so the held-out tail is a
    random sample of modules rather than the last few alphabetically."""
    files = stdlib_sources()
    random.Random(seed).shuffle(files)
    parts = []
    for p in files:
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately in other encodings
    if not parts:
        raise RunError(f"no readable .py files under {sysconfig.get_paths()['stdlib']}")
    text = "\n".join(parts)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return len(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lstmkit demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="time budget for the whole demo (default 5)")
    p.add_argument("--steps", type=int, default=0, help="also stop training after this many steps")
    p.add_argument("--out", default="lstmkit-demo", help="where everything goes (default ./lstmkit-demo)")
    p.add_argument("--engine", default="auto", choices=ENGINE_NAMES)
    p.add_argument("--compare-torch", action="store_true", help="also time torch.nn.LSTM on the same steps")
    # torch's thread count by default: the engine's big per-step GEMMs run in torch's own pool,
    # so on a quiet machine more threads train faster (BENCHMARKS.md, "Threads under load").
    # On a machine busy with other work, --threads 1 avoids threads that wait for a
    # descheduled partner at every time step.
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's default)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    return run_guarded("lstmkit demo", lambda: run(args, t0), (RunError,))


def run(args, t0: float) -> int:
    """Build the corpus, train, sample, write the summary; t0: when the command started."""
    out = Path(args.out)
    if args.minutes <= 0 or args.steps < 0:
        raise RunError("--minutes must be positive and --steps >= 0")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot write to {out}: {e.strerror or e}") from None
    corpus = out / "stdlib.txt"
    flags = _train_flags(args, corpus, out / "run")
    n_files = build_corpus(corpus)
    print(f"lstmkit demo: {n_files} standard-library modules -> {corpus}", file=sys.stderr)
    # Training's limit covers its final evaluation and checkpoint; keep ~15 s for the samples
    # and the start-up before t0 (importing torch).
    train_minutes = max(0.1, args.minutes - (time.perf_counter() - t0) / 60 - 15 / 60)
    summary = train.run(flags + ["--minutes", f"{train_minutes:.3f}"])

    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = _print_samples(summary["model"], read_config(out / "run")["vocab"])
    torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - t0
    result = {
        "held_out_bpc": summary["val_bpc"], "unigram_bpc": summary["unigram_bpc"],
        "steps": summary["step"], "train_chars_per_s": summary["chars_per_s"],
        "seconds_total": elapsed, "seconds_training": summary["seconds"], "engine": summary["engine"],
        "files": n_files, "threads": args.threads or threads_before,
    }
    if "compare" in summary:
        result["compare"] = {k: v for k, v in summary["compare"].items() if k != "lines"}
    write_json(out / "summary.json", result)
    (out / "samples.txt").write_text(
        "\n\n".join(f"--- prime {s['prime']!r}, temperature {s['temperature']} ---\n{s['text']}"
                    for s in samples) + "\n", encoding="utf-8")
    print("\n")
    print(f"held-out: {summary['val_bpc']:.3f} bits/char   unigram baseline: {summary['unigram_bpc']:.3f}"
          f"   ({summary['step']} steps, {summary['chars_per_s']:,.0f} chars/s, engine {summary['engine']}, "
          f"{train.fmt_time(elapsed)} in all)")
    print(f"written to {out}/: run/ (checkpoint, loss.png), samples.txt, summary.json. "
          f"More text: lstmkit sample {out / 'run'} --length 1000")
    return 0


def _train_flags(args, corpus: Path, run_dir: Path) -> list[str]:
    """`lstmkit train`'s arguments for the demo (without --minutes)."""
    flags = ["--text", str(corpus), "--out", str(run_dir), "--engine", args.engine,
             "--threads", str(args.threads), "--steps", str(args.steps),
             "--eval-every", "250", "--ckpt-every", "250", "--eval-chars", "100000"] + MODEL
    if (run_dir / CONFIG).exists():
        # Rerunning the demo starts over, but never over a different configuration.
        flags.append("--overwrite")
        if _differs(run_dir, flags):
            raise RunError(f"{run_dir} holds a run with another configuration; "
                           f"remove it or pass --out elsewhere")
    if args.compare_torch:
        flags.append("--compare-torch")
    return flags


def _print_samples(model, vocab: list[str]) -> list[dict]:
    samples = []
    for k, (prime, temp) in enumerate(PRIMES):
        print(f"\n--- sample (prime {prime!r}, temperature {temp}) ---")
        sys.stdout.write(prime)
        # A newline first, unprinted: the prime then starts a line, as code does.
        text = generate(model, vocab, 300, temp, "\n" + prime, seed=k, emit=_emit)
        samples.append({"prime": prime, "temperature": temp, "text": prime + text})
    return samples


def _emit(ch: str) -> None:
    sys.stdout.write(ch)
    sys.stdout.flush()


def _differs(run_dir: Path, flags: list[str]) -> bool:
    """Would these flags make a run with another configuration than the one in run_dir?"""
    old = read_config(run_dir)
    args = train.build_parser().parse_args(flags)
    fitted = lambda k, v: k == "lr_decay_steps" and v == -1  # noqa: E731 -- the run stored the number it fitted
    return any(old.get(k) != v and not fitted(k, v) for k in train.DEFAULTS if (v := getattr(args, k)) is not None)


if __name__ == "__main__":
    sys.exit(main())
