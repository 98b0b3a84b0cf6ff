"""Benchmark: a grid of batch sizes x hidden sizes, lstmkit.LSTM against torch.nn.LSTM, inference
(under no_grad) and one training step (forward, y.sum().backward()), float32, on CPU.

The bench's cases (`lstmkit bench`) are a handful of shapes; this grid looks for the shapes in
between where lstmkit runs slower than torch.nn.LSTM (marked `<<`). Each shape: the four
contenders interleaved round by round in one process, medians (lstmkit.cli.bench.compare).
Input 64 up to hidden 128, else 128; T = 100, or 50 from hidden 512.

    python benchmarks/sweep.py --threads 1
    python benchmarks/sweep.py --threads 2 --batches 3,4,6 --hidden 128,256 --rounds 15
    python benchmarks/sweep.py --steps 20 --input 256 --hidden 1024 --batches 5,6,7

--data-input trains on an input without requires_grad (the first layer of most models);
--frozen trains with the LSTM's parameters frozen (gradients for the input only). To compare
two versions of lstmkit, run the same command from a `git worktree` of each (PYTHONPATH=its
src), alternating: each run's ratios are against torch.nn.LSTM in that same run.
"""
import argparse

import torch

import lstmkit
from lstmkit.cli.bench import compare


def shape_for(H: int):
    """(T, input size) of the grid's shapes at hidden H."""
    return (100 if H <= 256 else 50), (64 if H <= 128 else 128)


def one_shape(T: int, N: int, I: int, H: int, rounds: int, data_input: bool = False, frozen: bool = False):
    """(inference, training) speedups of lstmkit over torch.nn.LSTM at this shape; training on an
    input without requires_grad (data_input) or with the LSTMs' parameters frozen."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H).requires_grad_(not frozen)
    ours = lstmkit.LSTM.from_torch(ref).requires_grad_(not frozen)
    x = torch.randn(T, N, I)
    xg = x.clone().requires_grad_(not data_input)

    def infer(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    def train(m):
        def f():
            y, _ = m(xg)
            y.sum().backward()
        return f

    t = compare({"ours_inf": infer(ours), "torch_inf": infer(ref), "ours_train": train(ours),
                 "torch_train": train(ref)}, 0.02, rounds)
    return t["torch_inf"] / t["ours_inf"], t["torch_train"] / t["ours_train"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,2,3,4,6,8,12,16,24,32,64")
    ap.add_argument("--hidden", default="64,128,256,512")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, help="T for every shape (default: shape_for's)")
    ap.add_argument("--input", type=int, help="input size for every shape (default: shape_for's)")
    grads = ap.add_mutually_exclusive_group()
    grads.add_argument("--data-input", action="store_true", help="train on an input without requires_grad")
    grads.add_argument("--frozen", action="store_true", help="train with the LSTM's parameters frozen")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for H in (int(h) for h in args.hidden.split(",")):
        T, I = shape_for(H)
        T, I = args.steps or T, args.input or I
        for N in (int(n) for n in args.batches.split(",")):
            fwd, train = one_shape(T, N, I, H, args.rounds, args.data_input, args.frozen)
            flag = "  <<" if min(fwd, train) < 1 else ""
            print(f"threads {args.threads}  T={T} N={N} I={I} H={H}:  forward {fwd:.2f}x  training {train:.2f}x{flag}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
