"""Benchmark: the step product (kernels/numba/tile.matmul) by row count, one thread, float32.

For each W (K x G, laid out once) and each number of rows n, the time of out[:n] = a[:n] @ W in
a compiled loop (the block order flipping every call, as the time loops do), best of 5. Every
row is also checked bitwise against the same row alone. The table in BENCHMARKS.md (twenty-first
session) compares these times before and after the 1-3 rows past the tiles became tiles of
their own: run it from a `git worktree` of each commit.

    python benchmarks/tile_rows.py
    python benchmarks/tile_rows.py --rows 1,2,3,4,5,6 --shapes 192x512,640x2048
"""
import argparse
import time

import numpy as np
from numba import njit

from lstmkit.kernels.numba.rows import KW
from lstmkit.kernels.numba.tile import WHOLE_K, matmul, pack, padded_width


@njit(**KW)
def _reps(a, n, wp, out, reps):
    for i in range(reps):
        matmul(a, n, wp, out, (i & 1) == 1, WHOLE_K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8,9,10,11,12,16,19")
    ap.add_argument("--shapes", default="96x256,192x512,300x200,640x2048", help="K x G, comma-separated")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        K, G = map(int, shape.split("x"))
        wp = pack(rng.random((G, K), np.float32), True)
        line = f"K={K} G={G}:"
        for n in map(int, args.rows.split(",")):
            a = rng.random((n, K), np.float32)
            out = np.zeros((n, padded_width(wp)), np.float32)
            reps = max(5, int(2e6 // (K * G)))
            _reps(a, n, wp, out, 2)
            best = min(_timed(a, n, wp, out, reps) for _ in range(5))
            for i in range(n):
                alone = np.zeros((1, out.shape[1]), np.float32)
                _reps(np.ascontiguousarray(a[i : i + 1]), 1, wp, alone, 1)
                assert np.array_equal(alone[0], out[i]), (K, G, n, i)
            line += f"  {n}: {best:.2f}"
        print(line + "  (us a product)", flush=True)


def _timed(a, n, wp, out, reps) -> float:
    t0 = time.perf_counter()
    _reps(a, n, wp, out, reps)
    return (time.perf_counter() - t0) / reps * 1e6


if __name__ == "__main__":
    main()
