"""lstmkit.export_onnx: one LSTM as an ONNX model, every option that has an inference form.

The graph is the one torch.onnx.export records for any model that contains lstmkit.LSTM
(interop/onnx_graph.py): one standard ONNX `LSTM` node per layer where the options fit that
operator (plain, bias or not, bidirectional, peephole, forget_bias), else a loop over the
steps in standard operators (proj_size, layer_norm, zoneout). It is the module's eval form:
dropout, recurrent_dropout and weight_drop vanish, zoneout is its expectation.

Weights in ONNX's LSTM layout, converted from torch's with config.onnx_gate_rows:

    torch   weight_ih (4H, I), rows [i | f | g | o]         ONNX  W (D, 4H, I), rows [i | o | f | c]
            weight_hh (4H, H)                                     R (D, 4H, H)
            bias_ih, bias_hh (4H,) each                           B (D, 8H) = [Wb | Rb]
            weight_peephole (3, H), rows [i | f | o]              P (D, 3H)  = [p_i | p_o | p_f]

Graph inputs: `input` (and `h0`, `c0` with initial_state=True); outputs `output`, `h_n`, `c_n`,
shaped as the module returns them (batch_first respected); sequence length and batch dynamic.
The model's metadata_props hold the configuration ("lstmkit.config", JSON of LSTMConfig), which
`lstmkit inspect` reports.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np

from ..config import LSTMConfig, onnx_gate_rows

CONFIG_KEY = "lstmkit.config"  # ONNX metadata_props key: LSTMConfig.to_dict() as JSON


def to_onnx_gate_order(w: np.ndarray) -> np.ndarray:
    """A (4H, ...) or (4H,) array with its gate blocks reordered from torch's to ONNX's order."""
    return w[onnx_gate_rows(w.shape[0] // 4)]


def _as_lstmkit(module):
    """An lstmkit.LSTM with module's weights (a torch.nn.LSTM is converted, an lstmkit.LSTM kept)."""
    from ..nn import LSTM

    LSTMConfig.from_module(module, "export_onnx")  # TypeError for anything else
    return module if isinstance(module, LSTM) else LSTM.from_torch(module)


def export_onnx(module, path, *, initial_state: bool = False, opset: int = 17) -> None:
    """Write `module` (lstmkit.LSTM or torch.nn.LSTM) to `path` as an ONNX model.

    initial_state: add graph inputs h0 (D*num_layers, N, P) and c0 (D*num_layers, N, H);
    without them the state starts at zeros.
    """
    import onnx
    import torch

    lstm = _as_lstmkit(module)
    cfg = lstm.config
    dtype = lstm.weight_ih_l0.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"export_onnx supports float32 and float64 weights, got {dtype}")
    T, N = 2, 2  # example sizes; both are dynamic in the graph
    x = torch.zeros((N, T, cfg.input_size) if cfg.batch_first else (T, N, cfg.input_size), dtype=dtype)
    args, names, axes = (x,), ["input"], {"input": {0: "batch", 1: "seq_len"} if cfg.batch_first else
                                          {0: "seq_len", 1: "batch"}}
    if initial_state:
        h_shape, c_shape = cfg.state_shapes(N)
        args += (torch.zeros(h_shape, dtype=dtype), torch.zeros(c_shape, dtype=dtype))
        names += ["h0", "c0"]
        axes.update(h0={1: "batch"}, c0={1: "batch"})
    axes.update(output=axes["input"], h_n={1: "batch"}, c_n={1: "batch"})
    was_training = lstm.training
    lstm.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter: fast, and the graph is the same builder's (onnx_graph.py).
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
            buffer = _export_to_bytes(torch, _graph_module(lstm, initial_state), args, names, axes, opset)
    finally:
        lstm.train(was_training)
    model = onnx.load_from_string(buffer)
    model.producer_name = "lstmkit"
    onnx.helper.set_model_props(model, {CONFIG_KEY: json.dumps(cfg.to_dict()), "lstmkit.version": _version()})
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, os.fspath(path))


def _graph_module(lstm, initial_state: bool):
    """A module calling the LSTM with (input[, h0, c0]) as separate arguments, like the graph's inputs."""
    import torch

    class LSTMGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm

        def forward(self, input, h0=None, c0=None):
            y, (h, c) = self.lstm(input, (h0, c0) if initial_state else None)
            return y, h, c

    return LSTMGraph()


def _export_to_bytes(torch, model, args, input_names, dynamic_axes, opset: int) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.onnx.export(
        model, args, buffer, dynamo=False, opset_version=opset, input_names=input_names,
        output_names=["output", "h_n", "c_n"], dynamic_axes=dynamic_axes,
    )
    return buffer.getvalue()


def _version() -> str:
    from .. import __version__

    return __version__
