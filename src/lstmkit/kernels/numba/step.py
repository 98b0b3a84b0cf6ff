"""Kernels for layer-direction calls of one or a few time steps, on the weights as they are.

The streaming / reinforcement-learning case: one time step, forward and backward, the
weights different at every call (an optimizer step in between). The time-loop kernels of
lstm.py lay the weights out for their micro-kernel in every call (a full copy of W, forward
and backward), which for one step costs as much as the products themselves. Here the caller
makes the products as plain GEMMs on the weights as they are (the torch engine: torch's),
and these kernels do only the per-unit work between them:

    step_forward(q, b, c0, acts, c, cells, h)
        q (B, 4H) = x W_ih^T + h0 W_hh^T (without b); b (4H,); c0 (B, H).
        Out: acts (B, 4H) the gate activations, c and cells (B, H) both c_1 (two arrays: one is
        returned to the caller, the other saved for backward), h (B, H) o * tanh(c_1).

    step_backward(acts, cells, c0, dh, dc, dgates, hpre, want_hpre)
        dh (B, H) dL/dh_1 before the projection; dc (B, H) in dL/dc_1, out dL/dc_0.
        Out: dgates (B, 4H) dL/d pre-activations; hpre (B, H) o * tanh(c_1) when want_hpre.

    step_forward_all(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, acts, c, cells, hpre, h)
        step_forward with its products in the same call, for a few rows: x (B, I), h0 (B, P).
        Out as step_forward, h (B, P) after the projection, hpre (B, H) before it.

    step_backward_all(...)  step_backward, then for a few rows dx, dh0 and the weight gradients
        in the same call (no torch call, so no torch parallel region, for these small products).
        step_backward_tiles(...) the same on the micro-kernel (tile.py), on W as it is.

    steps_forward / steps_backward
        A few steps over a few rows (binding.unpacked_path): lstm.py's time loop with the
        recurrent product as dot products on W_hh (4H, P) as it is, each row of W read once per
        step for all rows; slower per step than the packed micro-kernel, but with no copy of W.

All reuse lstm.py's row functions (gate_row, gate_backward_row), so a row's numbers are the
time-loop kernel's. (cache_guard.py drops this file's cached code when lstm.py changes.)
"""
import numpy as np
from numba import njit

from .lstm import KW, _rows_times, _rows_times2, add_into, copy_into, gate_backward_row, gate_row, gate_row_p
from .rows import row_ptr
from .tile import WHOLE_K, matmul, matmul_by_rows, packed_view, whole_blocks


@njit(**KW)
def step_forward(q, b, c0, acts, c, cells, h):
    for i in range(q.shape[0]):
        copy_into(c[i], c0[i])
        gate_row(q[i], b, acts[i], c[i], h[i])
        copy_into(cells[i], c[i])


@njit(**KW)
def step_forward_all(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, acts, c, cells, hpre, h):
    """step_forward with q made here: per row, b_ih plus the row dot products of W_ih with x
    and W_hh with h0 (lstm.one_step_live's operations: the streaming lane's bits), then the
    projection h = W_hr hpre where w_hr has rows (else hpre is not written: h holds o * tanh(c_1)).
    For a few rows: each row reads the weights once (a GEMM reads them once for all rows)."""
    G = w_ih.shape[0]
    H = G // 4
    has_proj = w_hr.shape[0] > 0
    q = np.empty(G, x.dtype)
    for i in range(x.shape[0]):
        copy_into(q, b_ih)
        _rows_times2(w_ih, x[i], w_hh, h0[i], q)
        copy_into(c[i], c0[i])
        gate_row_p(row_ptr(q, 0), row_ptr(b_hh, 0), row_ptr(acts, i), row_ptr(c, i),
                   row_ptr(hpre, i) if has_proj else row_ptr(h, i), H)
        copy_into(cells[i], c[i])
        if has_proj:
            h[i, :] = 0
            _rows_times(w_hr, hpre[i], h[i])


@njit(**KW)
def step_backward(acts, cells, c0, dh, dc, dgates, hpre, want_hpre):
    for i in range(acts.shape[0]):
        gate_backward_row(acts[i], cells[i], c0[i], dh[i], dc[i], dgates[i], hpre[i], want_hpre)


@njit(**KW)
def rows_times(a, w, out):
    """out = a @ w for a few rows of a (B, G), w (G, K): per row a sum of w's rows, each a
    contiguous vector loop (a BLAS call costs more than this at one-step sizes)."""
    for i in range(a.shape[0]):
        o = out[i]
        o[:] = 0
        ai = a[i]
        for j in range(w.shape[0]):
            d = ai[j]
            wj = w[j]
            for k in range(o.shape[0]):
                o[k] += d * wj[k]


