"""The forward time loop with the hidden units split over threads: batch 1 on several cores.

lstm.py splits a call's batch rows over threads; a single sequence has one row, and its step
is a matrix-vector product that reads every weight once per step: bound by how fast one core
reads the weights from its cache, not by arithmetic. Here each of S parts owns a slice of
the hidden units and the columns of [W_ih | W_hh]^T that make them (its units' i, f, g and o
rows), so each core reads only its part of the weights (which then fit in its own L2), and:

    per step t, every thread, for each of its parts s (units u_s : u_{s+1}):
        q_s = [x_t | h_{t-1}] @ W_s                     (n, 4 H_s)   all of h_{t-1}, own columns
        c_t, h_t of units u_s : u_{s+1}                 the gate pass, lstm.gate_row
    barrier: h_t complete before any thread starts step t + 1

h lives in two buffers, h_{t-1} read from one and h_t written to the other, so one barrier
per step is enough: a buffer is written again only two steps later, after every thread has
passed the barrier that ends the step reading it. Inference only (no saved activations), no
projection (h_t would need all units before its product: a second barrier per step).

A unit's pre-activation is the same chain of multiply-adds over k, in the same order, as in
lstm.py's row kernel (tile.py: each output column is its own chain), the input part made ahead
at 1-2 rows as there too (lookahead_steps), so the results are bitwise those of forward_chunk.
"""
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blas import PAD_ROWS, gemm_packed, gemm_packed_a, pack_a, pack_b, packed_a, padded_rows, transpose_rows
from .caches import l2_bytes
from .lstm import (KW, LOOKAHEAD_ROWS, add_into, copy_into, gate_backward_row, gate_row, input_part, lookahead_steps,
                   offsets, rows_ahead)
from .rows import copy_p, ptr_add, row_ptr
from .simd import LANES
from .team import on_team, spec, team_bodies, unpack, whole_team
from .threads import run_jobs
from .tile import WHOLE_K, aligned_empty, block_width, matmul, padded_width

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


# ---- a spinning barrier (int64 atomics; nothing in Numba itself) ---------------------------------
def _element_pointer(context, builder, arr_ty, arr, index):
    array = context.make_array(arr_ty)(context, builder, arr)
    return builder.gep(array.data, [index])


@intrinsic
def _fetch_add(typingctx, arr, index, value):
    """arr[index] += value atomically (sequentially consistent); returns the old value."""

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return types.int64(arr, index, value), codegen


@intrinsic
def _load_acquire(typingctx, arr, index):
    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, index), codegen


@intrinsic
def _store_release(typingctx, arr, index, value):
    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(arr, index, value), codegen


@intrinsic
def _spin_pause(typingctx):
    """x86's PAUSE: a spinning core yields its pipeline to its hyperthread sibling."""

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


COUNT, GENERATION = 0, 8  # sync's two words, a cache line apart


@njit(**KW)
def barrier(sync, threads, generation):
    """Wait until all `threads` threads called barrier with this generation; returns the next
    generation (each thread counts its own, all alike). sync: int64 zeros (16,), one per call."""
    if threads > 1:
        if _fetch_add(sync, COUNT, 1) == threads - 1:  # the last to arrive resets and releases
            _store_release(sync, COUNT, 0)
            _store_release(sync, GENERATION, generation + 1)
        else:
            while _load_acquire(sync, GENERATION) == generation:
                _spin_pause()
    return generation + 1


def new_sync():
    return np.zeros(16, np.int64)


# ---- when it pays -------------------------------------------------------------------------------
# Measured at 2 threads against the row kernel on one thread (BENCHMARKS.md, fifth session):
# batch 1, 2 and 4 gain once a step reads about 128 KiB of weights (input 64, hidden 128:
# 1.3x; hidden 512: 1.6-2x); at input 32, hidden 64 (96 KiB) the two were even. Starting
# the team costs a few microseconds: a single step of input 64, hidden 128 lost (15 us
# against 10), one of hidden 512 (5 MiB of weights) gained 1.6x.
MAX_ROWS = 4
MIN_WEIGHT_BYTES = 128 << 10
MIN_CALL_WEIGHT_BYTES = 1 << 20  # steps x weight bytes


def columns_pay(batch: int, steps: int, I: int, H: int, P: int, itemsize: int, threads: int) -> bool:
    """Whether a forward call over `batch` rows runs on `threads` threads split by hidden
    units (forward_columns) rather than on one thread (too few rows to split by rows)."""
    weight_bytes = (I + P) * 4 * H * itemsize
    return (threads > 1 and batch <= MAX_ROWS and P == H and weight_bytes >= MIN_WEIGHT_BYTES
            and steps * weight_bytes >= MIN_CALL_WEIGHT_BYTES)


