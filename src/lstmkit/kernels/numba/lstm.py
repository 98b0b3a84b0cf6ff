"""Fused LSTM kernels for one layer-direction over packed data (numpy + Numba, no torch).

Shapes (B = batch_sizes[0], T = len(batch_sizes), P = proj_size or H):

    x        (total, I)  time-major packed rows: step t holds rows off[t] : off[t] + batch_sizes[t]
    h0, c0   (B, P), (B, H)
    w_ih     (4H, I)   w_hh (4H, P)   b (4H,) = b_ih + b_hh   w_hr (P, H)   gate rows [i|f|g|o]
    y        (total, P)  h_n (B, P)  c_n (B, H)

Forward, per step (engines/reference.py has the readable version):

    gates = x_t W_ih^T + h_{t-1} W_hh^T + b      (bs, 4H)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(c_t)  [ @ W_hr^T ]

How the work is laid out:
  - the input projection of every step is ONE GEMM, x @ W_ih^T, written into `acts` (total, 4H);
  - each step does one GEMM (GEMV at batch 1) for h_{t-1} @ W_hh^T into a (B, 4H) scratch
    and then one fused pass over the gates that overwrites the step's rows of `acts` with
    the activations (i, f, g, o) — so the buffer of the input GEMM is also what training
    saves for backward, and inference keeps nothing;
  - all buffers are allocated before the time loop; the weights are used in their torch
    layout (BLAS reads W^T without a copy), except W_hh^T, laid out once per call for
    sequences of 8+ steps, where it pays.

Backward (BPTT) walks the steps in the opposite order, keeps the gradient of the state
(dh, dc) in (B, P)/(B, H) buffers, does one GEMM per step for dh_{t-1} = dgates W_hh,
and leaves every weight gradient to one GEMM each after the loop.
"""
import numpy as np
from numba import njit

from .activations import sigmoid, tanh

# Fast-math without 'nnan'/'ninf': LLVM may reassociate and contract (FMA), which SIMD
# reductions need, but must keep inf semantics (the float64 sigmoid relies on
# 1/(1+inf) = 0 for huge negative inputs) and NaN propagation.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
KW = dict(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)


@njit(**KW)
def _offsets(batch_sizes):
    T = batch_sizes.shape[0]
    off = np.empty(T + 1, np.int64)
    off[0] = 0
    for t in range(T):
        off[t + 1] = off[t] + batch_sizes[t]
    return off


@njit(**KW)
def recurrent_layout(w_hh, T):
    """W_hh^T laid out row-major (P, 4H) when that pays (see forward_core), else (0, 0)."""
    if T >= 8 and w_hh.size <= 131072:
        return np.ascontiguousarray(w_hh.T)
    return np.empty((0, 0), w_hh.dtype)


@njit(**KW)
def gate_step(a, q, b_ih, b_hh, c, h_out, cells, save):
    """The fused gate pass of one step, over its bs rows, in place.

    a (bs, 4H)  in: x_t W_ih^T; out: the activations (i, f, g, o)
    q (bs, 4H)  h_{t-1} W_hh^T
    c (bs, H)   in: c_{t-1}; out: c_t
    h_out (bs, H)  out: o * tanh(c_t)  (before the projection)
    cells (bs, H)  out: c_t, written only when save
    """
    bs, H = c.shape
    bi, bf, bg, bo = b_ih[:H], b_ih[H : 2 * H], b_ih[2 * H : 3 * H], b_ih[3 * H :]
    ci, cf, cg, co = b_hh[:H], b_hh[H : 2 * H], b_hh[2 * H : 3 * H], b_hh[3 * H :]
    for r in range(bs):
        # Each gate gets its own 1-D slice: with a[j], a[H + j], ... on one array LLVM
        # cannot rule out overlap and leaves the loop scalar (7x slower).
        ar = a[r]
        ai, af, ag, ao = ar[:H], ar[H : 2 * H], ar[2 * H : 3 * H], ar[3 * H :]
        qr = q[r]
        qi, qf, qg, qo = qr[:H], qr[H : 2 * H], qr[2 * H : 3 * H], qr[3 * H :]
        cr = c[r]
        hr = h_out[r]
        for j in range(H):
            ig = sigmoid(ai[j] + qi[j] + (bi[j] + ci[j]))
            fg = sigmoid(af[j] + qf[j] + (bf[j] + cf[j]))
            gg = tanh(ag[j] + qg[j] + (bg[j] + cg[j]))
            og = sigmoid(ao[j] + qo[j] + (bo[j] + co[j]))
            ai[j] = ig
            af[j] = fg
            ag[j] = gg
            ao[j] = og
            cv = fg * cr[j] + ig * gg
            cr[j] = cv
            hr[j] = og * tanh(cv)
        if save:
            cells[r] = cr