@njit(**KW)
def outer_sum(a, x, out):
    """out = a^T @ x for a few rows: a (B, G), x (B, K), out (G, K)."""
    for j in range(out.shape[0]):
        o = out[j]
        d = a[0, j]
        x0 = x[0]
        for k in range(o.shape[0]):
            o[k] = d * x0[k]
        for i in range(1, a.shape[0]):
            d = a[i, j]
            xi = x[i]
            for k in range(o.shape[0]):
                o[k] += d * xi[k]


@njit(**KW)
def column_sums(a, out):
    for k in range(out.shape[0]):
        out[k] = a[0, k]
    for i in range(1, a.shape[0]):
        for k in range(out.shape[0]):
            out[k] += a[i, k]


@njit(**KW)
def times_w(a, w, out):
    """out = a @ w, a (B, G), w (G, K): tile.matmul on w as it is (packed_view) where K is whole
    column blocks, else rows_times (the same bits: both sum each element over G in order)."""
    if whole_blocks(w):
        matmul(a, a.shape[0], packed_view(w), out, False, WHOLE_K)
    else:
        rows_times(a, w, out)


@njit(**KW)
def outer_times(a, x, out):
    """out = a^T @ x, a (B, G), x (B, K), B <= tile.K_BLOCK: the micro-kernel's tiles row by row
    (tile.matmul_by_rows) with a^T read in place and x as it is (packed_view) where K is whole
    column blocks and B > 1, else outer_sum (the same bits). One row is one multiply an element:
    outer_sum's loop writes it at 1.1-1.6x the tiles' speed (BENCHMARKS.md, twenty-sixth session)."""
    if a.shape[0] > 1 and whole_blocks(x):
        at = a.T
        matmul_by_rows(at, at.shape[0], packed_view(x), out)
    else:
        outer_sum(a, x, out)


@njit(**KW)
def step_backward_all(acts, cells, c0, dh, dc, dgates, hpre, want_hpre, x, h0, w_ih, w_hh,
                      dx, dh0, dw_ih, dw_hh, db):
    """step_backward, then for a few rows the products after it in the same call:
    dx = dgates W_ih, dh0 = dgates W_hh, dw_ih = dgates^T x, dw_hh = dgates^T h0 and
    db = the column sums of dgates. An output given with no rows (shape (0, ...)) is skipped."""
    step_backward(acts, cells, c0, dh, dc, dgates, hpre, want_hpre)
    if dx.shape[0]:
        rows_times(dgates, w_ih, dx)
    if dh0.shape[0]:
        rows_times(dgates, w_hh, dh0)
    if dw_ih.shape[0]:
        outer_sum(dgates, x, dw_ih)
    if dw_hh.shape[0]:
        outer_sum(dgates, h0, dw_hh)
    if db.shape[0]:
        column_sums(dgates, db)


@njit(**KW)
def step_backward_tiles(acts, cells, c0, dh, dc, dgates, hpre, want_hpre, x, h0, w_ih, w_hh,
                        dx, dh0, dw_ih, dw_hh, db):
    """step_backward_all with each product on the micro-kernel (times_w, outer_times) where its
    width is whole column blocks: the same bits (each output element one chain of multiply-adds
    in the same order either way), 1.1x (1 row) to 5x (8 rows) faster; but it compiles tile.matmul
    for two more argument types, seconds that a cold start's first step does not wait for
    (binding.step_tiles_ready)."""
    step_backward(acts, cells, c0, dh, dc, dgates, hpre, want_hpre)
    if dx.shape[0]:
        times_w(dgates, w_ih, dx)
    if dh0.shape[0]:
        times_w(dgates, w_hh, dh0)
    if dw_ih.shape[0]:
        outer_times(dgates, x, dw_ih)
    if dw_hh.shape[0]:
        outer_times(dgates, h0, dw_hh)
    if db.shape[0]:
        column_sums(dgates, db)


# ---- a few time steps of a few rows, on the weights as they are --------------------------------------
@njit(**KW)
def times_rows(v, n, w, out):
    """out[:n] = v[:n] @ w^T, w (G, K) row-major: dot products with w's contiguous rows, each row
    of w read once for all n rows of v."""
    for j in range(w.shape[0]):
        wj = w[j]
        for i in range(n):
            vi = v[i]
            s = vi[0] * wj[0]
            for k in range(1, vi.shape[0]):
                s += vi[k] * wj[k]
            out[i, j] = s


@njit(**KW)
def rows_times_n(v, n, w, out):
    """out[:n] = v[:n] @ w, w (G, K) row-major: sums of w's rows, each read once for all n rows,
    eight of them at a time into an output row (its stores once per eight rows of w, not per
    row: the few-steps backward 1.4x faster at input 64, hidden 128, one row)."""
    for i in range(n):
        o = out[i]
        o[:] = 0
    G = w.shape[0]
    g8 = G - G % 8
    for j in range(0, g8, 8):
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        w4, w5, w6, w7 = w[j + 4], w[j + 5], w[j + 6], w[j + 7]
        for i in range(n):
            vi = v[i]
            d0, d1, d2, d3 = vi[j], vi[j + 1], vi[j + 2], vi[j + 3]
            d4, d5, d6, d7 = vi[j + 4], vi[j + 5], vi[j + 6], vi[j + 7]
            o = out[i]
            for k in range(o.shape[0]):
                o[k] += (((d0 * w0[k] + d1 * w1[k]) + (d2 * w2[k] + d3 * w3[k]))
                         + ((d4 * w4[k] + d5 * w5[k]) + (d6 * w6[k] + d7 * w7[k])))
    for j in range(g8, G):
        wj = w[j]
        for i in range(n):
            d = v[i, j]
            o = out[i]
            for k in range(o.shape[0]):
                o[k] += d * wj[k]


