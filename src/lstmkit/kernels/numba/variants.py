"""Fused kernels for the LSTM variants (numpy + Numba, no torch): layer norm, peepholes,
zoneout, recurrent dropout. One layer-direction over packed data, forward and backward.

The equations are in lstmkit/nn/variants.py and engines/reference.py (lstm_layer_variant);
the layout follows kernels/lstm.py (read that first):
  - the caller makes x W_ih^T for all steps as one GEMM (into acts) before the time loop,
    and the weight gradients as GEMMs after the backward loop (both in torch in the engine);
  - the batch rows are split into chunks of whole sequences, one per thread, each chunk
    running its own time loop (forward_chunk / backward_chunk over rows r0:r1);
  - per step a chunk makes one product, (h_{t-1} * m) @ W_hh^T (tile.matmul on weights packed
    once per call), then one fused pass per row, on row pointers (rows.py), with the float32
    gate passes as explicit vector blocks (simd.py);
  - the parameter gradients that are sums over rows (db, layer-norm weights, peepholes) are
    summed per batch row (db_rows, dln_rows, dpeep_rows), so no chunk writes another's
    memory, and the caller adds the B rows up: the same sums for any thread count.
The layer-norm backward runs inside the step loop, on each row of dgates while it is still in
cache (LN is memory-bound: it reads and writes whole 4H rows).

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
    with zoneout of c: c_prev (H) c_{t-1} (else it is the previous row's cells, or c0)
    with layer norm: xhat, hhat (4H), chat (H) normalised values, and 1/std of each (3,)
h_{t-1} is y of the previous step (or h0): the backward reads it there.
"""
import numpy as np
from numba import njit

from .activations import sigmoid, tanh
from .blas import PAD_ROWS, gemm_packed, padded_input, padded_rows
from .lstm import backward_step, no_projection, offsets
from .rows import KW, KW_STORE, add_p, copy_p, fma_p, mul_p, ptr_add, row_ptr
from .simd import (LANES, block_units, out_tanh_block, variant_gate_backward_block, variant_gate_block,
                   variant_out_backward_block)
from .threads import run_chunks
from .tile import WHOLE_K, matmul, pack, padded_width

EPS = 1e-5


# ---- layer norm's sums: the only loops compiled with 'reassoc' (KW), which their vector lanes
# need; they store nothing, so LLVM runs one vector loop for a given n, whatever the addresses.
# Every loop that stores is compiled without it (rows.KW_STORE says why).
@njit(**KW)
def _sum(v, n):
    s = v[0] - v[0]  # v's dtype: a float64 literal would promote a float32 row
    for j in range(n):
        s += v[j]
    return s


@njit(**KW)
def _sum_squares(v, mean, n):
    """sum (v - mean)^2: the variance's second pass (no E[v^2] - mean^2 cancellation)."""
    s = v[0] - v[0]
    for j in range(n):
        d = v[j] - mean
        s += d * d
    return s


@njit(**KW)
def _sum2(a, q, n):
    """_sum of two rows in one pass: two independent chains (see normalize2)."""
    sa = a[0] - a[0]
    sq = sa
    for j in range(n):
        sa += a[j]
        sq += q[j]
    return sa, sq


@njit(**KW)
def _sum_squares2(a, ma, q, mq, n):
    sa = a[0] - a[0]
    sq = sa
    for j in range(n):
        da = a[j] - ma
        dq = q[j] - mq
        sa += da * da
        sq += dq * dq
    return sa, sq


@njit(**KW)
def _gradient_sums(dy, w, xhat, n):
    """(sum dy w, sum dy w xhat): the means normalize_backward subtracts, times n."""
    s1 = dy[0] - dy[0]
    s2 = s1
    for j in range(n):
        dxh = dy[j] * w[j]
        s1 += dxh
        s2 += dxh * xhat[j]
    return s1, s2


@njit(**KW)
def _gradient_sums2(dg, wa, xa, wq, xq, n):
    """_gradient_sums of dg through two layer norms, in one pass (see normalize_backward2)."""
    s1a = dg[0] - dg[0]
    s2a = s1a
    s1q = s1a
    s2q = s1a
    for j in range(n):
        ga = dg[j] * wa[j]
        gq = dg[j] * wq[j]
        s1a += ga
        s2a += ga * xa[j]
        s1q += gq
        s2q += gq * xq[j]
    return s1a, s2a, s1q, s2q


