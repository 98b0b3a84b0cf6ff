"""The Numba CPU engine for the LSTM variants: kernels/numba/variants.py bound to torch
(through binding.py, like the plain engine).

lstm_layer(x, batch_sizes, h0, c0, p, reverse, variant) is the engine interface of base.py
plus `variant`, a lstmkit.nn.variants.LayerVariant (parameters + masks, drawn by the module).
With nothing to record for autograd the forward kernel runs alone; otherwise a
torch.autograd.Function saves the inputs, the output y and the kernel's buffers with
save_for_backward (so autograd catches in-place changes between forward and backward) and its
backward runs the BPTT kernel. The masks are constants: no gradient flows to them.

The GEMMs around the time loops are torch's (x W_ih^T before the forward loop; dx and the
weight gradients after the backward loop), on torch's threads; the loops split their batch
rows into one chunk of whole sequences per torch thread (binding.row_bounds), inside the
kernel call (kernels/numba/variants.py). Rows never interact and the row-sum gradients are
summed per batch row, so the results do not depend on the split.
"""
from __future__ import annotations

import numpy as np
import torch

from ...kernels.numba import buffers
from ...kernels.numba.variants import backward_core, forward_core, weight_gradients
from ..base import LayerParams
from ..double_backward import differentiable_backward
from . import mkl
from .binding import as_numpy, as_numpy_or, check_input, chunk_rows, matmul, needs_grad, row_bounds, scratch

# The differentiable variant parameters, in the order the autograd Function takes them.
_VPARAMS = ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b", "w_peep")
_LN = _VPARAMS[:6]
# What the forward kernel saves for backward, per packed row (kernels/numba/variants.py).
_SAVED = ("acts", "cells", "c_prev", "xhat", "hhat", "chat", "rstd")


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


def _gemm(w_hh, transposed: bool, rows: int):
    """(address, W_hh^T or W_hh packed) of MKL's packed GEMM for the loop's recurrent product where
    it pays (engines/numba/mkl.py), else (0, None): the micro-kernel."""
    G, K = w_hh.shape if transposed else w_hh.shape[::-1]
    if not mkl.use(K, G, rows, w_hh.dtype):
        return 0, None
    return mkl.pack(w_hh, transposed, rows, padded=True)  # the loops compute on blas.padded_rows


