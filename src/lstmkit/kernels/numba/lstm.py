"""Fused LSTM kernels for one layer-direction over packed data (numpy + Numba, no torch).

Shapes (B = batch_sizes[0], T = len(batch_sizes), P = proj_size or H):

    x        (total, I)  time-major packed rows: step t holds rows off[t] : off[t] + batch_sizes[t]
    h0, c0   (B, P), (B, H)
    w_ih     (4H, I)   w_hh (4H, P)   b (4H,) = b_ih + b_hh   w_hr (P, H)   gate rows [i|f|g|o]
    y        (total, P)  h_n (B, P)  c_n (B, H)

Forward, per step (engines/reference.py has the readable version):

    gates = [x_t | h_{t-1}] [W_ih | W_hh]^T + b      (bs, 4H)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(c_t)  [ @ W_hr^T ]

How the work is laid out:
  - ONE compiled call runs the whole time loop of a layer-direction, forward or backward: no
    Python per step, whatever the batch size.
  - The batch rows are split into chunks of whole sequences, one per thread (threads.py's
    run_chunks: torch's OpenMP team when the engine gives it). Sequences are independent
    through time, so each chunk runs its own time loop with no barrier between steps; with
    packed data, at step t a chunk works on its rows below batch_sizes[t] (always a prefix
    of its rows, as the rows are sorted by decreasing length). chunk_bounds() balances the
    row-steps.
  - Per step a chunk makes ONE product, [x_t | h_{t-1}] @ [W_ih | W_hh]^T, with tile.matmul
    (a register-blocked micro-kernel on weights packed once per call, see tile.py), then
    one fused pass over the gates per row. The input projection rides in the same product:
    the chunk's threads do it, where a separate big GEMM before the loop ran on one thread.
  - Backward walks the steps in the opposite order over (B, P)/(B, H) state gradients,
    makes one product per step, dgates @ [W_ih | W_hh] = [dx_t | dh_{t-1}], writes each
    row's [x_t | h_{t-1}] and adds its dgates into its batch row's sum, and leaves the weight
    gradients to one GEMM after the loop, dgates^T [x | h_prev] = [dW_ih | dW_hh], and db to
    a sum of B rows (weight_gradients), which the caller runs (the torch engine in torch, on
    torch's threads).
  - Every row is computed by the same operations in the same order whichever chunk holds it,
    so results are bitwise identical for any thread count. (Where the caller hands the step
    products to a BLAS, forward_core's gemm, that BLAS may sum a row in another order for
    another row count: 1 and 2 threads then agree to rounding; the same count stays bitwise.)
"""
import numpy as np
from numba import carray, njit

from .activations import sigmoid, tanh
from .blas import PAD_ROWS, gemm_packed, gemm_packed_a, packed_a, padded_input, padded_rows, transpose_rows
from .caches import l2_bytes
from .rows import add_p, addr_ptr, copy_p, ptr_add, row_ptr
from .simd import LANES, block_units, gate_backward_block, gate_backward_block2, gate_block, gate_block2
from .team import call_kernel, on_team, row_chunks, spec, team_bodies, team_place, unpack, whole_team
from .threads import run_chunks
from .tile import WHOLE_K, dot_lanes, matmul, pack, pack2, padded_width, rows_dot1, rows_dot4, rows_dot8

# Fast-math without 'nnan'/'ninf': LLVM may reassociate and contract (FMA), which SIMD
# reductions need, but must keep inf semantics (the float64 sigmoid relies on
# 1/(1+inf) = 0 for huge negative inputs) and NaN propagation.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
KW = dict(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)


@njit(**KW)
def offsets(batch_sizes):
    T = batch_sizes.shape[0]
    off = np.empty(T + 1, np.int64)
    off[0] = 0
    for t in range(T):
        off[t + 1] = off[t] + batch_sizes[t]
    return off


# ---- weights, laid out once per call ------------------------------------------------------------
def pack_forward(w_ih, w_hh, w_hr=None, tile=True):
    """(wp, wpr): [W_ih | W_hh]^T and W_hr^T packed for tile.matmul (wpr empty without projection;
    wp empty when not tile: a BLAS makes the step products, see forward_core's gemm).
    All C-contiguous, one dtype."""
    wpr = pack(w_hr, True) if w_hr is not None and w_hr.shape[0] else no_projection(w_ih)
    if not tile:
        return no_projection(w_ih), wpr
    return pack2(np.ascontiguousarray(w_ih), np.ascontiguousarray(w_hh), True), wpr


def pack_backward(w_ih, w_hh, w_hr=None, with_input=True, tile=True):
    """(wpb, wprb): [W_ih | W_hh] (4H, I + P), or W_hh alone when not with_input (dx is then
    left to one GEMM after the loop, see backward_core), and W_hr (P, H) packed for tile.matmul
    (wpb empty when not tile: a BLAS makes the step products, see backward_core's gemm)."""
    wprb = pack(w_hr, False) if w_hr is not None and w_hr.shape[0] else no_projection(w_ih)
    if not tile:
        return no_projection(w_ih), wprb
    w_ih, w_hh = np.ascontiguousarray(w_ih), np.ascontiguousarray(w_hh)
    return (pack2(w_ih, w_hh, False) if with_input else pack(w_hh, False)), wprb


def no_projection(like):
    """The empty packed W_hr that tells the kernels there is no projection."""
    return np.zeros((0, 0, 32 if like.dtype == np.float32 else 16), like.dtype)