# ---- small row operations on pointers -------------------------------------------------------------
@njit(**KW_STORE)
def blend_p(dst, new, d, n):
    """Zoneout: dst[:n] = d dst + (1 - d) new, written new + d (dst - new) (no literal 1: see
    forward_chunk)."""
    for k in range(n):
        dst[k] = new[k] + d[k] * (dst[k] - new[k])


@njit(**KW_STORE)
def normalize(v, w, b, xhat, out, n, k):
    """Layer norm of the row v (n values): xhat = (v - mean) / sqrt(var + eps), out = xhat * w + b
    (out may be v itself); returns 1 / sqrt(var + eps). k: two scratch slots of v's dtype.
    Two passes for the statistics (no E[v^2] - mean^2 cancellation), summed in v's dtype with
    the lanes of a vector (as torch's layer_norm sums float32 in float32)."""
    k[0] = _sum(v, n) / n  # stored and read back: rounded to v's dtype
    mean = k[0]
    k[1] = 1.0 / np.sqrt(_sum_squares(v, mean, n) / n + EPS)
    rstd = k[1]
    for j in range(n):
        xh = (v[j] - mean) * rstd
        xhat[j] = xh
        out[j] = xh * w[j] + b[j]
    return rstd


@njit(**KW_STORE)
def normalize_backward(dy, w, xhat, rstd, dv, n, k):
    """Backward of y = xhat * w + b, xhat = normalize(v), to v: writes dv (n values).
    dv = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * w.
    dv may be dy itself (each element reads its own dy before writing). The gradients of
    w and b are left to the caller."""
    s1, s2 = _gradient_sums(dy, w, xhat, n)
    k[0] = s1 / n
    k[1] = s2 / n
    m1 = k[0]
    m2 = k[1]
    for j in range(n):
        dv[j] = rstd * (dy[j] * w[j] - m1 - xhat[j] * m2)


@njit(**KW_STORE)
def normalize2(a, q, wa, ba, wq, bq, xa, xq, n, k):
    """normalize() of two rows at once, in place (a = LN(a) with wa, ba; q = LN(q) with wq, bq;
    xa, xq out the normalised values); k[2], k[3] out their 1/std. Each pass carries two
    independent sums: 2.7x faster than two normalize() calls (BENCHMARKS.md, seventh session)."""
    sa, sq = _sum2(a, q, n)
    k[0] = sa / n
    k[1] = sq / n
    ma = k[0]
    mq = k[1]
    sa, sq = _sum_squares2(a, ma, q, mq, n)
    k[2] = 1.0 / np.sqrt(sa / n + EPS)
    k[3] = 1.0 / np.sqrt(sq / n + EPS)
    ra = k[2]
    rq = k[3]
    for j in range(n):
        xh = (a[j] - ma) * ra
        xa[j] = xh
        a[j] = xh * wa[j] + ba[j]
        xg = (q[j] - mq) * rq
        xq[j] = xg
        q[j] = xg * wq[j] + bq[j]


@njit(**KW_STORE)
def normalize_backward2(dg, wa, xa, ra, wq, xq, rq, dq, n, k):
    """normalize_backward() of one incoming row dg through two layer norms: dq (n) out the
    gradient through LN(q) (wq, xq, rq), then dg in place through LN(a) (wa, xa, ra). One pass
    for the four sums, one for the two results."""
    s1a, s2a, s1q, s2q = _gradient_sums2(dg, wa, xa, wq, xq, n)
    k[0] = s1a / n
    k[1] = s2a / n
    k[2] = s1q / n
    k[3] = s2q / n
    m1a, m2a, m1q, m2q = k[0], k[1], k[2], k[3]
    for j in range(n):
        g = dg[j]
        dq[j] = rq * (g * wq[j] - m1q - xq[j] * m2q)
        dg[j] = ra * (g * wa[j] - m1a - xa[j] * m2a)


