"""lstmkit.export_onnx: every option with an inference form, checked by running it in ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lstmkit
from lstmkit.interop.onnx_export import CONFIG_KEY
from lstmkit.interop.onnx_graph import uses_onnx_lstm_op

CONFIGS = [
    dict(),
    dict(num_layers=3, bidirectional=True, batch_first=True),
    dict(num_layers=2, bias=False),
    dict(num_layers=2, bidirectional=True, peephole=True),
    dict(num_layers=2, dropout=0.5, recurrent_dropout=0.2, weight_drop=0.3, forget_bias=1.0),  # eval: no noise
    # no ONNX LSTM equivalent: a loop over the steps
    dict(proj_size=2),
    dict(proj_size=3, num_layers=2, bidirectional=True, batch_first=True),
    dict(layer_norm=True),
    dict(zoneout=(0.2, 0.4)),
    dict(num_layers=2, bidirectional=True, layer_norm=True, peephole=True, zoneout=0.1, proj_size=2, bias=False),
]


def ident(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def make(seed=0, **cfg):
    torch.manual_seed(seed)
    m = lstmkit.LSTM(3, 5, **cfg)
    with torch.no_grad():  # peephole weights start at zero and LN at (1, 0): make them matter
        for name, p in m.named_parameters():
            if "peephole" in name or "layer_norm" in name:
                p.normal_(0.5, 0.3) if "layer_norm" in name else p.normal_(0.0, 0.3)
    return m.eval()


def assert_runs_like(module, path, initial_state, sizes=((7, 2), (1, 1), (4, 3), (30, 5)), atol=2e-5):
    s = session(path)
    cfg = module.config
    for T, N in sizes:  # one graph, any sequence length and batch (T=30 is longer than exported with)
        shape = (N, T, cfg.input_size) if cfg.batch_first else (T, N, cfg.input_size)
        x = torch.randn(shape, dtype=module.weight_ih_l0.dtype)
        h_shape, c_shape = cfg.state_shapes(N)
        h0, c0 = torch.randn(h_shape, dtype=x.dtype), torch.randn(c_shape, dtype=x.dtype)
        feed = {"input": x.numpy()}
        if initial_state:
            feed.update(h0=h0.numpy(), c0=c0.numpy())
        got = s.run(["output", "h_n", "c_n"], feed)
        with torch.no_grad():
            y, (h, c) = module(x, (h0, c0) if initial_state else None)
        for name, a, b in zip(("output", "h_n", "c_n"), got, (y, h, c)):
            assert a.shape == tuple(b.shape), name
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=atol, err_msg=f"{name} T={T} N={N}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=ident)
@pytest.mark.parametrize("initial_state", [False, True])
def test_onnx_runtime_matches_module(tmp_path, cfg, initial_state):
    m = make(**cfg)
    path = tmp_path / "m.onnx"
    lstmkit.export_onnx(m, path, initial_state=initial_state)
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # nothing ORT lacks
    if uses_onnx_lstm_op(m.config):  # ORT's fused kernel: one node per layer
        assert ops.count("LSTM") == m.num_layers
    else:
        assert "LSTM" not in ops and ops.count("Loop") == m.num_layers * (2 if m.bidirectional else 1)
    meta = {p.key: p.value for p in model.metadata_props}
    assert lstmkit.LSTMConfig.from_dict(json.loads(meta[CONFIG_KEY])) == m.config
    assert_runs_like(m, path, initial_state)


def test_export_keeps_training_mode_and_exports_eval_form(tmp_path):
    m = make(zoneout=0.3, recurrent_dropout=0.5, weight_drop=0.5).train()
    lstmkit.export_onnx(m, tmp_path / "m.onnx")
    assert m.training
    assert_runs_like(m.eval(), tmp_path / "m.onnx", False, sizes=((6, 2),))


def test_torch_lstm_and_float64(tmp_path):
    ref = nn.LSTM(4, 6, num_layers=2, bidirectional=True).eval()
    lstmkit.export_onnx(ref, tmp_path / "t.onnx")
    x = torch.randn(5, 2, 4)
    got = session(tmp_path / "t.onnx").run(None, {"input": x.numpy()})
    with torch.no_grad():
        y, (h, c) = ref(x)
    for a, b in zip(got, (y, h, c)):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)
    # torch.nn.LSTM with proj_size, which torch's own exporters cannot write as an LSTM
    ref = nn.LSTM(4, 6, proj_size=2).eval()
    lstmkit.export_onnx(ref, tmp_path / "p.onnx")
    assert_runs_like(lstmkit.LSTM.from_torch(ref), tmp_path / "p.onnx", False, sizes=((5, 2),))
    # float64: ONNX Runtime's CPU LSTM runs float32 only, so the LSTM node only passes the checker;
    # the step loop runs in float64 too
    lstmkit.export_onnx(lstmkit.LSTM(2, 3, dtype=torch.float64), tmp_path / "d.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "d.onnx"), full_check=True)
    m = make(proj_size=2, layer_norm=True).double()
    lstmkit.export_onnx(m, tmp_path / "d2.onnx", initial_state=True)
    assert_runs_like(m, tmp_path / "d2.onnx", True, sizes=((6, 2),), atol=1e-12)


def test_rejects_other_modules_and_dtypes(tmp_path):
    with pytest.raises(TypeError, match="LSTM"):
        lstmkit.export_onnx(nn.GRU(3, 5), tmp_path / "g.onnx")
    with pytest.raises(TypeError, match="float32 and float64"):
        lstmkit.export_onnx(lstmkit.LSTM(3, 5, dtype=torch.float16), tmp_path / "h.onnx")
    assert not (tmp_path / "g.onnx").exists() and not (tmp_path / "h.onnx").exists()
