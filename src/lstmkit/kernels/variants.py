"""Fused kernels for the LSTM variants (numpy + Numba, no torch): layer norm, peepholes,
zoneout, recurrent dropout. One layer-direction over packed data, forward and backward.

The equations are in lstmkit/variants.py and engines/reference.py (lstm_layer_variant);
the layout follows kernels/lstm.py (read that first): one GEMM for the input projection
of all steps, one GEMM per step for the recurrent projection, one fused pass over the
gates per row, weight gradients as one GEMM each after the backward loop.

Shapes (B = batch_sizes[0], P = proj_size or H); an absent part is passed as an empty
array, and its flag below is read off the shape:

    ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b (4H,), ln_c_w, ln_c_b (H,)   or (0,): no layer norm
    w_peep (3, H)   rows p_i, p_f, p_o                              or (0, H)
    zc (total, H), zh (total, P)  zoneout d per packed row          or (0, H), (0, P)
    rm (B, P)   recurrent-dropout mask on h_{t-1} (already scaled)  or (0, P)

The state is held for all B rows and step t updates rows [:bs] only: forward, a row
that has finished keeps its final state; reverse (time runs backwards), a row keeps
h0/c0 until it joins. Backward runs the steps in the opposite order over (B, .) state
gradients the same way, so what is left in them at the end is dh0/dc0.

What the forward pass saves for backward (save=True), per packed row:
    acts (4H) gate activations i, f, g, o      cells (H) c~_t (before zoneout)
    c_prev (H) c_{t-1}                          h_in (P) h_{t-1} * m (the GEMM's input)
    with layer norm: xhat, hhat (4H), chat (H) normalised values, and 1/std of each (3,)
"""
import numpy as np
from numba import njit

from .activations import sigmoid, tanh
from .lstm import KW, _offsets

EPS = 1e-5


@njit(**KW)
def _normalize(v, out):
    """out = (v - mean(v)) / sqrt(var(v) + eps); returns 1/sqrt(var + eps). Sums in float64."""
    n = v.shape[0]
    s = 0.0
    for j in range(n):
        s += v[j]
    mean = s / n
    s = 0.0
    for j in range(n):
        d = v[j] - mean
        s += d * d
    rstd = 1.0 / np.sqrt(s / n + EPS)
    for j in range(n):
        out[j] = (v[j] - mean) * rstd
    return rstd


@njit(**KW)
def _normalize_backward(dy, w, xhat, rstd, dv, dw, db):
    """Backward of y = xhat * w + b, xhat = normalize(v): writes dv, accumulates dw, db.
    dv = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * w."""
    n = dy.shape[0]
    s1 = 0.0
    s2 = 0.0
    for j in range(n):
        dxh = dy[j] * w[j]
        s1 += dxh
        s2 += dxh * xhat[j]
        dw[j] += dy[j] * xhat[j]
        db[j] += dy[j]
    m1 = s1 / n
    m2 = s2 / n
    for j in range(n):
        dv[j] = rstd * (dy[j] * w[j] - m1 - xhat[j] * m2)


