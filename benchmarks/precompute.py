"""Benchmark: x W_ih^T as one GEMM before the time loop against the input in the loop (in each
step's product; for calls of 1-2 rows made ahead, lstm.lookahead_steps) at 1-4 rows a chunk
(kernels/numba/lstm.precompute_input's rule there), lstmkit.LSTM in one process, the two
forced alternately round by round, medians.

Prints GEMM-first's speed over the input in the loop for each (rows, hidden, input); the rule's choice is what
BENCHMARKS.md (twenty-first session) derives from these. Inference by default, `--train` for a
training step (forward saving, backward).

    python benchmarks/precompute.py
    python benchmarks/precompute.py --train --rows 1,2 --threads 2
"""
import argparse
import itertools
import statistics
import time

import torch

import lstmkit
import lstmkit.kernels.numba.lstm as kernels


_LOOKAHEAD_MAX_BATCH = kernels.LOOKAHEAD_MAX_BATCH


def _force(pre: bool) -> None:
    kernels._precompute_few_rows = lambda *a: pre  # noqa: E731 (the rule at 1-2 rows)
    kernels.LOOKAHEAD_MAX_BATCH = 0 if pre else _LOOKAHEAD_MAX_BATCH  # (precompute_input's; the loop's own stays)
    kernels.PRECOMPUTE_MIN_WEIGHT_BYTES = 0 if pre else 1 << 40
    kernels.weights_stay_in_l2 = lambda nbytes, rows: not pre  # noqa: E731 (the L2 rule)
    kernels.PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW = 0 if pre else 1 << 40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", default="1,2,4")
    ap.add_argument("--hidden", default="32,64,128")
    ap.add_argument("--input", default="32,64,128,256")
    ap.add_argument("--rounds", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = [[int(v) for v in s.split(",")] for s in (args.rows, args.hidden, args.input)]
    for N, H, I in itertools.product(*grid):
        m = lstmkit.LSTM(I, H)
        x = torch.randn(args.steps, N, I, requires_grad=args.train)

        def call(pre: bool) -> float:
            _force(pre)
            t0 = time.perf_counter()
            for _ in range(5):
                if args.train:
                    y, _ = m(x)
                    y.sum().backward()
                else:
                    with torch.no_grad():
                        m(x)
            return (time.perf_counter() - t0) / 5

        times = {False: [], True: []}
        for r in range(args.rounds):
            for pre in ((False, True), (True, False))[r % 2]:
                times[pre].append(call(pre))
        loop, first = (statistics.median(times[k]) * 1e6 for k in (False, True))
        print(f"rows {N} hidden {H:4d} input {I:4d}: in the loop {loop:8.1f} us, GEMM first {first:8.1f} us, "
              f"GEMM first's speed {loop / first:.2f}x", flush=True)


if __name__ == "__main__":
    main()