def chunk_bounds(batch_sizes, chunks: int):
    """Row boundaries (int64, chunks' + 1) splitting the B rows into at most `chunks` chunks of
    contiguous rows with about equal row-steps (packed rows are sorted longest first)."""
    bsz = np.asarray(batch_sizes, dtype=np.int64)
    B = int(bsz[0]) if bsz.shape[0] else 0
    chunks = max(1, min(int(chunks), B))
    if chunks == 1:
        return np.array([0, B], np.int64)
    if bsz[-1] == B:  # padded: every row the same length
        return np.array([B * k // chunks for k in range(chunks + 1)], np.int64)
    lengths = np.searchsorted(-bsz, -np.arange(B), side="left")  # steps of row r: count of batch_sizes > r
    work = np.concatenate(([0], np.cumsum(lengths)))
    cuts = np.searchsorted(work, work[-1] * np.arange(1, chunks) / chunks)
    bounds = np.unique(np.clip(np.concatenate(([0], cuts, [B])), 0, B))
    return bounds.astype(np.int64)


# ---- threads ---------------------------------------------------------------------------------------
# Below this many multiply-adds per call, handing a chunk to a second thread costs more than
# it saves (a thread wake-up is tens of microseconds). The chunks run through
# threads.run_chunks (the host's OpenMP team, or Python threads), not Numba's parallel=True:
# its own OpenMP pool spin-waits after each region against torch's, and compiling a
# parallel region took seconds of the cold start.
MIN_SPLIT_MACS = 1 << 21


# Chunks of 2 rows lost to one chunk of all the rows in training at 2 threads while the
# micro-kernel computed 2 rows as a 4-row tile (thirteenth session: batch 4, 0.73-1.02x
# torch.nn.LSTM split, 0.80-1.16x whole). With 2 rows as a tile of their own (tile.py) two chunks
# of 2 rows won: training at 2 threads, 100,4,64,128 and 100,4,128,256, 1.13-1.15x faster than
# one chunk of 4 (BENCHMARKS.md, twenty-first session). A chunk of 1 row beside one of 2 (batch 3)
# measured the same as one chunk of 3, so chunks hold 2 rows or more; one row a chunk
# (batch <= threads) runs the one-row product, and splits.
def chunks_for(batch: int, macs: int, threads: int) -> int:
    """How many row chunks a call over `batch` rows and `macs` multiply-adds gets on `threads`
    threads: one per thread, at most one per row, one when the work is small, none of 1 row
    beside others (see above)."""
    if macs < MIN_SPLIT_MACS:
        return 1
    if batch <= threads:
        return max(1, batch)
    return max(1, min(threads, batch // 2))


# x W_ih^T + b of all steps as one GEMM before the time loop, or the input part of each
# step's own product [x_t | h_{t-1}] @ [W_ih | W_hh]^T? A BLAS GEMM runs faster than the step
# product, on every thread, but writes and re-reads (total, 4H), four times x. It pays where
# the step product is bound by reading the weights: many weight bytes per row of the chunk
# that reuses each read. With more rows the fused product wins (BENCHMARKS.md, "fourth
# round" and "fifth session", has the measurements behind the number: the fourth session
# also capped the rows at 16, which kept the GEMM from the big shapes, where it gains 5-10 %).
PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW = 112 << 10
# Where the step products go to a BLAS's packed GEMM (blas.py), fused won up to far more weight
# bytes per row: at 164-590 KiB a row 3-14 % faster than the GEMM first, as fast at 390 KiB,
# 3 % slower at 1.2 MiB, inference and training, 1 and 2 threads (BENCHMARKS.md, twelfth session).
PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW_BLAS = 1 << 20
# Whatever the rows, weights that stay in a core's L2 between steps keep the input in the step
# product: at batch 1-3 with 384-864 KiB of weights the GEMM first lost in training, where x and
# W_ih come to it from outside the cache (L2 of 1.25 MiB: BENCHMARKS.md, thirteenth session). With
# 2 MiB of L2, at 8 rows a chunk and more, up to 1.5 MiB of weights: training at input 128,
# hidden 256 (1.5 MiB), GEMM first -> fused, vs torch.nn.LSTM: 1 thread, 8 rows 0.95x -> 1.00x,
# 12 rows 0.97x -> 1.02x, 6 rows as fast; 2 threads (chunks of 8, 12 rows) 0.99x -> 1.02x,
# 1.18x -> 1.25x; inference within 1 %; at 1.75-2 MiB as fast either way. At fewer rows the
# step product is bound by reading W from L2 and the GEMM first, which leaves it W_hh alone,
# still won: one row 1.11x -> 1.01x, two-row chunks at 2 threads 1.12x -> 0.92x (BENCHMARKS.md,
# twenty-fifth session). So: 1 MiB, or from 8 rows three quarters of the L2 (weights_stay_in_l2).
PRECOMPUTE_MIN_WEIGHT_BYTES = 1 << 20
PRECOMPUTE_L2_MIN_ROWS = 8
# Except where W_hh alone stays in L2 and [W_ih | W_hh] does not: the GEMM first then leaves
# the steps a product on weights in L2 instead of one streaming them from L3, and pays from
# fewer weight bytes a row. Training at hidden 192-256, input 256-512, BLAS products, vs
# torch.nn.LSTM, fused -> GEMM first: one chunk of 4-8 rows 0.83-0.99x -> 0.99-1.16x, 12 rows
# 1.04x -> 1.10x, 16 rows as fast; two chunks of 8 rows (2 threads, which share L3) 0.93-0.95x
# -> 1.05-1.09x, of 12-16 rows as fast (BENCHMARKS.md, fourteenth session).
PRECOMPUTE_MAX_HH_BYTES_IN_L2 = 1 << 20
PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW_L2 = 160 << 10  # one chunk
PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW_L2_SPLIT = 128 << 10  # several chunks at once


def weights_stay_in_l2(nbytes: int, rows: int) -> bool:
    """Whether a step product's weights of nbytes, on chunks of `rows` rows, stay in a core's
    L2 between steps, fused with the input (PRECOMPUTE_MIN_WEIGHT_BYTES)."""
    if nbytes <= PRECOMPUTE_MIN_WEIGHT_BYTES:
        return True
    return rows >= PRECOMPUTE_L2_MIN_ROWS and nbytes <= 3 * l2_bytes() // 4


# At one or two rows a chunk of a call of more rows (a call of 1-2 rows makes the input part
# ahead in its loop: lookahead_steps) the micro-kernel's step product is bound by reading W, and
# the GEMM first pays from far fewer weight bytes where W_hh alone then stays in L1 between steps
# (48 KiB here, and a product that flips its block order each step finds most of 64 KiB still
# there). Inference / training, GEMM first against fused, 1 thread, T = 300: one row, W_hh
# in L1, [W_ih | W_hh] past it: 1.12-1.85x / 1.00-1.23x; one row, input >= hidden 128:
# 1.07-1.45x / 1.05-1.15x; two rows, W_hh in L1, W_ih >= 64 KiB: 1.06-1.19x / 1.03-1.07x.
# Elsewhere at these rows (W in L1, a smaller W_ih, or W_hh of 256 KiB) fused measured 0.78-1.07
# of it (BENCHMARKS.md, twenty-first session).
PRECOMPUTE_L1_BYTES = 48 << 10
PRECOMPUTE_HH_IN_L1_BYTES = 64 << 10
PRECOMPUTE_MIN_INPUT_BYTES_TWO_ROWS = 64 << 10


def _precompute_few_rows(rows: int, I: int, H: int, P: int, itemsize: int) -> bool:
    """precompute_input's rule at 1-2 rows a chunk on the micro-kernel (see above)."""
    hh, ih = P * 4 * H * itemsize, I * 4 * H * itemsize
    if rows == 1:
        return hh + ih > PRECOMPUTE_L1_BYTES and (hh <= PRECOMPUTE_HH_IN_L1_BYTES or I >= P)
    return rows == 2 and hh <= PRECOMPUTE_HH_IN_L1_BYTES and ih >= PRECOMPUTE_MIN_INPUT_BYTES_TWO_ROWS


def precompute_input(batch: int, steps: int, I: int, H: int, P: int, itemsize: int, chunks: int,
                     blas: bool = False, few_rows: bool = True) -> bool:
    """Whether a forward call over `steps` steps of up to `batch` rows, split in `chunks`,
    gets x W_ih^T + b as one GEMM before its time loop (forward_core's xproj). blas: whether
    its fused step products ([x | h] by [W_ih | W_hh]^T) would go to a BLAS's packed GEMM.
    few_rows: whether the chunks run forward_chunk, which makes the input part ahead itself for
    1-2 rows (lookahead_steps), and the rule at 1-2 rows a chunk applies (measured on it); the
    variant kernels' loops keep the general one."""
    rows = -(-batch // max(chunks, 1))
    if steps > 1 and few_rows and not blas:
        if batch <= LOOKAHEAD_MAX_BATCH:
            return False  # forward_chunk makes the input part ahead itself (lookahead_steps)
        if rows <= 2 and _precompute_few_rows(rows, I, H, P, itemsize):
            return True
    limit = PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW_BLAS if blas else PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW
    if blas and P * 4 * H * itemsize <= PRECOMPUTE_MAX_HH_BYTES_IN_L2:
        limit = PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW_L2 if chunks <= 1 else PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW_L2_SPLIT
    nbytes = (I + P) * 4 * H * itemsize
    return steps > 1 and nbytes > limit * rows and not weights_stay_in_l2(nbytes, rows)


# The backward's counterpart: dx = dgates W_ih as one GEMM after the loop, each step's product
# then dgates_t @ W_hh alone. No extra buffer here (the GEMM writes dx, which the loop would
# have written), so it pays as soon as the GEMM beats the step product's input part.
DX_AFTER_MIN_WEIGHT_BYTES = 1 << 18


def dx_after_loop(steps: int, I: int, H: int, P: int, itemsize: int) -> bool:
    """Whether a backward call makes dx as one GEMM after its time loop (backward_core's dx (0, I))."""
    return steps > 1 and (I + P) * 4 * H * itemsize > DX_AFTER_MIN_WEIGHT_BYTES


def input_projection(x, w_ih, b, slot: int = 0):
    """x W_ih^T + b with numpy's BLAS: forward_core's xproj where precompute_input says so (the
    torch engine makes it with torch's GEMM instead, on the threads its chunks run on, into its
    scratch buffer number `slot`; here each call returns a new array)."""
    out = np.dot(x, w_ih.T)
    out += b
    return out


@njit(**KW)
def same_words(a, b):
    """Whether a and b (1-D, one unsigned integer dtype: the words of two float arrays) are equal
    word for word: the OR of their XORs, block by block, stopping at the first block that
    differs. Each block is a slice run from 0 (a loop over range(s, e) on the whole arrays stayed
    scalar here, 25x slower). What a cache of packed weights checks its source with."""
    n = a.shape[0]
    if n != b.shape[0]:
        return False
    for s in range(0, n, 4096):
        x, y = a[s : s + 4096], b[s : s + 4096]
        acc = x[0] ^ x[0]
        for i in range(x.shape[0]):
            acc |= x[i] ^ y[i]
        if acc != 0:
            return False
    return True


@njit(**KW)
def copy_into(dst, src):
    """dst[:] = src for rows known not to overlap (slice assignment checks for overlap each time)."""
    for k in range(dst.shape[0]):
        dst[k] = src[k]


@njit(**KW)
def add_into(dst, src):
    for k in range(dst.shape[0]):
        dst[k] += src[k]


# ---- the fused gate passes -----------------------------------------------------------------------
@njit(**KW)
def gate_row_p(q, b, a, c, h, H):
    """One row of the gate pass, on row pointers (rows.py). q (4H) pre-activations without bias;
    b (4H); a (4H) out: the activations i, f, g, o (not q itself: see forward_chunk); c (H) in
    c_{t-1}, out c_t; h (H) out o*tanh(c_t)."""
    j0 = block_units(q, H)  # float32: blocks of LANES units as explicit vector code (simd.py)
    j2 = j0 - j0 % (2 * LANES)
    for j in range(0, j2, 2 * LANES):
        gate_block2(q, b, a, c, h, H, j)
    if j2 < j0:
        gate_block(q, b, a, c, h, H, j2)
    for j in range(j0, H):
        ig = sigmoid(q[j] + b[j])
        fg = sigmoid(q[H + j] + b[H + j])
        gg = tanh(q[2 * H + j] + b[2 * H + j])
        og = sigmoid(q[3 * H + j] + b[3 * H + j])
        a[j] = ig
        a[H + j] = fg
        a[2 * H + j] = gg
        a[3 * H + j] = og
        cv = fg * c[j] + ig * gg
        c[j] = cv
        h[j] = og * tanh(cv)


@njit(**KW)
def gate_row(q, b, a, c, h):
    """gate_row_p on 1-D arrays with unit stride (H = len(c))."""
    gate_row_p(row_ptr(q, 0), row_ptr(b, 0), row_ptr(a, 0), row_ptr(c, 0), row_ptr(h, 0), c.shape[0])


@njit(**KW)
def gate_backward_row_p(a, cell, cprev, dh, dc, dg, hpre, want_hpre, H):
    """One row of the gate gradients (the inverse of gate_row), on row pointers.

    a (4H) activations; cell (H) c_t; cprev (H) c_{t-1}; dh (H) dL/dh_t before the projection;
    dc (H) in dL/dc_t carried from t+1, out dL/dc_{t-1}; dg (4H) out dL/d(pre-activations);
    hpre (H) out when want_hpre: o * tanh(c_t), the projection's input (for dW_hr)."""
    j0 = block_units(a, H)
    j2 = j0 - j0 % (2 * LANES)
    for j in range(0, j2, 2 * LANES):
        gate_backward_block2(a, cell, cprev, dh, dc, dg, hpre, want_hpre, H, j)
    if j2 < j0:
        gate_backward_block(a, cell, cprev, dh, dc, dg, hpre, want_hpre, H, j2)
    for j in range(j0, H):
        ig = a[j]
        fg = a[H + j]
        gg = a[2 * H + j]
        og = a[3 * H + j]
        tc = tanh(cell[j])
        dhv = dh[j]
        # No literal 1 here: int - float32 types as float64 in Numba, which would run the
        # whole float32 loop in float64 (s' = s - s^2, tanh' = 1 - t^2).
        dct = dc[j] + dhv * (og - og * tc * tc)  # dL/dc_t: carried + through h_t
        dg[j] = dct * gg * (ig - ig * ig)
        dg[H + j] = dct * cprev[j] * (fg - fg * fg)
        dg[2 * H + j] = dct * (ig - ig * gg * gg)
        dg[3 * H + j] = dhv * tc * (og - og * og)
        dc[j] = dct * fg  # dL/dc_{t-1}
        if want_hpre:
            hpre[j] = og * tc


@njit(**KW)
def gate_backward_row(a, cell, cprev, dh, dc, dg, hpre, want_hpre):
    """gate_backward_row_p on 1-D arrays with unit stride (H = len(dc))."""
    gate_backward_row_p(row_ptr(a, 0), row_ptr(cell, 0), row_ptr(cprev, 0), row_ptr(dh, 0), row_ptr(dc, 0),
                        row_ptr(dg, 0), row_ptr(hpre, 0), want_hpre, dc.shape[0])


# ---- forward ---------------------------------------------------------------------------------------
# At one or two rows, the step product [x_t | h_{t-1}] @ [W_ih | W_hh]^T is bound by
# reading W from L2 (or L3): each weight read feeds one multiply-add per row. x_t W_ih^T does
# not wait on the recurrence, so the loop makes it ahead, for the rows of the next steps at once
# (LOOKAHEAD_ROWS rows: one 16-row product reads W_ih once for all of them), and each step's
# product multiplies h by W_hh alone. Against the fused product, 1 thread, inference: 100,1,64,128
# 258 -> 224 us, 1000,1,32,64 664 -> 582, 50,1,128,512 6.4 -> 4.9 ms, 100,1,16,32 20.0 -> 18.9,
# two rows 100,2,64,128 298 -> 292; four rows lost (540 -> 558). It also beat the GEMM of every
# row first (precompute_input) at these rows, with no (total, 4H) array: 100,1,256,64 129 -> 114,
# 1000,1,32,64 604 -> 582, 100,2,256,64 210 -> 196, as fast at hidden 256-512 (BENCHMARKS.md,
# twenty-eighth session).
# The rule goes by the call's rows, not the chunk's: every chunk of a call then makes its rows'
# sums the same way (each element one chain over k, whatever the rows beside it), so the results
# stay bitwise the same for any split.
LOOKAHEAD_ROWS = 16
LOOKAHEAD_MAX_BATCH = 2


@njit(**KW)
def lookahead_steps(B, m):
    """The steps whose input part a chunk of m of a call's B rows makes at once (0: none, the
    fused product)."""
    return LOOKAHEAD_ROWS // m if B <= LOOKAHEAD_MAX_BATCH else 0


@njit(**KW)
def rows_ahead(x, batch_sizes, off, reverse, r0, r1, s, la, xa, first_row):
    """Gathers into xa the rows r0:r1 of x at steps s : s + la of the loop (fewer past its end;
    packed input: the rows each step has), step s + j's from row first_row[j]; returns the count."""
    T = batch_sizes.shape[0]
    R = 0
    for j in range(min(la, T - s)):
        t = T - 1 - (s + j) if reverse else s + j
        first_row[j] = R
        for i in range(max(min(r1, batch_sizes[t]) - r0, 0)):
            copy_p(row_ptr(xa, R), row_ptr(x, off[t] + r0 + i), x.shape[1])
            R += 1
    return R


@njit(**KW)
def input_part(xa, R, wp, b, qa):
    """qa[:R] = xa[:R] W_ih^T + b. W_ih^T is the first I rows of the packed [W_ih | W_hh]^T (or
    of a part's columns of it): a product over xa's I columns reads no further. Each element is
    its own chain over k (tile.py), so a row's sums do not depend on the rows beside it."""
    matmul(xa, R, wp, qa, R < 0, WHOLE_K)  # flip False, typed as a bool: a literal would compile another matmul
    for r in range(R):
        add_p(row_ptr(qa, r), row_ptr(b, 0), b.shape[0])


@njit(**KW)
def forward_chunk(x, batch_sizes, h0, c0, wp, b, wpr, xproj, gemm, wg, reverse, acts, y, h, c, cells, save, r0, r1):
    """The whole time loop of rows r0:r1 (see forward_core for the arguments)."""
    T = batch_sizes.shape[0]
    off = offsets(batch_sizes)
    I = x.shape[1]
    H = c.shape[1]
    P = h.shape[1]
    m = r1 - r0
    dt = x.dtype
    has_proj = wpr.shape[0] > 0
    pre = xproj.shape[0] > 0  # x W_ih^T + b of every row given: the step multiplies by W_hh only
    # A call of 1-2 rows on the micro-kernel makes x W_ih^T + b ahead, for the next steps' rows
    # at once (lookahead_steps): the step product then multiplies h by W_hh alone.
    la = lookahead_steps(h0.shape[0], m) if T > 1 and not pre and gemm == 0 else 0
    k_first = I if pre or la else 0  # the product's first row of W (and column of xh): h's part
    K = P if pre or la else I + P  # the product's inner dimension
    # The BLAS computes a few rows as padded_rows of them: xh and q have rows to spare (zeros in).
    mp = max(m, PAD_ROWS) if gemm != 0 else m
    as_a, fn = packed_a(gemm)  # W packed as the A matrix: the product transposed into qt first
    qt = np.empty((4 * H if as_a else 0, m), dt)
    xh = np.zeros((mp, I + P), dt)  # [x_t | h_{t-1}] of the chunk's rows: the product's input
    q = np.empty((mp, max(padded_width(wp), 4 * H)), dt)  # (wp is empty when gemm does the product)
    hp = np.empty((m if has_proj else 0, H), dt)  # h before the projection
    qp = np.empty((m if has_proj else 0, padded_width(wpr) if has_proj else 0), dt)
    # Inference keeps no activations, but still writes them to a scratch row: written in
    # place into q, the gate loop's arrays would overlap and LLVM would leave it scalar.
    scratch = np.empty((0 if save else m, 4 * H), dt)
    xa = np.empty((LOOKAHEAD_ROWS if la else 0, I), dt)  # the rows of x of the steps ahead
    qa = np.empty((LOOKAHEAD_ROWS if la else 0, q.shape[1]), dt)  # their x W_ih^T + b
    first_row = np.zeros(max(la, 1), np.int64)  # each step's first row in xa and qa
    ahead_from, ahead_to = 0, 0  # the steps s whose rows qa holds
    for i in range(m):
        copy_into(xh[i, I:], h0[r0 + i])
        copy_into(c[r0 + i], c0[r0 + i])
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = min(r1, batch_sizes[t]) - r0
        if n <= 0:
            continue
        o = off[t] + r0
        if la and s >= ahead_to:
            input_part(xa, rows_ahead(x, batch_sizes, off, reverse, r0, r1, s, la, xa, first_row), wp, b, qa)
            ahead_from, ahead_to = s, s + la
        if not pre and not la:
            for i in range(n):
                copy_into(xh[i, :I], x[o + i])
        if as_a:  # qt = W @ [x | h]^T (blas.gemm_packed_a), then q = qt^T
            gemm_packed_a(fn, n, 4 * H, K, ptr_add(row_ptr(xh, 0), k_first), I + P, row_ptr(wg, 0), row_ptr(qt, 0), m)
            transpose_rows(qt, n, q)
        elif gemm != 0:  # the BLAS's packed GEMM (blas.py), on W laid out by the caller
            gemm_packed(gemm, padded_rows(n, K, 4 * H), 4 * H, K, ptr_add(row_ptr(xh, 0), k_first), I + P,
                        row_ptr(wg, 0), row_ptr(q, 0), q.shape[1])
        else:  # (n, I + P) @ (I + P, 4H), or with xproj (n, P) @ (P, 4H): k_first = I
            matmul(xh, n, wp, q, s % 2 == 1, k_first)
        for i in range(n):  # row pointers, not row views: see rows.py
            c_i = row_ptr(c, r0 + i)
            x_part = row_ptr(qa, first_row[s - ahead_from] + i) if la else row_ptr(b, 0)
            gate_row_p(row_ptr(q, i), row_ptr(xproj, o + i) if pre else x_part,
                       row_ptr(acts, o + i) if save else row_ptr(scratch, i), c_i,
                       row_ptr(hp, i) if has_proj else ptr_add(row_ptr(xh, i), I), H)
            if save:
                copy_p(row_ptr(cells, o + i), c_i, H)
        if has_proj:
            matmul(hp, n, wpr, qp, s % 2 == 1, WHOLE_K)
            for i in range(n):
                copy_p(ptr_add(row_ptr(xh, i), I), row_ptr(qp, i), P)
        for i in range(n):
            copy_p(row_ptr(y, o + i), ptr_add(row_ptr(xh, i), I), P)
    for i in range(m):
        copy_into(h[r0 + i], xh[i, I:])


@njit(**KW)
def one_step(x, h0, c0, wp, b, wpr, y, h, c):
    """One time step of N rows on one thread, the streaming call: x (1, N, I) or (N, 1, I),
    h0, c0 (1, N, P), (1, N, H) in; y like x with P features, h, c like h0, c0 out (all
    C-contiguous). forward_chunk with the arguments it needs made here: a call from Python
    pays per argument (about 0.1 us each), a few microseconds against a kernel of a few."""
    N = c0.shape[1]
    dt = x.dtype
    bsz = np.full(1, N, np.int64)
    no_rows = np.empty((0, 4 * c0.shape[2]), dt)
    forward_chunk(x.reshape(N, x.shape[2]), bsz, h0[0], c0[0], wp, b, wpr, no_rows, 0, np.empty(0, dt), False,
                  no_rows, y.reshape(N, y.shape[2]), h[0], c[0], no_rows[:, :c0.shape[2]], False, 0, N)


@njit(**KW)
def _rows_times(w, v, out):
    """out[g] += w[g] . v for every row g of w (G, K), C-contiguous: four rows at a time, each a
    chain over k that LLVM vectorises (the reassociation KW allows), then the rows left."""
    G, K = w.shape
    g4 = G - G % 4
    for g in range(0, g4, 4):
        a0, a1, a2, a3 = w[g], w[g + 1], w[g + 2], w[g + 3]
        # float32 zeros: the sums take the weights' dtype (float64 widens them), and LLVM fuses
        # the multiply-adds; zeros made as out[g] * 0 left them unfused (9.7-13 against 4.6 us).
        s0, s1, s2, s3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
        for k in range(K):
            vk = v[k]
            s0 += a0[k] * vk
            s1 += a1[k] * vk
            s2 += a2[k] * vk
            s3 += a3[k] * vk
        out[g] += s0
        out[g + 1] += s1
        out[g + 2] += s2
        out[g + 3] += s3
    for g in range(g4, G):
        a = w[g]
        s = np.float32(0)
        for k in range(K):
            s += a[k] * v[k]
        out[g] += s


@njit(**KW)
def _rows_times2(w1, v1, w2, v2, out, flip=False):
    """out[g] += w1[g] . v1 + w2[g] . v2 for every row g of w1, w2 (G, K1), (G, K2) (rows with
    unit inner stride): tile.rows_dot over the vector part of both, eight rows at a time, then
    four, then one (each row the same bits whichever), then the rows' tails of fewer than
    dot_lanes elements in order. flip: the groups of rows from the last one back (the same
    bits): a caller that flips at every other row of input starts each on the rows of W the last
    one read last, still in L2 where the weights outgrow it (one_step_live, live_turn)."""
    G, K1, K2 = w1.shape[0], w1.shape[1], w2.shape[1]
    L = dot_lanes(w1)
    g8 = G - G % 8
    if flip:  # the rows past the eights one at a time (at most 7), then the eights backwards
        for g in range(G - 1, g8 - 1, -1):
            rows_dot1(w1, v1, w2, v2, g, out)
        for g in range(g8 - 8, -1, -8):
            rows_dot8(w1, v1, w2, v2, g, out)
    else:
        g = 0
        while g + 8 <= G:
            rows_dot8(w1, v1, w2, v2, g, out)
            g += 8
        if g + 4 <= G:
            rows_dot4(w1, v1, w2, v2, g, out)
            g += 4
        while g < G:
            rows_dot1(w1, v1, w2, v2, g, out)
            g += 1
    t1, t2 = K1 - K1 % L, K2 - K2 % L
    if t1 < K1 or t2 < K2:
        for g in range(G):
            for k in range(t1, K1):
                out[g] += w1[g, k] * v1[k]
            for k in range(t2, K2):
                out[g] += w2[g, k] * v2[k]


@njit(**KW)
def one_step_live(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, h, c, turn=0):
    """one_step on the weights as they are, in torch's layout (never packed): the module's
    one-step fast path runs it on the parameters' own memory, so an update that no version
    counter records (p.data.mul_(), a write through numpy) is read like any other, with no
    copy to check. x (1, N, I) or (N, 1, I); h0, c0 (1, N, P), (1, N, H); w_ih (4H, I), w_hh
    (4H, P), b_ih, b_hh (4H,) (zeros without bias), w_hr (P, H) or (0, H); y like x with P
    features, h, c like h0, c0 (all C-contiguous). The products are row dot products, so the
    last bits differ from one_step's (a packed product sums in another order). turn: the rows
    (of x) read before this call's first on these weights (live_turn); every other row reads the
    rows of W backwards (_rows_times2's flip; the same bits)."""
    N, H, P = c0.shape[1], c0.shape[2], h0.shape[2]
    xr, yr, h0r, hr, cr = x.reshape(N, x.shape[2]), y.reshape(N, P), h0[0], h[0], c[0]
    q = np.empty(4 * H, x.dtype)
    acts = np.empty(4 * H, x.dtype)  # the gate pass writes them; inference keeps none
    hp = np.empty(H, x.dtype)  # o * tanh(c_t) before the projection
    has_proj = w_hr.shape[0] > 0
    for i in range(N):
        copy_into(q, b_ih)
        _rows_times2(w_ih, xr[i], w_hh, h0r[i], q, (turn + i) % 2 == 1)
        copy_into(cr[i], c0[0, i])
        gate_row_p(row_ptr(q, 0), row_ptr(b_hh, 0), row_ptr(acts, 0), row_ptr(cr, i),
                   row_ptr(hp, 0) if has_proj else row_ptr(hr, i), H)
        if has_proj:
            hr[i, :] = 0
            _rows_times(w_hr, hp, hr[i])
        copy_into(yr[i], hr[i])


# w_addrs of the by-address steps: the addresses of w_ih, w_hh, b_ih, b_hh and w_hr, then a count
# of the rows the calls on them read so far (LIVE_TURN), whose parity flips the order of the rows
# of W (live_turn).
LIVE_TURN = 5


@njit(**KW)
def live_turn(w_addrs, rows):
    """The rows read on w_addrs' weights before this call of `rows` rows, counting them: one_step_live's
    turn. Each row reads all of W, every other one backwards, so each starts on the rows of W
    the last one read last, still in L2 where the weights outgrow it (one step, input 128,
    hidden 512: 176 -> 131 us a product, BENCHMARKS.md, twenty-seventh session). Any order
    gives the same bits, so calls from several threads at once, which may miss a count, change
    no result."""
    turn = w_addrs[LIVE_TURN]
    w_addrs[LIVE_TURN] = turn + rows
    return turn


@njit(**KW)
def _weights_at(w_addrs, like, I, H, P):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) as arrays on the addresses w_addrs (int64, that order, then
    the rows' count: LIVE_TURN), of one_step_live's shapes (w_hr (0, H) without a projection,
    P == H), like's dtype."""
    G = 4 * H
    return (carray(addr_ptr(w_addrs[0], like), (G, I)), carray(addr_ptr(w_addrs[1], like), (G, P)),
            carray(addr_ptr(w_addrs[2], like), (G,)), carray(addr_ptr(w_addrs[3], like), (G,)),
            carray(addr_ptr(w_addrs[4], like), (P if P < H else 0, H)))


@njit(**KW)
def one_step_live_at(x_addr, I, h0, c0, w_addrs, y, h, c):
    """one_step_live with x (N * I elements, C-contiguous) and the weights (w_ih, w_hh, b_ih,
    b_hh, w_hr, C-contiguous, their shapes as one_step_live's) given by address, w_addrs an
    int64 array (_weights_at's, its turn counted here: live_turn): the module's streaming lane
    passes its input's data_ptr() and the addresses of the parameters it checked, where numpy
    views of them cost a call more than the products' share of it (Python's part of a one-step
    call, BENCHMARKS.md). The caller keeps that memory alive through the call. The same
    operations as one_step_live: the same bits."""
    N, H, P = c0.shape[1], c0.shape[2], h0.shape[2]
    x = carray(addr_ptr(x_addr, y), (1, N, I))
    w_ih, w_hh, b_ih, b_hh, w_hr = _weights_at(w_addrs, y, I, H, P)
    one_step_live(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, h, c, live_turn(w_addrs, N))


@njit(**KW)
def cell_step_at(x_addr, h0_addr, c0_addr, I, w_addrs, h, c):
    """An LSTM cell's step (no projection) for N rows: h, c (N, H) = the step of x (N, I) from
    h0, c0 (N, H), all of x, h0, c0 and the weights (as one_step_live_at's, the turn counted
    here) given by address, C-contiguous, h's dtype. The same operations as one_step_live: the
    same bits."""
    N, H = h.shape
    x = carray(addr_ptr(x_addr, h), (1, N, I))
    h0 = carray(addr_ptr(h0_addr, h), (1, N, H))
    c0 = carray(addr_ptr(c0_addr, h), (1, N, H))
    w_ih, w_hh, b_ih, b_hh, w_hr = _weights_at(w_addrs, h, I, H, H)
    h3 = h.reshape(1, N, H)
    one_step_live(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, h3, h3, c.reshape(1, N, H), live_turn(w_addrs, N))  # y is h


@njit(**KW)
def live_part_units(H, part, parts):
    """Units [u0, u1) of part `part` of `parts` (one_step_live_part): cuts at multiples of
    LANES, so every unit runs the same vector or scalar gate code as in one_step_live."""
    unit = parts * LANES
    u0 = min(H, (H * part + unit // 2) // unit * LANES)
    u1 = H if part == parts - 1 else min(H, (H * (part + 1) + unit // 2) // unit * LANES)
    return u0, u1


@njit(**KW)
def one_step_live_part(x, h0, c0, w_ih, w_hh, b_ih, b_hh, y, h, c, turn, part, parts):
    """one_step_live (no projection) for the hidden units of one part (live_part_units): each
    thread of a team reads only its units' rows of W_ih and W_hh, a 1/parts share of the
    weights, and writes only its units of y, h and c, so the parts need no barrier. Each unit
    is computed by the same operations as in one_step_live (the same bits), turn too (the gates'
    rows then backwards as well)."""
    N, H = c0.shape[1], c0.shape[2]
    u0, u1 = live_part_units(H, part, parts)
    n = u1 - u0
    if n <= 0:
        return
    xr, yr, h0r, hr, cr = x.reshape(N, x.shape[2]), y.reshape(N, H), h0[0], h[0], c[0]
    q = np.empty(4 * n, x.dtype)
    bq = np.empty(4 * n, x.dtype)  # b_hh of the part's units, gate by gate
    acts = np.empty(4 * n, x.dtype)
    for g in range(4):
        bq[g * n:(g + 1) * n] = b_hh[g * H + u0:g * H + u1]
    for i in range(N):
        flip = (turn + i) % 2 == 1
        for j in range(4):
            g = 3 - j if flip else j
            qg = q[g * n:(g + 1) * n]
            copy_into(qg, b_ih[g * H + u0:g * H + u1])
            _rows_times2(w_ih[g * H + u0:g * H + u1], xr[i], w_hh[g * H + u0:g * H + u1], h0r[i], qg, flip)
        copy_into(cr[i, u0:u1], c0[0, i, u0:u1])
        gate_row_p(row_ptr(q, 0), row_ptr(bq, 0), row_ptr(acts, 0), ptr_add(row_ptr(cr, i), u0),
                   ptr_add(row_ptr(hr, i), u0), n)
        copy_into(yr[i, u0:u1], hr[i, u0:u1])


def forward_core(x, batch_sizes, h0, c0, wp, b, wpr, reverse, acts, y, h, c, cells, save, bounds, xproj=None,
                 gemm=0, wg=None):
    """The forward pass into preallocated arrays (all C-contiguous, one dtype).

    batch_sizes int64; wp, wpr from pack_forward; b (4H,) = b_ih + b_hh (zeros for no bias);
    acts (total, 4H) out: the gate activations, written only when save (else may be (0, 4H));
    y (total, P) out; h, c (B, P), (B, H) out: h_n, c_n; cells (total, H) out: c_t of every
    row, written only when save (else may be (0, H)); bounds from chunk_bounds: one chunk per
    thread, each running forward_chunk (see run_chunks). xproj (total, 4H), optional: x W_ih^T + b
    of every row, computed by the caller as one big GEMM (worth it when one chunk holds every
    row: the steps then multiply h by W_hh alone, with no x part). gemm, wg (optional): the
    address of a BLAS's packed GEMM and [W_ih | W_hh]^T (W_hh^T with xproj) packed for it
    (blas.py): the step products then go there, and wp may be empty."""
    if xproj is None:
        xproj = np.empty((0, b.shape[0]), b.dtype)
    if wg is None:
        wg = np.empty(0, b.dtype)
    run_chunks(forward_chunk, bounds, x, batch_sizes, h0, c0, wp, b, wpr, xproj, gemm, wg, reverse, acts, y, h, c,
               cells, save, body=forward_body)


# ---- backward --------------------------------------------------------------------------------------
@njit(**KW)
def backward_step(batch_sizes, off, s, reverse, r0, r1):
    """Step s of a backward loop over rows r0:r1 (the steps in the forward's opposite order):
    (n, o, n_prev, p0): how many of the rows the step holds (n <= 0: none) and its first packed
    row o; how many of them the step that ran just before it in the forward pass holds and
    that step's first packed row (n_prev = 0: the rows start here, from h0 and c0)."""
    T = batch_sizes.shape[0]
    t = s if reverse else T - 1 - s
    n = min(r1, batch_sizes[t]) - r0
    o = off[t] + r0
    if reverse:
        tp = t + 1
        n_prev = min(r1, batch_sizes[tp]) - r0 if tp < T else 0
    else:
        tp = t - 1
        n_prev = n if tp >= 0 else 0
    n_prev = max(n_prev, 0)
    p0 = off[tp] + r0 if n_prev > 0 else 0
    return n, o, n_prev, p0


@njit(**KW)
def backward_chunk(x, batch_sizes, h0, c0, wpb, wprb, gemm, wgb, reverse, acts, cells, y, dy, dh, dc,
                   dx, dgates, xh_prev, db_rows, dh_all, hpre_all, r0, r1):
    """BPTT over rows r0:r1 (see backward_core for the arguments)."""
    T = batch_sizes.shape[0]
    off = offsets(batch_sizes)
    I = x.shape[1]
    H = dc.shape[1]
    P = dh.shape[1]
    m = r1 - r0
    dt = x.dtype
    has_proj = wprb.shape[0] > 0
    dx_here = dx.shape[0] > 0  # else wpb is W_hh alone and the caller makes dx after the loop
    I_out = I if dx_here else 0  # dh_{t-1}'s column in the product
    # [dx_t | dh_{t-1}] (or dh_{t-1}) of the chunk's rows (wpb is empty when gemm does the product)
    # The BLAS computes a few rows as padded_rows of them: qb has rows to spare, and a padded
    # product reads its dgates rows from dg_pad (dgates' next rows may lie past the array).
    qb = np.empty((max(m, PAD_ROWS) if gemm != 0 else m, max(padded_width(wpb), I_out + P)), dt)
    dg_pad = np.zeros((PAD_ROWS if gemm != 0 else 0, 4 * H), dt)
    dhp = np.empty((m if has_proj else 0, padded_width(wprb) if has_proj else 0), dt)
    no_hpre = np.empty(0, dt)
    for s in range(T):
        n, o, n_prev, p0 = backward_step(batch_sizes, off, s, reverse, r0, r1)
        if n <= 0:
            continue
        for i in range(n):  # carried + this step's output gradient (row pointers: see rows.py)
            add_p(row_ptr(dh, r0 + i), row_ptr(dy, o + i), P)
        if has_proj:
            for i in range(n):
                copy_p(row_ptr(dh_all, o + i), row_ptr(dh, r0 + i), P)
            matmul(dh[r0:], n, wprb, dhp, s % 2 == 1, WHOLE_K)  # (n, P) @ (P, H)
        for i in range(n):
            xh_i = row_ptr(xh_prev, o + i)  # [x_t | h_{t-1}]: the weight gradients' GEMM input
            copy_p(xh_i, row_ptr(x, o + i), I)
            if i < n_prev:
                cprev = row_ptr(cells, p0 + i)
                copy_p(ptr_add(xh_i, I), row_ptr(y, p0 + i), P)
            else:  # the row starts here: its previous state is h0, c0
                cprev = row_ptr(c0, r0 + i)
                copy_p(ptr_add(xh_i, I), row_ptr(h0, r0 + i), P)
            gate_backward_row_p(row_ptr(acts, o + i), row_ptr(cells, o + i), cprev,
                                row_ptr(dhp, i) if has_proj else row_ptr(dh, r0 + i), row_ptr(dc, r0 + i),
                                row_ptr(dgates, o + i), row_ptr(hpre_all, o + i) if has_proj else row_ptr(no_hpre, 0),
                                has_proj, H)
            add_p(row_ptr(db_rows, r0 + i), row_ptr(dgates, o + i), 4 * H)
        if gemm != 0:  # the BLAS's packed GEMM (blas.py)
            rows = padded_rows(n, 4 * H, I_out + P)
            gemm_packed(gemm, rows, I_out + P, 4 * H, padded_input(dgates, o, n, rows, dg_pad), 4 * H,
                        row_ptr(wgb, 0), row_ptr(qb, 0), qb.shape[1])
        else:
            matmul(dgates[o:], n, wpb, qb, s % 2 == 1, WHOLE_K)  # (n, 4H) @ (4H, I + P), or (4H, P)
        for i in range(n):
            if dx_here:
                copy_p(row_ptr(dx, o + i), row_ptr(qb, i), I)
            copy_p(row_ptr(dh, r0 + i), ptr_add(row_ptr(qb, i), I_out), P)


def backward_core(x, batch_sizes, h0, c0, wpb, wprb, reverse, acts, cells, y, dy, dh, dc,
                  dx, dgates, xh_prev, db_rows, dh_all, hpre_all, bounds, gemm=0, wgb=None):
    """BPTT through forward_core(save=True): the time loop. Weight gradients are left to the
    caller, as GEMMs over what this writes (see weight_gradients).

    wpb, wprb from pack_backward; acts, cells, y: what the forward pass left; dy (total, P);
    dh (B, P), dc (B, H): in dL/dh_n, dL/dc_n, out dL/dh0, dL/dc0 (a row's state gradient is
    left alone once its sequence is done). Out: dx (total, I) (or (0, I) with wpb packed
    without the input part: the caller then makes dx = dgates W_ih as one GEMM, where
    dx_after_loop says so), dgates (total, 4H) dL/d pre-activations, xh_prev (total, I + P)
    [x_t | h_{t-1}] of every row (so dW_ih and dW_hh are one GEMM, dgates^T xh_prev), db_rows
    (B, 4H) in zeros, out each batch row's sum of its dgates (db = their sum: no pass over the
    (total, 4H) dgates), and with a projection dh_all (total, P) dL/dh_t and hpre_all
    (total, H) the projection's input (else (0, P), (0, H)). gemm, wgb (optional): the address of
    a BLAS's packed GEMM and [W_ih | W_hh] (W_hh with dx after the loop) packed for it (blas.py):
    the step products then go there, and wpb may be empty."""
    if wgb is None:
        wgb = np.empty(0, x.dtype)
    run_chunks(backward_chunk, bounds, x, batch_sizes, h0, c0, wpb, wprb, gemm, wgb, reverse, acts, cells, y, dy, dh,
               dc, dx, dgates, xh_prev, db_rows, dh_all, hpre_all, body=backward_body)


# ---- compiled team bodies (team.py): the chunks of a split call with no Python on the team -------
# Kinds (team.spec) of the jobs: the kernel's address, its arguments before (r0, r1), the bounds.
_FORWARD_KINDS = "n a2 i1 a2 a2 a3 a1 a3 a2 n a1 b a2 a2 a2 a2 a2 b i1"
_BACKWARD_KINDS = "n a2 i1 a2 a2 a3 a3 n a1 b" + " a2" * 12 + " i1"
_FORWARD32, _FORWARD64 = spec(np.float32, _FORWARD_KINDS), spec(np.float64, _FORWARD_KINDS)
_BACKWARD32, _BACKWARD64 = spec(np.float32, _BACKWARD_KINDS), spec(np.float64, _BACKWARD_KINDS)


def _forward32(data):
    row_chunks(data, unpack(data, _FORWARD32))


def _forward64(data):
    row_chunks(data, unpack(data, _FORWARD64))


def _backward32(data):
    row_chunks(data, unpack(data, _BACKWARD32))


def _backward64(data):
    row_chunks(data, unpack(data, _BACKWARD64))


# Two whole forward_chunk calls at once, one per team thread (a team of one runs both): the two
# directions of a bidirectional layer (runtime/model.py). Kinds: the address, then each call's
# arguments with its (r0, r1).
_CHUNK_ARGS = " a2 i1 a2 a2 a3 a1 a3 a2 n a1 b a2 a2 a2 a2 a2 b n n"
_PAIR32, _PAIR64 = (spec(dt, "n" + _CHUNK_ARGS * 2) for dt in (np.float32, np.float64))


@njit(**KW)
def _two_chunk_calls(data, a):
    """A pair body: a = (forward_chunk's address, *call 0's 19 arguments, *call 1's); thread 0
    runs call 0, thread 1 call 1 (a team of one: both)."""
    k, threads = team_place(data)
    if k == 0:
        call_kernel(a[0], a[1:20])
    if k == 1 or threads == 1:
        call_kernel(a[0], a[20:39])


def _pair32(data):
    _two_chunk_calls(data, unpack(data, _PAIR32))


def _pair64(data):
    _two_chunk_calls(data, unpack(data, _PAIR64))


forward_body = team_bodies(_forward32, _forward64)
forward_pair_body = team_bodies(_pair32, _pair64)
backward_body = team_bodies(_backward32, _backward64)


# Calls of at most this many batch rows on weights of at least SPLIT_WEIGHT_GRADIENT_MIN_BYTES
# make dW_ih and dW_hh as two GEMMs, each into its own array; the others make them as one, whose
# two column blocks the caller then copies apart. The one GEMM runs faster from about 8 rows; at
# batch 1-2 the copies cost more than it gains on big weights (BENCHMARKS.md, tenth and eleventh
# sessions), and less than a second call on small ones: dW_ih and dW_hh with the copies, one
# GEMM against two, at 1 thread: 100 rows of input 64, hidden 128 114 us against 121, 1,000
# of 32, 64 232 against 252; at 1.5 MiB (100 rows of 128, 256) 452 against 437 (BENCHMARKS.md,
# twentieth session).
SPLIT_WEIGHT_GRADIENT_MAX_ROWS = 2
SPLIT_WEIGHT_GRADIENT_MIN_BYTES = 1 << 20


def weight_gradients(I, dgates, xh_prev, db_rows, dh_all, hpre_all, mm=np.dot):
    """(dw_ih, dw_hh, db, dw_hr or None) from backward_core's outputs: [dW_ih | dW_hh] as one
    GEMM (views of its columns), or, for a few batch rows (db_rows' count) on big weights, as
    two GEMMs on xh_prev's column blocks; db as the sum of the rows' sums, dW_hr one GEMM.
    mm: the matrix product to use (the torch engine passes torch's)."""
    db = db_rows.sum(0)
    dw_hr = mm(dh_all.T, hpre_all) if dh_all.shape[0] else None  # (P, total) @ (total, H)
    weight_bytes = dgates.shape[1] * xh_prev.shape[1] * dgates.itemsize
    if db_rows.shape[0] <= SPLIT_WEIGHT_GRADIENT_MAX_ROWS and weight_bytes >= SPLIT_WEIGHT_GRADIENT_MIN_BYTES:
        return mm(dgates.T, xh_prev[:, :I]), mm(dgates.T, xh_prev[:, I:]), db, dw_hr
    dw = mm(dgates.T, xh_prev)  # (4H, total) @ (total, I + P)
    return dw[:, :I], dw[:, I:], db, dw_hr


# ---- numpy-level API (the torch-free runtime and the tests use these) ------------------------------
def _prep(dtype, *arrays):
    return [np.ascontiguousarray(a, dtype=dtype) for a in arrays]


def _check(x, h0, c0, w_ih, w_hh):
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"lstmkit kernels take float32 or float64 arrays, got {x.dtype}")
    if x.ndim != 2 or w_ih.shape[1] != x.shape[1] or w_ih.shape[0] != w_hh.shape[0]:
        raise ValueError(f"shape mismatch: x {x.shape}, w_ih {w_ih.shape}, w_hh {w_hh.shape}")
    if h0.shape[1] != w_hh.shape[1] or c0.shape[1] * 4 != w_ih.shape[0]:
        raise ValueError(f"shape mismatch: h0 {h0.shape}, c0 {c0.shape}, w_hh {w_hh.shape}")


def lstm_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b=None, w_hr=None, reverse=False, save=False, chunks=1,
                 precompute=False):
    """One LSTM layer-direction over packed data, numpy in and out.

    x (total, I); batch_sizes: ints, non-increasing, sum == total (padded data of N
    sequences: [N] * T); h0 (B, P); c0 (B, H); w_ih (4H, I); w_hh (4H, P);
    b (4H,) = b_ih + b_hh or None; w_hr (P, H) or None; gate order i, f, g, o.
    All float arrays share x's dtype (float32 or float64). chunks: row chunks run in parallel.
    precompute: x W_ih^T + b of all rows as one GEMM before the loop (see forward_core).

    Returns (y, h_n, c_n): y (total, P); h_n (B, P), c_n (B, H) each sequence's state after
    its own last step (forward) or after step 0 (reverse=True, time runs backwards).
    With save=True returns (y, h_n, c_n, saved), saved = (acts, cells) for lstm_backward.
    """
    x = np.asarray(x)
    dt = x.dtype
    x, h0, c0, w_ih, w_hh = _prep(dt, x, h0, c0, w_ih, w_hh)
    _check(x, h0, c0, w_ih, w_hh)
    bsz = np.ascontiguousarray(batch_sizes, dtype=np.int64)
    H = c0.shape[1]
    P = h0.shape[1]
    b = np.zeros(4 * H, dt) if b is None else _prep(dt, b)[0]
    w_hr = None if w_hr is None else _prep(dt, w_hr)[0]
    wp, wpr = pack_forward(w_ih, w_hh, w_hr)
    total = x.shape[0]
    acts = np.empty((total if save else 0, 4 * H), dt)
    cells = np.empty((total if save else 0, H), dt)
    y = np.empty((total, P), dt)
    h_n = np.empty_like(h0)
    c_n = np.empty_like(c0)
    if total:
        xproj = input_projection(x, w_ih, b) if precompute else None
        forward_core(x, bsz, h0, c0, wp, b, wpr, bool(reverse), acts, y, h_n, c_n, cells, bool(save),
                     chunk_bounds(bsz, chunks), xproj)
    else:
        h_n[:], c_n[:] = h0, c0
    if save:
        return y, h_n, c_n, (acts, cells)
    return y, h_n, c_n


def lstm_backward(x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse, y, saved, dy, dh_n, dc_n, chunks=1,
                  dx_after=False):
    """Gradients of one layer-direction, given lstm_forward(..., save=True)'s y and saved.

    dy (total, P), dh_n (B, P), dc_n (B, H): incoming gradients (None = zeros).
    dx_after: dx = dgates W_ih as one GEMM after the loop (see backward_core).
    Returns (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr); db is the gradient of b_ih and of
    b_hh alike; dw_hr is None without projection.
    """
    x = np.asarray(x)
    dt = x.dtype
    x, h0, c0, w_ih, w_hh, y = _prep(dt, x, h0, c0, w_ih, w_hh, y)
    acts, cells = saved
    bsz = np.ascontiguousarray(batch_sizes, dtype=np.int64)
    H = c0.shape[1]
    P = h0.shape[1]
    total = x.shape[0]
    dy = np.zeros_like(y) if dy is None else _prep(dt, dy)[0]
    dh = np.zeros_like(h0) if dh_n is None else _prep(dt, dh_n)[0].copy()
    dc = np.zeros_like(c0) if dc_n is None else _prep(dt, dc_n)[0].copy()
    has_proj = w_hr is not None
    w_hr = _prep(dt, w_hr)[0] if has_proj else None
    wpb, wprb = pack_backward(w_ih, w_hh, w_hr, with_input=not dx_after)
    dx = np.empty((0 if dx_after else total, x.shape[1]), dt)
    dgates = np.empty((total, 4 * H), dt)
    xh_prev = np.empty((total, x.shape[1] + P), dt)
    db_rows = np.zeros((c0.shape[0], 4 * H), dt)
    dh_all = np.empty((total if has_proj else 0, P), dt)
    hpre_all = np.empty((total if has_proj else 0, H), dt)
    if total:
        backward_core(x, bsz, h0, c0, wpb, wprb, bool(reverse), acts, cells, y, dy, dh, dc,
                      dx, dgates, xh_prev, db_rows, dh_all, hpre_all, chunk_bounds(bsz, chunks))
    if dx_after:
        dx = np.dot(dgates, w_ih)  # (total, 4H) @ (4H, I)
    dw_ih, dw_hh, db, dw_hr = weight_gradients(x.shape[1], dgates, xh_prev, db_rows, dh_all, hpre_all)
    return dx, dh, dc, np.ascontiguousarray(dw_ih), np.ascontiguousarray(dw_hh), db, dw_hr


# One step's hidden units split over a team (one_step_live_part), for weights too big for one
# core to stream alone. Kinds: the address, then one_step_live_part's arguments before (part, parts).
_LIVE_KINDS = "n a3 a3 a3 a2 a2 a1 a1 a3 a3 a3 n"
_LIVE32, _LIVE64 = spec(np.float32, _LIVE_KINDS), spec(np.float64, _LIVE_KINDS)


def _live32(data):
    whole_team(data, unpack(data, _LIVE32))


def _live64(data):
    whole_team(data, unpack(data, _LIVE64))


live_part_body = team_bodies(_live32, _live64)


def one_step_live_split(threads: int, x, h0, c0, w_ih, w_hh, b_ih, b_hh, y, h, c, turn: int = 0) -> bool:
    """one_step_live (no projection, its turn) with the hidden units split over an OpenMP team
    of `threads` threads; False, having run nothing, without a team, while the body is being
    compiled elsewhere, or for arrays that are not C-contiguous."""
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, y, h, c)
    if not all(a.flags.c_contiguous for a in args):
        return False
    return on_team(live_part_body, one_step_live_part, threads, x.dtype, args + (int(turn),))