@njit(**KW)
def forward_core(x, batch_sizes, h0, c0, w_ih, w_hh, b, w_hr,
                 ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep, zc, zh, rm,
                 reverse, acts, y, h, c, cells, c_prev, h_in, xhat, hhat, chat, rstd, save):
    """Forward pass into preallocated arrays (C-contiguous, one dtype).

    acts (total, 4H) scratch, on return the activations; y (total, P); h, c (B, P), (B, H)
    on return h_n, c_n. Saved arrays (written when save, else may have 0 rows): cells,
    c_prev (total, H), h_in (total, P); with layer norm xhat (total, 4H), hhat (total, 4H),
    chat (total, H), rstd (total, 3) (else 0 rows).
    """
    T = batch_sizes.shape[0]
    B, H = c0.shape
    P = h0.shape[1]
    has_proj = w_hr.shape[0] > 0
    has_ln = ln_ih_w.shape[0] > 0
    has_peep = w_peep.shape[0] > 0
    has_zc = zc.shape[0] > 0
    has_zh = zh.shape[0] > 0
    has_rm = rm.shape[0] > 0
    off = _offsets(batch_sizes)
    h[:] = h0
    c[:] = c0
    dt = acts.dtype
    hh = np.empty((B, 4 * H), dt)  # (h_{t-1} * m) @ W_hh^T of one step
    hin = np.empty((B, P), dt)  # h_{t-1} * m
    hp = np.empty((B, H), dt)  # o * tanh(c~), before the projection
    hn = np.empty((B, P), dt)  # h~ (after the projection), before zoneout
    nrm4 = np.empty(4 * H, dt)  # one row normalised (scratch when not saving)
    nrm1 = np.empty(H, dt)
    nrm1c = np.empty(H, dt)
    if T == 0:
        return
    np.dot(x, w_ih.T, acts)  # (total, 4H)
    if has_ln:  # LN_ih of every row at once, before the loop: acts = LN_ih(x W_ih^T)
        for row in range(x.shape[0]):
            a = acts[row]
            xr = xhat[row] if save else nrm4
            rs = _normalize(a, xr)
            if save:
                rstd[row, 0] = rs
            for j in range(4 * H):
                a[j] = xr[j] * ln_ih_w[j] + ln_ih_b[j]

    for s in range(T):
        t = T - 1 - s if reverse else s
        bs = batch_sizes[t]
        o0 = off[t]
        for r in range(bs):
            for k in range(P):
                hin[r, k] = h[r, k] * rm[r, k] if has_rm else h[r, k]
            if save:
                h_in[o0 + r] = hin[r]
                c_prev[o0 + r] = c[r]
        np.dot(hin[:bs], w_hh.T, hh[:bs])  # (bs, P) @ (P, 4H)
        for r in range(bs):
            row = o0 + r
            a = acts[row]
            q = hh[r]
            cr = c[r]
            cn = cells[row] if save else nrm1  # c~ of this row
            if has_ln:  # q = LN_hh(q)
                hr = hhat[row] if save else nrm4
                rs = _normalize(q, hr)
                if save:
                    rstd[row, 1] = rs
                for j in range(4 * H):
                    q[j] = hr[j] * ln_hh_w[j] + ln_hh_b[j]
            for j in range(H):
                cp = cr[j]
                zi = a[j] + q[j] + b[j]
                zf = a[H + j] + q[H + j] + b[H + j]
                if has_peep:
                    zi += w_peep[0, j] * cp
                    zf += w_peep[1, j] * cp
                ig = sigmoid(zi)
                fg = sigmoid(zf)
                gg = tanh(a[2 * H + j] + q[2 * H + j] + b[2 * H + j])
                cv = fg * cp + ig * gg
                zo = a[3 * H + j] + q[3 * H + j] + b[3 * H + j]
                if has_peep:
                    zo += w_peep[2, j] * cv
                a[j] = ig
                a[H + j] = fg
                a[2 * H + j] = gg
                a[3 * H + j] = sigmoid(zo)
                cn[j] = cv
                # zoneout of c: the carried state keeps c_{t-1} where d = 1
                cr[j] = zc[row, j] * cp + (1 - zc[row, j]) * cv if has_zc else cv
            if has_ln:  # h~ = o * tanh(LN_cell(c~))
                chr_ = chat[row] if save else nrm1c
                rs = _normalize(cn, chr_)
                if save:
                    rstd[row, 2] = rs
                for j in range(H):
                    hp[r, j] = a[3 * H + j] * tanh(chr_[j] * ln_c_w[j] + ln_c_b[j])
            else:
                for j in range(H):
                    hp[r, j] = a[3 * H + j] * tanh(cn[j])
        if has_proj:
            np.dot(hp[:bs], w_hr.T, hn[:bs])  # (bs, H) @ (H, P)
        else:
            hn[:bs] = hp[:bs]
        for r in range(bs):  # zoneout of h, then y_t = h_t
            row = o0 + r
            for k in range(P):
                v = zh[row, k] * h[r, k] + (1 - zh[row, k]) * hn[r, k] if has_zh else hn[r, k]
                h[r, k] = v
                y[row, k] = v