# ---- the fused row passes: float32 vector blocks (simd.py), the rest (float64, H % LANES) scalar --
@njit(**KW_STORE)
def gate_row(a, q, b, pi, pf, po, c, cn, H):
    """a (4H) in x W_ih^T (normalised), out the activations i, f, g, o; q (4H) the recurrent
    part; b (4H); pi, pf, po (H) peepholes; c (H) c_{t-1}; cn (H) out c~_t."""
    j0 = block_units(a, H)
    for j in range(0, j0, LANES):
        variant_gate_block(a, q, b, pi, pf, po, c, cn, H, j)
    for j in range(j0, H):
        cp = c[j]
        ig = sigmoid(a[j] + q[j] + b[j] + pi[j] * cp)
        fg = sigmoid(a[H + j] + q[H + j] + b[H + j] + pf[j] * cp)
        gg = tanh(a[2 * H + j] + q[2 * H + j] + b[2 * H + j])
        cv = fg * cp + ig * gg
        a[j] = ig
        a[H + j] = fg
        a[2 * H + j] = gg
        a[3 * H + j] = sigmoid(a[3 * H + j] + q[3 * H + j] + b[3 * H + j] + po[j] * cv)
        cn[j] = cv


@njit(**KW_STORE)
def out_tanh_row(a, v, out, H):
    """out (H) = o * tanh(v), o the last gate row of a (4H)."""
    j0 = block_units(a, H)
    for j in range(0, j0, LANES):
        out_tanh_block(a, v, out, H, j)
    for j in range(j0, H):
        out[j] = a[3 * H + j] * tanh(v[j])


@njit(**KW_STORE)
def out_backward_row(a, v, dhp, dg, dv, hpre, want_hpre, H):
    """Through h~ = o * tanh(v): dv (H) out dL/dv; dg[3H:] out dL/d pre_o; hpre (H) out o tanh(v)
    when want_hpre. dhp (H) dL/dh~ before the projection."""
    j0 = block_units(a, H)
    for j in range(0, j0, LANES):
        variant_out_backward_block(a, v, dhp, dg, dv, hpre, want_hpre, H, j)
    for j in range(j0, H):
        # No literal 1 here: int - float32 types as float64 in Numba (s' = s - s^2).
        og = a[3 * H + j]
        tc = tanh(v[j])
        dv[j] = dhp[j] * (og - og * tc * tc)
        dg[3 * H + j] = dhp[j] * tc * (og - og * og)
        if want_hpre:
            hpre[j] = og * tc


@njit(**KW_STORE)
def gate_backward_row(a, cp, dcv, dc, zc, dg, pi, pf, po, H):
    """dc (H) in dL/dc_t carried, out dL/dc_{t-1}; dcv (H) dL/dc~ through h~; zc (H) zoneout's d
    (zeros without); dg (4H) out dL/d pre-activations i, f, g (o: out_backward_row)."""
    j0 = block_units(a, H)
    for j in range(0, j0, LANES):
        variant_gate_backward_block(a, cp, dcv, dc, zc, dg, pi, pf, po, H, j)
    for j in range(j0, H):
        ig = a[j]
        fg = a[H + j]
        gg = a[2 * H + j]
        keep = zc[j] * dc[j]  # c~ reaches the carried c_t through (1 - d); c_{t-1} gets d dc_t
        d = dcv[j] + (dc[j] - keep) + dg[3 * H + j] * po[j]  # dL/dc~
        dzi = d * gg * (ig - ig * ig)
        dzf = d * cp[j] * (fg - fg * fg)
        dg[j] = dzi
        dg[H + j] = dzf
        dg[2 * H + j] = d * (ig - ig * gg * gg)
        dc[j] = d * fg + keep + dzi * pi[j] + dzf * pf[j]