@njit(**KW)
def steps_forward(xproj, batch_sizes, h0, c0, w_hh, b, w_hr, reverse, acts, cells, y, h, c):
    """The time loop of lstm.py's forward_chunk (all rows, save=True) with the recurrent product
    made as dot products on W_hh (4H, P) itself: xproj (total, 4H) = x W_ih^T + b_ih, b = b_hh
    (or zeros); w_hr (P, H), or (0, H) for no projection. Out: acts, cells, y as forward_core,
    h (B, P), c (B, H) the final states."""
    T = batch_sizes.shape[0]
    B, H = c.shape
    has_proj = w_hr.shape[0] > 0
    q = np.empty((B, 4 * H), xproj.dtype)
    hp = np.empty((B if has_proj else 0, H), xproj.dtype)  # o * tanh(c_t), before the projection
    no_w, no_v = np.empty((4 * H, 0), xproj.dtype), np.empty(0, xproj.dtype)  # _rows_times2's other term
    for i in range(B):
        copy_into(h[i], h0[i])
        copy_into(c[i], c0[i])
    off = np.empty(T + 1, np.int64)
    off[0] = 0
    for t in range(T):
        off[t + 1] = off[t] + batch_sizes[t]
    for s in range(T):
        t = T - 1 - s if reverse else s
        o = off[t]
        n = batch_sizes[t]
        if n == 1:  # W_hh read once either way: the row dot products of the streaming step,
            copy_into(q[0], xproj[o])  # every other step from its last row back (still in L2)
            _rows_times2(no_w, no_v, w_hh, h[0], q[0], s % 2 == 1)
        else:  # W_hh read once for all rows
            times_rows(h, n, w_hh, q)
            for i in range(n):
                add_into(q[i], xproj[o + i])
        for i in range(n):
            gate_row(q[i], b, acts[o + i], c[i], hp[i] if has_proj else h[i])
            copy_into(cells[o + i], c[i])
        if has_proj:
            times_rows(hp, n, w_hr, h)
        for i in range(n):
            copy_into(y[o + i], h[i])


@njit(**KW)
def steps_backward(acts, cells, batch_sizes, h0, c0, y, dy, w_hh, w_hr, reverse, dh, dc, dgates, h_prev,
                   dh_all, hpre_all):
    """BPTT through steps_forward, as lstm.py's backward_chunk (all rows), the products on W_hh
    (4H, P) and W_hr (P, H) as they are. dh (B, P), dc (B, H): in dL/dh_n, dL/dc_n, out dL/dh0,
    dL/dc0. Out: dgates (total, 4H), h_prev (total, P) h_{t-1} of every row, and with a
    projection dh_all (total, P) dL/dh_t and hpre_all (total, H) (else (0, P), (0, H))."""
    T = batch_sizes.shape[0]
    B, H = dc.shape
    has_proj = w_hr.shape[0] > 0
    dhp = np.empty((B if has_proj else 0, H), dh.dtype)  # dL/d(o * tanh(c_t))
    no_hpre = np.empty(0, dh.dtype)
    off = np.empty(T + 1, np.int64)
    off[0] = 0
    for t in range(T):
        off[t + 1] = off[t] + batch_sizes[t]
    for s in range(T):
        t = s if reverse else T - 1 - s
        n = batch_sizes[t]
        o = off[t]
        # The step that ran just before t in the forward pass, and how many of the rows it holds.
        tp = t + 1 if reverse else t - 1
        n_prev = 0 if tp < 0 or tp >= T else min(n, batch_sizes[tp])
        p0 = off[tp] if n_prev > 0 else 0
        for i in range(n):
            add_into(dh[i], dy[o + i])
        if has_proj:
            for i in range(n):
                copy_into(dh_all[o + i], dh[i])
            rows_times_n(dh, n, w_hr, dhp)
        for i in range(n):
            if i < n_prev:
                cprev = cells[p0 + i]
                copy_into(h_prev[o + i], y[p0 + i])
            else:  # the row starts here: its previous state is h0, c0
                cprev = c0[i]
                copy_into(h_prev[o + i], h0[i])
            gate_backward_row(acts[o + i], cells[o + i], cprev, dhp[i] if has_proj else dh[i], dc[i], dgates[o + i],
                              hpre_all[o + i] if has_proj else no_hpre, has_proj)
        rows_times_n(dgates[o:], n, w_hh, dh)
