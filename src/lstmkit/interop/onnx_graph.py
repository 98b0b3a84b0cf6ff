"""What lstmkit.LSTM records while torch.onnx.export runs: standard ONNX operators only.

LSTM.forward calls `export_forward` instead of an engine when torch.onnx.export is recording
it, with either exporter (dynamo=True: torch.export; dynamo=False: the TorchScript tracer).
lstmkit.export_onnx (onnx_export.py) runs torch.onnx.export on the module too, so both ways
out produce the same graph from this one builder. The graph is the module's eval form:
dropout, recurrent dropout and weight drop vanish, zoneout is its expectation.

Per layer:
  * options ONNX's `LSTM` operator can express (plain, bias or not, bidirectional, peephole,
    forget_bias, which is only an initial value) -> one ONNX `LSTM` node for both directions,
    so ONNX Runtime runs its fused kernel. Weights in ONNX's gate order (config.onnx_gate_rows).
  * proj_size, layer_norm, zoneout -> a loop over the steps with standard operators: `Scan`
    (dynamo exporter, from torch's scan) or `Loop` (TorchScript exporter, from a scripted loop).
    Each direction is its own loop; the step's equations are `lstm_step` below.
The sequence length is never baked into the graph: a model exported with T=5 runs T=500.

No torch LSTM kernel is involved: the ONNX LSTM node is emitted symbolically (its value while
tracing comes from `lstm_step`), and the loops are written with plain tensor ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ONNX_PEEPHOLE_PERMUTATION, LSTMConfig, onnx_gate_rows
from ..nn.variants import LN_EPS



def uses_onnx_lstm_op(cfg: LSTMConfig) -> bool:
    """Whether each layer of this configuration is one ONNX `LSTM` node (else a step loop)."""
    return cfg.proj_size == 0 and not cfg.layer_norm and cfg.zoneout_probs == (0.0, 0.0)


def layer_norm(v: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """F.layer_norm over the last dim. Spelled out when scripted: inside the TorchScript exporter's
    loop the normalized shape is not a constant, which its LayerNormalization export requires."""
    if not torch.jit.is_scripting():
        return F.layer_norm(v, v.shape[-1:], weight, bias, eps)
    inv_n = 1.0 / v.shape[-1]
    centered = v - v.sum(-1, keepdim=True) * inv_n
    out = centered * torch.rsqrt((centered * centered).sum(-1, keepdim=True) * inv_n + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


# ---- one step, written once for both loops (and for the value the LSTM node has while tracing) ----
def lstm_step(
    xw_t: Tensor, h: Tensor, c: Tensor, w_hh: Tensor,
    ln_hh_w: Optional[Tensor], ln_hh_b: Optional[Tensor], ln_c_w: Optional[Tensor], ln_c_b: Optional[Tensor],
    w_peep: Optional[Tensor], w_hr: Optional[Tensor], zoneout_c: float, zoneout_h: float, ln_eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """(h_t, c_t) from xw_t = LN_ih(x_t W_ih^T) + b_ih + b_hh (N, 4H), gates in [i|f|g|o] order.
    Eval form of engines/reference.py's variant step (zoneout: d = p, its expectation)."""
    hw = torch.matmul(h, w_hh.t())
    if ln_hh_w is not None:
        hw = layer_norm(hw, ln_hh_w, ln_hh_b, ln_eps)
    pre_i, pre_f, pre_g, pre_o = (xw_t + hw).chunk(4, 1)
    if w_peep is not None:
        pre_i = pre_i + w_peep[0] * c
        pre_f = pre_f + w_peep[1] * c
    c_new = torch.sigmoid(pre_f) * c + torch.sigmoid(pre_i) * torch.tanh(pre_g)
    if w_peep is not None:
        pre_o = pre_o + w_peep[2] * c_new
    c_out = c_new
    if ln_c_w is not None:
        c_out = layer_norm(c_new, ln_c_w, ln_c_b, ln_eps)
    h_new = torch.sigmoid(pre_o) * torch.tanh(c_out)
    if w_hr is not None:
        h_new = torch.matmul(h_new, w_hr.t())
    if zoneout_c > 0:  # d * prev + (1 - d) * new, with d = p
        c_new = c_new + (c - c_new) * zoneout_c
    if zoneout_h > 0:
        h_new = h_new + (h - h_new) * zoneout_h
    return h_new, c_new