# ---- forward ---------------------------------------------------------------------------------------
@njit(**KW_STORE)
def forward_chunk(x, batch_sizes, h0, c0, wp_ih, wp_hh, b, wp_hr, gemm, wg, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
                  w_peep, zc, zh, rm, reverse, acts, y, h, c, cells, c_prev, xhat, hhat, chat, rstd, save, r0, r1):
    """The whole time loop of rows r0:r1 (see forward_core for the arguments)."""
    T = batch_sizes.shape[0]
    off = offsets(batch_sizes)
    H = c.shape[1]
    P = h.shape[1]
    m = r1 - r0
    dt = acts.dtype
    has_proj = wp_hr.shape[0] > 0
    has_ln = ln_ih_w.shape[0] > 0
    has_zc = zc.shape[0] > 0
    has_zh = zh.shape[0] > 0
    has_rm = rm.shape[0] > 0
    in_loop = wp_ih.shape[0] > 0  # x W_ih^T made per step here (else acts holds it on entry)
    xq = np.empty((m if in_loop else 0, padded_width(wp_ih)), dt)  # x_t W_ih^T of one step
    # The BLAS computes a few rows as blas.padded_rows of them: hin and hh have rows to spare (zeros in).
    mp = max(m, PAD_ROWS) if gemm != 0 else m
    hin = np.zeros((mp, P), dt)  # h_{t-1} * m: the product's input
    hh = np.empty((mp, max(padded_width(wp_hh), 4 * H)), dt)  # (h_{t-1} * m) W_hh^T (wp_hh empty with gemm)
    hp = np.empty((m, H), dt)  # o * tanh(.), before the projection
    hn = np.empty((m if has_proj else 0, padded_width(wp_hr)), dt)  # after the projection
    cscr = np.empty((0 if save else m, H), dt)  # c~ when not saving
    nrm4 = np.empty(4 * H, dt)  # normalised rows when not saving (written, never read)
    nrm1 = np.empty(H, dt)
    cnl = np.empty(H, dt)  # LN_cell(c~) of one row
    k = np.empty(4, dt)
    # No literal 1 in float math: int - float32 types as float64 in Numba and would run a
    # float32 loop in float64 (so s' = s - s*s, and (1 - d) a + d b = a + d (b - a)).
    pb, pi, pf, po = row_ptr(b, 0), row_ptr(w_peep, 0), row_ptr(w_peep, 1), row_ptr(w_peep, 2)
    lih_w, lih_b, lhh_w, lhh_b = row_ptr(ln_ih_w, 0), row_ptr(ln_ih_b, 0), row_ptr(ln_hh_w, 0), row_ptr(ln_hh_b, 0)
    lc_w, lc_b = row_ptr(ln_c_w, 0), row_ptr(ln_c_b, 0)
    for i in range(m):
        copy_p(row_ptr(h, r0 + i), row_ptr(h0, r0 + i), P)
        copy_p(row_ptr(c, r0 + i), row_ptr(c0, r0 + i), H)
    for s in range(T):
        t = T - 1 - s if reverse else s
        n = min(r1, batch_sizes[t]) - r0
        if n <= 0:
            continue
        o = off[t] + r0
        for i in range(n):
            if has_rm:
                mul_p(row_ptr(hin, i), row_ptr(h, r0 + i), row_ptr(rm, r0 + i), P)
            else:
                copy_p(row_ptr(hin, i), row_ptr(h, r0 + i), P)
            if save and has_zc:
                copy_p(row_ptr(c_prev, o + i), row_ptr(c, r0 + i), H)
        if gemm != 0:  # the BLAS's packed GEMM (blas.py)
            gemm_packed(gemm, padded_rows(n, P, 4 * H), 4 * H, P, row_ptr(hin, 0), P, row_ptr(wg, 0), row_ptr(hh, 0),
                        hh.shape[1])
        else:
            matmul(hin, n, wp_hh, hh, s % 2 == 1, WHOLE_K)  # (n, P) @ (P, 4H)
        if in_loop:
            matmul(x[o:], n, wp_ih, xq, s % 2 == 1, WHOLE_K)  # (n, I) @ (I, 4H)
        for i in range(n):
            row = o + i
            a = row_ptr(xq, i) if in_loop else row_ptr(acts, row)
            q = row_ptr(hh, i)
            cr = row_ptr(c, r0 + i)
            cn = row_ptr(cells, row) if save else row_ptr(cscr, i)  # c~
            if has_ln:  # a = LN_ih(a), q = LN_hh(q), each row when its step comes (in cache)
                normalize2(a, q, lih_w, lih_b, lhh_w, lhh_b, row_ptr(xhat, row) if save else row_ptr(nrm4, 0),
                           row_ptr(hhat, row) if save else row_ptr(nrm4, 0), 4 * H, k)
                if save:
                    rstd[row, 0] = k[2]
                    rstd[row, 1] = k[3]
            gate_row(a, q, pb, pi, pf, po, cr, cn, H)
            if has_zc:  # the carried state keeps c_{t-1} where d = 1
                blend_p(cr, cn, row_ptr(zc, row), H)
            else:
                copy_p(cr, cn, H)
            v = cn
            if has_ln:  # h~ = o * tanh(LN_cell(c~))
                v = row_ptr(cnl, 0)
                rs = normalize(cn, lc_w, lc_b, row_ptr(chat, row) if save else row_ptr(nrm1, 0), v, H, k)
                if save:
                    rstd[row, 2] = rs
            out_tanh_row(a, v, row_ptr(hp, i), H)
            if in_loop and save:
                copy_p(row_ptr(acts, row), a, 4 * H)
        if has_proj:
            matmul(hp, n, wp_hr, hn, s % 2 == 1, WHOLE_K)  # (n, H) @ (H, P)
        for i in range(n):  # zoneout of h, then y_t = h_t
            hr = row_ptr(h, r0 + i)
            new = row_ptr(hn, i) if has_proj else row_ptr(hp, i)
            if has_zh:
                blend_p(hr, new, row_ptr(zh, o + i), P)
            else:
                copy_p(hr, new, P)
            copy_p(row_ptr(y, o + i), hr, P)


