"""Triton kernels for one LSTM step, forward and backward (the GPU engine's hot loop).

Each kernel runs ONE time step of one layer (one direction, or both: see Directions) over the rows (sequences) live at
that step. The input projection x W_ih^T of all steps is a single GEMM done by the
caller; what remains per step is fused here:

  forward   gates = xw_t + h_{t-1} W_hh^T + b          recurrent GEMM (one tl.dot per K block)
            i,f,o = sigmoid, g = tanh                   gate math
            c_t = f c_{t-1} + i g ;  h_t = o tanh(c_t)  state update
  backward  dh_t = dy_t + dgates_{t+1} W_hh  (or dh_n)  recurrent GEMM (no projection)
            dc_t, d(pre-activations) of the 4 gates    gate math
            dc_{t-1} = dc_t f                           state update (in place)

Gate-interleaved layout. Every 4H-wide buffer these kernels read or write (the input
projection xw, W_hh^T's columns, the bias, the saved gates, their gradients) holds gate
k of hidden unit j in column 4*j + k, gate order (i, f, g, o); the driver permutes the
weights once per call (interleave_perm) so the input projection comes out in this order.
A program owning hidden units j0 .. j0+BLOCK_H-1 then reads ONE contiguous block of
4*BLOCK_H columns and runs one dot per K block instead of four, and the gates are pulled
apart in registers (split_gates). The dot's N is 4*BLOCK_H, so BLOCK_H can be as small
as 4 (tl.dot wants every dimension >= 16): more programs, a fuller GPU at small batch.

A program owns a BLOCK_B x BLOCK_H tile of (rows, hidden units) and all four gates of
it, so the gate math never leaves registers. Every (rows, ...) buffer is packed like the
engine's data: a step's rows start at a row offset passed as an int (never specialized:
one compiled kernel serves every step), so the driver never slices tensors in its loop.

Precision: the dots accumulate in ACC_DTYPE (fp32; fp64 when ACC_F64, for float64
inputs), always passed as tl.dot's out_dtype: Triton 3.6 (the lent GPU machine's) checks
that the accumulator's dtype equals out_dtype, whose default is fp32, so an fp64
accumulator without it does not compile. Both dot operands have the same dtype (the
driver casts everything to one compute dtype). Gate math
runs in ACC_DTYPE; stores cast back to the buffer's dtype. The cell state c is kept in
the accumulation dtype by the driver, so it does not lose bits between steps in fp16/bf16.

Directions. A launch's grid has a third axis, the direction slot d (0, or 1 for the second
direction of a bidirectional layer run in the same launch): every buffer holds one slab per
direction stacked on a leading axis, (D, total, .) for per-row data, (D, B, .) for states,
(D, rows, cols) for weights, each slab contiguous, so a program finds its direction's slab
from the row counts `total` and `B` alone (dir_offset). The two directions walk time
opposite ways, so each per-step argument has a second copy (`*_r`) for slot 1; a launch with
one direction passes the same values twice. The grid's first axis covers the larger of the
two steps' row counts; each slot masks its own.

These kernels never import torch. Whether they are compiled or interpreted is decided by
triton when this module is imported (TRITON_INTERPRET=1 -> interpreter, runs on CPU
tensors); see mode().
"""
from __future__ import annotations

import triton
import triton.language as tl


# The arguments that change from step to step (row offsets and counts): never specialized, so
# one compiled kernel serves every step (engines/triton/launcher.py relies on these lists).
_STEP_ARGS = {
    "lstm_fwd_step": ("prev_row", "n_prev", "row0", "bs"),
    "rows_matmul_step": ("out_row", "base_row", "a_row", "n_live", "bs"),
    "lstm_bwd_step": ("dh_row", "a_row", "n_live", "prev_row", "n_prev", "row0", "bs"),
}
# Each per-step argument and its second direction's copy.
DO_NOT_SPECIALIZE = {k: v + tuple(a + "_r" for a in v) for k, v in _STEP_ARGS.items()}


@triton.jit
def _pick(d, first, second):
    """first for direction slot 0, second for slot 1 (scalars)."""
    return first + d * (second - first)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1, written so it saturates cleanly (exp(-2|x|) <= 1).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def split_gates(x, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BB, 4*BH) interleaved columns 4*j + k -> the four (BB, BH) gates i, f, g, o."""
    # k = 2*k1 + k0: the reshape puts k0 last; split peels the last axis.
    x4 = tl.reshape(x, (BLOCK_B, BLOCK_H, 2, 2))
    k0_is_0, k0_is_1 = tl.split(x4)  # (i, g) and (f, o), indexed by k1
    i, g = tl.split(k0_is_0)
    f, o = tl.split(k0_is_1)
    return i, f, g, o


@triton.jit
def join_gates(i, f, g, o, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Inverse of split_gates: four (BB, BH) tiles -> (BB, 4*BH) interleaved."""
    x4 = tl.join(tl.join(i, g), tl.join(f, o))  # (BB, BH, k1, k0)
    return tl.reshape(x4, (BLOCK_B, 4 * BLOCK_H))