# Training (forward saving, then backward_columns) measured at 2 threads, split -> one thread,
# forward+backward: hidden 512 (5 MiB of weights) 38 -> 24 ms at batch 1, 56 -> 38 at batch 4;
# at 0.4-1.3 MiB (hidden 128-256) the split lost 5-20 % (it packs the weights per part at every
# call and scatters the saved activations); around 2.7 MiB runs went either way.
TRAIN_MIN_PART_BYTES = 2 << 20
# With each part copied out once (pack_columns), a batch the threads do not divide (1 or 3 rows
# at 2 threads) splits from 1.5 MiB of weights: the rows split leaves a thread idle there (1 row)
# or runs one chunk on one thread (3 rows, lstm.chunks_for). Training at 2 threads, rows -> units
# split, vs torch.nn.LSTM: 100,1,128,256 0.93-1.04x -> 1.07-1.21x; 100,3,128,256 0.86-0.90x ->
# 0.99-1.09x; 100,1,256,384 0.80x -> 1.11x; 100,3,256,384 0.72-0.77x -> 0.90-0.97x. At 2 and 4
# rows the rows split stays: as fast or 5-10 % faster (BENCHMARKS.md, fourteenth session).
TRAIN_MIN_PART_BYTES_UNEVEN = 768 << 10


def columns_pay_training(batch: int, steps: int, I: int, H: int, P: int, itemsize: int, threads: int) -> bool:
    """columns_pay for a training call (forward saving for backward, and its backward)."""
    part = TRAIN_MIN_PART_BYTES_UNEVEN if threads > 1 and batch % threads else TRAIN_MIN_PART_BYTES
    return (columns_pay(batch, steps, I, H, P, itemsize, threads)
            and (I + P) * 4 * H * itemsize >= part * threads)


# x W_ih^T + b as one GEMM before the loop (forward_columns' xproj): measured at 2 threads, it
# paid where a part's weights outgrow the core's L2 (input 128, hidden 512, 2.6 MiB a part:
# 7.8 -> 5.5 ms at T=100) and cost 5-8 % below that (hidden 64-256).
PRECOMPUTE_MIN_PART_BYTES = 1 << 20


def columns_precompute(steps: int, I: int, H: int, itemsize: int, threads: int) -> bool:
    """Whether a column-split call gets its input projection as one GEMM before the loop."""
    return steps > 1 and (I + H) * 4 * H * itemsize > PRECOMPUTE_MIN_PART_BYTES * threads


# Batches of 5-96 rows on wide weights: split by hidden units too, each part's step product on
# MKL's packed GEMM (run_columns' gemm). Split by rows, each core streams all of the weights at
# every step for its half of the rows: at fewer than 8 rows a chunk from 512 KiB of weights,
# and from 4 MiB of W_hh at up to 96 rows, that lost to torch.nn.LSTM at 2 threads (0.58-0.97x)
# where the units split ran 0.81-1.34x; at 128-256 rows the rows split won again (BENCHMARKS.md,
# twelfth session).
WIDE_MIN_WEIGHT_BYTES = 512 << 10  # [W_ih | W_hh], chunks of fewer than WIDE_CHUNK_ROWS rows
WIDE_CHUNK_ROWS = 8
# Inference (no activations saved, no backward to follow) splits by units up to chunks of 15
# rows: at 2 threads, hidden 192-384, batch 16-28 (input 64-256), the rows split ran 0.85-0.97x
# torch.nn.LSTM where the units split ran 1.00-1.35x; at 32 rows of hidden 256 the rows split won
# again (1.12-1.16x against 1.06x). BENCHMARKS.md, fifteenth session.
WIDE_INFERENCE_CHUNK_ROWS = 16
WIDE_MIN_HH_BYTES = 4 << 20  # W_hh, any batch up to WIDE_MAX_ROWS
WIDE_MAX_ROWS = 96
# Inference of up to this many rows where [W_ih | W_hh] outgrows a core's L2 and W_hh more than
# half of it: split by rows, each core streams all of W from L3 at every step. 2 threads, vs
# torch.nn.LSTM, rows -> units split: 100,32,128,384 0.87x -> 1.01x, 40 and 48 rows 0.93-0.94x
# -> 1.00-1.02x, input 64 0.88x -> 1.00x, input 256 (48 rows) 0.81-0.93x -> 0.97-1.01x, hidden
# 320 0.96x -> 1.04x; from 64 rows as fast or slower (80: 1.14x -> 1.07x), and W_hh of 1 MiB
# at input 512 0.98x -> 0.96x (BENCHMARKS.md, twenty-seventh session).
WIDE_INFERENCE_PAST_L2_MAX_ROWS = 48
# The wide path keeps the input in each part's step product (no x W_ih^T + b made first, as
# columns_precompute would have it): made first, it ran 0.83-0.92x torch at hidden 512, 32-48
# rows, against 0.95-1.08x fused, and as fast elsewhere (hidden 384-1024).