@njit(**KW)
def forward_core(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, acts, y, h, c, cells, save):
    """The forward pass, writing into preallocated arrays (all C-contiguous, one dtype).

    acts  (total, 4H)  scratch; on return the gate activations (i, f, g, o) of every row
    y     (total, P)   output
    h, c  (B, P), (B, H)  on return h_n, c_n
    cells (total, H)   c_t of every row, written only when save (else may be (0, H))
    b_ih, b_hh (4H,) always given (zeros for bias=False; passing both saves the caller a sum)
    w_hr  (P, H), or (0, H) for no projection.
    """
    T = batch_sizes.shape[0]
    B, H = c0.shape
    P = h0.shape[1]
    has_proj = w_hr.shape[0] > 0
    off = _offsets(batch_sizes)
    h[:] = h0
    c[:] = c0
    hh = np.empty((B, 4 * H), acts.dtype)  # h_{t-1} @ W_hh^T of one step
    hp = np.empty((B, H), acts.dtype)  # h before the projection (proj only)
    if T == 0:
        return
    np.dot(x, w_ih.T, acts)  # (total, 4H): the input projection of all steps at once
    # BLAS is faster on W_hh^T laid out (P, 4H) row-major than on W_hh transposed on the
    # fly (measured: 4.1 vs 7.1 us for (16, 64) @ (64, 256), 2.1 vs 3.4 us at batch 1,
    # H=128), not at (32, 256) @ (256, 1024); the copy costs about one step, so we make
    # it only for longer sequences and smaller matrices.
    w_hh_t = recurrent_layout(w_hh, T)
    layout = w_hh_t.shape[0] > 0
    for s in range(T):
        t = T - 1 - s if reverse else s
        bs = batch_sizes[t]
        o0 = off[t]
        if layout:
            np.dot(h[:bs], w_hh_t, hh[:bs])  # (bs, P) @ (P, 4H)
        else:
            np.dot(h[:bs], w_hh.T, hh[:bs])
        gate_step(acts[o0 : o0 + bs], hh[:bs], b_ih, b_hh, c[:bs], hp[:bs] if has_proj else h[:bs],
                  cells[o0 : o0 + bs] if save else cells, save)
        if has_proj:
            np.dot(hp[:bs], w_hr.T, y[o0 : o0 + bs])  # (bs, H) @ (H, P)
            h[:bs] = y[o0 : o0 + bs]
        else:
            y[o0 : o0 + bs] = h[:bs]


@njit(**KW)
def gate_backward_step(a, cells, cprev, dh, dc, dgates, hpre, want_hpre):
    """The gate gradients of one step, over its bs rows (the inverse of gate_step).

    a (bs, 4H) activations i, f, g, o;  cells (bs, H) c_t;  cprev (bs, H) c_{t-1}
    dh (bs, H)  dL/dh_t before the projection (carried + this step's output gradient)
    dc (bs, H)  in: dL/dc_t carried from t+1; out: dL/dc_{t-1}
    dgates (bs, 4H)  out: dL/d(pre-activation gates)
    hpre (bs, H)  out when want_hpre: o * tanh(c_t), the projection's input (for dW_hr)
    """
    bs, H = dc.shape
    for r in range(bs):
        ar = a[r]  # one slice per gate (see gate_step)
        ai, af, ag, ao = ar[:H], ar[H : 2 * H], ar[2 * H : 3 * H], ar[3 * H :]
        dgr = dgates[r]
        di, df, dg, do = dgr[:H], dgr[H : 2 * H], dgr[2 * H : 3 * H], dgr[3 * H :]
        cr = cells[r]
        cp = cprev[r]
        dcr = dc[r]
        dhr = dh[r]
        for j in range(H):
            ig = ai[j]
            fg = af[j]
            gg = ag[j]
            og = ao[j]
            tc = tanh(cr[j])
            dhv = dhr[j]
            # No literal 1 here: int - float32 types as float64 in Numba, which would
            # run the whole float32 loop in float64 (s' = s - s^2, tanh' = 1 - t^2).
            dct = dcr[j] + dhv * (og - og * tc * tc)  # dL/dc_t: carried + through h_t
            di[j] = dct * gg * (ig - ig * ig)
            df[j] = dct * cp[j] * (fg - fg * fg)
            dg[j] = dct * (ig - ig * gg * gg)
            do[j] = dhv * tc * (og - og * og)
            dcr[j] = dct * fg  # dL/dc_{t-1}
        if want_hpre:
            hr = hpre[r]
            for j in range(H):
                hr[j] = ao[j] * tanh(cr[j])


