"""The Numba CPU engine for the LSTM variants: kernels/numba/variants.py bound to torch
(through binding.py, like the plain engine).

lstm_layer(x, batch_sizes, h0, c0, p, reverse, variant) is the engine interface of base.py
plus `variant`, a lstmkit.nn.variants.LayerVariant (parameters + masks, drawn by the module).
With nothing to record for autograd the forward kernel runs alone; otherwise a
torch.autograd.Function saves the inputs and the kernel's buffers with save_for_backward
(so autograd catches in-place changes between forward and backward) and its backward runs
the BPTT kernel. The masks are constants: no gradient flows to them.

Threads: like the plain engine, a call with enough work splits its batch rows into one chunk
of whole sequences per torch thread (binding.chunks_for). Here the split is made outside the
kernel: each chunk's packed rows are gathered into a call of their own (batch_sizes of the
chunk), the kernels run on the chunks at once (nogil), and the rows are scattered back; the
parameter gradients are the sums of the chunks'. Rows never interact, so a row's numbers do
not depend on the split (parameter gradients: up to the order of that final sum).
"""
from __future__ import annotations

import numpy as np
import torch

from ...kernels.numba.lstm import chunk_bounds
from ...kernels.numba.threads import run_chunks
from ...kernels.numba.variants import backward_core, forward_core
from ..base import LayerParams, step_offsets
from ..double_backward import differentiable_backward
from .binding import as_numpy, as_numpy_or, check_input, chunks_for, limit_blas, needs_grad

# The differentiable variant parameters, in the order the autograd Function takes them.
_VPARAMS = ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b", "w_peep")
_LN = _VPARAMS[:6]
# What the forward kernel saves for backward, per packed row (kernels/numba/variants.py).
_SAVED = ("acts", "cells", "c_prev", "h_in", "xhat", "hhat", "chat", "rstd")


def _kernel_weights(p: LayerParams, v, dt, H: int, P: int) -> dict:
    """The kernels' weight and mask arguments as numpy arrays (empty ones for absent parts)."""
    k = dict(
        w_ih=as_numpy(p.w_ih), w_hh=as_numpy(p.w_hh), w_hr=as_numpy_or(p.w_hr, (0, H), dt),
        w_peep=as_numpy_or(v.w_peep, (3, H), dt),  # zero peepholes: none
        zc=as_numpy_or(v.zoneout_c, (0, H), dt), zh=as_numpy_or(v.zoneout_h, (0, P), dt),
        rm=as_numpy_or(v.rec_mask, (0, P), dt),
    )
    for n in _LN:
        k[n] = as_numpy_or(getattr(v, n), (0,), dt)
    return k


def _row_chunks(batch_sizes, I: int, H: int, P: int):
    """[(r0, r1, chunk batch_sizes (int64), packed row indices of the chunk (int64))], one per
    chunk of rows; a single chunk means: no split (indices None)."""
    bsz = np.asarray(batch_sizes, dtype=np.int64)
    total = int(bsz.sum())
    bounds = chunk_bounds(bsz, chunks_for(int(bsz[0]), total * (I + P) * 4 * H))
    if bounds.shape[0] <= 2:
        return [(0, int(bsz[0]), bsz, None)]
    offsets = step_offsets(batch_sizes)
    chunks = []
    for r0, r1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        sizes = np.clip(bsz - r0, 0, r1 - r0)
        sizes = sizes[sizes > 0]  # rows are sorted longest first: the chunk's steps are a prefix
        rows = np.concatenate([np.arange(o + r0, o + r0 + n) for o, n in zip(offsets, sizes)])
        chunks.append((r0, r1, sizes, rows))
    return chunks


def _each_chunk(chunks, fn) -> None:
    """fn(r0, r1, sizes, rows) for every chunk of _row_chunks, on threads at once."""
    by_start = {c[0]: c for c in chunks}
    bounds = np.array([c[0] for c in chunks] + [chunks[-1][1]], np.int64)
    run_chunks(lambda r0, r1: fn(*by_start[r0]), bounds)


def _take_rows(k: dict, rows, r0: int, r1: int) -> dict:
    """The kernel arguments of one chunk: per-packed-row masks gathered, rec_mask's rows sliced."""
    k = dict(k)
    for n in ("zc", "zh"):
        if k[n].shape[0]:
            k[n] = k[n][rows]  # fancy indexing: a contiguous copy
    if k["rm"].shape[0]:
        k["rm"] = k["rm"][r0:r1]
    return k