def wide_columns_pay(batch: int, I: int, H: int, P: int, itemsize: int, threads: int,
                     inference: bool = False) -> bool:
    """Whether a forward call over `batch` rows, more than columns_pay takes, runs split by
    hidden units with its step products on a BLAS (the caller checks that one is at hand).
    inference: the call saves nothing for a backward (chunks up to WIDE_INFERENCE_CHUNK_ROWS)."""
    if threads < 2 or P != H or itemsize != 4 or not MAX_ROWS < batch <= WIDE_MAX_ROWS:
        return False
    chunk_rows = WIDE_INFERENCE_CHUNK_ROWS if inference else WIDE_CHUNK_ROWS
    whole, hh = (I + H) * 4 * H * itemsize, 4 * H * H * itemsize
    few_rows = batch < chunk_rows * threads and whole >= WIDE_MIN_WEIGHT_BYTES
    past_l2 = inference and batch <= WIDE_INFERENCE_PAST_L2_MAX_ROWS and whole > l2_bytes() and hh > l2_bytes() // 2
    return few_rows or past_l2 or hh >= WIDE_MIN_HH_BYTES


# W_hh of 16 MiB and more (hidden 1024 and up), with the micro-kernel's products (where MKL is
# not wanted): split by units, inference past WIDE_MAX_ROWS up to 512 rows, training from 5 to
# 16 rows. Each core of the rows split streams all of W from L3 or memory at every step, each
# of the units split its half. AMD EPYC, 2 threads, rows -> units split vs torch.nn.LSTM, the
# order of the variants rotated each round:
#   inference 20,128,256,2048 0.79x -> 1.08x, 50,128,512,1024 0.74x -> 1.10x, 20,256,256,1024
#   0.96x -> 1.16x, 10,512,256,2048 0.94x -> 1.05x;
#   training 100,8,128,1024 0.70x -> 1.15x, 100,16,128,1024 1.02x -> 1.06x; from 32 rows it
#   did not pay: 100,32,128,1024 1.11x -> 1.07x, 50,64,512,1024 1.04x -> 1.02x,
#   20,128,256,2048 0.87x -> 0.82x, 30,512,128,1024 0.78x -> 0.79x.
# On 4 MiB (hidden 512) inference lost at 1024 rows (1.13x -> 0.86x). BENCHMARKS.md, eighteenth
# session.
BIG_HH_BYTES = 16 << 20
BIG_HH_MAX_ROWS = 512
BIG_HH_TRAIN_MAX_ROWS = 16


def big_weights_columns_pay(batch: int, H: int, P: int, itemsize: int, threads: int, training: bool = False) -> bool:
    """Whether a call over `batch` rows (more than columns_pay takes) on the biggest weights runs
    split by hidden units on the micro-kernel's products (the caller checks that it has those).
    training: a forward that saves for a backward, or that backward."""
    most = BIG_HH_TRAIN_MAX_ROWS if training else BIG_HH_MAX_ROWS
    return (threads > 1 and P == H and itemsize == 4 and MAX_ROWS < batch <= most
            and 4 * H * H * itemsize >= BIG_HH_BYTES)


# The backward (backward_columns' gemm), measured the same way: the split won at chunks of fewer
# than 8 rows (hidden 384-1024: 1.03-1.18x -> 1.25-1.29x torch) and at hidden 1024 up to 32 rows
# (1.13-1.16x -> 1.17-1.24x). From W_hh of 4 MiB (hidden 512) at 16-32 rows too: on the Intel
# Xeon of the twenty-fifth session (2 MiB of L2 a core), training at 2 threads, rows -> units
# split: 50,16,128,512 0.90-0.91x -> 0.96-0.99x torch.nn.LSTM, 50,16,256,512 0.93x -> 0.99x,
# 50,24,128,512 1.08x -> 1.12x, 50,32,128,512 1.10-1.13x -> 1.12-1.14x; at 48 rows 1.15x ->
# 1.13x, and hidden 384 (2.25 MiB) 1.20x either way (BENCHMARKS.md). An older measurement had 32
# rows of hidden 512 lose (1.31-1.35x -> 1.13-1.15x); here they gained 1-2 %.
WIDE_BACKWARD_MIN_HH_BYTES = 4 << 20


