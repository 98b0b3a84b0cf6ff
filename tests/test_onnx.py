"""lstmkit.export_onnx: standard ONNX LSTM nodes, checked by running them in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lstmkit

CONFIGS = [
    dict(),
    dict(num_layers=3, bidirectional=True, batch_first=True),
    dict(num_layers=2, bias=False),
    dict(num_layers=2, bidirectional=True, peephole=True),
    dict(num_layers=2, dropout=0.5, recurrent_dropout=0.2, weight_drop=0.3, forget_bias=1.0),  # eval: no noise
]


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("initial_state", [False, True])
def test_onnx_runtime_matches_module(tmp_path, cfg, initial_state):
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 5, **cfg)
    with torch.no_grad():  # peephole weights start at zero; make them matter
        for name, p in m.named_parameters():
            if "peephole" in name:
                p.normal_()
    m.eval()
    path = tmp_path / "m.onnx"
    lstmkit.export_onnx(m, path, initial_state=initial_state)
    model = onnx.load(path)
    assert [n.op_type for n in model.graph.node].count("LSTM") == m.num_layers
    s = session(path)
    D = 2 if m.bidirectional else 1
    for T, N in ((7, 2), (1, 1), (4, 3)):  # one graph, any sequence length and batch
        x = torch.randn((N, T, 3) if m.batch_first else (T, N, 3))
        h0, c0 = torch.randn(D * m.num_layers, N, 5), torch.randn(D * m.num_layers, N, 5)
        feed = {"input": x.numpy()}
        if initial_state:
            feed.update(h0=h0.numpy(), c0=c0.numpy())
        got = s.run(["output", "h_n", "c_n"], feed)
        with torch.no_grad():
            y, (h, c) = m(x, (h0, c0) if initial_state else None)
        for name, a, b in zip(("output", "h_n", "c_n"), got, (y, h, c)):
            assert a.shape == tuple(b.shape), name
            np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5, err_msg=name)


def test_torch_lstm_and_float64(tmp_path):
    ref = nn.LSTM(4, 6, num_layers=2, bidirectional=True).eval()
    lstmkit.export_onnx(ref, tmp_path / "t.onnx")
    x = torch.randn(5, 2, 4)
    got = session(tmp_path / "t.onnx").run(None, {"input": x.numpy()})
    with torch.no_grad():
        y, (h, c) = ref(x)
    for a, b in zip(got, (y, h, c)):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)
    # float64 is valid ONNX (ONNX Runtime's CPU LSTM only runs float32, so only the checker here)
    lstmkit.export_onnx(lstmkit.LSTM(2, 3, dtype=torch.float64), tmp_path / "d.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "d.onnx"), full_check=True)


@pytest.mark.parametrize(
    "kwargs, option",
    [(dict(proj_size=2), "proj_size"), (dict(layer_norm=True), "layer_norm"), (dict(zoneout=0.1), "zoneout")],
)
def test_unsupported_options_name_the_option(tmp_path, kwargs, option):
    with pytest.raises(NotImplementedError, match=option):
        lstmkit.export_onnx(lstmkit.LSTM(3, 5, **kwargs), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_rejects_other_modules(tmp_path):
    with pytest.raises(TypeError, match="LSTM"):
        lstmkit.export_onnx(nn.GRU(3, 5), tmp_path / "g.onnx")
