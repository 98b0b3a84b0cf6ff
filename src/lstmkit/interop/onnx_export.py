"""lstmkit.export_onnx: an LSTM as standard ONNX `LSTM` operators, written directly.

One ONNX LSTM node per layer (both directions in one node when bidirectional), with the
weights converted from torch's layout:

    torch   weight_ih (4H, I), rows [i | f | g | o]         ONNX  W (D, 4H, I), rows [i | o | f | c]
            weight_hh (4H, H)                                     R (D, 4H, H)
            bias_ih, bias_hh (4H,) each                           B (D, 8H) = [Wb | Rb]
            weight_peephole (3, H), rows [i | f | o]              P (D, 3H)  = [p_i | p_o | p_f]

ONNX's Y is (T, D, N, H); the next layer and the graph output want torch's (T, N, D*H), so each
layer's Y goes through Transpose(0, 2, 1, 3) + Reshape(0, 0, -1). Sequence length and batch are
dynamic. Graph inputs: `input` (and `h0`, `c0` with initial_state=True); outputs: `output`,
`h_n`, `c_n`, shaped as the module returns them (batch_first respected).

The exported graph is the module in eval mode: dropout, recurrent dropout and weight drop
are training-time noise and vanish. Options ONNX's LSTM cannot express (proj_size,
layer_norm, zoneout) raise NotImplementedError naming the option.
"""
from __future__ import annotations

import os

import numpy as np

from ..config import ONNX_PEEPHOLE_PERMUTATION, LSTMConfig, onnx_gate_rows


def to_onnx_gate_order(w: np.ndarray) -> np.ndarray:
    """A (4H, ...) or (4H,) array with its gate blocks reordered from torch's to ONNX's order."""
    return w[onnx_gate_rows(w.shape[0] // 4)]


def _check_exportable(cfg) -> None:
    unsupported = {
        "proj_size": cfg.proj_size > 0,
        "layer_norm": getattr(cfg, "layer_norm", False),
        "zoneout": getattr(cfg, "zoneout_probs", (0.0, 0.0)) != (0.0, 0.0),
    }
    for option, on in unsupported.items():
        if on:
            raise NotImplementedError(
                f"export_onnx: ONNX's LSTM operator has no equivalent of {option}={getattr(cfg, option)!r}; "
                "export a model without it, or run it with lstmkit.runtime / lstmkit.LSTM"
            )


def export_onnx(module, path, *, initial_state: bool = False, opset: int = 17) -> None:
    """Write `module` (lstmkit.LSTM or torch.nn.LSTM) to `path` as an ONNX model.

    initial_state: add graph inputs h0 (D*num_layers, N, H) and c0 (same); without them the
    state starts at zeros.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = LSTMConfig.from_module(module, "export_onnx")
    _check_exportable(cfg)
    params = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    dtype = params["weight_ih_l0"].dtype
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}.get(dtype)
    if elem is None:
        raise TypeError(f"export_onnx supports float32 and float64 weights, got {dtype}")

    H, D, L = cfg.hidden_size, cfg.num_directions, cfg.num_layers
    peephole = getattr(cfg, "peephole", False)
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    inputs = [helper.make_tensor_value_info(
        "input", elem, ["batch", "seq_len", cfg.input_size] if cfg.batch_first else ["seq_len", "batch", cfg.input_size]
    )]
    if initial_state:
        inputs += [helper.make_tensor_value_info(n, elem, [L * D, "batch", H]) for n in ("h0", "c0")]

    x = "input"
    if cfg.batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["input_tnc"], perm=[1, 0, 2]))
        x = "input_tnc"  # (T, N, I)
    const("flatten_dirs", np.array([0, 0, -1], np.int64))  # Reshape (T, N, D, H) -> (T, N, D*H)

    h_outs, c_outs = [], []
    for k in range(L):
        sfx = [f"_l{k}", f"_l{k}_reverse"][:D]
        W = np.stack([to_onnx_gate_order(params["weight_ih" + s]) for s in sfx])  # (D, 4H, I_k)
        R = np.stack([to_onnx_gate_order(params["weight_hh" + s]) for s in sfx])  # (D, 4H, H)
        ins = [x, const(f"W_l{k}", W), const(f"R_l{k}", R)]
        if cfg.bias:
            B = np.stack([np.concatenate([to_onnx_gate_order(params[b + s]) for b in ("bias_ih", "bias_hh")])
                          for s in sfx])
            ins.append(const(f"B_l{k}", B))  # (D, 8H)
        else:
            ins.append("")
        ins.append("")  # sequence_lens: every sequence runs the full length
        if initial_state:  # this layer's rows of h0/c0: (D, N, H)
            starts, ends = const(f"start_l{k}", np.array([k * D], np.int64)), const(f"end_l{k}", np.array([(k + 1) * D], np.int64))
            for n in ("h0", "c0"):
                nodes.append(helper.make_node("Slice", [n, starts, ends], [f"{n}_l{k}"]))
            ins += [f"h0_l{k}", f"c0_l{k}"]
        else:
            ins += ["", ""]
        if peephole:
            P = np.stack([params["weight_peephole" + s][list(ONNX_PEEPHOLE_PERMUTATION)].reshape(-1) for s in sfx])  # (D, 3H)
            ins.append(const(f"P_l{k}", P))
        while ins[-1] == "":
            ins.pop()  # trailing optional inputs are left out
        y, yh, yc = f"Y_l{k}", f"h_n_l{k}", f"c_n_l{k}"
        nodes.append(helper.make_node(
            "LSTM", ins, [y, yh, yc], name=f"lstm_l{k}", hidden_size=H,
            direction="bidirectional" if D == 2 else "forward",
        ))
        # Y (T, D, N, H) -> (T, N, D, H) -> (T, N, D*H)
        nodes.append(helper.make_node("Transpose", [y], [f"Y_tndh_l{k}"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"Y_tndh_l{k}", "flatten_dirs"], [f"out_l{k}"]))
        x = f"out_l{k}"
        h_outs.append(yh)
        c_outs.append(yc)

    if cfg.batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["output"], perm=[1, 0, 2]))
    else:
        nodes.append(helper.make_node("Identity", [x], ["output"]))
    for name, parts in (("h_n", h_outs), ("c_n", c_outs)):  # (L*D, N, H), layer-major like torch
        nodes.append(helper.make_node("Concat", parts, [name], axis=0) if L > 1 else helper.make_node("Identity", parts, [name]))

    out_shape = ["batch", "seq_len", D * H] if cfg.batch_first else ["seq_len", "batch", D * H]
    outputs = [
        helper.make_tensor_value_info("output", elem, out_shape),
        helper.make_tensor_value_info("h_n", elem, [L * D, "batch", H]),
        helper.make_tensor_value_info("c_n", elem, [L * D, "batch", H]),
    ]
    graph = helper.make_graph(nodes, "lstmkit_lstm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lstmkit")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, os.fspath(path))
