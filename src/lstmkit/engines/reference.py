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
):
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
