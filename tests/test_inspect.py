"""`lstmkit inspect`: the LSTMs of a checkpoint, whatever format it comes in."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

import lstmkit
from lstmkit.cli.inspect_cmd import main


class Net(nn.Module):  # module level, so torch.save(whole model) can pickle it
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Sequential(nn.Linear(4, 4))
        self.encoder.lstm = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
        self.decoder = lstmkit.LSTM(16, 6, proj_size=3, bias=False)
        self.gru = nn.GRU(4, 8)  # same parameter names, not an LSTM
        self.head = nn.Linear(3, 10)


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_rows(net: Net, outer: str = "") -> list[dict]:
    enc, dec = net.encoder.lstm, net.decoder
    return [
        dict(prefix=outer + "encoder.lstm.", input_size=4, hidden_size=8, num_layers=2, bias=True,
             bidirectional=True, proj_size=0, parameters=numel(enc), variants={}),
        dict(prefix=outer + "decoder.", input_size=16, hidden_size=6, num_layers=1, bias=False,
             bidirectional=False, proj_size=3, parameters=numel(dec), variants={}),
    ]


def run_json(capsys, path) -> list[dict]:
    assert main([str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_prefix(rows):
    return sorted(rows, key=lambda r: r["prefix"])


def test_state_dict_nested_checkpoint_whole_module_and_safetensors(tmp_path, capsys):
    net = Net()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save({"model": net.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
    torch.save(net, tmp_path / "whole.pt")  # a pickled module: read without running its code
    save_file(net.state_dict(), tmp_path / "m.safetensors")
    want = by_prefix(expected_rows(net))
    assert by_prefix(run_json(capsys, tmp_path / "sd.pt")) == want
    assert by_prefix(run_json(capsys, tmp_path / "whole.pt")) == want
    assert by_prefix(run_json(capsys, tmp_path / "m.safetensors")) == want
    assert by_prefix(run_json(capsys, tmp_path / "ckpt.pth")) == by_prefix(expected_rows(net, "model."))
    # the table names every LSTM
    assert main([str(tmp_path / "sd.pt")]) == 0
    out = capsys.readouterr().out
    assert "2 LSTMs" in out and "encoder.lstm." in out and "decoder." in out and "gru" not in out


@settings(max_examples=10)
@given(I=st.integers(1, 6), H=st.integers(2, 6), L=st.integers(1, 3), bias=st.booleans(), bidir=st.booleans(),
       proj=st.booleans())
def test_inferred_config_matches_nn_lstm(tmp_path_factory, I, H, L, bias, bidir, proj):
    m = nn.LSTM(I, H, L, bias=bias, bidirectional=bidir, proj_size=H - 1 if proj else 0)
    path = tmp_path_factory.mktemp("i") / "m.safetensors"
    save_file(m.state_dict(), path)
    from lstmkit.interop.inspection import find_in_file

    rows, _ = find_in_file(path)
    assert rows == [dict(prefix="", input_size=I, hidden_size=H, num_layers=L, bias=bias, bidirectional=bidir,
                         proj_size=m.proj_size, parameters=numel(m), variants={})]


def test_variant_parameters_are_counted(tmp_path, capsys):
    m = lstmkit.LSTM(3, 4, num_layers=2, layer_norm=True, peephole=True)
    lstmkit.save(m, tmp_path / "v.safetensors")
    (row,) = run_json(capsys, tmp_path / "v.safetensors")
    assert row["parameters"] == numel(m) and row["num_layers"] == 2
    assert row["variants"] == dict(layer_norm=True, peephole=True)
    # in a state_dict only the options with parameters show; lstmkit.save's header has them all
    torch.save(m.state_dict(), tmp_path / "v.pt")
    m = lstmkit.LSTM(3, 4, zoneout=(0.1, 0.2), forget_bias=1.0, peephole=True)
    lstmkit.save(m, tmp_path / "z.safetensors")
    assert run_json(capsys, tmp_path / "v.pt")[0]["variants"] == dict(layer_norm=True, peephole=True)
    assert run_json(capsys, tmp_path / "z.safetensors")[0]["variants"] == dict(
        peephole=True, zoneout=[0.1, 0.2], forget_bias=1.0)  # JSON has no tuples
    assert main([str(tmp_path / "z.safetensors")]) == 0
    assert "peephole, zoneout=(0.1, 0.2), forget_bias=1.0" in capsys.readouterr().out


@pytest.mark.parametrize("options", [dict(proj_size=3, num_layers=2, bidirectional=True),
                                     dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.1),
                                     dict(peephole=True, forget_bias=1.0, batch_first=True)])
def test_onnx_from_export_onnx_reports_proj_size_and_variants(tmp_path, capsys, options):
    m = lstmkit.LSTM(5, 7, **options)
    lstmkit.export_onnx(m, tmp_path / "m.onnx")
    (row,) = run_json(capsys, tmp_path / "m.onnx")
    c = m.config
    assert row == dict(prefix="", input_size=5, hidden_size=7, num_layers=c.num_layers, bias=True,
                       bidirectional=c.bidirectional, proj_size=c.proj_size, parameters=numel(m),
                       variants=json.loads(json.dumps(c.variant_kwargs())))
    # the same file without lstmkit's metadata: the structure alone, where ONNX LSTM nodes hold it
    model = onnx.load(tmp_path / "m.onnx")
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "bare.onnx")
    if "proj_size" in options or "layer_norm" in options:  # step loops: nothing to read sizes from
        assert main([str(tmp_path / "bare.onnx")]) == 1
        assert "no LSTM found" in capsys.readouterr().err
    else:
        (bare,) = run_json(capsys, tmp_path / "bare.onnx")
        assert (bare["hidden_size"], bare["variants"], bare["parameters"]) == (7, {"peephole": True}, numel(m))


def test_onnx(tmp_path, capsys):
    m = lstmkit.LSTM(5, 7, num_layers=3, bidirectional=True, batch_first=True)
    lstmkit.export_onnx(m, tmp_path / "m.onnx")
    (row,) = run_json(capsys, tmp_path / "m.onnx")
    assert {k: v for k, v in row.items() if k != "prefix"} == dict(
        input_size=5, hidden_size=7, num_layers=3, bias=True, bidirectional=True, proj_size=0, parameters=numel(m),
        variants={})
    # a whole model through torch.onnx.export (no lstmkit metadata): its ONNX LSTM nodes
    model = nn.Sequential(nn.Linear(4, 5))
    model.rnn = lstmkit.LSTM(5, 6, num_layers=2)
    torch.onnx.export(model.eval(), (torch.randn(3, 2, 4),), tmp_path / "whole.onnx", dynamo=False)
    (row,) = run_json(capsys, tmp_path / "whole.onnx")
    assert (row["input_size"], row["hidden_size"], row["num_layers"], row["parameters"]) == (5, 6, 2, numel(model.rnn))

    # two independent single-layer LSTM nodes, no bias, in one hand-written graph
    nodes, inits, inputs = [], [], []
    for name, I, H in (("a", 3, 4), ("b", 2, 5)):
        inits += [numpy_helper.from_array(np.zeros((1, 4 * H, I), np.float32), f"W_{name}"),
                  numpy_helper.from_array(np.zeros((1, 4 * H, H), np.float32), f"R_{name}")]
        inputs.append(helper.make_tensor_value_info(f"x_{name}", TensorProto.FLOAT, ["T", "N", I]))
        nodes.append(helper.make_node("LSTM", [f"x_{name}", f"W_{name}", f"R_{name}"], [f"y_{name}"],
                                      name=f"lstm_{name}", hidden_size=H))
    outputs = [helper.make_tensor_value_info(f"y_{n}", TensorProto.FLOAT, None) for n in "ab"]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits))
    onnx.save(model, tmp_path / "two.onnx")
    rows = run_json(capsys, tmp_path / "two.onnx")
    assert [(r["prefix"], r["input_size"], r["hidden_size"], r["num_layers"], r["bias"], r["parameters"]) for r in rows] == [
        ("lstm_a", 3, 4, 1, False, 16 * 7), ("lstm_b", 2, 5, 1, False, 20 * 7)]


def bad_file(tmp_path, kind):
    path = tmp_path / {"missing": "nope.pt", "junk": "junk.pt", "gru": "gru.pt", "junk_onnx": "x.onnx",
                       "junk_safetensors": "x.safetensors", "directory": "d.pt"}[kind]
    if kind.startswith("junk"):
        path.write_bytes(b"this is not a checkpoint")
    elif kind == "gru":
        torch.save(nn.GRU(3, 4).state_dict(), path)
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["missing", "junk", "gru", "junk_onnx", "junk_safetensors", "directory"])
def test_bad_files_one_line_nonzero_exit(tmp_path, capsys, kind):
    assert main([str(bad_file(tmp_path, kind))]) != 0
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("lstmkit inspect: "), err


def test_cli_bad_file_no_traceback(tmp_path):
    """Through the real entry point: one line on stderr, exit status 1, no traceback."""
    r = subprocess.run([sys.executable, "-m", "lstmkit", "inspect", str(bad_file(tmp_path, "junk"))],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