@njit(**KW)
def backward_core(x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse, acts, cells, y,
                  dy, dh_n, dc_n, dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr):
    """BPTT through forward_core(save=True). Writes dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr.

    acts, cells, y: what the forward pass left. dy (total, P), dh_n (B, P), dc_n (B, H)
    are the incoming gradients (zeros where unused). db is the gradient of b_ih and of
    b_hh alike. dw_hr may be (0, H) without projection.
    """
    T = batch_sizes.shape[0]
    B, H = c0.shape
    P = h0.shape[1]
    total = x.shape[0]
    has_proj = w_hr.shape[0] > 0
    off = _offsets(batch_sizes)
    dt = acts.dtype
    dgates = np.empty((total, 4 * H), dt)  # d loss / d pre-activation gates, every row
    # dW_hh = sum over rows of dgates^T h_{t-1}. With every step the same size (padded
    # data) the h_{t-1} rows are y shifted by one step (plus h0), so two GEMMs read y in
    # place; packed data gathers h_{t-1} into a (total, P) buffer for one GEMM.
    uniform = True
    for t in range(T):
        if batch_sizes[t] != B:
            uniform = False
    h_prev = np.empty((0 if uniform else total, P), dt)
    dh = dh_n.copy()  # (B, P) gradient w.r.t. the state h, carried backwards in time
    dc = dc_n.copy()  # (B, H)
    dhp = np.empty((B, H), dt)  # gradient w.r.t. h before projection (proj only)
    cprev = np.empty((B, H), dt)  # c_{t-1} of one step's rows
    dh_all = np.empty((total if has_proj else 0, P), dt)  # for dW_hr in one GEMM
    hpre_all = np.empty((total if has_proj else 0, H), dt)

    for s in range(T):
        t = s if reverse else T - 1 - s
        bs = batch_sizes[t]
        o0 = off[t]
        # The step that ran just before t in the forward pass, and how many of our rows it holds.
        if reverse:
            tp = t + 1
            n_prev = batch_sizes[tp] if tp < T else 0
        else:
            tp = t - 1
            n_prev = bs if tp >= 0 else 0
        p0 = off[tp] if n_prev > 0 else 0

        for r in range(bs):  # dh_total = dh carried + dy of this step
            for k in range(P):
                dh[r, k] += dy[o0 + r, k]
        if has_proj:
            dh_all[o0 : o0 + bs] = dh[:bs]
            np.dot(dh[:bs], w_hr, dhp[:bs])  # (bs, P) @ (P, H)
        # c_{t-1} of this step's rows: the previous step's cells, or c0 for rows starting here
        cprev[:n_prev] = cells[p0 : p0 + n_prev]
        cprev[n_prev:bs] = c0[n_prev:bs]
        if not uniform:
            h_prev[o0 : o0 + n_prev] = y[p0 : p0 + n_prev]
            h_prev[o0 + n_prev : o0 + bs] = h0[n_prev:bs]
        gate_backward_step(acts[o0 : o0 + bs], cells[o0 : o0 + bs], cprev[:bs], dhp[:bs] if has_proj else dh[:bs],
                           dc[:bs], dgates[o0 : o0 + bs], hpre_all[o0 : o0 + bs] if has_proj else hpre_all, has_proj)
        np.dot(dgates[o0 : o0 + bs], w_hh, dh[:bs])  # (bs, 4H) @ (4H, P): dh_{t-1}

    # Rows never touched again keep their last value: that is dh0/dc0 (see module doc).
    dh0[:] = dh
    dc0[:] = dc
    np.dot(dgates, w_ih, dx)  # (total, 4H) @ (4H, I)
    np.dot(dgates.T, x, dw_ih)  # (4H, total) @ (total, I)
    if not uniform:
        np.dot(dgates.T, h_prev, dw_hh)  # (4H, total) @ (total, P)
    else:
        # forward: rows of steps 1.. pair with y of steps ..T-2; step 0 with h0 (reverse: mirrored)
        first = dgates[total - B :] if reverse else dgates[:B]  # the step whose h_{t-1} is h0
        np.dot(first.T, h0, dw_hh)  # (4H, B) @ (B, P)
        if total > B:
            rest = dgates[: total - B] if reverse else dgates[B:]
            prev = y[B:] if reverse else y[: total - B]
            dw_hh += np.dot(rest.T, prev)  # (4H, total - B) @ (total - B, P)
    db[:] = 0
    for row in range(total):
        db += dgates[row]
    if has_proj:
        np.dot(dh_all.T, hpre_all, dw_hr)  # (P, total) @ (total, H)


