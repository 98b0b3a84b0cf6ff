"""The big matrix products around the time loops, on the micro-kernel (tile.py), the rows of the
result split over the threads: x W_ih^T before a forward loop, dx = dgates W_ih and the weight
gradients dgates^T [x | h] after a backward one.

    matmul_rows(a, b, b_transposed, threads, out=None, bias=None) -> C (M, padded G)
        C = a @ B (+ bias on every row), B = b (K, G), or b^T where b is (G, K) (b_transposed).
        a (M, K) with unit stride along one of its axes: C-contiguous, or a transposed view
        (dgates.T), read as it is (no copy). C's columns past G are padding (padded_width).

Why: the torch engine makes these with torch's GEMM, which is MKL. On a CPU that is not Intel's
MKL runs its AVX2 code (engines/numba/mkl.py): on an AMD EPYC (Zen 5) 90 GFLOP/s a core, where
the micro-kernel runs 200-230 (BENCHMARKS.md, seventeenth session). The engine asks
engines/numba/mkl.own_gemm() which one to take.

Each chunk's rows are computed by the same operations as in one call over all rows (a row's sum
runs over k in order: tile.py), so the result does not depend on the thread count.
"""
import numpy as np
from numba import njit

from . import buffers
from .rows import KW, copy_p, ptr_add, row_ptr
from .threads import run_chunks
from .tile import K_BLOCK, WHOLE_K, block_width, matmul, pack, padded_width, tiles_pass
from .tile import packed_shape as tile_packed_shape

# Rows of C a chunk starts on: whole 8-row tiles (tile.py) in every chunk but the last.
CHUNK_ROWS = 8
# Below this many multiply-adds a second thread costs more than it saves: the chunks start
# through a Python callback on each team thread (threads.run_chunks). Training at 2 threads on
# the AMD EPYC, split from 2^22 against from 2^26, vs torch.nn.LSTM: 100,1,64,128 0.90-0.96x
# against 1.00-1.02x, 1000,1,32,64 1.34-1.58x against 1.39-1.65x, 100,32,128,256 1.09x against
# 1.16x (BENCHMARKS.md, seventeenth session); the main job's weight gradients (0.7-1.1 G) split.
MIN_SPLIT_MACS = 1 << 26


# A C-contiguous `a` (x, dgates) runs matmul on blocks of rows whose part of `a` stays in L2
# (L2_ROWS_BYTES) while every column block of W reads it. matmul over a whole chunk streams the
# chunk's `a` once per column block, from L3 or memory once it outgrows L2. One thread, GFLOP/s,
# whole chunk -> blocks of 64 rows: 1280 x 8192 x 256 (hidden 2048's dx) 138-141 -> 165-182,
# 8192 x 2048 x 256 200-202 -> 239-241; the main job's products and 3200 x 4096 x 512 the same
# within noise (BENCHMARKS.md, twentieth session).
L2_ROWS_BYTES = 256 << 10
MIN_L2_ROWS = 64
MAX_L2_ROWS = 256


@njit(**KW)
def l2_rows(K, itemsize):
    """Rows of a C-contiguous `a` (K columns) in one of _rows' blocks: a multiple of 8."""
    rows = L2_ROWS_BYTES // max(1, K * itemsize) // 8 * 8
    return min(MAX_L2_ROWS, max(MIN_L2_ROWS, rows))


# A transposed view (the weight gradients' dgates^T) is read a few elements per row of dgates,
# one row per k: a row tile's whole K (matmul's order, block by block) touches K rows of
# dgates. For a chunk of many rows the product runs in passes of K_BLOCK k's instead, each
# over row blocks of ROW_BLOCK rows, and within a row block over every column block, so that
# the pass's rows of dgates stay in L2 while all column blocks read them. The weight gradients
# of hidden 1024-2048 at batch 64-128 (a chunk of 4-8 K rows) ran at 85-137 GFLOP/s a core
# with passes over the whole chunk, 170-180 in row blocks (BENCHMARKS.md, eighteenth session).
ROW_BLOCK = 256
ROW_BLOCKS_FROM_BYTES = 1 << 20
# The copy's rows are this many elements longer than a row block: k's 1,088 (float32) or 2,176
# bytes apart spread over L1's sets. The weight gradients at 64,32,256,256 (dgates' rows 4 KiB),
# dgates with rows 64 bytes longer against as they are: 1 thread 10.0-10.5 against 11.9 ms,
# 2 threads 5.5 against 7.5 (BENCHMARKS.md, twenty-third session).
PAD_ELEMENTS = 16