def pack_forward(w_hh, w_hr, w_ih=None, tile_hh=True):
    """(wp_ih, wp_hh, wp_hr): W_ih^T, W_hh^T and W_hr^T packed for tile.matmul; wp_ih empty unless
    w_ih is given (x W_ih^T then made per step in the loop), wp_hr empty without projection,
    wp_hh empty when not tile_hh (a BLAS makes that product: forward_core's gemm)."""
    wp_ih = pack(w_ih, True) if w_ih is not None else no_projection(w_hh)
    wp_hh = pack(w_hh, True) if tile_hh else no_projection(w_hh)
    return wp_ih, wp_hh, (pack(w_hr, True) if w_hr.shape[0] else no_projection(w_hh))


def forward_core(x, batch_sizes, h0, c0, w_ih, w_hh, b, w_hr,
                 ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep, zc, zh, rm,
                 reverse, acts, y, h, c, cells, c_prev, xhat, hhat, chat, rstd, save, bounds=None, projected=False,
                 packed=None, gemm=0, wg=None):
    """The forward pass into preallocated arrays (C-contiguous, one dtype).

    acts (total, 4H): x W_ih^T on entry when projected (the caller's GEMM), on return the
    activations; when not projected, x W_ih^T is made per step in the loop where packed holds a
    packed W_ih (then acts may have 0 rows unless save), else here with numpy's GEMM; y (total, P); h, c (B, P), (B, H) on return h_n, c_n;
    cells (total, H) c~ (written when save, else may have 0 rows); c_prev (total, H) with
    zoneout of c and save (else 0 rows); with layer norm and save xhat (total, 4H), hhat
    (total, 4H), chat (total, H), rstd (total, 3) (else 0 rows). w_hr (0, H) without a
    projection. bounds: row chunks (lstm.chunk_bounds), None: one. packed: pack_forward(...) made
    once by a caller whose weights do not change (the runtime), else made here. gemm, wg: the
    address of a BLAS's packed GEMM and W_hh^T packed for it (blas.py), or 0: tile.matmul.
    """
    if x.shape[0] == 0:
        h[:], c[:] = h0, c0
        return
    wp_ih, wp_hh, wp_hr = packed if packed is not None else pack_forward(w_hh, w_hr, None, gemm == 0)
    if wg is None:
        wg = np.empty(0, acts.dtype)
    if projected or not wp_ih.shape[0]:
        wp_ih = no_projection(w_hh)  # nothing to make in the loop
        if not projected:
            np.dot(x, w_ih.T, acts)
    if bounds is None:
        bounds = np.array([0, c0.shape[0]], np.int64)
    run_chunks(forward_chunk, bounds, x, batch_sizes, h0, c0, wp_ih, wp_hh, b, wp_hr, gemm, wg, ln_ih_w, ln_ih_b,
               ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep, zc, zh, rm, reverse, acts, y, h, c, cells, c_prev, xhat, hhat,
               chat, rstd, save)