@triton.jit
def _load_prev(prev_ptr, prev_row, prev_stride, init_ptr, init_stride, n_prev, rows64, rmask, cols, cmask):
    """(BB, len(cols)) tile of a step's previous state: rows < n_prev continue from the previous
    step's rows (prev_row.. of prev), the others start from their initial state (init, row = sequence)."""
    cont = rmask & (rows64 < n_prev)
    fresh = rmask & (rows64 >= n_prev)
    a = tl.load(prev_ptr + (prev_row + rows64)[:, None] * prev_stride + cols[None, :],
                mask=cont[:, None] & cmask[None, :], other=0.0)
    b = tl.load(init_ptr + rows64[:, None] * init_stride + cols[None, :], mask=fresh[:, None] & cmask[None, :],
                other=0.0)
    return a + b


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["lstm_fwd_step"])
def lstm_fwd_step(
    xw_ptr,  # (total, 4H)  x W_ih^T of every step (no bias), interleaved
    wt_ptr,  # (K, 4H)      W_hh^T, interleaved columns (K = P = width of h)
    b_ptr,  # (4H,)         b_ih + b_hh, interleaved (unused when not HAS_BIAS)
    hp_ptr, h0_ptr,  # h_{t-1}: rows prev_row.. of hp (*, K) for rows < n_prev, else h0 (B, K)
    cp_ptr, c0_ptr,  # c_{t-1}: the same rows of cp (*, H) / c0 (B, H)
    prev_row, n_prev,  # where the previous step's rows start in hp / cp, and how many rows continue
    gates_ptr,  # (total, 4H) out: activations i, f, g, o, interleaved (saved for backward)
    c_ptr,  # (total, H)    out: c_t
    h_ptr, h_stride,  # (total, *) out: o * tanh(c_t)  (y, or the pre-projection buffer)
    row0,  # first row of this step in xw / gates / c / h
    bs,
    prev_row_r, n_prev_r, row0_r, bs_r,  # the same for direction slot 1
    total, B, H, K,  # rows per direction of the packed buffers, of h0 / c0
    HAS_BIAS: tl.constexpr, STORE_GATES: tl.constexpr,
    ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    ACC_DTYPE = tl.float64 if ACC_F64 else tl.float32
    d = tl.program_id(2).to(tl.int64)  # direction slot: select its step and its slab of every buffer
    prev_row, n_prev = _pick(d, prev_row, prev_row_r), _pick(d, n_prev, n_prev_r)
    row0, bs = _pick(d, row0, row0_r), _pick(d, bs, bs_r)
    four_h = 4 * H
    xw_ptr += d * total * four_h
    gates_ptr += d * total * four_h
    wt_ptr += d * K * four_h
    b_ptr += d * four_h
    hp_ptr += d * total * K
    h0_ptr += d * B * K
    cp_ptr += d * total * H
    c_ptr += d * total * H
    c0_ptr += d * B * H
    h_ptr += d * total * h_stride
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,) hidden units
    cols = tl.program_id(1) * (4 * BLOCK_H) + tl.arange(0, 4 * BLOCK_H)  # (4BH,) their gate columns
    rmask = rows < bs
    umask = units < H
    cmask = cols < four_h
    m2 = rmask[:, None] & umask[None, :]  # (BB, BH)
    g2 = rmask[:, None] & cmask[None, :]  # (BB, 4BH)
    rows64 = rows.to(tl.int64)

    # Recurrent GEMM: h_{t-1} W_hh^T for the 4*BH gate columns of this program, one dot per K block.
    acc = tl.zeros((BLOCK_B, 4 * BLOCK_H), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        kmask = ks < K
        a = _load_prev(hp_ptr, prev_row, K, h0_ptr, K, n_prev, rows64, rmask, ks, kmask)  # (BB, BK)
        w = tl.load(wt_ptr + ks.to(tl.int64)[:, None] * four_h + cols[None, :],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)  # (BK, 4BH)
        if UPCAST_DOT:  # the interpreter's dot mishandles bf16; it computes in fp32 instead
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)

    # Add the input projection and bias, then the gate math, all in registers.
    rc = (row0 + rows64)[:, None]
    acc += tl.load(xw_ptr + rc * four_h + cols[None, :], mask=g2, other=0.0).to(ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC_DTYPE)[None, :]
    is_g = (cols % 4) == 2  # the cell candidate g is the only tanh gate
    act = tl.where(is_g[None, :], _tanh(acc), _sigmoid(acc))  # (BB, 4BH)
    if STORE_GATES:
        tl.store(gates_ptr + rc * four_h + cols[None, :], act.to(gates_ptr.dtype.element_ty), mask=g2)
    i, f, g, o = split_gates(act, BLOCK_B, BLOCK_H)

    c_prev = _load_prev(cp_ptr, prev_row, H, c0_ptr, H, n_prev, rows64, rmask, units, umask).to(ACC_DTYPE)
    c = f * c_prev + i * g  # (BB, BH)
    h = o * _tanh(c)
    tl.store(c_ptr + rc * H + units[None, :], c.to(c_ptr.dtype.element_ty), mask=m2)
    tl.store(h_ptr + rc * h_stride + units[None, :], h.to(h_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["rows_matmul_step"])
def rows_matmul_step(
    out_ptr, out_row, out_stride,  # (*, N) out: rows out_row .. out_row + bs
    base_ptr, base_row, base_stride,  # (*, N) added to every row (HAS_BASE)
    a_ptr, a_row, a_stride,  # (*, K) the rows r < n_live are a[a_row + r] @ w ...
    w_ptr,  # (K, N) row-major
    alt_ptr, alt_stride,  # (B, N) ... the rows r >= n_live get alt[r] instead (HAS_ALT)
    n_live, bs,
    out_row_r, base_row_r, a_row_r, n_live_r, bs_r,  # the same for direction slot 1
    total, B, N, K,  # rows per direction of out / base / a, of alt
    HAS_BASE: tl.constexpr, HAS_ALT: tl.constexpr,
    ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step's projection GEMM, so the step loop runs no torch op: forward y_t = h_t W_hr^T;
    backward dL/dy_t + (dgates_{t+1} W_hh for the rows that go on, dL/dh_n for the rows that end)."""
    ACC_DTYPE = tl.float64 if ACC_F64 else tl.float32
    d = tl.program_id(2).to(tl.int64)
    out_row, base_row, a_row = _pick(d, out_row, out_row_r), _pick(d, base_row, base_row_r), _pick(d, a_row, a_row_r)
    n_live, bs = _pick(d, n_live, n_live_r), _pick(d, bs, bs_r)
    out_ptr += d * total * out_stride
    base_ptr += d * total * base_stride
    a_ptr += d * total * a_stride
    w_ptr += d * K * N
    alt_ptr += d * B * alt_stride
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < bs
    nmask = ns < N
    m2 = rmask[:, None] & nmask[None, :]
    rows64 = rows.to(tl.int64)
    live = rmask & (rows64 < n_live)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + (a_row + rows64)[:, None] * a_stride + ks[None, :],
                    mask=live[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * N + ns[None, :], mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if HAS_ALT:
        ended = m2 & (rows64 >= n_live)[:, None]
        acc += tl.load(alt_ptr + rows64[:, None] * alt_stride + ns[None, :], mask=ended, other=0.0).to(ACC_DTYPE)
    if HAS_BASE:
        acc += tl.load(base_ptr + (base_row + rows64)[:, None] * base_stride + ns[None, :], mask=m2,
                       other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + (out_row + rows64)[:, None] * out_stride + ns[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m2)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE["lstm_bwd_step"])
def lstm_bwd_step(
    dh_ptr, dh_row, dh_stride,  # dL/dh_t from outside the recurrence (HAS_DH): dy_t
    a_ptr, a_row, a_stride, n_live,  # dh_t += a[a_row + r] @ w for rows r < n_live ...
    w_ptr, KD,  # (KD, H) ... : dgates_{t+1} (interleaved) @ W_hh (interleaved rows), or dL/dy_t @ W_hr
    dhn_ptr, dhn_stride,  # (B, H) ... and rows r >= n_live get dL/dh_n[r] (HAS_DHN)
    dg_ptr,  # (total, 4H) out, interleaved: this step's gate pre-activation grads
    gates_ptr,  # (total, 4H) saved activations, interleaved
    c_ptr,  # (total, H)    saved c_t
    cp_ptr, c0_ptr, prev_row, n_prev,  # c_{t-1}: rows < n_prev from cp[prev_row..], the others from c0
    dc_ptr,  # (B, H) in/out, in place: dL/dc_t in, dL/dc_{t-1} out (rows < bs)
    row0, bs,
    dh_row_r, a_row_r, n_live_r, prev_row_r, n_prev_r, row0_r, bs_r,  # the same for direction slot 1
    total, B, H,  # rows per direction of the packed buffers, of dh_n / c0 / dc
    HAS_DH: tl.constexpr, HAS_DHN: tl.constexpr,
    ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Without a projection: HAS_DH (dy_t), a = the next step's gate grads, w = W_hh, HAS_DHN.
    # With one, a kernel before this one summed dL/dy_t and the recurrence into a (width P):
    # a = those rows, w = W_hr, every row live, no dh nor dh_n here.
    ACC_DTYPE = tl.float64 if ACC_F64 else tl.float32
    d = tl.program_id(2).to(tl.int64)
    dh_row, a_row, n_live = _pick(d, dh_row, dh_row_r), _pick(d, a_row, a_row_r), _pick(d, n_live, n_live_r)
    prev_row, n_prev = _pick(d, prev_row, prev_row_r), _pick(d, n_prev, n_prev_r)
    row0, bs = _pick(d, row0, row0_r), _pick(d, bs, bs_r)
    four_h = 4 * H
    dh_ptr += d * total * dh_stride
    a_ptr += d * total * a_stride
    w_ptr += d * KD * H
    dhn_ptr += d * B * dhn_stride
    dg_ptr += d * total * four_h
    gates_ptr += d * total * four_h
    c_ptr += d * total * H
    cp_ptr += d * total * H
    c0_ptr += d * B * H
    dc_ptr += d * B * H
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(1) * (4 * BLOCK_H) + tl.arange(0, 4 * BLOCK_H)
    rmask = rows < bs
    umask = units < H
    cmask = cols < four_h
    m2 = rmask[:, None] & umask[None, :]
    g2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)

    dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=ACC_DTYPE)
    live = rmask & (rows64 < n_live)
    for k0 in range(0, KD, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < KD
        a = tl.load(a_ptr + (a_row + rows64)[:, None] * a_stride + ks[None, :],
                    mask=live[:, None] & kmask[None, :], other=0.0)  # (BB, BK)
        w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * H + units[None, :],
                    mask=kmask[:, None] & umask[None, :], other=0.0)  # (BK, BH)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        dh = tl.dot(a, w, dh, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if HAS_DHN:
        ended = m2 & (rows64 >= n_live)[:, None]
        dh += tl.load(dhn_ptr + rows64[:, None] * dhn_stride + units[None, :], mask=ended, other=0.0).to(ACC_DTYPE)
    if HAS_DH:
        dh += tl.load(dh_ptr + (dh_row + rows64)[:, None] * dh_stride + units[None, :], mask=m2,
                      other=0.0).to(ACC_DTYPE)

    rc = (row0 + rows64)[:, None]
    act = tl.load(gates_ptr + rc * four_h + cols[None, :], mask=g2, other=0.0).to(ACC_DTYPE)
    i, f, g, o = split_gates(act, BLOCK_B, BLOCK_H)
    c = tl.load(c_ptr + rc * H + units[None, :], mask=m2, other=0.0).to(ACC_DTYPE)
    c_prev = _load_prev(cp_ptr, prev_row, H, c0_ptr, H, n_prev, rows64, rmask, units, umask).to(ACC_DTYPE)
    dcp = dc_ptr + rows64[:, None] * H + units[None, :]

    # h = o tanh(c);  c = f c_prev + i g
    tc = _tanh(c)
    dc = tl.load(dcp, mask=m2, other=0.0).to(ACC_DTYPE) + dh * o * (1.0 - tc * tc)
    d_o = dh * tc
    d_i = dc * g
    d_g = dc * i
    d_f = dc * c_prev
    tl.store(dcp, (dc * f).to(dc_ptr.dtype.element_ty), mask=m2)

    # Through the nonlinearities to the pre-activations, stored as one interleaved tile.
    dpre = join_gates(d_i * i * (1.0 - i), d_f * f * (1.0 - f), d_g * (1.0 - g * g), d_o * o * (1.0 - o),
                      BLOCK_B, BLOCK_H)
    tl.store(dg_ptr + rc * four_h + cols[None, :], dpre.to(dg_ptr.dtype.element_ty), mask=g2)


def _is_interpreted(kernel) -> bool:
    # triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set at import.
    return type(kernel).__name__ == "InterpretedFunction"


_OURS_INTERPRETED = _is_interpreted(lstm_fwd_step)  # read once: tests may swap the kernels


def mode() -> str:
    """"compiled", "interpreted", or "mixed": TRITON_INTERPRET was set after triton itself was
    imported but before this module, so triton.language's own helpers (tl.zeros, ...) are
    compiled-mode while our kernels are interpreted, and nothing can run."""
    ours, theirs = _OURS_INTERPRETED, _is_interpreted(tl.zeros)
    if ours and theirs:
        return "interpreted"
    return "mixed" if ours or theirs else "compiled"


INTERPRETED = mode() == "interpreted"