def wide_columns_pay_backward(batch: int, I: int, H: int, P: int, itemsize: int, threads: int) -> bool:
    """wide_columns_pay for a backward call."""
    return wide_columns_pay(batch, I, H, P, itemsize, threads) and (
        batch < WIDE_CHUNK_ROWS * threads
        or (4 * H * H * itemsize >= WIDE_BACKWARD_MIN_HH_BYTES and batch <= 2 * WIDE_CHUNK_ROWS * threads))


# ---- weights, laid out per part ------------------------------------------------------------------
def unit_bounds(H: int, parts: int):
    """Unit boundaries (parts + 1,) of `parts` slices of about equal size, cut at multiples of
    simd.LANES: the gate pass then runs every unit in the vector code or the scalar tail
    exactly as the row kernel does over all H (the same bits)."""
    cuts = [min(H, round(H * k / parts / LANES) * LANES) for k in range(parts + 1)]
    cuts[-1] = H
    return np.array(cuts, np.int64)


def part_rows(H: int, units, s: int):
    """The rows of W_ih, W_hh and b that make part s's units: gates i, f, g, o in that order."""
    return np.concatenate([np.arange(g * H + units[s], g * H + units[s + 1]) for g in range(4)])


def pack_columns(w_ih, w_hh, b, parts: int, panels: bool = True):
    """(wps (S, nb, I + P, V), bps (S, 4 H_max), units (S + 1,)): part s's rows of W_ih, W_hh and
    b (gates i, f, g, o of its units, in that order) packed for tile.matmul; every part padded
    to the same shape with zeros. panels=False: wps empty, (S, 0, 1, LANES) (a BLAS's packed
    GEMM makes the products: run_columns' gemm). A training call packs at every call: each part
    is copied out once and packed straight into wps."""
    H = w_hh.shape[0] // 4
    units = unit_bounds(H, parts)
    width = 4 * int(np.max(np.diff(units)))
    bps = np.zeros((parts, width), w_ih.dtype)
    for s in range(parts):
        bps[s, : 4 * (units[s + 1] - units[s])] = unit_rows(b.reshape(-1, 1), H, units[s], units[s + 1])[:, 0]
    if not panels:
        return np.empty((parts, 0, 1, LANES), w_ih.dtype), bps, units
    V = block_width(w_ih.dtype)
    w_ih, w_hh = np.ascontiguousarray(w_ih), np.ascontiguousarray(w_hh)  # read by row pointers
    wps = aligned_empty((parts, -(-width // V), w_ih.shape[1] + w_hh.shape[1], V), w_ih.dtype)
    run_jobs([(pack_part_rows, (w_ih, w_hh, H, units[s], units[s + 1], wps[s])) for s in range(parts)])
    return wps, bps, units


# A training call packs its parts at every call: each part on a thread of its own, straight from
# the weights (no copy of a part's rows first). At input 128, hidden 512 (5 MiB), 2 threads, the
# forward's and the backward's packing took 1.5 and 1.0 ms of a 15 ms training step, serially
# through copies (BENCHMARKS.md, twenty-fifth session).
@njit(**KW)
def pack_part_rows(w_ih, w_hh, H, u0, u1, wp):
    """wp (nb, K, V), C-contiguous: the rows of [W_ih | W_hh] that make units u0:u1 (part_rows:
    gates i, f, g, o), transposed for tile.matmul as tile.pack2 lays out unit_rows(w_ih) and
    unit_rows(w_hh); every element written (columns past the part's, and whole blocks past
    them, zero). w_ih (4H, I), w_hh (4H, P) C-contiguous (read by row pointers)."""
    nb, K, V = wp.shape[0], wp.shape[1], wp.shape[2]
    I, P = w_ih.shape[1], w_hh.shape[1]
    u = u1 - u0
    for b in range(nb):
        dst = row_ptr(wp, b)
        j = 0
        while j < V:
            r = b * V + j  # the part's row (column of the packed W)
            if r >= 4 * u:
                for k in range(K):
                    for jj in range(j, V):
                        dst[k * V + jj] = 0
                break
            n = min(V - j, u - r % u)  # a run of the part's rows that are consecutive rows of W
            row = (r // u) * H + u0 + r % u
            src = row_ptr(w_ih, row)
            for k in range(I):
                for jj in range(n):
                    dst[k * V + j + jj] = src[jj * I + k]
            src = row_ptr(w_hh, row)
            for k in range(P):
                for jj in range(n):
                    dst[(I + k) * V + j + jj] = src[jj * P + k]
            j += n


# The same per part, for a BLAS's packed GEMM (run_columns' gemm): a part's rows copied out, then
# the BLAS's pack (fn: MKL's cblas_sgemm_pack, by address as blas.gemm_packed calls its compute).
# Serially, a training call's copies and packs took 0.78 ms at input 128, hidden 512 (BENCHMARKS.md,
# twenty-fifth session).
@njit(**KW)
def pack_part_rows_for_blas(w_ih, w_hh, H, u0, u1, part, fn, rows, dst, as_a=False):
    """dst: the rows of [W_ih | W_hh] (4H, I + P) that make units u0:u1 (part_rows: gates i, f, g,
    o), transposed, laid out by the pack at address fn for products of `rows` rows (as_a: as
    they are, as the A matrix of blas.gemm_packed_a); part (>= 4 (u1 - u0), I + P) C-contiguous
    scratch they are copied into first. float32."""
    u = u1 - u0
    I, P = w_ih.shape[1], w_hh.shape[1]
    for g in range(4):
        for j in range(u):
            row = row_ptr(part, g * u + j)
            copy_p(row, row_ptr(w_ih, g * H + u0 + j), I)
            copy_p(ptr_add(row, I), row_ptr(w_hh, g * H + u0 + j), P)
    if as_a:
        pack_a(fn, 4 * u, rows, I + P, row_ptr(part, 0), part.shape[1], row_ptr(dst, 0))
    else:
        pack_b(fn, True, rows, 4 * u, I + P, row_ptr(part, 0), part.shape[1], row_ptr(dst, 0))


@njit(**KW)
def pack_part_columns_for_blas(w_hh, u0, u1, fn, rows, dst):
    """dst: W_hh[:, u0:u1] (4H rows of u1 - u0, read in place) laid out by the pack at address fn
    for products of `rows` rows. float32."""
    pack_b(fn, False, rows, u1 - u0, w_hh.shape[0], ptr_add(row_ptr(w_hh, 0), u0), w_hh.shape[1], row_ptr(dst, 0))


@njit(**KW)
def pack_part_columns(w_hh, u0, u1, wp):
    """wp (nb, 4H, V), C-contiguous: W_hh[:, u0:u1] packed for tile.matmul (not transposed), as
    tile.pack2 lays it out; every element written. w_hh (4H, H) C-contiguous."""
    nb, K, V = wp.shape[0], wp.shape[1], wp.shape[2]
    for b in range(nb):
        dst = row_ptr(wp, b)
        n = max(0, min(V, u1 - u0 - b * V))
        for k in range(K):
            src = ptr_add(row_ptr(w_hh, k), u0 + b * V)
            for j in range(n):
                dst[k * V + j] = src[j]
            for j in range(n, V):
                dst[k * V + j] = 0


def unit_view(w, H: int, u0: int, u1: int):
    """Rows i, f, g, o of units u0:u1 of w (4H, K) (part_rows' rows), a (4, u1 - u0, K) view."""
    return w.reshape(4, H, w.shape[1])[:, u0:u1]


def unit_rows(w, H: int, u0: int, u1: int):
    """w[part_rows(H, units, s)] for units u0:u1, C-contiguous (4 (u1 - u0), K), as one copy."""
    return np.ascontiguousarray(unit_view(w, H, u0, u1)).reshape(4 * (u1 - u0), w.shape[1])


# ---- the time loop -------------------------------------------------------------------------------
@njit(**KW)
def forward_columns(x, batch_sizes, h0, c0, wps, bps, units, xproj, gemm, wgs, reverse, y, h, c, acts_out, cells_out,
                    save, hbuf, sync, k, threads):
    """Thread k of `threads`: the whole time loop for parts k, k + threads, ... (see the module
    docstring). x (total, I); h0, c0, h, c (B, H); y (total, H) out; hbuf (2, B, H) scratch;
    h, c out: h_n, c_n (c is the running state, as in lstm.forward_chunk). xproj (total, 4H)
    or (0, 4H): x W_ih^T + b of every row made before the loop, as lstm.forward_core takes it
    (the steps then multiply h by W_hh alone, each part adding its units' columns of xproj).
    save: acts_out (total, 4H) and cells_out (total, H) written, as forward_core(save=True).
    gemm, wgs (S, L): the address of a BLAS's packed GEMM (blas.py) and each part's W_s laid out
    for it, row s (gemm 0: tile.matmul on wps; wps may then hold no panel)."""
    T = batch_sizes.shape[0]
    off = offsets(batch_sizes)
    I = x.shape[1]
    B, H = h0.shape
    dt = x.dtype
    S = wps.shape[0]
    pre = xproj.shape[0] > 0
    # 1-2 rows on the micro-kernel: x W_ih^T + b of the next steps made ahead, each part its
    # columns (as lstm.forward_chunk, the same bits)
    la = lookahead_steps(B, B) if T > 1 and not pre and gemm == 0 else 0
    k_first = I if pre or la else 0  # the product's first row of W (and column of xh): h's part
    Bp = max(B, PAD_ROWS) if gemm != 0 else B  # rows to spare for the BLAS's padded_rows (zeros in)
    xh = np.zeros((Bp, I + H), dt)
    K = H if pre or la else I + H  # the product's inner dimension
    q = np.empty((Bp, max(padded_width(wps[0]), bps.shape[1])), dt)
    acts = np.empty((B, bps.shape[1]), dt)  # scratch: the activations, not kept
    as_a, fn = packed_a(gemm)  # each W_s packed as the A matrix: its product transposed into qt first
    qt = np.empty((bps.shape[1] if as_a else 0, B), dt)
    hs = np.empty(bps.shape[1] // 4, dt)
    xb = np.empty(bps.shape[1], dt)  # a part's columns of one row of xproj
    xa = np.empty((LOOKAHEAD_ROWS if la else 0, I), dt)  # the rows of x of the steps ahead
    qa = np.empty((S if la else 0, LOOKAHEAD_ROWS, q.shape[1]), dt)  # each part's x W_s,ih^T + b_s of them
    first_row = np.zeros(max(la, 1), np.int64)  # each step's first row in xa and qa
    ahead_from, ahead_to = 0, 0  # the steps whose rows qa holds
    for s in range(k, S, threads):
        u0, u1 = units[s], units[s + 1]
        for i in range(B):
            copy_into(c[i, u0:u1], c0[i, u0:u1])
    generation = 0
    n_prev = 0  # rows the previous step ran: a row past them starts here, from h0 (reverse joins)
    for step in range(T):
        t = T - 1 - step if reverse else step
        n = batch_sizes[t]
        o = off[t]
        src = hbuf[(step + 1) % 2]
        dst = hbuf[step % 2]
        if la and step >= ahead_to:
            R = rows_ahead(x, batch_sizes, off, reverse, 0, B, step, la, xa, first_row)
            for s in range(k, S, threads):
                input_part(xa, R, wps[s], bps[s, : 4 * (units[s + 1] - units[s])], qa[s])
            ahead_from, ahead_to = step, step + la
        for i in range(n):
            if not pre and not la:
                copy_into(xh[i, :I], x[o + i])
            copy_into(xh[i, I:], src[i] if i < n_prev else h0[i])
        for s in range(k, S, threads):
            u0, u1 = units[s], units[s + 1]
            Hs = u1 - u0
            # (n, I + H) @ (I + H, 4 H_s), or with xproj (n, H) @ (H, 4 H_s): k_first = I
            if as_a:  # qt = W_s @ [x | h]^T, then q = qt^T (as lstm.forward_chunk)
                gemm_packed_a(fn, n, 4 * Hs, K, ptr_add(row_ptr(xh, 0), k_first), I + H, row_ptr(wgs, s),
                              row_ptr(qt, 0), B)
                transpose_rows(qt[: 4 * Hs], n, q)
            elif gemm != 0:
                gemm_packed(gemm, padded_rows(n, K, 4 * Hs), 4 * Hs, K, ptr_add(row_ptr(xh, 0), k_first), I + H,
                            row_ptr(wgs, s), row_ptr(q, 0), q.shape[1])
            else:
                matmul(xh, n, wps[s], q, step % 2 == 1, k_first)
            for i in range(n):
                bias = bps[s, : 4 * Hs]
                if pre:
                    for g in range(4):
                        copy_into(xb[g * Hs : (g + 1) * Hs], xproj[o + i, g * H + u0 : g * H + u1])
                    bias = xb[: 4 * Hs]
                elif la:
                    bias = qa[s, first_row[step - ahead_from] + i, : 4 * Hs]
                gate_row(q[i, : 4 * Hs], bias, acts[i, : 4 * Hs], c[i, u0:u1], hs[:Hs])
                if save:
                    for g in range(4):
                        copy_into(acts_out[o + i, g * H + u0 : g * H + u1], acts[i, g * Hs : (g + 1) * Hs])
                    copy_into(cells_out[o + i, u0:u1], c[i, u0:u1])
                copy_into(dst[i, u0:u1], hs[:Hs])
                copy_into(y[o + i, u0:u1], hs[:Hs])
                copy_into(h[i, u0:u1], hs[:Hs])  # a finished row keeps its last step's h
        n_prev = n
        generation = barrier(sync, threads, generation)


# ---- backward ------------------------------------------------------------------------------------
def pack_columns_backward(w_hh, parts: int, panels: bool = True):
    """(wbs (S, nb, 4H, V), units): part s's columns of W_hh (4H, H), its units u_s : u_{s+1},
    packed for tile.matmul: dh_{t-1}[:, units] = dgates_t @ W_hh[:, units]. panels=False: wbs
    empty, (S, 0, 1, LANES) (a BLAS's packed GEMM makes the products: run_columns_backward's gemm)."""
    H = w_hh.shape[1]
    units = unit_bounds(H, parts)
    if not panels:
        return np.empty((parts, 0, 1, LANES), w_hh.dtype), units
    V = block_width(w_hh.dtype)
    w_hh = np.ascontiguousarray(w_hh)  # read by row pointers
    wbs = aligned_empty((parts, -(-int(np.max(np.diff(units))) // V), w_hh.shape[0], V), w_hh.dtype)
    run_jobs([(pack_part_columns, (w_hh, units[s], units[s + 1], wbs[s])) for s in range(parts)])
    return wbs, units


@njit(**KW)
def backward_columns(batch_sizes, h0, c0, wbs, units, gemm, wgbs, reverse, acts, cells, y, dy, dh, dc, dgates,
                     h_prev, sync, k, threads):
    """Thread k of `threads`: BPTT through forward_columns(save=True) (or forward_core's, the
    same arrays) for parts k, k + threads, ..., per step (gemm, wgbs (S, L): the products on a
    BLAS's packed GEMM, W_hh[:, units of s] laid out for it in row s, as forward_columns' gemm)

        dgates_t of its units (lstm.gate_backward_row on them)          own units: no waiting
        barrier: dgates_t complete
        dh_{t-1} of its units = dgates_t (n, 4H) @ W_hh[:, units]        all of dgates_t

    dh (B, H), dc (B, H): in dL/dh_n, dL/dc_n, out dL/dh0, dL/dc0; dgates (total, 4H) and
    h_prev (total, H) out, as lstm.backward_core writes them (dx and the weight gradients are
    the caller's GEMMs after the loop). A step's dgates rows are its own, so one barrier per
    step is enough. lstm.backward_core's numbers to rounding (the unit loop on a part's slices
    vectorises otherwise than on whole rows)."""
    T = batch_sizes.shape[0]
    off = offsets(batch_sizes)
    B, H = dc.shape
    dt = dh.dtype
    S = wbs.shape[0]
    widest = 0
    for s in range(S):
        widest = max(widest, units[s + 1] - units[s])
    qb = np.empty((B, max(padded_width(wbs[0]), widest)), dt)
    a_s = np.empty(4 * H, dt)  # a part's activations of one row, gates side by side
    dg_s = np.empty(4 * H, dt)
    no_hpre = np.empty(0, dt)
    generation = 0
    for step in range(T):
        t = step if reverse else T - 1 - step
        n = batch_sizes[t]
        o = off[t]
        # The step that ran just before t in the forward pass, and how many rows it holds.
        tp = t + 1 if reverse else t - 1
        n_prev = (batch_sizes[tp] if tp < T else 0) if reverse else (n if tp >= 0 else 0)
        p0 = off[tp] if n_prev > 0 else 0
        for s in range(k, S, threads):
            u0, u1 = units[s], units[s + 1]
            Hs = u1 - u0
            for i in range(n):
                add_into(dh[i, u0:u1], dy[o + i, u0:u1])
                for g in range(4):
                    copy_into(a_s[g * Hs : (g + 1) * Hs], acts[o + i, g * H + u0 : g * H + u1])
                if i < n_prev:
                    cprev = cells[p0 + i, u0:u1]
                    copy_into(h_prev[o + i, u0:u1], y[p0 + i, u0:u1])
                else:  # the row starts here: its previous state is h0, c0
                    cprev = c0[i, u0:u1]
                    copy_into(h_prev[o + i, u0:u1], h0[i, u0:u1])
                gate_backward_row(a_s[: 4 * Hs], cells[o + i, u0:u1], cprev, dh[i, u0:u1], dc[i, u0:u1],
                                  dg_s[: 4 * Hs], no_hpre, False)
                for g in range(4):
                    copy_into(dgates[o + i, g * H + u0 : g * H + u1], dg_s[g * Hs : (g + 1) * Hs])
        generation = barrier(sync, threads, generation)
        for s in range(k, S, threads):
            u0, u1 = units[s], units[s + 1]
            if gemm != 0:  # (n, 4H) @ (4H, H_s)
                gemm_packed(gemm, n, u1 - u0, 4 * H, row_ptr(dgates, o), 4 * H, row_ptr(wgbs, s), row_ptr(qb, 0),
                            qb.shape[1])
            else:
                matmul(dgates[o:], n, wbs[s], qb, step % 2 == 1, WHOLE_K)
            for i in range(n):
                copy_into(dh[i, u0:u1], qb[i, : u1 - u0])


# ---- the compiled team bodies (team.py) ----------------------------------------------------------
# One small module-level function per kernel and dtype, alike in shape: Numba caches a cfunc by
# its function's source position, and the kinds must be compile-time constants (globals); a
# factory's closures would be neither.
# The job's kinds (team.spec): the kernel's address, then forward_columns's arguments before (k, threads).
_KINDS = "n a2 i1 a2 a2 a4 a2 i1 a2 n a2 b a2 a2 a2 a2 a2 b a3 i1"
_KINDS32, _KINDS64 = spec(np.float32, _KINDS), spec(np.float64, _KINDS)


def _body32(data):
    whole_team(data, unpack(data, _KINDS32))


def _body64(data):
    whole_team(data, unpack(data, _KINDS64))


team_body = team_bodies(_body32, _body64)

_BACKWARD_KINDS = "n i1 a2 a2 a4 i1 n a2 b a2 a2 a2 a2 a2 a2 a2 a2 i1"
_BACKWARD32, _BACKWARD64 = spec(np.float32, _BACKWARD_KINDS), spec(np.float64, _BACKWARD_KINDS)


def _backward32(data):
    whole_team(data, unpack(data, _BACKWARD32))


def _backward64(data):
    whole_team(data, unpack(data, _BACKWARD64))


backward_body = team_bodies(_backward32, _backward64)


def run_columns(threads: int, x, batch_sizes, h0, c0, wps, bps, units, reverse: bool, y, h, c, xproj=None,
                acts=None, cells=None, gemm=0, wgs=None) -> bool:
    """forward_columns on an OpenMP team of `threads` threads (threads.run_compiled), saving
    acts and cells for backward when given, the step products on a BLAS's packed GEMM when
    given (gemm, wgs: see forward_columns); False, having run nothing, where there is no team
    (or its body is still being compiled elsewhere)."""
    H = h0.shape[1]
    if wgs is None:
        wgs = np.empty((0, 0), x.dtype)
    if xproj is None:
        xproj = np.empty((0, 4 * H), x.dtype)
    save = acts is not None
    if not save:
        acts, cells = np.empty((0, 4 * H), x.dtype), np.empty((0, H), x.dtype)
    args = (x, batch_sizes, h0, c0, wps, bps, units, xproj, int(gemm), wgs, bool(reverse), y, h, c, acts, cells, save,
            np.empty((2,) + h0.shape, x.dtype), new_sync())
    return on_team(team_body, forward_columns, threads, x.dtype, args)


def run_columns_backward(threads: int, batch_sizes, h0, c0, wbs, units, reverse: bool, acts, cells, y, dy, dh, dc,
                         dgates, h_prev, gemm=0, wgbs=None) -> bool:
    """backward_columns on an OpenMP team (see run_columns); False, having run nothing, where
    there is none."""
    if wgbs is None:
        wgbs = np.empty((0, 0), dh.dtype)
    args = (batch_sizes, h0, c0, wbs, units, int(gemm), wgbs, bool(reverse), acts, cells, y, dy, dh, dc, dgates,
            h_prev, new_sync())
    return on_team(backward_body, backward_columns, threads, dh.dtype, args)