# ---- backward --------------------------------------------------------------------------------------
@njit(**KW_STORE)
def backward_chunk(x, batch_sizes, h0, c0, wpb_hh, wpb_hr, gemm, wgb, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, w_peep,
                   zc, zh, rm, reverse, acts, cells, c_prev, y, xhat, hhat, chat, rstd, dy, dh, dc,
                   dgates, dhw, xh_prev, db_rows, dln_rows, dpeep_rows, dh_all, hpre_all, r0, r1):
    """BPTT over rows r0:r1 (see backward_core for the arguments)."""
    T = batch_sizes.shape[0]
    off = offsets(batch_sizes)
    I = x.shape[1]
    H = dc.shape[1]
    P = dh.shape[1]
    m = r1 - r0
    dt = acts.dtype
    has_proj = wpb_hr.shape[0] > 0
    has_ln = ln_ih_w.shape[0] > 0
    has_peep = dpeep_rows.shape[0] > 0  # (0, 3H): no peepholes, no gradient wanted
    has_zc = zc.shape[0] > 0
    has_zh = zh.shape[0] > 0
    has_rm = rm.shape[0] > 0
    dhn = np.empty((m, P), dt)  # dL/dh~ (after the projection, before zoneout)
    dhp = np.empty((m if has_proj else 0, padded_width(wpb_hr)), dt)  # dL/d(o * tanh(.))
    # The BLAS computes a few rows as blas.padded_rows of them: dhin has rows to spare, and a padded
    # product reads its rows from src_pad (the rows after them in dgates or dhw may lie past the array).
    dhin = np.empty((max(m, PAD_ROWS) if gemm != 0 else m, max(padded_width(wpb_hh), P)), dt)  # dL/d(h_{t-1} * m)
    src_pad = np.zeros((PAD_ROWS if gemm != 0 else 0, 4 * H), dt)
    dcn = np.empty(H, dt)  # dL/d(what went into tanh) of one row
    dcv = np.empty(H, dt)  # dL/dc~ through LN_cell
    cnl = np.empty(H, dt)  # LN_cell(c~)
    zeros = np.zeros(H, dt)  # zoneout's d without zoneout
    k = np.empty(4, dt)
    pi, pf, po = row_ptr(w_peep, 0), row_ptr(w_peep, 1), row_ptr(w_peep, 2)
    lih_w, lhh_w, lc_w, lc_b = row_ptr(ln_ih_w, 0), row_ptr(ln_hh_w, 0), row_ptr(ln_c_w, 0), row_ptr(ln_c_b, 0)
    for s in range(T):
        n, o, n_prev, p0 = backward_step(batch_sizes, off, s, reverse, r0, r1)
        if n <= 0:
            continue
        for i in range(n):  # dh_t = carried + dy_t; zoneout splits it into h~ and h_{t-1} parts
            g, dr = row_ptr(dhn, i), row_ptr(dh, r0 + i)
            copy_p(g, dr, P)
            add_p(g, row_ptr(dy, o + i), P)
            if has_zh:
                mul_p(dr, g, row_ptr(zh, o + i), P)  # d g
                for kk in range(P):
                    g[kk] = g[kk] - dr[kk]  # (1 - d) g
        if has_proj:
            for i in range(n):
                copy_p(row_ptr(dh_all, o + i), row_ptr(dhn, i), P)
            matmul(dhn, n, wpb_hr, dhp, s % 2 == 1, WHOLE_K)  # (n, P) @ (P, H)
        for i in range(n):
            row = o + i
            xh = row_ptr(xh_prev, row)  # [x_t | h_{t-1} * m]: the weight gradients' GEMM input
            copy_p(xh, row_ptr(x, row), I)
            hprev = row_ptr(y, p0 + i) if i < n_prev else row_ptr(h0, r0 + i)
            if has_rm:
                mul_p(ptr_add(xh, I), hprev, row_ptr(rm, r0 + i), P)
            else:
                copy_p(ptr_add(xh, I), hprev, P)
            if has_zc:
                cp = row_ptr(c_prev, row)
            else:
                cp = row_ptr(cells, p0 + i) if i < n_prev else row_ptr(c0, r0 + i)
            a = row_ptr(acts, row)
            dg = row_ptr(dgates, row)
            cv = row_ptr(cells, row)  # c~_t
            v = cv
            if has_ln:  # what went into tanh: LN_cell(c~) = chat * w + b
                v = row_ptr(cnl, 0)
                ch = row_ptr(chat, row)
                for j in range(H):
                    v[j] = ch[j] * lc_w[j] + lc_b[j]
            out_backward_row(a, v, row_ptr(dhp, i) if has_proj else row_ptr(dhn, i), dg, row_ptr(dcn, 0),
                             row_ptr(hpre_all, row) if has_proj else row_ptr(dcv, 0), has_proj, H)
            dcv_p = row_ptr(dcn, 0)
            if has_ln:
                dl = row_ptr(dln_rows, r0 + i)  # [ih_w 4H | hh_w 4H | c_w H | c_b H]
                fma_p(ptr_add(dl, 8 * H), row_ptr(dcn, 0), row_ptr(chat, row), H)
                add_p(ptr_add(dl, 9 * H), row_ptr(dcn, 0), H)
                dcv_p = row_ptr(dcv, 0)
                normalize_backward(row_ptr(dcn, 0), lc_w, row_ptr(chat, row), rstd[row, 2], dcv_p, H, k)
            gate_backward_row(a, cp, dcv_p, row_ptr(dc, r0 + i), row_ptr(zc, row) if has_zc else row_ptr(zeros, 0),
                              dg, pi, pf, po, H)
            if has_peep:  # pre_i, pre_f saw p * c_{t-1}; pre_o saw p_o * c~_t
                dp = row_ptr(dpeep_rows, r0 + i)
                fma_p(dp, dg, cp, H)
                fma_p(ptr_add(dp, H), ptr_add(dg, H), cp, H)
                fma_p(ptr_add(dp, 2 * H), ptr_add(dg, 3 * H), cv, H)
            add_p(row_ptr(db_rows, r0 + i), dg, 4 * H)
            if has_ln:  # LN_ih, LN_hh outputs are added like the biases
                dl = row_ptr(dln_rows, r0 + i)
                xr, hr = row_ptr(xhat, row), row_ptr(hhat, row)
                fma_p(dl, dg, xr, 4 * H)
                fma_p(ptr_add(dl, 4 * H), dg, hr, 4 * H)
                # dhw = dL/d(h_in W_hh^T) through LN_hh; dgates becomes dL/d(x W_ih^T) in place
                normalize_backward2(dg, lih_w, xr, rstd[row, 0], lhh_w, hr, rstd[row, 1], row_ptr(dhw, row), 4 * H, k)
        src = dhw if has_ln else dgates
        if gemm != 0:  # the BLAS's packed GEMM (blas.py)
            rows = padded_rows(n, 4 * H, P)
            gemm_packed(gemm, rows, P, 4 * H, padded_input(src, o, n, rows, src_pad), 4 * H, row_ptr(wgb, 0),
                        row_ptr(dhin, 0), dhin.shape[1])
        else:
            matmul(src[o:], n, wpb_hh, dhin, s % 2 == 1, WHOLE_K)  # (n, 4H) @ (4H, P)
        for i in range(n):  # dh_{t-1} = (zoneout's part) + m * (the recurrent product's part)
            dr, di = row_ptr(dh, r0 + i), row_ptr(dhin, i)
            if has_rm and has_zh:
                fma_p(dr, di, row_ptr(rm, r0 + i), P)
            elif has_rm:
                mul_p(dr, di, row_ptr(rm, r0 + i), P)
            elif has_zh:
                add_p(dr, di, P)
            else:
                copy_p(dr, di, P)


