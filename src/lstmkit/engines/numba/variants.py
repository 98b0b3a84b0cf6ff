"""The Numba CPU engine for the LSTM variants: kernels/variants.py bound to torch.

lstm_layer(x, batch_sizes, h0, c0, p, reverse, variant) is the engine interface of
base.py plus `variant`, a lstmkit.nn.variants.LayerVariant (parameters + masks, drawn by
the module). Same two paths and the same thread handling as engines/numba_engine.py:
a thin no-grad path, and a torch.autograd.Function whose backward runs the BPTT kernel.
The masks are constants: no gradient flows to them.
"""
from __future__ import annotations

import numpy as np
import torch

from ...kernels.numba.variants import backward_core, forward_core
from ..base import LayerParams
from ..double_backward import differentiable_backward
from .engine import _check, _np, _set_threads

# The differentiable variant parameters, in the order the autograd Function takes them.
_VPARAMS = ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b", "w_peep")


def _arr(t, shape, dt):
    """Contiguous numpy view of t, or an empty array of `shape` when t is None."""
    return _np(t) if t is not None else np.zeros(shape, dt)


def _forward(x, batch_sizes, h0, c0, p: LayerParams, v, reverse, save):
    xn, h0n, c0n = _np(x), _np(h0), _np(c0)
    dt = xn.dtype
    total = xn.shape[0]
    B, H = c0n.shape
    P = h0n.shape[1]
    b = _np(p.b_ih) + _np(p.b_hh) if p.b_ih is not None else np.zeros(4 * H, dt)
    ln = v.layer_norm
    k = dict(
        w_ih=_np(p.w_ih), w_hh=_np(p.w_hh), w_hr=_arr(p.w_hr, (0, H), dt),
        ln_ih_w=_arr(v.ln_ih_w, (0,), dt), ln_ih_b=_arr(v.ln_ih_b, (0,), dt),
        ln_hh_w=_arr(v.ln_hh_w, (0,), dt), ln_hh_b=_arr(v.ln_hh_b, (0,), dt),
        ln_c_w=_arr(v.ln_c_w, (0,), dt), ln_c_b=_arr(v.ln_c_b, (0,), dt),
        w_peep=_arr(v.w_peep, (3, H), dt), zc=_arr(v.zoneout_c, (0, H), dt),  # zero peepholes: none
        zh=_arr(v.zoneout_h, (0, P), dt), rm=_arr(v.rec_mask, (0, P), dt),
    )
    n, nl = (total if save else 0), (total if save and ln else 0)
    acts = np.empty((total, 4 * H), dt)
    y = np.empty((total, P), dt)
    h_n, c_n = np.empty((B, P), dt), np.empty((B, H), dt)
    saved = dict(
        cells=np.empty((n, H), dt), c_prev=np.empty((n, H), dt), h_in=np.empty((n, P), dt),
        xhat=np.empty((nl, 4 * H), dt), hhat=np.empty((nl, 4 * H), dt), chat=np.empty((nl, H), dt),
        rstd=np.empty((nl, 3), dt),
    )
    if not save:  # the kernel still needs a c~ row per step: it only reads what it wrote
        saved["cells"] = np.empty((total, H), dt)
    forward_core(
        xn, np.asarray(batch_sizes, dtype=np.int64), h0n, c0n, k["w_ih"], k["w_hh"], b, k["w_hr"],
        k["ln_ih_w"], k["ln_ih_b"], k["ln_hh_w"], k["ln_hh_b"], k["ln_c_w"], k["ln_c_b"], k["w_peep"],
        k["zc"], k["zh"], k["rm"], bool(reverse), acts, y, h_n, c_n,
        saved["cells"], saved["c_prev"], saved["h_in"], saved["xhat"], saved["hhat"], saved["chat"], saved["rstd"],
        bool(save),
    )
    return y, h_n, c_n, acts, saved, k


