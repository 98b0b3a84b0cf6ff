"""Benchmark: a grid of batch sizes x hidden sizes, lstmkit.LSTM against torch.nn.LSTM, inference
(under no_grad) and one training step (forward, y.sum().backward()), float32, on CPU.

The bench's cases (`lstmkit bench`) are a handful of shapes; this grid looks for the shapes in
between where lstmkit runs slower than torch.nn.LSTM (marked `<<`). Each shape: the four
contenders interleaved round by round in one process, medians (lstmkit.cli.bench.compare).
Input 64 up to hidden 128, else 128; T = 100, or 50 from hidden 512.

    python benchmarks/sweep.py --threads 1
    python benchmarks/sweep.py --threads 2 --batches 3,4,6 --hidden 128,256 --rounds 15
"""
import argparse

import torch

import lstmkit
from lstmkit.cli.bench import compare


def shape_for(H: int):
    """(T, input size) of the grid's shapes at hidden H."""
    return (100 if H <= 256 else 50), (64 if H <= 128 else 128)


def one_shape(T: int, N: int, I: int, H: int, rounds: int):
    """(inference, training) speedups of lstmkit over torch.nn.LSTM at this shape."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H)
    ours = lstmkit.LSTM.from_torch(ref)
    x = torch.randn(T, N, I)
    xg = x.clone().requires_grad_(True)

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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for H in (int(h) for h in args.hidden.split(",")):
        T, I = shape_for(H)
        for N in (int(n) for n in args.batches.split(",")):
            fwd, train = one_shape(T, N, I, H, args.rounds)
            flag = "  <<" if min(fwd, train) < 1 else ""
            print(f"threads {args.threads}  T={T} N={N} I={I} H={H}:  forward {fwd:.2f}x  training {train:.2f}x{flag}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
