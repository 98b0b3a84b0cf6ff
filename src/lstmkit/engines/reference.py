"""The reference engine: the LSTM equations written with plain tensor ops.

This is the readable specification every other engine is tested against. Autograd
provides the backward pass. It must never call PyTorch's own LSTM kernels.

One call runs one layer in one direction over *packed* data:

    x            (total, I)   the time-major concatenation of the steps: step t holds
                              rows offsets[t] : offsets[t] + batch_sizes[t]
    batch_sizes  [T]          non-increasing; a padded batch of N sequences is the
                              case batch_sizes == [N] * T
    h0           (B, P)       B = batch_sizes[0]; P = proj_size or H
    c0           (B, H)

and returns y (total, P), h_n (B, P), c_n (B, H), where h_n/c_n hold each sequence's
state after its own last step (forward) or after step 0 (reverse).

The equations, per step, with gate order (i, f, g, o):

    gates = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh          (bs, 4H)
    i, f, o = sigmoid(.)   g = tanh(.)
    c_t = f * c_{t-1} + i * g                                    (bs, H)
    h_t = o * tanh(c_t)                                          (bs, H)
    h_t = h_t W_hr^T            only when proj_size > 0          (bs, P)

Packed data in the forward direction: a sequence that has ended simply drops out of
the batch (sequences are sorted by decreasing length), and its state is final. In
the reverse direction the batch grows as time runs backwards, and a sequence joins,
starting from its own h0/c0, at its own last token.
"""
from __future__ import annotations

import torch

from .base import LayerParams, step_offsets


def lstm_layer(
    x: torch.Tensor,
    batch_sizes: list[int],
    h0: torch.Tensor,
    c0: torch.Tensor,
    p: LayerParams,
    reverse: bool = False,
    variant=None,
):
    if variant is not None:  # layer norm, peepholes, zoneout, recurrent dropout: see below
        return lstm_layer_variant(x, batch_sizes, h0, c0, p, reverse, variant)
    H = c0.shape[1]
    offsets = step_offsets(batch_sizes)
    T = len(batch_sizes)

    # The input projection of every step at once: one GEMM.
    xw = x @ p.w_ih.t()  # (total, 4H)
    if p.b_ih is not None:
        xw = xw + p.b_ih

    h, c = h0, c0
    if reverse and T:  # only the sequences that reach the last step start there
        h, c = h0[: batch_sizes[-1]], c0[: batch_sizes[-1]]
    finished_h, finished_c = [], []  # forward: states of sequences that ended, latest first
    outputs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        bs = batch_sizes[t]
        if not reverse and bs < h.shape[0]:
            finished_h.append(h[bs:])
            finished_c.append(c[bs:])
            h, c = h[:bs], c[:bs]
        elif reverse and bs > h.shape[0]:
            h = torch.cat([h, h0[h.shape[0] : bs]])
            c = torch.cat([c, c0[c.shape[0] : bs]])

        gates = xw[offsets[t] : offsets[t] + bs] + h @ p.w_hh.t()  # (bs, 4H)
        if p.b_hh is not None:
            gates = gates + p.b_hh
        i = torch.sigmoid(gates[:, 0 * H : 1 * H])
        f = torch.sigmoid(gates[:, 1 * H : 2 * H])
        g = torch.tanh(gates[:, 2 * H : 3 * H])
        o = torch.sigmoid(gates[:, 3 * H : 4 * H])
        c = f * c + i * g
        h = o * torch.tanh(c)
        if p.w_hr is not None:
            h = h @ p.w_hr.t()  # (bs, P)
        outputs[t] = h

    if finished_h:  # rows bs_T.. finished earliest, so they come last
        h = torch.cat([h] + finished_h[::-1])
        c = torch.cat([c] + finished_c[::-1])
    y = torch.cat(outputs) if T else x.new_zeros((0, h0.shape[1]))
    return y, h, c


def lstm_layer_variant(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool, v):
    """The same layer with the variants of nn/variants.py (v: LayerVariant).

    Per step, rows r < bs (d_c, d_h: zoneout; m: recurrent-dropout mask; LN: layer norm):

        a_x   = x_t W_ih^T                 -> LN_ih(a_x)   with layer_norm
        a_h   = (h_{t-1} * m) W_hh^T       -> LN_hh(a_h)   with layer_norm
        gates = a_x + a_h + b_ih + b_hh
        pre_i += p_i * c_{t-1};  pre_f += p_f * c_{t-1}       with peephole
        c~    = f * c_{t-1} + i * g
        pre_o += p_o * c~                                     with peephole
        h~    = o * tanh(LN_cell(c~))   (LN_cell only with layer_norm), then h~ W_hr^T
        c_t   = d_c * c_{t-1} + (1 - d_c) * c~                with zoneout
        h_t   = d_h * h_{t-1} + (1 - d_h) * h~                with zoneout;  y_t = h_t

    The packed bookkeeping is simpler than above: the state holds all B rows and step t
    updates rows [:bs] only. Forward, a row stops updating after its last step, so its
    final state stays put; reverse, a row still holds h0/c0 until it joins.
    """
    from ..nn.variants import layer_norm

    H = c0.shape[1]
    offsets = step_offsets(batch_sizes)
    T = len(batch_sizes)

    xw = x @ p.w_ih.t()  # (total, 4H)
    if v.layer_norm:
        xw = layer_norm(xw, v.ln_ih_w, v.ln_ih_b)
    if p.b_ih is not None:
        xw = xw + p.b_ih + p.b_hh

    h, c = h0, c0  # (B, P), (B, H); out-of-place updates keep autograd happy
    outputs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        bs, rows = batch_sizes[t], slice(offsets[t], offsets[t] + batch_sizes[t])
        h_prev, c_prev = h[:bs], c[:bs]

        h_in = h_prev if v.rec_mask is None else h_prev * v.rec_mask[:bs]
        hw = h_in @ p.w_hh.t()  # (bs, 4H)
        if v.layer_norm:
            hw = layer_norm(hw, v.ln_hh_w, v.ln_hh_b)
        gates = xw[rows] + hw
        pre_i, pre_f, pre_g, pre_o = gates.split(H, dim=1)
        if v.w_peep is not None:
            pre_i = pre_i + v.w_peep[0] * c_prev
            pre_f = pre_f + v.w_peep[1] * c_prev
        i, f, g = torch.sigmoid(pre_i), torch.sigmoid(pre_f), torch.tanh(pre_g)
        c_new = f * c_prev + i * g
        if v.w_peep is not None:
            pre_o = pre_o + v.w_peep[2] * c_new
        o = torch.sigmoid(pre_o)
        c_out = layer_norm(c_new, v.ln_c_w, v.ln_c_b) if v.layer_norm else c_new
        h_new = o * torch.tanh(c_out)
        if p.w_hr is not None:
            h_new = h_new @ p.w_hr.t()  # (bs, P)

        if v.zoneout_c is not None:
            d = v.zoneout_c[rows]
            c_new = d * c_prev + (1 - d) * c_new
        if v.zoneout_h is not None:
            d = v.zoneout_h[rows]
            h_new = d * h_prev + (1 - d) * h_new
        outputs[t] = h_new
        h = torch.cat([h_new, h[bs:]])
        c = torch.cat([c_new, c[bs:]])

    y = torch.cat(outputs) if T else x.new_zeros((0, h0.shape[1]))
    return y, h, c