@njit(**KW)
def backward_core(x, batch_sizes, w_ih, w_hh, w_hr,
                  ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, w_peep, zc, zh, rm, reverse,
                  acts, cells, c_prev, h_in, xhat, hhat, chat, rstd,
                  dy, dh, dc, dx, dw_ih, dw_hh, db, dw_hr,
                  dln_ih_w, dln_ih_b, dln_hh_w, dln_hh_b, dln_c_w, dln_c_b, dw_peep):
    """BPTT through forward_core(save=True).

    dy (total, P) incoming; dh (B, P), dc (B, H) hold dh_n, dc_n on entry and dh0, dc0
    on return. Writes dx, dw_ih, dw_hh, db (of b_ih and b_hh alike), dw_hr, and the
    gradients of the layer-norm parameters and of w_peep (empty arrays when absent).
    """
    T = batch_sizes.shape[0]
    B, H = dc.shape
    P = dh.shape[1]
    total = x.shape[0]
    has_proj = w_hr.shape[0] > 0
    has_ln = ln_ih_w.shape[0] > 0
    has_peep = w_peep.shape[0] > 0
    has_zc = zc.shape[0] > 0
    has_zh = zh.shape[0] > 0
    has_rm = rm.shape[0] > 0
    off = _offsets(batch_sizes)
    dt = acts.dtype
    dgates = np.empty((total, 4 * H), dt)  # d loss / d (gate pre-activations) = d b
    dhw = np.empty((total if has_ln else 0, 4 * H), dt)  # d loss / d (h_in W_hh^T), before LN_hh
    dhn = np.empty((B, P), dt)  # d loss / d h~ (after projection, before zoneout)
    dhp = np.empty((B, H), dt)  # d loss / d (o * tanh(.)) before the projection
    dhin = np.empty((B, P), dt)  # d loss / d h_in of one step
    dcv = np.empty(H, dt)  # d loss / d c~ of one row
    dcn = np.empty(H, dt)  # d loss / d LN_cell(c~) of one row
    dh_all = np.empty((total if has_proj else 0, P), dt)  # for dW_hr in one GEMM
    hp_all = np.empty((total if has_proj else 0, H), dt)
    dln_c_w[:] = 0
    dln_c_b[:] = 0
    dln_hh_w[:] = 0
    dln_hh_b[:] = 0
    dln_ih_w[:] = 0
    dln_ih_b[:] = 0
    dw_peep[:] = 0

    for s in range(T):
        t = s if reverse else T - 1 - s
        bs = batch_sizes[t]
        o0 = off[t]
        for r in range(bs):  # dh_t = carried + dy_t; split by zoneout into h~ and h_{t-1} parts
            row = o0 + r
            for k in range(P):
                g = dh[r, k] + dy[row, k]
                if has_zh:
                    dhn[r, k] = (1 - zh[row, k]) * g
                    dh[r, k] = zh[row, k] * g
                else:
                    dhn[r, k] = g
                    dh[r, k] = 0
        if has_proj:
            dh_all[o0 : o0 + bs] = dhn[:bs]
            np.dot(dhn[:bs], w_hr, dhp[:bs])  # (bs, P) @ (P, H)
        else:
            dhp[:bs] = dhn[:bs]
        for r in range(bs):
            row = o0 + r
            a = acts[row]
            cv = cells[row]
            cp = c_prev[row]
            dgr = dgates[row]
            # d h~ / d c~ through tanh (and LN_cell)
            for j in range(H):
                cnv = chat[row, j] * ln_c_w[j] + ln_c_b[j] if has_ln else cv[j]
                tc = tanh(cnv)
                og = a[3 * H + j]
                dcn[j] = dhp[r, j] * og * (1 - tc * tc)
                dgr[3 * H + j] = dhp[r, j] * tc * og * (1 - og)
                if has_proj:
                    hp_all[row, j] = og * tc
            if has_ln:
                _normalize_backward(dcn, ln_c_w, chat[row], rstd[row, 2], dcv, dln_c_w, dln_c_b)
            else:
                dcv[:] = dcn
            for j in range(H):
                ig = a[j]
                fg = a[H + j]
                gg = a[2 * H + j]
                dzo = dgr[3 * H + j]
                # c~ feeds the carried c_t with weight (1 - d_c); c_{t-1} gets d_c directly
                dct = dc[r, j]
                d = dcv[j] + ((1 - zc[row, j]) * dct if has_zc else dct)
                if has_peep:
                    d += dzo * w_peep[2, j]
                    dw_peep[2, j] += dzo * cv[j]
                dzi = d * gg * ig * (1 - ig)
                dzf = d * cp[j] * fg * (1 - fg)
                dgr[j] = dzi
                dgr[H + j] = dzf
                dgr[2 * H + j] = d * ig * (1 - gg * gg)
                dcp = d * fg + (zc[row, j] * dct if has_zc else 0.0)
                if has_peep:
                    dcp += dzi * w_peep[0, j] + dzf * w_peep[1, j]
                    dw_peep[0, j] += dzi * cp[j]
                    dw_peep[1, j] += dzf * cp[j]
                dc[r, j] = dcp
            if has_ln:
                _normalize_backward(dgr, ln_hh_w, hhat[row], rstd[row, 1], dhw[row], dln_hh_w, dln_hh_b)
        src = dhw if has_ln else dgates
        np.dot(src[o0 : o0 + bs], w_hh, dhin[:bs])  # (bs, 4H) @ (4H, P)
        for r in range(bs):
            for k in range(P):
                dh[r, k] += dhin[r, k] * rm[r, k] if has_rm else dhin[r, k]

    db[:] = 0
    for row in range(total):
        db += dgates[row]
    src = dhw if has_ln else dgates
    np.dot(src.T, h_in, dw_hh)  # (4H, total) @ (total, P)
    if has_ln:  # dgates becomes d(x W_ih^T), through LN_ih (in place: each row only reads itself)
        tmp = np.empty(4 * H, dt)
        for row in range(total):
            _normalize_backward(dgates[row], ln_ih_w, xhat[row], rstd[row, 0], tmp, dln_ih_w, dln_ih_b)
            dgates[row] = tmp
    np.dot(dgates, w_ih, dx)  # (total, 4H) @ (4H, I)
    np.dot(dgates.T, x, dw_ih)  # (4H, total) @ (total, I)
    if has_proj:
        np.dot(dh_all.T, hp_all, dw_hr)  # (P, total) @ (total, H)
