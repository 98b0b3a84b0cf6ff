"""The Numba CPU engine: kernels/numba/lstm.py bound to torch (through binding.py).

lstm_layer(x, batch_sizes, h0, c0, p, reverse) has the engine interface of base.py.

With nothing to record for autograd (torch.no_grad(), inference_mode, or no input requires
grad) the forward kernel runs on numpy views of the tensors and saves nothing. Otherwise a
torch.autograd.Function saves the gate activations (total, 4H) and cell states (total, H),
and its backward runs the BPTT kernel, then the weight gradients as torch GEMMs.

Each call is one compiled time loop per layer-direction, the batch rows split over
torch.get_num_threads() threads (binding.py, kernels/numba/lstm.py).

dtypes: the kernels take float32 and float64. Other dtypes (bfloat16, float16) raise
TypeError here; engine="auto" sends them to the reference engine (engines/__init__.py).
"""
from __future__ import annotations

import torch

from ..base import LayerParams
from ..double_backward import differentiable_backward
from .binding import (SUPPORTED_DTYPES, check_input, layer_backward, layer_forward, needs_grad, one_step_backward,
                      one_step_forward)


def lstm_layer(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool = False):
    if x.dtype not in SUPPORTED_DTYPES or not x.is_cpu or p.w_ih.dtype != x.dtype:
        check_input(x, p)
    if needs_grad((x, h0, c0, *p)):
        if len(batch_sizes) == 1:  # one step (a streaming or RL step, LSTMCell): _StepFunction
            return _StepFunction.apply(x, h0, c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr)
        return _LSTMFunction.apply(x, h0, c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr, batch_sizes, reverse)
    # Inference: the kernel on numpy views, nothing saved.
    y, h_n, c_n, _, _ = layer_forward(_rows(x), batch_sizes, h0, c0, p, bool(reverse), False)
    return _outputs(x, y, h_n, c_n)


# x may also come padded, (L, N, I) with batch_sizes [N] * L (the module's one-layer,
# one-direction calls): the outputs then come in nn.LSTM's shapes, y (L, N, P), h_n (1, N, P),
# c_n (1, N, H), and the module adds no view or stack of its own to the autograd graph (each a
# node of the backward pass: about 10 us of a 140 us one-step training step, BENCHMARKS.md).
lstm_layer.takes_padded_input = True


def _rows(t):
    """t as packed rows (total, features): padded (L, N, features) and (1, N, features) states
    viewed as such; 2-D t and None as they are."""
    return t if t is None or t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _outputs(x, y, h_n, c_n):
    """The kernel's numpy outputs as tensors, shaped as x came: packed rows, or padded (above)."""
    if x.dim() == 3:
        y, h_n, c_n = y.reshape(x.shape[0], x.shape[1], y.shape[1]), h_n[None], c_n[None]
    return torch.from_numpy(y), torch.from_numpy(h_n), torch.from_numpy(c_n)


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
        p = LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr)
        y, h_n, c_n, acts, cells = layer_forward(_rows(x), batch_sizes, h0, c0, p, bool(reverse), True)
        y, h_n, c_n = _outputs(x, y, h_n, c_n)
        # Saved: inputs (no copies), the output y, and the kernel's acts + cells.
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, y, torch.from_numpy(acts), torch.from_numpy(cells),
                              b_ih, b_hh)  # the biases: for differentiable_backward only
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not a tensor of zeros
        ctx.batch_sizes = batch_sizes
        ctx.reverse = bool(reverse)
        ctx.has_bias = b_ih is not None
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        if torch.is_grad_enabled():  # create_graph=True: this backward is itself differentiated
            x, h0, c0, w_ih, w_hh, w_hr, _, _, _, b_ih, b_hh = ctx.saved_tensors
            return (*_differentiable(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, dy, dh_n, dc_n, ctx.batch_sizes,
                                     ctx.reverse), None, None)
        x, h0, c0, w_ih, w_hh, w_hr, y, acts, cells = ctx.saved_tensors[:9]
        grads = layer_backward(
            _rows(x), ctx.batch_sizes, h0, c0, LayerParams(w_ih, w_hh, None, None, w_hr), ctx.reverse, _rows(y), acts,
            cells, _rows(dy), _rows(dh_n), _rows(dc_n), ctx.needs_input_grad)
        return (*_kept(ctx, x, w_hr, grads), None, None)


class _StepFunction(torch.autograd.Function):
    """_LSTMFunction for one time step (batch_sizes [B]), straight to the one-step kernels'
    bindings (binding.one_step_forward / one_step_backward) without layer_forward's and
    layer_backward's choice of path: a training step of a streaming model or an LSTMCell
    spends its time in Python and autograd, not in the products (BENCHMARKS.md, twenty-fifth
    and twenty-sixth sessions, have the microseconds). Saves no y. The kernel's acts and cells
    and the numpy views it read stay numpy (ctx.step), not tensors to make and take apart
    again; the tensors are saved all the same, so an update in place between forward and
    backward raises autograd's error, and a backward that is itself differentiated has them."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        y, h_n, c_n, acts, cells, views = one_step_forward(_rows(x), h0, c0, LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr))
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh)
        ctx.step = (acts, cells, views)
        ctx.set_materialize_grads(False)
        ctx.has_bias = b_ih is not None
        return _outputs(x, y, h_n, c_n)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh = ctx.saved_tensors  # first: raises if used up or changed
        if torch.is_grad_enabled():  # create_graph=True (see _LSTMFunction)
            return _differentiable(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, dy, dh_n, dc_n, [h0.shape[0]], False)
        acts, cells, views = ctx.step
        grads = one_step_backward(_rows(x), h0, c0, LayerParams(w_ih, w_hh, None, None, w_hr), acts, cells,
                                  _rows(dy), _rows(dh_n), _rows(dc_n), ctx.needs_input_grad, views)
        return _kept(ctx, x, w_hr, grads)


def _differentiable(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, dy, dh_n, dc_n, batch_sizes, reverse):
    """The eight input gradients of a backward that is itself differentiated (create_graph=True)."""
    grads = differentiable_backward("numba", (_rows(x), h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr),
                                    (_rows(dy), _rows(dh_n), _rows(dc_n)), batch_sizes, reverse,
                                    ctx.needs_input_grad[:8])
    return (_shaped_as(grads[0], x), *grads[1:])


def _kept(ctx, x, w_hr, grads):
    """The eight input gradients from the kernels' (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr): those
    autograd asks for, dx in x's shape, db for both biases."""
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = grads
    dx = _shaped_as(dx, x)
    need = ctx.needs_input_grad
    keep = lambda g, k: g if need[k] else None  # noqa: E731
    db_ih = db if ctx.has_bias and need[5] else None
    # d/db_ih == d/db_hh: both enter the gates as-is. A copy through numpy: torch's clone() is a
    # dispatch of several microseconds (a one-step call's kernels take about ten).
    db_hh = torch.from_numpy(db.numpy().copy()) if ctx.has_bias and need[6] else None
    return (keep(dx, 0), keep(dh0, 1), keep(dc0, 2), keep(dw_ih, 3), keep(dw_hh, 4), db_ih, db_hh,
            keep(dw_hr, 7) if w_hr is not None else None)


def _shaped_as(dx, x):
    return dx if dx is None or x.dim() == 2 else dx.view(x.shape)