def pack_backward(w_hh, w_hr, tile_hh=True):
    """(wpb_hh, wpb_hr): W_hh (4H, P) and W_hr (P, H) packed for tile.matmul (wpb_hh empty when
    not tile_hh: a BLAS makes that product)."""
    wpb_hh = pack(w_hh, False) if tile_hh else no_projection(w_hh)
    return wpb_hh, (pack(w_hr, False) if w_hr.shape[0] else no_projection(w_hh))


def backward_core(x, batch_sizes, h0, c0, w_hh, w_hr, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b, w_peep, zc, zh, rm,
                  reverse, acts, cells, c_prev, y, xhat, hhat, chat, rstd, dy, dh, dc,
                  dgates, dhw, xh_prev, db_rows, dln_rows, dpeep_rows, dh_all, hpre_all, bounds=None, gemm=0,
                  wgb=None):
    """BPTT through forward_core(save=True): the time loop. The weight gradients are left to
    the caller, as GEMMs over what this writes (weight_gradients).

    y: forward_core's output (h_{t-1} of each row); dy (total, P); dh (B, P), dc (B, H): in
    dL/dh_n, dL/dc_n, out dL/dh0, dL/dc0. Out: dgates (total, 4H) dL/d pre-activations (with
    layer norm: dL/d(x W_ih^T), through LN_ih), dhw (total, 4H) with layer norm dL/d(h_in W_hh^T)
    (else 0 rows), xh_prev (total, I + P) [x_t | h_{t-1} * m] of every row, db_rows (B, 4H)
    zeros in, each batch row's sum of dgates; dln_rows (B, 10H) zeros in, with layer norm each
    batch row's sums for [ln_ih_w | ln_hh_w | ln_c_w | ln_c_b] (the LN biases' gradients are
    db); dpeep_rows (B, 3H) zeros in, with peepholes the sums for p_i, p_f, p_o (0 rows: none
    wanted); with a projection dh_all (total, P) dL/dh~ and hpre_all (total, H) its input.
    gemm, wgb: the address of a BLAS's packed GEMM and W_hh packed for it, or 0 (blas.py)."""
    if x.shape[0] == 0:
        return
    wpb_hh, wpb_hr = pack_backward(w_hh, w_hr, gemm == 0)
    if wgb is None:
        wgb = np.empty(0, acts.dtype)
    if bounds is None:
        bounds = np.array([0, dc.shape[0]], np.int64)
    run_chunks(backward_chunk, bounds, x, batch_sizes, h0, c0, wpb_hh, wpb_hr, gemm, wgb, ln_ih_w, ln_hh_w, ln_c_w,
               ln_c_b, w_peep, zc, zh, rm, reverse, acts, cells, c_prev, y, xhat, hhat, chat, rstd, dy, dh, dc,
               dgates, dhw, xh_prev, db_rows, dln_rows, dpeep_rows, dh_all, hpre_all)