def lstm_layer(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool = False, variant=None):
    if variant is None:
        from .engine import lstm_layer as vanilla

        return vanilla(x, batch_sizes, h0, c0, p, reverse)
    _check(x)
    _set_threads(h0.shape[0] * h0.shape[1] * 4 * c0.shape[1])  # BLAS threads for (B, P) @ (P, 4H) steps
    vparams = [getattr(variant, n) for n in _VPARAMS]
    tensors = [x, h0, c0, *p, *vparams]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _VariantFunction.apply(x, h0, c0, *p, *vparams, batch_sizes, bool(reverse), variant)
    y, h_n, c_n, _, _, _ = _forward(x, batch_sizes, h0, c0, p, variant, reverse, False)
    return torch.from_numpy(y), torch.from_numpy(h_n), torch.from_numpy(c_n)


class _VariantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep, batch_sizes, reverse, variant):
        p = LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr)
        y, h_n, c_n, acts, saved, k = _forward(x, batch_sizes, h0, c0, p, variant, reverse, True)
        # numpy arrays (views of the inputs, and what the kernel saved) live on ctx:
        # none of them is an output, so save_for_backward is not needed for them.
        ctx.np = (_np(x), k, acts, saved)
        # The inputs (no copies) and the masks: for differentiable_backward only.
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                              ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep)
        ctx.variant = variant._replace(**{n: None for n in _VPARAMS})
        ctx.shapes = (tuple(h0.shape), tuple(c0.shape))
        ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
        ctx.has = (b_ih is not None, w_hr is not None, ln_ih_w is not None, w_peep is not None)
        return torch.from_numpy(y), torch.from_numpy(h_n), torch.from_numpy(c_n)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        if torch.is_grad_enabled():  # create_graph=True: this backward is itself differentiated
            grads = differentiable_backward("numba", ctx.saved_tensors, (dy, dh_n, dc_n), ctx.batch_sizes,
                                            ctx.reverse, ctx.needs_input_grad, variant=ctx.variant)
            return (*grads, None, None, None)
        xn, k, acts, sv = ctx.np
        (B, P), (_, H) = ctx.shapes
        dt = xn.dtype
        total = xn.shape[0]
        has_bias, has_proj, has_ln, has_peep = ctx.has
        dyn = _np(dy) if dy is not None else np.zeros((total, P), dt)
        dh = _np(dh_n).copy() if dh_n is not None else np.zeros((B, P), dt)  # becomes dh0
        dc = _np(dc_n).copy() if dc_n is not None else np.zeros((B, H), dt)  # becomes dc0
        dx = np.empty_like(xn)
        dw_ih, dw_hh, dw_hr = np.empty_like(k["w_ih"]), np.empty_like(k["w_hh"]), np.empty_like(k["w_hr"])
        db = np.empty(4 * H, dt)
        g = {n: np.empty_like(k[n]) for n in ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b")}
        g["w_peep"] = np.empty((3 if has_peep else 0, H), dt)
        _set_threads(B * P * 4 * H)
        backward_core(
            xn, np.asarray(ctx.batch_sizes, dtype=np.int64), k["w_ih"], k["w_hh"], k["w_hr"],
            k["ln_ih_w"], k["ln_hh_w"], k["ln_c_w"], k["ln_c_b"], k["w_peep"], k["zc"], k["zh"], k["rm"],
            ctx.reverse, acts, sv["cells"], sv["c_prev"], sv["h_in"], sv["xhat"], sv["hhat"], sv["chat"], sv["rstd"],
            dyn, dh, dc, dx, dw_ih, dw_hh, db, dw_hr,
            g["ln_ih_w"], g["ln_ih_b"], g["ln_hh_w"], g["ln_hh_b"], g["ln_c_w"], g["ln_c_b"], g["w_peep"],
        )
        need = ctx.needs_input_grad
        t = lambda a, i, present=True: torch.from_numpy(a) if need[i] and present else None  # noqa: E731
        return (
            t(dx, 0), t(dh, 1), t(dc, 2), t(dw_ih, 3), t(dw_hh, 4),
            t(db, 5, has_bias), t(db.copy(), 6, has_bias), t(dw_hr, 7, has_proj),
            *(t(g[n], 8 + i, has_ln) for i, n in enumerate(("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b"))),
            t(g["w_peep"], 14, has_peep),
            None, None, None,
        )