def step_loop(
    xw: Tensor, h: Tensor, c: Tensor, w_hh: Tensor,
    ln_hh_w: Optional[Tensor], ln_hh_b: Optional[Tensor], ln_c_w: Optional[Tensor], ln_c_b: Optional[Tensor],
    w_peep: Optional[Tensor], w_hr: Optional[Tensor], zoneout_c: float, zoneout_h: float, ln_eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """All steps of xw (T, N, 4H) forward in time: (y (T, N, P), h_T, c_T). Scripted for the
    TorchScript exporter, where the loop becomes an ONNX Loop with a dynamic trip count."""
    ys = []
    for t in range(xw.shape[0]):
        h, c = lstm_step(xw[t], h, c, w_hh, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, w_peep, w_hr, zoneout_c, zoneout_h,
                         ln_eps)
        ys.append(h)
    return torch.stack(ys), h, c


_scripted_loop = None


def scripted_step_loop():
    global _scripted_loop
    if _scripted_loop is None:  # scripted on first export, not at import
        _scripted_loop = torch.jit.script(step_loop)
    return _scripted_loop


# ---- the ONNX LSTM node --------------------------------------------------------------------------
class OnnxLSTMNode(torch.autograd.Function):
    """An ONNX `LSTM` node for the TorchScript exporter (its `symbolic`); the forward gives the
    same values from lstm_step, so anything traced after it sees real numbers."""

    @staticmethod
    def forward(ctx, x, W, R, B, h0, c0, P):  # noqa: N803 - ONNX's input names
        D, H = W.shape[0], W.shape[1] // 4
        back = torch.tensor(_inverse_rows(H))  # ONNX gate order -> ours
        ys, hs, cs = [], [], []
        for d in range(D):
            xw = torch.matmul(x, W[d][back].t()) + B[d, : 4 * H][back] + B[d, 4 * H :][back]
            peep = None if P is None else P[d].view(3, H)[list(_inverse_peephole_rows())]
            seq = xw.flip(0) if d == 1 else xw
            y, h, c = step_loop(seq, h0[d], c0[d], R[d][back], None, None, None, None, peep, None, 0.0, 0.0)
            ys.append(y.flip(0) if d == 1 else y)
            hs.append(h)
            cs.append(c)
        return torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)

    @staticmethod
    def symbolic(g, x, W, R, B, h0, c0, P):  # noqa: N803
        no_input = g.op("prim::Constant")  # ONNX's empty name for the absent sequence_lens
        no_input.setType(torch._C.OptionalType.ofTensor())
        inputs = [x, W, R, B, no_input, h0, c0] + ([] if _is_none(P) else [P])
        D, H = _static_dims(W)
        return g.op("LSTM", *inputs, hidden_size_i=H,
                    direction_s="bidirectional" if D == 2 else "forward", outputs=3)


