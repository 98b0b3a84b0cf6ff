"""The fused Numba engine as torch.library custom ops, so torch.compile sees one opaque node.

torch.compile cannot trace into Numba (or into the numpy views the eager engine makes),
and it graph-breaks on torch.nn.LSTM. Registered as custom ops with

  * a fake (meta) implementation: output shapes from input shapes, so the compiler can
    plan the graph without running the kernel;
  * an autograd formula: the backward is itself a custom op running the BPTT kernel,
    so AOTAutograd captures forward and backward in the compiled graph;

a model containing lstmkit.LSTM compiles with fullgraph=True. engines/__init__.get_layer_fn
returns `lstm_layer` below instead of the eager engine while torch.compile is tracing.

    lstmkit::lstm_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih?, b_hh?, w_hr?, reverse)
        -> y (total, P), h_n (B, P), c_n (B, H), acts (total, 4H), cells (total, H)
    lstmkit::lstm_backward(x, batch_sizes, h0, c0, w_ih, w_hh, w_hr?, reverse, y, acts, cells,
                           dy, dh_n, dc_n) -> dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr

acts and cells are what the backward kernel needs (gate activations and cell states of
every row); they are outputs so that autograd can save them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..base import LayerParams, PaddedSizes
from ..double_backward import differentiable_backward

# The binding (and Numba with it) is imported by the ops' first call, not here: nn/modules.py
# imports this file so that the ops exist as soon as lstmkit's modules do (torch.jit.load of a
# traced model names lstmkit::lstm_forward), and that import stays cheap.


# ---- forward -----------------------------------------------------------------------------------
@torch.library.custom_op("lstmkit::lstm_forward", mutates_args=(), device_types="cpu")
def lstm_forward(
    x: Tensor, batch_sizes: list[int], h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], reverse: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .binding import layer_forward

    batch_sizes = _batch_sizes(x, batch_sizes, c0)
    outs = layer_forward(x, batch_sizes, h0, c0, LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr), reverse, True)
    return tuple(torch.from_numpy(a) for a in outs)


def _batch_sizes(x, batch_sizes, c0):
    """The op's batch_sizes: [] stands for padded data (base.PaddedSizes), every step of c0's
    batch; a list is checked against the input. The module makes it from the input, but a
    torch.jit.trace holds its example's as constants: replayed on another sequence length or
    batch, the kernel would read past x or leave rows of y unwritten."""
    B = c0.shape[0]
    if len(batch_sizes) == 0:
        if B == 0 or x.shape[0] % B:
            if x.shape[0]:
                raise RuntimeError(f"lstmkit::lstm_forward: {x.shape[0]} rows are not steps of batch {B}")
            return [B]  # a batch of 0 sequences: one step of no rows stands for any length
        return [B] * (x.shape[0] // B)
    if sum(batch_sizes) != x.shape[0] or batch_sizes[0] != B:
        raise RuntimeError(
            f"lstmkit::lstm_forward: batch_sizes (steps {len(batch_sizes)}, {sum(batch_sizes)} rows) do not "
            f"match the input ({x.shape[0]} rows, batch {c0.shape[0]}); a torch.jit.trace of lstmkit.LSTM "
            "holds its example input's sequence length and batch size: trace again for other shapes, or "
            "use torch.compile or torch.export")
    return batch_sizes


@lstm_forward.register_fake
def _(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    total = x.shape[0]
    B, H = c0.shape
    P = h0.shape[1]
    return (x.new_empty((total, P)), h0.new_empty((B, P)), c0.new_empty((B, H)),
            x.new_empty((total, 4 * H)), x.new_empty((total, H)))


# ---- backward ----------------------------------------------------------------------------------
@torch.library.custom_op("lstmkit::lstm_backward", mutates_args=(), device_types="cpu")
def lstm_backward(
    x: Tensor, batch_sizes: list[int], h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    w_hr: Optional[Tensor], reverse: bool, y: Tensor, acts: Tensor, cells: Tensor,
    dy: Tensor, dh_n: Tensor, dc_n: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .binding import layer_backward

    batch_sizes = _batch_sizes(x, batch_sizes, c0)
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = layer_backward(
        x, batch_sizes, h0, c0, LayerParams(w_ih, w_hh, None, None, w_hr), reverse, y, acts, cells, dy, dh_n, dc_n)
    if dw_hr is None:
        dw_hr = x.new_empty((0, c0.shape[1]))
    return dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr


@lstm_backward.register_fake
def _(x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse, y, acts, cells, dy, dh_n, dc_n):
    H = c0.shape[1]
    dw_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else x.new_empty((0, H))
    return (x.new_empty(x.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), x.new_empty((4 * H,)), dw_hr)


# ---- autograd: the forward op's derivative is the backward op ----------------------------------------
def _setup_context(ctx, inputs, output):
    x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse = inputs
    y, _, _, acts, cells = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, y, acts, cells, b_ih, b_hh)  # biases: double backward only
    ctx.batch_sizes = batch_sizes
    ctx.reverse = reverse
    ctx.has_bias = b_ih is not None


def _backward(ctx, dy, dh_n, dc_n, _dacts, _dcells):
    if torch.is_grad_enabled():  # create_graph=True: this backward is itself differentiated
        x, h0, c0, w_ih, w_hh, w_hr, _, _, _, b_ih, b_hh = ctx.saved_tensors
        needs = [ctx.needs_input_grad[k] for k in (0, 2, 3, 4, 5, 6, 7, 8)]  # skip batch_sizes
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = differentiable_backward(
            "numba", (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), (dy, dh_n, dc_n), _batch_sizes(x, ctx.batch_sizes, c0),
            ctx.reverse, needs)
        return dx, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None
    x, h0, c0, w_ih, w_hh, w_hr, y, acts, cells = ctx.saved_tensors[:9]
    # An output nobody used has no gradient: zeros stand in.
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    dc_n = torch.zeros_like(c0) if dc_n is None else dc_n
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = lstm_backward(
        x, ctx.batch_sizes, h0, c0, w_ih, w_hh, w_hr, ctx.reverse, y, acts, cells,
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(),
    )
    db_ih = db if ctx.has_bias else None
    db_hh = db.clone() if ctx.has_bias else None  # d/db_ih == d/db_hh: both enter the gates as-is
    return dx, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, (dw_hr if w_hr is not None else None), None


torch.library.register_autograd("lstmkit::lstm_forward", _backward, setup_context=_setup_context)


# ---- the engine interface (engines/base.py), as the compiler sees it ---------------------------------
def lstm_layer(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool = False):
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the Numba engine computes in float32 or float64, got {x.dtype}")
    sizes = [] if isinstance(batch_sizes, PaddedSizes) else [int(b) for b in batch_sizes]  # []: padded
    y, h_n, c_n, _, _ = torch.ops.lstmkit.lstm_forward(
        x.contiguous(), sizes, h0.contiguous(), c0.contiguous(), p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr,
        bool(reverse),
    )
    return y, h_n, c_n


lstm_layer.takes_padded_sizes = True  # nn/modules.py: hands it base.PaddedSizes as they are