@njit(**KW)
def _add_bias(out, bias, r0, r1):
    """out[r0:r1, :G] += bias (G,): the input projection's bias, onto each block of rows right
    after its product, while they are in L2, on the chunk's own thread. A numpy `out += b` after
    the product read and wrote all of (M, 4H) again on one thread: 0.4 ms of the main job's 3 ms
    input projection at 2 threads (BENCHMARKS.md, twentieth session)."""
    G = bias.shape[0]
    for r in range(r0, r1):
        row = out[r]
        for j in range(G):
            row[j] += bias[j]


@njit(**KW)
def _rows(a, wp, out, bias, r0, r1):
    """out[r0:r1] = a[r0:r1] @ W, plus bias (G,) on each row where bias has columns. Every
    row's sum runs over k in order whatever the blocking: the same bits for any chunks."""
    K = a.shape[1]
    n = r1 - r0
    # Where a's k's lie a multiple of 1 KiB apart (dgates^T at hidden 64, 128, 256, ...), a row
    # tile's K_BLOCK k's fall into a few of L1's sets and evict each other at every column block:
    # the passes then copy each block to rows PAD_ELEMENTS longer first.
    crowded = K > 0 and a.strides[0] == a.itemsize and a.strides[1] % 1024 == 0
    if not crowded and (a.strides[1] == a.itemsize or K == 0
                        or n * min(K, K_BLOCK) * a.itemsize < ROW_BLOCKS_FROM_BYTES):
        step = l2_rows(K, a.itemsize)
        for m0 in range(r0, r1, step):
            m1 = min(r1, m0 + step)
            matmul(a[m0:m1], m1 - m0, wp, out[m0:m1], False, WHOLE_K)
            _add_bias(out, bias, m0, m1)
        return
    buf = np.empty((K_BLOCK if crowded else 0, ROW_BLOCK + PAD_ELEMENTS), a.dtype)
    kstride = a.strides[1] // a.itemsize
    for kb in range(0, K, K_BLOCK):  # matmul's passes over K (the same sums in the same order)
        k1 = min(K, kb + K_BLOCK)
        for m0 in range(r0, r1, ROW_BLOCK):
            m1 = min(r1, m0 + ROW_BLOCK)
            blk = a[m0:m1, kb:k1]
            if crowded:
                src = row_ptr(a, m0)
                for k in range(kb, k1):  # a[m0:m1, k], contiguous, to buf[k - kb]
                    copy_p(row_ptr(buf, k - kb), ptr_add(src, k * kstride), m1 - m0)
                blk = buf[:k1 - kb, :m1 - m0].T
            tiles_pass(blk, m1 - m0, wp[:, kb:k1], out[m0:m1], kb > 0)
    _add_bias(out, bias, r0, r1)


def row_bounds(M: int, macs: int, threads: int) -> np.ndarray:
    """The chunks' first rows and M: `threads` chunks of whole tiles, or one for a small product."""
    n = max(1, min(threads, M // CHUNK_ROWS)) if macs >= MIN_SPLIT_MACS else 1
    step = -(-M // (n * CHUNK_ROWS)) * CHUNK_ROWS
    return np.array(sorted({min(k * step, M) for k in range(n)} | {M}), np.int64)


def packed_shape(b: np.ndarray, b_transposed: bool):
    """The shape of B laid out for the micro-kernel (tile.pack)."""
    G, K = b.shape if b_transposed else b.shape[::-1]
    return tile_packed_shape(G, K, b.dtype)


def matmul_rows(a: np.ndarray, b: np.ndarray, b_transposed: bool, threads: int, out=None,
                packed=None, bias=None) -> np.ndarray:
    """C = a @ B (+ bias (G,) on every row: see the module's docstring), into `out` (M, >= padded
    G) when given. packed: where to lay B out (packed_shape, C-contiguous, on a cache line),
    else a new array."""
    wp = pack(b, b_transposed, out=packed)  # B laid out for the micro-kernel: one copy of b
    M, K = a.shape
    G = b.shape[0] if b_transposed else b.shape[1]
    if out is None:
        out = buffers.empty((M, padded_width(wp)), a.dtype)
    if bias is None:
        bias = np.empty(0, a.dtype)
    elif bias.shape != (G,) or bias.dtype != a.dtype:
        raise ValueError(f"matmul_rows: bias must be ({G},) {a.dtype}, got {bias.shape} {bias.dtype}")
    run_chunks(_rows, row_bounds(M, M * K * G, threads), a, wp, out, np.ascontiguousarray(bias))
    return out


def fits(G: int, dtype) -> bool:
    """Whether a product of G columns comes out of matmul_rows without padding (C is then the
    (M, G) array itself, no copy)."""
    return G % block_width(dtype) == 0