def _forward(x, batch_sizes, h0, c0, p: LayerParams, v, reverse, save):
    """Returns numpy (y, h_n, c_n, saved); saved: the _SAVED buffers (0 rows where not saved)."""
    xn, h0n, c0n = as_numpy(x), as_numpy(h0), as_numpy(c0)
    dt = xn.dtype
    total, I = xn.shape
    B, H = c0n.shape
    P = h0n.shape[1]
    b = as_numpy(p.b_ih) + as_numpy(p.b_hh) if p.b_ih is not None else np.zeros(4 * H, dt)
    k = _kernel_weights(p, v, dt, H, P)
    n, nl = (total if save else 0), (total if save and v.layer_norm else 0)
    nz = total if save and k["zc"].shape[0] else 0
    y = buffers.empty((total, P), dt)  # where big, pooled mappings (kernels/numba/buffers.py)
    h_n, c_n = np.empty((B, P), dt), np.empty((B, H), dt)
    acts = matmul(x.detach(), p.w_ih.detach().t()).numpy()  # x W_ih^T, (total, 4H); then the activations
    sv = dict(
        acts=acts, cells=buffers.empty((n, H), dt), c_prev=buffers.empty((nz, H), dt),
        xhat=buffers.empty((nl, 4 * H), dt), hhat=buffers.empty((nl, 4 * H), dt), chat=buffers.empty((nl, H), dt),
        rstd=np.empty((nl, 3), dt),
    )
    bsz = np.asarray(batch_sizes, dtype=np.int64)
    bounds = row_bounds(batch_sizes, I, H, P)
    gemm, wg = _gemm(k["w_hh"], True, chunk_rows(B, bounds))
    forward_core(xn, bsz, h0n, c0n, k["w_ih"], k["w_hh"], b, k["w_hr"], *(k[n] for n in _LN), k["w_peep"],
                 k["zc"], k["zh"], k["rm"], bool(reverse), acts, y, h_n, c_n, *(sv[n] for n in _SAVED[1:]),
                 bool(save), bounds, projected=True, gemm=gemm, wg=wg)
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
        y = torch.from_numpy(y)
        # The inputs (no copies; also what differentiable_backward reads), y (h_{t-1} of every row:
        # saved, so autograd refuses a backward after an in-place change of it), the kernel's buffers.
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                              ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep, y,
                              *(torch.from_numpy(sv[n]) for n in _SAVED))
        ctx.variant = variant._replace(**{n: None for n in _VPARAMS})  # the masks only
        ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
        return y, torch.from_numpy(h_n), torch.from_numpy(c_n)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        saved = ctx.saved_tensors
        inputs, y, buffers = saved[:15], saved[15], saved[16:]
        if torch.is_grad_enabled():  # create_graph=True: this backward is itself differentiated
            grads = differentiable_backward("numba", inputs, (dy, dh_n, dc_n), ctx.batch_sizes,
                                            ctx.reverse, ctx.needs_input_grad, variant=ctx.variant)
            return (*grads, None, None, None)
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs[:8]
        v = ctx.variant._replace(**dict(zip(_VPARAMS, inputs[8:])))
        xn, h0n, c0n = as_numpy(x), as_numpy(h0), as_numpy(c0)
        dt = xn.dtype
        total, I = xn.shape
        (B, P), H = h0.shape, c0.shape[1]
        k = _kernel_weights(LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr), v, dt, H, P)
        sv = {n: t.numpy() for n, t in zip(_SAVED, buffers)}
        has_bias, has_proj, has_ln, has_peep = b_ih is not None, w_hr is not None, v.layer_norm, w_peep_present(v)
        dh = as_numpy(dh_n).copy() if dh_n is not None else np.zeros((B, P), dt)  # becomes dh0
        dc = as_numpy(dc_n).copy() if dc_n is not None else np.zeros((B, H), dt)  # becomes dc0
        bufs = dict(
            # scratch (binding.scratch): weight_gradients and dx below return none of them
            dgates=scratch("dgates", (total, 4 * H), dt), dhw=scratch("dhw", (total if has_ln else 0, 4 * H), dt),
            xh_prev=scratch("xh_prev", (total, I + P), dt), db_rows=np.zeros((B, 4 * H), dt),
            dln_rows=np.zeros((B if has_ln else 0, 10 * H), dt), dpeep_rows=np.zeros((B if has_peep else 0, 3 * H), dt),
            dh_all=scratch("dh_all", (total if has_proj else 0, P), dt),
            hpre_all=scratch("hpre_all", (total if has_proj else 0, H), dt),
        )
        bsz = np.asarray(ctx.batch_sizes, dtype=np.int64)
        bounds = row_bounds(ctx.batch_sizes, I, H, P)
        gemm, wgb = _gemm(k["w_hh"], False, chunk_rows(B, bounds))
        backward_core(xn, bsz, h0n, c0n, k["w_hh"], k["w_hr"], k["ln_ih_w"], k["ln_hh_w"], k["ln_c_w"], k["ln_c_b"],
                      k["w_peep"], k["zc"], k["zh"], k["rm"], bool(ctx.reverse), sv["acts"], sv["cells"],
                      sv["c_prev"], y.numpy(), *(sv[n] for n in _SAVED[3:]), as_numpy_or(dy, (total, P), dt), dh, dc,
                      *bufs.values(), bounds, gemm, wgb)
        t_ = torch.from_numpy
        need = ctx.needs_input_grad
        if any(need[3:]):  # else a frozen LSTM: no weight-gradient GEMMs
            g = weight_gradients(I, H, *(t_(a) for a in bufs.values()), mm=matmul)
        else:
            g = dict.fromkeys(("db", "dln", "dw_ih", "dw_hh", "dw_hr", "dpeep"))
        db, dln = g["db"], g["dln"] or (None,) * 4
        grads = (matmul(t_(bufs["dgates"]), w_ih.detach()) if need[0] else None, t_(dh), t_(dc), g["dw_ih"], g["dw_hh"],
                 db, db, g["dw_hr"], dln[0], db, dln[1], db, dln[2], dln[3], g["dpeep"])
        present = (True,) * 5 + (has_bias, has_bias, has_proj) + (has_ln,) * 6 + (has_peep,)
        out = []
        for i, (gr, ok) in enumerate(zip(grads, present)):
            if not (need[i] and ok):
                out.append(None)
            elif gr._base is not None or any(gr is o for o in out):
                out.append(gr.clone(memory_format=torch.contiguous_format))  # own storage each, as torch's
            else:
                out.append(gr)
        return (*out, None, None, None)


def w_peep_present(v) -> bool:
    return v.w_peep is not None