# ---- numpy-level API (the torch-free runtime and the torch engine both use these) ------------

def _prep(dtype, *arrays):
    return [np.ascontiguousarray(a, dtype=dtype) for a in arrays]


def _check(x, h0, c0, w_ih, w_hh):
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"lstmkit kernels take float32 or float64 arrays, got {x.dtype}")
    if x.ndim != 2 or w_ih.shape[1] != x.shape[1] or w_ih.shape[0] != w_hh.shape[0]:
        raise ValueError(f"shape mismatch: x {x.shape}, w_ih {w_ih.shape}, w_hh {w_hh.shape}")
    if h0.shape[1] != w_hh.shape[1] or c0.shape[1] * 4 != w_ih.shape[0]:
        raise ValueError(f"shape mismatch: h0 {h0.shape}, c0 {c0.shape}, w_hh {w_hh.shape}")


def lstm_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b=None, w_hr=None, reverse=False, save=False):
    """One LSTM layer-direction over packed data, numpy in and out.

    x (total, I); batch_sizes: ints, non-increasing, sum == total (padded data of N
    sequences: [N] * T); h0 (B, P); c0 (B, H); w_ih (4H, I); w_hh (4H, P);
    b (4H,) = b_ih + b_hh or None; w_hr (P, H) or None; gate order i, f, g, o.
    All float arrays share x's dtype (float32 or float64).

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
    w_hr = np.zeros((0, H), dt) if w_hr is None else _prep(dt, w_hr)[0]
    total = x.shape[0]
    acts = np.empty((total, 4 * H), dt)
    y = np.empty((total, P), dt)
    h_n = np.empty_like(h0)
    c_n = np.empty_like(c0)
    cells = np.empty((total if save else 0, H), dt)
    forward_core(x, bsz, h0, c0, w_ih, w_hh, b, np.zeros_like(b), w_hr, bool(reverse), acts, y, h_n, c_n, cells,
                 bool(save))
    if save:
        return y, h_n, c_n, (acts, cells)
    return y, h_n, c_n


def lstm_backward(x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse, y, saved, dy, dh_n, dc_n):
    """Gradients of one layer-direction, given lstm_forward(..., save=True)'s y and saved.

    dy (total, P), dh_n (B, P), dc_n (B, H): incoming gradients (None = zeros).
    Returns (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr); db is the gradient of b_ih and of
    b_hh alike; dw_hr is None without projection.
    """
    x = np.asarray(x)
    dt = x.dtype
    x, h0, c0, w_ih, w_hh, y = _prep(dt, x, h0, c0, w_ih, w_hh, y)
    acts, cells = saved
    bsz = np.ascontiguousarray(batch_sizes, dtype=np.int64)
    H = c0.shape[1]
    dy = np.zeros_like(y) if dy is None else _prep(dt, dy)[0]
    dh_n = np.zeros_like(h0) if dh_n is None else _prep(dt, dh_n)[0]
    dc_n = np.zeros_like(c0) if dc_n is None else _prep(dt, dc_n)[0]
    has_proj = w_hr is not None
    w_hr = _prep(dt, w_hr)[0] if has_proj else np.zeros((0, H), dt)
    dx = np.empty_like(x)
    dh0 = np.empty_like(h0)
    dc0 = np.empty_like(c0)
    dw_ih = np.empty_like(w_ih)
    dw_hh = np.empty_like(w_hh)
    db = np.empty(4 * H, dt)
    dw_hr = np.empty_like(w_hr)
    backward_core(x, bsz, h0, c0, w_ih, w_hh, w_hr, bool(reverse), acts, cells, y,
                  dy, dh_n, dc_n, dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr)
    return dx, dh0, dc0, dw_ih, dw_hh, db, (dw_hr if has_proj else None)