def _forward(x, batch_sizes, h0, c0, p: LayerParams, v, reverse, save):
    """Returns numpy (y, h_n, c_n, saved); saved: the _SAVED buffers (empty unless save)."""
    xn, h0n, c0n = as_numpy(x), as_numpy(h0), as_numpy(c0)
    dt = xn.dtype
    total = xn.shape[0]
    B, H = c0n.shape
    P = h0n.shape[1]
    b = as_numpy(p.b_ih) + as_numpy(p.b_hh) if p.b_ih is not None else np.zeros(4 * H, dt)
    k = _kernel_weights(p, v, dt, H, P)
    n, nl = (total if save else 0), (total if save and v.layer_norm else 0)
    y = np.empty((total, P), dt)
    h_n, c_n = np.empty((B, P), dt), np.empty((B, H), dt)
    sv = dict(
        acts=np.empty((total, 4 * H), dt), cells=np.empty((total, H), dt),  # the kernel's scratch too
        c_prev=np.empty((n, H), dt), h_in=np.empty((n, P), dt), xhat=np.empty((nl, 4 * H), dt),
        hhat=np.empty((nl, 4 * H), dt), chat=np.empty((nl, H), dt), rstd=np.empty((nl, 3), dt),
    )
    limit_blas()
    chunks = _row_chunks(batch_sizes, xn.shape[1], H, P)

    def core(x, sizes, h0, c0, kk, svk, y, h_n, c_n):
        forward_core(
            x, sizes, h0, c0, kk["w_ih"], kk["w_hh"], b, kk["w_hr"], *(kk[n] for n in _LN), kk["w_peep"],
            kk["zc"], kk["zh"], kk["rm"], bool(reverse), svk["acts"], y, h_n, c_n, *(svk[n] for n in _SAVED[1:]),
            bool(save),
        )

    if len(chunks) == 1:
        core(xn, chunks[0][2], h0n, c0n, k, sv, y, h_n, c_n)
        return y, h_n, c_n, sv

    def run(r0, r1, sizes, rows):
        m = len(rows)
        yk = np.empty((m, P), dt)
        svk = {n: np.empty((m if a.shape[0] else 0,) + a.shape[1:], dt) for n, a in sv.items()}
        # h_n, c_n rows: views the kernel writes (row slices of C arrays are contiguous)
        core(xn[rows], sizes, h0n[r0:r1], c0n[r0:r1], _take_rows(k, rows, r0, r1), svk, yk, h_n[r0:r1], c_n[r0:r1])
        y[rows] = yk
        for n, a in svk.items():
            if a.shape[0]:
                sv[n][rows] = a

    _each_chunk(chunks, run)
    return y, h_n, c_n, sv


def lstm_layer(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool = False, variant=None):
    check_input(x, p)
    vparams = [getattr(variant, n) for n in _VPARAMS]
    if needs_grad((x, h0, c0, *p, *vparams)):
        return _VariantFunction.apply(x, h0, c0, *p, *vparams, batch_sizes, bool(reverse), variant)
    y, h_n, c_n, _ = _forward(x, batch_sizes, h0, c0, p, variant, reverse, False)
    return torch.from_numpy(y), torch.from_numpy(h_n), torch.from_numpy(c_n)


