"""Triton kernels for one LSTM step, forward and backward (the GPU engine's hot loop).

Each kernel runs ONE time step of one layer-direction over the rows (sequences) live at
that step. The input projection x W_ih^T of all steps is a single GEMM done by the
caller (torch.matmul); what remains per step is fused here:

  forward   gates = xw_t + h_{t-1} W_hh^T + b          recurrent GEMM (tl.dot, fp32 acc)
            i,f,o = sigmoid, g = tanh                   gate math
            c_t = f c_{t-1} + i g ;  h_t = o tanh(c_t)  state update
  backward  dh_t = dy_t + dgates_{t+1} W_hh  (or dh_n)  recurrent GEMM (no projection)
            dc_t, d(pre-activations) of the 4 gates    gate math
            dc_{t-1} = dc_t f                           state update (in place)

A program owns a BLOCK_B x BLOCK_H tile of (rows, hidden units) and computes all four
gates of it, so the gate math never leaves registers. Gate order is (i, f, g, o): gate k
of hidden unit j lives in column k*H + j of every (rows, 4H) buffer.

Every (rows, ...) buffer is packed like the engine's data: a step's rows start at a
row offset passed as an int, so the driver never slices tensors in its loop.

Precision: loads are upcast and everything accumulates in fp32 (fp64 for float64
inputs); stores cast back to the buffer's dtype. The cell state c is kept in the
accumulation dtype by the driver, so it does not lose bits between steps in fp16/bf16.

This module imports triton and works on torch tensors: it is NOT under kernels/ (numpy).
Whether kernels are compiled or interpreted is decided by triton when it is imported
(TRITON_INTERPRET=1 -> interpreter, runs on CPU tensors); see mode().
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1, written so it saturates cleanly (exp(-2|x|) <= 1).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit(do_not_specialize=["row0", "hp_row", "cp_row", "bs"])
def lstm_fwd_step(
    xw_ptr,  # (total, 4H)  x W_ih^T of every step (no bias)
    wt_ptr,  # (K, 4H)      W_hh^T, contiguous (K = P = width of h)
    b_ptr,  # (4H,)         b_ih + b_hh (unused when not HAS_BIAS)
    hp_ptr, hp_row, hp_stride,  # h_{t-1}: rows hp_row.. of a (*, K) buffer
    cp_ptr, cp_row, cp_stride,  # c_{t-1}: rows cp_row.. of a (*, H) buffer
    gates_ptr,  # (total, 4H) out: activations i, f, g, o (saved for backward)
    c_ptr,  # (total, H)    out: c_t
    h_ptr, h_stride,  # (total, *) out: o * tanh(c_t)  (y, or the pre-projection buffer)
    row0,  # first row of this step in xw / gates / c / h
    bs, H, K,
    HAS_BIAS: tl.constexpr, STORE_GATES: tl.constexpr,
    ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,) hidden units
    rmask = rows < bs
    cmask = cols < H
    m2 = rmask[:, None] & cmask[None, :]  # (BB, BH)
    rows64 = rows.to(tl.int64)

    # Recurrent GEMM: the four gate blocks of h_{t-1} W_hh^T, columns `cols` of each.
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_ty)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_ty)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_ty)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_ty)
    four_h = 4 * H
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        kmask = ks < K
        a = tl.load(hp_ptr + (hp_row + rows64)[:, None] * hp_stride + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)  # (BB, BK)
        wm = kmask[:, None] & cmask[None, :]
        w_base = wt_ptr + ks.to(tl.int64)[:, None] * four_h + cols[None, :]  # (BK, BH)
        w_i = tl.load(w_base + 0 * H, mask=wm, other=0.0)
        w_f = tl.load(w_base + 1 * H, mask=wm, other=0.0)
        w_g = tl.load(w_base + 2 * H, mask=wm, other=0.0)
        w_o = tl.load(w_base + 3 * H, mask=wm, other=0.0)
        if UPCAST_DOT:  # the interpreter's dot mishandles bf16; it computes in fp32 instead
            a = a.to(tl.float32)
            w_i, w_f, w_g, w_o = w_i.to(tl.float32), w_f.to(tl.float32), w_g.to(tl.float32), w_o.to(tl.float32)
        acc_i = tl.dot(a, w_i, acc_i, input_precision=PRECISION)
        acc_f = tl.dot(a, w_f, acc_f, input_precision=PRECISION)
        acc_g = tl.dot(a, w_g, acc_g, input_precision=PRECISION)
        acc_o = tl.dot(a, w_o, acc_o, input_precision=PRECISION)

    # Add the input projection and bias, then the gate math, all in registers.
    xw = xw_ptr + (row0 + rows64)[:, None] * four_h + cols[None, :]  # (BB, BH) pointers
    acc_i += tl.load(xw + 0 * H, mask=m2, other=0.0).to(acc_ty)
    acc_f += tl.load(xw + 1 * H, mask=m2, other=0.0).to(acc_ty)
    acc_g += tl.load(xw + 2 * H, mask=m2, other=0.0).to(acc_ty)
    acc_o += tl.load(xw + 3 * H, mask=m2, other=0.0).to(acc_ty)
    if HAS_BIAS:
        acc_i += tl.load(b_ptr + 0 * H + cols, mask=cmask, other=0.0).to(acc_ty)[None, :]
        acc_f += tl.load(b_ptr + 1 * H + cols, mask=cmask, other=0.0).to(acc_ty)[None, :]
        acc_g += tl.load(b_ptr + 2 * H + cols, mask=cmask, other=0.0).to(acc_ty)[None, :]
        acc_o += tl.load(b_ptr + 3 * H + cols, mask=cmask, other=0.0).to(acc_ty)[None, :]
    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)

    c_prev = tl.load(cp_ptr + (cp_row + rows64)[:, None] * cp_stride + cols[None, :], mask=m2, other=0.0).to(acc_ty)
    c = f * c_prev + i * g  # (BB, BH)
    h = o * _tanh(c)

    rc = (row0 + rows64)[:, None]
    tl.store(c_ptr + rc * H + cols[None, :], c.to(c_ptr.dtype.element_ty), mask=m2)
    tl.store(h_ptr + rc * h_stride + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=m2)
    if STORE_GATES:
        gp = gates_ptr + rc * four_h + cols[None, :]
        gty = gates_ptr.dtype.element_ty
        tl.store(gp + 0 * H, i.to(gty), mask=m2)
        tl.store(gp + 1 * H, f.to(gty), mask=m2)
        tl.store(gp + 2 * H, g.to(gty), mask=m2)
        tl.store(gp + 3 * H, o.to(gty), mask=m2)


@triton.jit(do_not_specialize=["row0", "dh_row", "next_row", "n_next", "cp_row", "bs"])
def lstm_bwd_step(
    dh_ptr, dh_row, dh_stride,  # dL/dh_t from outside the recurrence: dy_t (FUSE_REC) or the full dh_t
    dg_ptr,  # (total, 4H) in/out: gate pre-activation grads; reads the next step's, writes this one's
    next_row, n_next,  # the next step's rows in dg; rows < n_next get their recurrent grad from it
    w_ptr,  # (4H, H)  W_hh (only with FUSE_REC, i.e. no projection: K = H)
    dhn_ptr, dhn_stride,  # (B, H) dL/dh_n: the recurrent grad of rows >= n_next (FUSE_REC)
    gates_ptr,  # (total, 4H) saved activations i, f, g, o
    c_ptr,  # (total, H)    saved c_t
    cp_ptr, cp_row, cp_stride,  # c_{t-1}
    dc_ptr,  # (B, H) in/out, in place: dL/dc_t in, dL/dc_{t-1} out (rows < bs)
    row0, bs, H,
    FUSE_REC: tl.constexpr,
    ACC_F64: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = rows < bs
    cmask = cols < H
    m2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    four_h = 4 * H

    dh = tl.load(dh_ptr + (dh_row + rows64)[:, None] * dh_stride + cols[None, :], mask=m2, other=0.0).to(acc_ty)
    if FUSE_REC:
        # dh_t += dgates_{t+1} W_hh for the rows that go on to the next step; the rows
        # whose sequence ends here get dL/dh_n instead.
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=acc_ty)
        live = rmask & (rows < n_next)
        for k0 in range(0, four_h, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < four_h
            a = tl.load(dg_ptr + (next_row + rows64)[:, None] * four_h + ks[None, :],
                        mask=live[:, None] & kmask[None, :], other=0.0)  # (BB, BK)
            w = tl.load(w_ptr + ks.to(tl.int64)[:, None] * H + cols[None, :],
                        mask=kmask[:, None] & cmask[None, :], other=0.0)  # (BK, BH)
            if UPCAST_DOT:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        ended = rmask[:, None] & (rows >= n_next)[:, None] & cmask[None, :]
        acc += tl.load(dhn_ptr + rows64[:, None] * dhn_stride + cols[None, :], mask=ended, other=0.0).to(acc_ty)
        dh += acc

    rc = (row0 + rows64)[:, None]
    gp = gates_ptr + rc * four_h + cols[None, :]
    i = tl.load(gp + 0 * H, mask=m2, other=0.0).to(acc_ty)
    f = tl.load(gp + 1 * H, mask=m2, other=0.0).to(acc_ty)
    g = tl.load(gp + 2 * H, mask=m2, other=0.0).to(acc_ty)
    o = tl.load(gp + 3 * H, mask=m2, other=0.0).to(acc_ty)
    c = tl.load(c_ptr + rc * H + cols[None, :], mask=m2, other=0.0).to(acc_ty)
    c_prev = tl.load(cp_ptr + (cp_row + rows64)[:, None] * cp_stride + cols[None, :], mask=m2, other=0.0).to(acc_ty)
    dcp = dc_ptr + rows64[:, None] * H + cols[None, :]

    # h = o tanh(c);  c = f c_prev + i g
    tc = _tanh(c)
    dc = tl.load(dcp, mask=m2, other=0.0).to(acc_ty) + dh * o * (1.0 - tc * tc)
    d_o = dh * tc
    d_i = dc * g
    d_g = dc * i
    d_f = dc * c_prev
    tl.store(dcp, (dc * f).to(dc_ptr.dtype.element_ty), mask=m2)

    # Through the nonlinearities to the pre-activations.
    dgp = dg_ptr + rc * four_h + cols[None, :]
    gty = dg_ptr.dtype.element_ty
    tl.store(dgp + 0 * H, (d_i * i * (1.0 - i)).to(gty), mask=m2)
    tl.store(dgp + 1 * H, (d_f * f * (1.0 - f)).to(gty), mask=m2)
    tl.store(dgp + 2 * H, (d_g * (1.0 - g * g)).to(gty), mask=m2)
    tl.store(dgp + 3 * H, (d_o * o * (1.0 - o)).to(gty), mask=m2)


def _is_interpreted(kernel) -> bool:
    # triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set at import.
    return type(kernel).__name__ == "InterpretedFunction"


def mode() -> str:
    """"compiled", "interpreted", or "mixed": TRITON_INTERPRET was set after triton itself was
    imported but before this module, so triton.language's own helpers (tl.zeros, ...) are
    compiled-mode while our kernels are interpreted, and nothing can run."""
    ours, theirs = _is_interpreted(lstm_fwd_step), _is_interpreted(tl.zeros)
    if ours and theirs:
        return "interpreted"
    return "mixed" if ours or theirs else "compiled"


INTERPRETED = mode() == "interpreted"
