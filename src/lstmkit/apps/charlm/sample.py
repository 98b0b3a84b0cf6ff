"""`lstmkit sample DIR`: generate text from a trained char-LM, one character at a time.

Streaming: the prime is read once, then every new character is a single LSTM step
(T=1) from the carried (h, c), so each character costs the same however long the
text grows. Characters are printed as they are made.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ...cli import run_guarded
from ...config import ENGINE_NAMES
from .model import RunError, encode, load_model


def build_parser(prog="lstmkit sample") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate text from a model trained by `lstmkit train`.")
    p.add_argument("dir", metavar="DIR", help="run directory written by `lstmkit train`")
    p.add_argument("--length", type=int, default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature: <1 safer, >1 wilder, 0 always the likeliest (default 0.8)")
    p.add_argument("--prime", default=None, help="text to start from (default: a newline, if in the vocabulary)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    p.add_argument("--engine", default="auto", choices=ENGINE_NAMES)
    return p


def generate(model, vocab: list[str], length: int, temperature: float = 0.8, prime: str | None = None,
             seed: int | None = None, emit=None) -> str:
    """Sample `length` characters after `prime`; emit(ch) is called on each as it is made."""
    if length < 0:
        raise RunError(f"--length must be >= 0, got {length}")
    if temperature < 0:
        raise RunError(f"--temperature must be >= 0, got {temperature}")
    if prime is None or prime == "":
        prime = "\n" if "\n" in vocab else vocab[0]
    ids = encode(prime, vocab)  # (n,)  RunError on unknown characters
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dev = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        # The prime in one call: (1, n) -> logits of its last position and the state after it.
        logits, state = model(ids.view(1, -1).to(dev))  # (1, n, V)
        logits = logits[0, -1]  # (V,)
        for _ in range(length):
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            ch = vocab[nxt]
            out.append(ch)
            if emit is not None:
                emit(ch)
            # One step: (1, 1) id -> (1, 1, V) logits, state carried.
            logits, state = model(torch.tensor([[nxt]], device=dev), state)
            logits = logits[0, 0]
    return "".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded("lstmkit sample", lambda: run(args), (RunError,))


def run(args) -> int:
    model, cfg = load_model(args.dir, engine=args.engine)
    prime = args.prime
    if prime:
        sys.stdout.write(prime)

    def emit(ch):
        sys.stdout.write(ch)
        sys.stdout.flush()

    generate(model, cfg["vocab"], args.length, args.temperature, prime, args.seed, emit=emit)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