def _is_none(value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def _static_dims(W) -> tuple[int, int]:
    sizes = W.type().sizes()
    return sizes[0], sizes[1] // 4


def _inverse_rows(H: int) -> list[int]:
    rows = onnx_gate_rows(H)
    inverse = [0] * len(rows)
    for k, r in enumerate(rows):
        inverse[r] = k
    return inverse


def _inverse_peephole_rows() -> list[int]:
    inverse = [0] * 3
    for k, r in enumerate(ONNX_PEEPHOLE_PERMUTATION):
        inverse[r] = k
    return inverse


def onnx_lstm_node(x, W, R, B, h0, c0, P):
    """Y (T, D, N, H), Y_h (D, N, H), Y_c (D, N, H) of one ONNX LSTM node, in either exporter."""
    if torch.jit.is_tracing():
        return OnnxLSTMNode.apply(x, W, R, B, h0, c0, P)
    T, N = x.shape[0], x.shape[1]
    D, H = W.shape[0], W.shape[1] // 4
    return torch.onnx.ops.symbolic_multi_out(
        "LSTM", [x, W, R, B, None, h0, c0, P],
        {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"},
        dtypes=[x.dtype] * 3, shapes=[[T, D, N, H], [D, N, H], [D, N, H]], version=None,
    )


# ---- one layer ---------------------------------------------------------------------------------------
def _layer_tensors(module, layer: int, direction: int) -> dict:
    cfg = module.config
    sfx = f"_l{layer}{cfg.suffix(direction)}"
    get = lambda name: getattr(module, name + sfx, None)  # noqa: E731
    return {n: get(n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "weight_peephole",
                                "layer_norm_ih_weight", "layer_norm_ih_bias", "layer_norm_hh_weight",
                                "layer_norm_hh_bias", "layer_norm_cell_weight", "layer_norm_cell_bias")}


def _layer_as_onnx_node(module, layer: int, x, h0, c0):
    """One layer, both directions, as an ONNX LSTM node: (y (T, N, D*H), h_n (D, N, H), c_n)."""
    cfg = module.config
    rows = onnx_gate_rows(cfg.hidden_size)
    parts = [_layer_tensors(module, layer, d) for d in range(cfg.num_directions)]
    W = torch.stack([p["weight_ih"][rows] for p in parts])
    R = torch.stack([p["weight_hh"][rows] for p in parts])
    if cfg.bias:
        B = torch.stack([torch.cat([p["bias_ih"][rows], p["bias_hh"][rows]]) for p in parts])
    else:  # absent bias = zeros in ONNX too; an explicit input keeps the node's inputs positional
        B = W.new_zeros((cfg.num_directions, 8 * cfg.hidden_size))
    P = None
    if cfg.peephole:
        P = torch.stack([p["weight_peephole"][list(ONNX_PEEPHOLE_PERMUTATION)].reshape(-1) for p in parts])
    y, h_n, c_n = onnx_lstm_node(x, W, R, B, h0, c0, P)
    return y.transpose(1, 2).flatten(2), h_n, c_n  # (T, D, N, H) -> (T, N, D*H)


def _direction_as_loop(module, layer: int, direction: int, x, h0, c0):
    """One layer-direction as a step loop: (y (T, N, P), h_n (N, P), c_n (N, H))."""
    cfg = module.config
    p = _layer_tensors(module, layer, direction)
    xw = torch.matmul(x, p["weight_ih"].t())
    if cfg.layer_norm:
        xw = F.layer_norm(xw, [4 * cfg.hidden_size], p["layer_norm_ih_weight"], p["layer_norm_ih_bias"], LN_EPS)
    if cfg.bias:
        xw = xw + (p["bias_ih"] + p["bias_hh"])
    zc, zh = cfg.zoneout_probs
    weights = (p["weight_hh"], p["layer_norm_hh_weight"], p["layer_norm_hh_bias"], p["layer_norm_cell_weight"],
               p["layer_norm_cell_bias"], p["weight_peephole"], p["weight_hr"])
    reverse = direction == 1
    if torch.jit.is_tracing():  # TorchScript exporter: a scripted loop -> ONNX Loop
        seq = xw.flip(0) if reverse else xw
        y, h, c = scripted_step_loop()(seq, h0, c0, *weights, zc, zh, LN_EPS)
        return (y.flip(0) if reverse else y), h, c
    from torch._higher_order_ops.scan import scan  # dynamo exporter: torch's scan -> ONNX Scan

    def combine(carry, xw_t):
        h, c = lstm_step(xw_t, carry[0], carry[1], *weights, zc, zh, LN_EPS)
        return (h, c), h.clone()  # scan's outputs may not alias its carry

    (h, c), y = scan(combine, (h0, c0), xw, reverse=reverse)
    return y, h, c


# ---- the module --------------------------------------------------------------------------------------
def export_forward(module, input, hx=None):
    """LSTM.forward as recorded by torch.onnx.export: (output, (h_n, c_n)), same shapes as forward."""
    from torch.nn.utils.rnn import PackedSequence

    cfg = module.config
    if isinstance(input, PackedSequence):
        raise NotImplementedError(
            "torch.onnx.export of lstmkit.LSTM takes padded input: pass a (T, N, I) tensor (and h0/c0), "
            "not a PackedSequence"
        )
    if input.dim() not in (2, 3):
        raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if cfg.batch_first else 1)
        if hx is not None:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    x = input.transpose(0, 1) if cfg.batch_first else input  # (T, N, I)
    if hx is None:
        N = x.shape[1]
        h_shape, c_shape = cfg.state_shapes(1)
        h0 = x.new_zeros((h_shape[0], N, h_shape[2]))
        c0 = x.new_zeros((c_shape[0], N, c_shape[2]))
    else:
        h0, c0 = hx
    D = cfg.num_directions
    h_n, c_n = [], []
    for k in range(cfg.num_layers):
        h0_k, c0_k = h0[k * D : (k + 1) * D], c0[k * D : (k + 1) * D]
        if uses_onnx_lstm_op(cfg):
            x, h, c = _layer_as_onnx_node(module, k, x, h0_k, c0_k)
            h_n.append(h)
            c_n.append(c)
            continue
        outs = []
        for d in range(D):
            y, h, c = _direction_as_loop(module, k, d, x, h0_k[d], c0_k[d])
            outs.append(y)
            h_n.append(h.unsqueeze(0))
            c_n.append(c.unsqueeze(0))
        x = outs[0] if D == 1 else torch.cat(outs, 2)
    out = x.transpose(0, 1) if cfg.batch_first else x
    h_n, c_n = torch.cat(h_n), torch.cat(c_n)
    if not batched:
        out = out.squeeze(0 if cfg.batch_first else 1)
        h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
    return out, (h_n, c_n)


def cell_export_forward(cell, input, hx=None):
    """LSTMCell.forward as recorded by torch.onnx.export: one step in plain operators, (h_1, c_1)."""
    batched = input.dim() == 2
    if not batched:
        input = input.unsqueeze(0)
    if hx is None:
        h0 = c0 = input.new_zeros((input.shape[0], cell.hidden_size))
    else:
        h0, c0 = hx
        if not batched:
            h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
    xw = torch.matmul(input, cell.weight_ih.t())
    if cell.bias:
        xw = xw + (cell.bias_ih + cell.bias_hh)
    h, c = lstm_step(xw, h0, c0, cell.weight_hh, None, None, None, None, None, None, 0.0, 0.0)
    return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
