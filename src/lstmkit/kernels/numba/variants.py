"""Fused kernels for the LSTM variants (numpy + Numba, no torch): layer norm, peepholes,
zoneout, recurrent dropout. One layer-direction over packed data, forward and backward.

The equations are in lstmkit/variants.py and engines/reference.py (lstm_layer_variant);
the layout follows kernels/lstm.py (read that first): one GEMM for the input projection
of all steps, one product per step for the recurrent projection (tile.matmul on weights
packed once per call), one fused pass over the
gates per row, weight gradients as one GEMM each after the backward loop. The layer-norm
backward runs inside the step loop, on each row of dgates while it is still in cache
(LN is memory-bound: it reads and writes whole 4H rows).

Shapes (B = batch_sizes[0], P = proj_size or H); an absent part is passed as an empty
array, and its flag below is read off the shape:

    ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b (4H,), ln_c_w, ln_c_b (H,)   or (0,): no layer norm
    w_peep (3, H)   rows p_i, p_f, p_o                              zeros: no peepholes
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
from .lstm import KW, offsets
from .simd import LANES, variant_gate_block, variant_vector_units
from .tile import matmul, pack2, padded_width

EPS = 1e-5


@njit(**KW)
def _constants(dt):
    """Two scratch slots of dtype dt: a float64 scalar stored and read back is rounded to dt,
    so the per-element math stays in float32 for float32 data (a float64 scalar would
    promote every element and halve the SIMD width)."""
    return np.empty(2, dt)


@njit(**KW)
def _normalize(v, w, b, xhat, out, k):
    """Layer norm of the row v: xhat = (v - mean) / sqrt(var + eps), out = xhat * w + b
    (out may be v itself); returns 1 / sqrt(var + eps). k = _constants(dtype).
    Two passes for the statistics (no E[v^2] - mean^2 cancellation), summed in float64."""
    n = v.shape[0]
    s = 0.0
    for j in range(n):
        s += v[j]
    k[0] = s / n
    mean = k[0]
    s = 0.0
    for j in range(n):
        d = v[j] - mean
        s += d * d
    k[1] = 1.0 / np.sqrt(s / n + EPS)
    rstd = k[1]
    for j in range(n):
        xh = (v[j] - mean) * rstd
        xhat[j] = xh
        out[j] = xh * w[j] + b[j]
    return rstd


@njit(**KW)
def _normalize_backward(dy, w, xhat, rstd, dv, k):
    """Backward of y = xhat * w + b, xhat = normalize(v), to v: writes dv.
    dv = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * w.
    dv may be dy itself (each element reads its own dy before writing). The gradients of
    w and b (sums over rows of dy * xhat and dy) are left to the caller: pure reductions
    here vectorise, stores into two more arrays would not."""
    n = dy.shape[0]
    s1 = 0.0
    s2 = 0.0
    for j in range(n):
        dxh = dy[j] * w[j]
        s1 += dxh
        s2 += dxh * xhat[j]
    k[0] = s1 / n
    k[1] = s2 / n
    m1 = k[0]
    m2 = k[1]
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
    has_zc = zc.shape[0] > 0
    has_zh = zh.shape[0] > 0
    has_rm = rm.shape[0] > 0
    off = offsets(batch_sizes)
    h[:] = h0
    c[:] = c0
    dt = acts.dtype
    # The per-step products on weights packed once per call for the micro-kernel (tile.py),
    # as the plain kernel does; their outputs are padded to the kernel's column blocks.
    wp_hh = pack2(w_hh, w_hh[:, :0], True)  # W_hh^T (P, 4H)
    wp_hr = pack2(w_hr, w_hr[:, :0], True)  # W_hr^T (H, P); no blocks without a projection
    hh = np.empty((B, padded_width(wp_hh)), dt)  # (h_{t-1} * m) @ W_hh^T of one step
    hin = np.empty((B, P), dt)  # h_{t-1} * m
    hp = np.empty((B, H), dt)  # o * tanh(c~), before the projection
    hn = np.empty((B, padded_width(wp_hr) if has_proj else P), dt)  # h~ (after the projection), before zoneout
    nrm4 = np.empty(4 * H, dt)  # one row normalised (scratch when not saving)
    nrm1 = np.empty(H, dt)
    nrm1c = np.empty(H, dt)
    cnl = np.empty(H, dt)  # LN_cell(c~) of one row
    kc = _constants(dt)
    bi, bf, bg, bo = b[:H], b[H : 2 * H], b[2 * H : 3 * H], b[3 * H :]
    pi, pf, po = w_peep[0], w_peep[1], w_peep[2]
    if T == 0:
        return
    # No literal 1 in float math below: int - float32 types as float64 in Numba and would
    # run a float32 loop in float64 (so s' = s - s*s, and (1 - d) a + d b = a + d (b - a)).
    np.dot(x, w_ih.T, acts)  # (total, 4H)

    for s in range(T):
        t = T - 1 - s if reverse else s
        bs = batch_sizes[t]
        o0 = off[t]
        for r in range(bs):
            if has_rm:
                for k in range(P):
                    hin[r, k] = h[r, k] * rm[r, k]
            else:
                hin[r] = h[r]
            if save:
                h_in[o0 + r] = hin[r]
                c_prev[o0 + r] = c[r]
        matmul(hin, bs, wp_hh, hh)  # (bs, P) @ (P, 4H)
        for r in range(bs):
            row = o0 + r
            a = acts[row]
            q = hh[r, : 4 * H]
            cr = c[r]
            hr_ = hp[r]
            cn = cells[row] if save else nrm1  # c~ of this row
            if has_ln:  # a = LN_ih(a), q = LN_hh(q), each row when its step comes (in cache)
                rs = _normalize(a, ln_ih_w, ln_ih_b, xhat[row] if save else nrm4, a, kc)
                if save:
                    rstd[row, 0] = rs
                rs = _normalize(q, ln_hh_w, ln_hh_b, hhat[row] if save else nrm4, q, kc)
                if save:
                    rstd[row, 1] = rs
            # The gate loop: no branches (peepholes of zero cost nothing); float32 in vector
            # blocks, the rest (float64, H % LANES) in a loop on one 1-D slice per gate (LLVM
            # can't prove a[j], a[H + j] apart), made only when that loop runs: each slice is
            # a view with a reference count, which per row costs as much as a block.
            j0 = variant_vector_units(a, q, b, pi, pf, po, cr, cn)  # float32: vector blocks (simd.py)
            for j in range(0, j0, LANES):
                variant_gate_block(a, q, b, pi, pf, po, cr, cn, j)
            ao = a[3 * H :]  # o, read again below
            if j0 < H:
                ai, af, ag = a[:H], a[H : 2 * H], a[2 * H : 3 * H]
                qi, qf, qg, qo = q[:H], q[H : 2 * H], q[2 * H : 3 * H], q[3 * H :]
            for j in range(j0, H):
                cp = cr[j]
                ig = sigmoid(ai[j] + qi[j] + bi[j] + pi[j] * cp)
                fg = sigmoid(af[j] + qf[j] + bf[j] + pf[j] * cp)
                gg = tanh(ag[j] + qg[j] + bg[j])
                cv = fg * cp + ig * gg
                ai[j] = ig
                af[j] = fg
                ag[j] = gg
                ao[j] = sigmoid(ao[j] + qo[j] + bo[j] + po[j] * cv)
                cn[j] = cv
            if has_zc:  # zoneout of c: the carried state keeps c_{t-1} where d = 1
                for j in range(H):
                    cr[j] = cn[j] + zc[row, j] * (cr[j] - cn[j])  # d c_prev + (1 - d) c~
            else:
                cr[:] = cn
            if has_ln:  # h~ = o * tanh(LN_cell(c~))
                rs = _normalize(cn, ln_c_w, ln_c_b, chat[row] if save else nrm1c, cnl, kc)
                if save:
                    rstd[row, 2] = rs
                for j in range(H):
                    hr_[j] = ao[j] * tanh(cnl[j])
            else:
                for j in range(H):
                    hr_[j] = ao[j] * tanh(cn[j])
        if has_proj:
            matmul(hp, bs, wp_hr, hn)  # (bs, H) @ (H, P)
        else:
            hn[:bs] = hp[:bs]
        for r in range(bs):  # zoneout of h, then y_t = h_t
            if has_zh:
                row = o0 + r
                for k in range(P):
                    h[r, k] = hn[r, k] + zh[row, k] * (h[r, k] - hn[r, k])
            else:
                h[r] = hn[r, :P]
        y[o0 : o0 + bs] = h[:bs]


@njit(**KW)
def backward_core(x, batch_sizes, w_ih, w_hh, w_hr,
                  ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, w_peep, zc, zh, rm, reverse,
                  acts, cells, c_prev, h_in, xhat, hhat, chat, rstd,
                  dy, dh, dc, dx, dw_ih, dw_hh, db, dw_hr,
                  dln_ih_w, dln_ih_b, dln_hh_w, dln_hh_b, dln_c_w, dln_c_b, dw_peep):
    """BPTT through forward_core(save=True).

    dy (total, P) incoming; dh (B, P), dc (B, H) hold dh_n, dc_n on entry and dh0, dc0
    on return. Writes dx, dw_ih, dw_hh, db (of b_ih and b_hh alike), dw_hr, and the
    gradients of the layer-norm parameters and of w_peep (empty arrays when absent;
    w_peep itself is zeros (3, H) without peepholes, and dw_peep (0, H)).
    """
    T = batch_sizes.shape[0]
    B, H = dc.shape
    P = dh.shape[1]
    total = x.shape[0]
    has_proj = w_hr.shape[0] > 0
    has_ln = ln_ih_w.shape[0] > 0
    has_peep = dw_peep.shape[0] > 0  # (0, H): no peepholes, no gradient wanted
    has_zc = zc.shape[0] > 0
    has_zh = zh.shape[0] > 0
    has_rm = rm.shape[0] > 0
    off = offsets(batch_sizes)
    dt = acts.dtype
    # d loss / d (gate pre-activations) = d b; with layer norm each row then becomes
    # d loss / d (x W_ih^T) (through LN_ih), in place, once its step is done.
    dgates = np.empty((total, 4 * H), dt)
    dhw = np.empty((total if has_ln else 0, 4 * H), dt)  # d loss / d (h_in W_hh^T), before LN_hh
    dhn = np.empty((B, P), dt)  # d loss / d h~ (after projection, before zoneout)
    wpb_hh = pack2(w_hh, w_hh[:, :0], False)  # W_hh (4H, P) packed for the per-step product
    wpb_hr = pack2(w_hr, w_hr[:, :0], False)  # W_hr (P, H); no blocks without a projection
    dhp = np.empty((B, padded_width(wpb_hr) if has_proj else H), dt)  # d loss / d (o * tanh(.)) before the projection
    dhin = np.empty((B, padded_width(wpb_hh)), dt)  # d loss / d h_in of one step
    dcv = np.empty(H, dt)  # d loss / d c~ of one row
    dcn = np.empty(H, dt)  # d loss / d LN_cell(c~) of one row
    cn = np.empty(H, dt)  # LN_cell(c~) (or c~) of one row
    kc = _constants(dt)
    pi, pf, po = w_peep[0], w_peep[1], w_peep[2]
    keep = np.zeros(H, dt)  # zoneout: d_c * dc_t, the part of dc_t that goes straight to c_{t-1}
    dh_all = np.empty((total if has_proj else 0, P), dt)  # for dW_hr in one GEMM
    hp_all = np.empty((total if has_proj else 0, H), dt)
    dln_c_w[:] = 0
    dln_c_b[:] = 0
    dln_hh_w[:] = 0
    dln_hh_b[:] = 0
    dln_ih_w[:] = 0
    dln_ih_b[:] = 0
    dw_peep[:] = 0
    db[:] = 0
    dp0 = dw_peep[0] if has_peep else keep  # (keep: never written through, just a typed stand-in)
    dp1 = dw_peep[1] if has_peep else keep
    dp2 = dw_peep[2] if has_peep else keep

    for s in range(T):
        t = s if reverse else T - 1 - s
        bs = batch_sizes[t]
        o0 = off[t]
        for r in range(bs):  # dh_t = carried + dy_t; zoneout splits it into h~ and h_{t-1} parts
            row = o0 + r
            if has_zh:
                for k in range(P):
                    g = dh[r, k] + dy[row, k]
                    dhn[r, k] = g - zh[row, k] * g  # (1 - d) g
                    dh[r, k] = zh[row, k] * g
            else:
                for k in range(P):
                    dhn[r, k] = dh[r, k] + dy[row, k]
        if has_proj:
            dh_all[o0 : o0 + bs] = dhn[:bs]
            matmul(dhn, bs, wpb_hr, dhp)  # (bs, P) @ (P, H)
        else:
            dhp[:bs] = dhn[:bs]
        for r in range(bs):
            row = o0 + r
            a = acts[row]
            cp = c_prev[row]
            dgr = dgates[row]
            dcr = dc[r]
            hpr = hp_all[row] if has_proj else dcv  # o * tanh(.) for dW_hr (dcv: scratch)
            if has_ln:  # cn = what went into tanh
                for j in range(H):
                    cn[j] = chat[row, j] * ln_c_w[j] + ln_c_b[j]
            else:
                cn[:] = cells[row]
            ai, af, ag, ao = a[:H], a[H : 2 * H], a[2 * H : 3 * H], a[3 * H :]  # 1-D slices: see forward
            di, df, dg, do = dgr[:H], dgr[H : 2 * H], dgr[2 * H : 3 * H], dgr[3 * H :]
            dpr = dhp[r]
            for j in range(H):  # through h~ = o * tanh(cn)
                tc = tanh(cn[j])
                og = ao[j]
                dcn[j] = dpr[j] * (og - og * tc * tc)
                do[j] = dpr[j] * tc * (og - og * og)
                hpr[j] = og * tc
            if has_ln:
                _normalize_backward(dcn, ln_c_w, chat[row], rstd[row, 2], dcv, kc)
                chr_ = chat[row]
                for j in range(H):
                    dln_c_w[j] += dcn[j] * chr_[j]
                    dln_c_b[j] += dcn[j]
            else:
                dcv[:] = dcn
            # c~ reaches the carried c_t through (1 - d_c); c_{t-1} gets d_c * dc_t directly.
            if has_zc:
                for j in range(H):
                    keep[j] = zc[row, j] * dcr[j]
                    dcr[j] = dcr[j] - zc[row, j] * dcr[j]
            for j in range(H):  # branch-free, vectorises; peepholes of zero cost nothing
                ig = ai[j]
                fg = af[j]
                gg = ag[j]
                d = dcv[j] + dcr[j] + do[j] * po[j]  # d loss / d c~
                dzi = d * gg * (ig - ig * ig)
                dzf = d * cp[j] * (fg - fg * fg)
                di[j] = dzi
                df[j] = dzf
                dg[j] = d * (ig - ig * gg * gg)
                dcr[j] = d * fg + keep[j] + dzi * pi[j] + dzf * pf[j]  # d c_{t-1}
            # While this row of dgates is in cache: the parameter gradients that need it,
            # then (layer norm) its two LN backwards.
            if has_peep:  # pre_i, pre_f saw p * c_{t-1}; pre_o saw p_o * c~_t
                cvr = cells[row]
                for j in range(H):
                    dp0[j] += di[j] * cp[j]
                    dp1[j] += df[j] * cp[j]
                    dp2[j] += do[j] * cvr[j]
            if has_ln:
                xr, hr = xhat[row], hhat[row]
                for j in range(4 * H):  # LN_ih, LN_hh outputs are added like the biases
                    g = dgr[j]
                    db[j] += g
                    dln_ih_w[j] += g * xr[j]
                    dln_hh_w[j] += g * hr[j]
                _normalize_backward(dgr, ln_hh_w, hr, rstd[row, 1], dhw[row], kc)
                # dgates becomes d(x W_ih^T) in place (db, dW_hh no longer need it)
                _normalize_backward(dgr, ln_ih_w, xr, rstd[row, 0], dgr, kc)
        src = dhw if has_ln else dgates
        matmul(src[o0:], bs, wpb_hh, dhin)  # (bs, 4H) @ (4H, P)
        if has_rm and has_zh:  # dh_{t-1} = (zoneout's part) + m * (the recurrent GEMM's part)
            for r in range(bs):
                for k in range(P):
                    dh[r, k] += dhin[r, k] * rm[r, k]
        elif has_rm:
            for r in range(bs):
                for k in range(P):
                    dh[r, k] = dhin[r, k] * rm[r, k]
        elif has_zh:
            dh[:bs] += dhin[:bs, :P]
        else:
            dh[:bs] = dhin[:bs, :P]

    if has_ln:
        dln_ih_b[:] = db
        dln_hh_b[:] = db
    else:
        for row in range(total):
            db += dgates[row]
    src = dhw if has_ln else dgates
    np.dot(src.T, h_in, dw_hh)  # (4H, total) @ (total, P)
    np.dot(dgates, w_ih, dx)  # (total, 4H) @ (4H, I)
    np.dot(dgates.T, x, dw_ih)  # (4H, total) @ (total, I)
    if has_proj:
        np.dot(dh_all.T, hp_all, dw_hr)  # (P, total) @ (total, H)