def weight_gradients(I, H, dgates, dhw, xh_prev, db_rows, dln_rows, dpeep_rows, dh_all, hpre_all, mm=np.dot):
    """The parameter gradients from backward_core's outputs: dict of dw_ih, dw_hh, db, dw_hr
    (None without projection), dln (ln_ih_w, ln_hh_w, ln_c_w, ln_c_b; None without layer norm)
    and dpeep ((3, H) or None). Without layer norm [dW_ih | dW_hh] is one GEMM (column views);
    mm: the matrix product (the torch engine passes torch's)."""
    if dhw.shape[0]:
        dw_ih = mm(dgates.T, xh_prev[:, :I])  # (4H, total) @ (total, I)
        dw_hh = mm(dhw.T, xh_prev[:, I:])  # (4H, total) @ (total, P)
    else:
        dw = mm(dgates.T, xh_prev)
        dw_ih, dw_hh = dw[:, :I], dw[:, I:]
    g = dict(dw_ih=dw_ih, dw_hh=dw_hh, db=db_rows.sum(0), dw_hr=None, dln=None, dpeep=None)
    if dh_all.shape[0]:
        g["dw_hr"] = mm(dh_all.T, hpre_all)  # (P, total) @ (total, H)
    if dhw.shape[0]:
        d = dln_rows.sum(0)
        g["dln"] = (d[: 4 * H], d[4 * H : 8 * H], d[8 * H : 9 * H], d[9 * H :])
    if dpeep_rows.shape[0]:
        g["dpeep"] = dpeep_rows.sum(0).reshape(3, H)
    return g
