"""Benchmark: one per-step product of the time loop, the kernels' micro-kernel (tile.matmul)
against Intel MKL's packed GEMM (the one engines/numba/mkl.py hands the kernels), float32.

For each shape (rows, K, G): out = a (rows, K) @ W (K, G), W laid out once for each, then
timed in one process, the two interleaved round by round; medians. Prints GFLOP/s of each and
whether mkl.use() sends that product to MKL (the thresholds these numbers set).

    python benchmarks/products.py                  # the shapes of BENCHMARKS.md, 1 thread
    python benchmarks/products.py --threads 2
"""
import argparse
import ctypes
import time

import numpy as np
import torch
from numba import njit

from lstmkit.engines.numba import mkl
from lstmkit.kernels.numba import tile
from lstmkit.kernels.numba.rows import KW

SHAPES = [(32, 384, 1024), (16, 320, 1024), (16, 256, 1024), (16, 128, 256), (8, 192, 512), (1, 192, 512),
          (64, 1536, 4096), (64, 4096, 1024)]


@njit(**KW)
def _tile_reps(a, n, wp, out, reps):
    for _ in range(reps):
        tile.matmul(a, n, wp, out, False, tile.WHOLE_K)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if mkl._find() is None:
        raise SystemExit("torch's library exports no MKL packed GEMM here")
    i, p = ctypes.c_int, ctypes.c_void_p
    compute = ctypes.CFUNCTYPE(None, i, i, i, i, i, i, p, i, p, i, ctypes.c_float, p, i)(mkl._find()[0])
    rng = np.random.default_rng(0)
    print(f"# one step product, float32, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
    print("| rows, K, G | micro-kernel GFLOP/s | MKL packed GFLOP/s | mkl.use |")
    print("|---|---:|---:|---|")
    for rows, K, G in SHAPES:
        a = rng.standard_normal((rows, K)).astype(np.float32)
        w = rng.standard_normal((G, K)).astype(np.float32)  # torch's layout: the product is a @ w.T
        wp = tile.pack(w, True)
        out_t = np.empty((rows, tile.padded_width(wp)), np.float32)
        _, packed = mkl.pack(w, True, rows)
        out_m = np.empty((rows, G), np.float32)
        reps = max(1, int(3e7 / (rows * K * G)))

        def by_mkl():
            for _ in range(reps):
                compute(101, 111, 151, rows, G, K, a.ctypes.data, K, packed.ctypes.data, G, 0.0, out_m.ctypes.data, G)

        by_mkl()
        _tile_reps(a, rows, wp, out_t, 1)
        assert np.allclose(out_m, out_t[:, :G], rtol=1e-4, atol=1e-3)
        times = {"tile": [], "mkl": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            _tile_reps(a, rows, wp, out_t, reps)
            times["tile"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            by_mkl()
            times["mkl"].append(time.perf_counter() - t0)
        gf = {k: 2 * rows * K * G * reps / np.median(v) / 1e9 for k, v in times.items()}
        print(f"| {rows}, {K}, {G} | {gf['tile']:.0f} | {gf['mkl']:.0f} | {mkl.use(K, G, rows, np.float32)} |")


if __name__ == "__main__":
    main()