class _VariantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep, batch_sizes, reverse, variant):
        p = LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr)
        y, h_n, c_n, sv = _forward(x, batch_sizes, h0, c0, p, variant, reverse, True)
        # The inputs (no copies; also what differentiable_backward reads), then the kernel's buffers.
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                              ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep,
                              *(torch.from_numpy(sv[n]) for n in _SAVED))
        ctx.variant = variant._replace(**{n: None for n in _VPARAMS})  # the masks only
        ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
        return torch.from_numpy(y), torch.from_numpy(h_n), torch.from_numpy(c_n)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        saved = ctx.saved_tensors
        inputs, buffers = saved[:15], saved[15:]
        if torch.is_grad_enabled():  # create_graph=True: this backward is itself differentiated
            grads = differentiable_backward("numba", inputs, (dy, dh_n, dc_n), ctx.batch_sizes,
                                            ctx.reverse, ctx.needs_input_grad, variant=ctx.variant)
            return (*grads, None, None, None)
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs[:8]
        v = ctx.variant._replace(**dict(zip(_VPARAMS, inputs[8:])))
        xn = as_numpy(x)
        dt = xn.dtype
        total = xn.shape[0]
        (B, P), H = h0.shape, c0.shape[1]
        k = _kernel_weights(LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr), v, dt, H, P)
        sv = {n: t.numpy() for n, t in zip(_SAVED, buffers)}
        dyn = as_numpy_or(dy, (total, P), dt)
        dh = as_numpy(dh_n).copy() if dh_n is not None else np.zeros((B, P), dt)  # becomes dh0
        dc = as_numpy(dc_n).copy() if dc_n is not None else np.zeros((B, H), dt)  # becomes dc0
        dx = np.empty_like(xn)
        dw_ih, dw_hh, dw_hr = np.empty_like(k["w_ih"]), np.empty_like(k["w_hh"]), np.empty_like(k["w_hr"])
        db = np.empty(4 * H, dt)
        g = {n: np.empty_like(k[n]) for n in _LN}
        g["w_peep"] = np.empty((3 if w_peep_present(v) else 0, H), dt)
        limit_blas()
        _backward(xn, ctx.batch_sizes, k, ctx.reverse, sv, dyn, dh, dc, dx, dw_ih, dw_hh, db, dw_hr, g, H, P)
        need = ctx.needs_input_grad
        t = lambda a, i, present=True: torch.from_numpy(a) if need[i] and present else None  # noqa: E731
        has_bias, has_proj, has_ln = b_ih is not None, w_hr is not None, v.layer_norm
        return (
            t(dx, 0), t(dh, 1), t(dc, 2), t(dw_ih, 3), t(dw_hh, 4),
            t(db, 5, has_bias), t(db.copy(), 6, has_bias), t(dw_hr, 7, has_proj),
            *(t(g[n], 8 + i, has_ln) for i, n in enumerate(_LN)),
            t(g["w_peep"], 14, w_peep_present(v)),
            None, None, None,
        )


def w_peep_present(v) -> bool:
    return v.w_peep is not None


def _backward(xn, batch_sizes, k, reverse, sv, dyn, dh, dc, dx, dw_ih, dw_hh, db, dw_hr, g, H, P):
    """backward_core over the whole call, or over each row chunk at once (sums of the chunks'
    parameter gradients); dh, dc in: dh_n, dc_n, out: dh0, dc0."""
    chunks = _row_chunks(batch_sizes, xn.shape[1], H, P)

    def core(x, sizes, kk, svk, dy, dh, dc, dx, dw_ih, dw_hh, db, dw_hr, gk):
        backward_core(
            x, sizes, kk["w_ih"], kk["w_hh"], kk["w_hr"], kk["ln_ih_w"], kk["ln_hh_w"], kk["ln_c_w"], kk["ln_c_b"],
            kk["w_peep"], kk["zc"], kk["zh"], kk["rm"], reverse, *(svk[n] for n in _SAVED),
            dy, dh, dc, dx, dw_ih, dw_hh, db, dw_hr, *(gk[n] for n in _VPARAMS),
        )

    if len(chunks) == 1:
        core(xn, chunks[0][2], k, sv, dyn, dh, dc, dx, dw_ih, dw_hh, db, dw_hr, g)
        return
    parts = {}

    def run(r0, r1, sizes, rows):
        kk = _take_rows(k, rows, r0, r1)
        svk = {n: a[rows] if a.shape[0] else a for n, a in sv.items()}
        grads = dict(dw_ih=np.empty_like(dw_ih), dw_hh=np.empty_like(dw_hh), db=np.empty_like(db),
                     dw_hr=np.empty_like(dw_hr), g={n: np.empty_like(a) for n, a in g.items()})
        dxk = np.empty((len(rows), xn.shape[1]), xn.dtype)
        # dh, dc rows: views, updated in place by the kernel (row slices of C arrays are contiguous)
        core(xn[rows], sizes, kk, svk, dyn[rows], dh[r0:r1], dc[r0:r1], dxk,
             grads["dw_ih"], grads["dw_hh"], grads["db"], grads["dw_hr"], grads["g"])
        dx[rows] = dxk
        parts[r0] = grads

    _each_chunk(chunks, run)
    ordered = [parts[c[0]] for c in chunks]  # a fixed order: the same sums run after run
    for name, out in (("dw_ih", dw_ih), ("dw_hh", dw_hh), ("db", db), ("dw_hr", dw_hr)):
        np.sum([part[name] for part in ordered], axis=0, out=out)
    for n, out in g.items():
        if out.size:
            np.sum([part["g"][n] for part in ordered], axis=0, out=out)
