"""Parameter accounting and the `lstmkit params` command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lstmkit
from lstmkit import LSTMConfig, describe


@given(I=st.integers(1, 50), H=st.integers(1, 50), layers=st.integers(1, 4), bias=st.booleans(),
       bidir=st.booleans(), proj=st.integers(0, 49))
def test_counts_match_torch(I, H, layers, bias, bidir, proj):
    proj = proj if proj < H else 0
    ref = nn.LSTM(I, H, layers, bias, bidirectional=bidir, proj_size=proj)
    d = describe(LSTMConfig(I, H, layers, bias, False, 0.0, bidir, proj))
    assert d.total == sum(p.numel() for p in ref.parameters())
    assert [(t["name"], tuple(t["shape"])) for t in d.tensors()] == [(n, tuple(p.shape)) for n, p in ref.named_parameters()]
    assert sum(layer["count"] for layer in d.layers()) == d.total
    # the formula, evaluated, gives each layer's count
    for layer in d.layers():
        assert eval(layer["formula"]) == layer["count"]  # noqa: S307 - our own arithmetic string


@pytest.mark.parametrize("opts", [dict(layer_norm=True), dict(peephole=True), dict(layer_norm=True, peephole=True, proj_size=2)])
def test_variant_parameters_counted(opts):
    m = lstmkit.LSTM(3, 5, num_layers=2, bidirectional=True, **opts)
    d = describe(m)
    assert d.total == sum(p.numel() for p in m.parameters())
    assert [t["name"] for t in d.tensors()] == [n for n, _ in m.named_parameters()]
    for layer in d.layers():
        assert eval(layer["formula"]) == layer["count"]  # noqa: S307


def test_shapes_match_a_real_forward():
    cfg = dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    m = lstmkit.LSTM(**cfg)
    d = describe(m, seq_len=4, batch=6).to_dict()
    x = torch.randn(*d["shapes"]["input"])
    h0, c0 = torch.zeros(*d["shapes"]["h0"]), torch.zeros(*d["shapes"]["c0"])
    y, (h, c) = m(x, (h0, c0))
    assert list(y.shape) == d["shapes"]["output"]
    assert list(h.shape) == d["shapes"]["h_n"] and list(c.shape) == d["shapes"]["c_n"]
    assert d["memory_bytes_float32"]["parameters"] == 4 * d["total"]


def test_describe_torch_module_and_errors():
    assert describe(nn.LSTM(3, 4, 2)).total == sum(p.numel() for p in nn.LSTM(3, 4, 2).parameters())
    with pytest.raises(TypeError):
        describe("lstm")
    with pytest.raises(ValueError, match="seq_len"):
        describe(LSTMConfig(3, 4), seq_len=0)


def test_worked_example_from_readme():
    # README: input 10, hidden 20, 2 layers -> 4*20*(10+20) + 8*20 + 4*20*(20+20) + 8*20 = 5920
    assert describe(LSTMConfig(10, 20, 2)).total == 5920


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lstmkit", "params", *args], capture_output=True, text=True)


def test_cli_text():
    r = _cli("64", "128", "--num-layers", "2", "--bidirectional", "--seq-len", "10", "--batch", "3")
    assert r.returncode == 0, r.stderr
    ref = nn.LSTM(64, 128, 2, bidirectional=True)
    assert f"total parameters: {sum(p.numel() for p in ref.parameters()):,}" in r.stdout
    assert "weight_hh_l1_reverse" in r.stdout and "(512, 128)" in r.stdout
    assert "output  (10, 3, 256)" in r.stdout and "h0      (4, 3, 128)" in r.stdout


def test_cli_json():
    r = _cli("3", "8", "--proj-size", "2", "--no-bias", "--json")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    ref = nn.LSTM(3, 8, bias=False, proj_size=2)
    assert d["total"] == sum(p.numel() for p in ref.parameters())
    assert d["tensors"] == [{"name": n, "shape": list(p.shape), "count": p.numel()} for n, p in ref.named_parameters()]


@pytest.mark.parametrize("args", [["64", "128", "--proj-size", "128"], ["64", "x"], ["0", "5"], ["4", "5", "--num-layers", "0"],
                                  ["4.5", "5"], ["4"], ["4", "5", "--seq-len", "0"]])
def test_cli_bad_arguments(args):
    r = _cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_console_script_entry_point():
    from lstmkit.cli import main

    assert main(["params", "3", "4"]) == 0
    assert main(["nonsense"]) == 2


def test_memory_at_the_dtype():
    cfg = LSTMConfig(3, 4, 2)
    d = describe(cfg, seq_len=5, batch=2, dtype="float64")
    assert d.memory()["parameters"] == 8 * d.total and d.memory_float32()["parameters"] == 4 * d.total
    assert "memory at float64:" in d.text() and d.to_dict()["memory_bytes"]["parameters"] == 8 * d.total
    assert describe(nn.LSTM(3, 4).double()).dtype == "float64"  # a module's own dtype by default
    half = nn.LSTM(3, 4).half()
    assert describe(half, dtype="bfloat16").memory()["gradients"] == 2 * sum(p.numel() for p in half.parameters())
    with pytest.raises(ValueError, match="dtype"):
        describe(cfg, dtype="int8")


def test_cli_variant_options_match_the_module():
    r = _cli("3", "5", "--num-layers", "2", "--bidirectional", "--proj-size", "2", "--layer-norm", "--peephole",
             "--dropout", "0.25", "--zoneout", "0.1,0.05", "--recurrent-dropout", "0.2", "--weight-drop", "0.3",
             "--forget-bias", "1", "--dtype", "float16", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    m = lstmkit.LSTM(3, 5, 2, dropout=0.25, bidirectional=True, proj_size=2, layer_norm=True, peephole=True,
                     zoneout=(0.1, 0.05), recurrent_dropout=0.2, weight_drop=0.3, forget_bias=1.0)
    assert d["tensors"] == [{"name": n, "shape": list(p.shape), "count": p.numel()} for n, p in m.named_parameters()]
    assert d["config"]["dropout"] == 0.25 and d["config"]["zoneout"] == [0.1, 0.05]
    assert d["dtype"] == "float16" and d["memory_bytes"]["parameters"] == 2 * d["total"]


@pytest.mark.parametrize("args", [["4", "5", "--zoneout", "0.1,0.2,0.3"], ["4", "5", "--zoneout", "x"],
                                  ["4", "5", "--dropout", "1.5"], ["4", "5", "--no-bias", "--forget-bias", "1"],
                                  ["4", "5", "--dtype", "int8"], ["4", "5", "--weight-drop", "1"]])
def test_cli_bad_variant_options(args):
    r = _cli(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_cli_unwritable_plot_is_one_line_exit_1(tmp_path):
    path = tmp_path / "no_such_dir" / "lstm.svg"
    r = _cli("4", "8", "--plot", str(path))
    assert r.returncode == 1 and "total parameters" in r.stdout  # the table is printed before the plot
    assert r.stderr == f"lstmkit params: error: cannot write {path}: No such file or directory\n"


def test_run_guarded_is_the_commands_error_policy(capsys):
    """Every command's one-line errors and exit codes come from cli.run_guarded."""
    from lstmkit.cli import CommandError, run_guarded

    def raises(e):
        def body():
            raise e
        return body

    assert run_guarded("lstmkit x", lambda: None) == 0
    assert run_guarded("lstmkit x", raises(CommandError("cannot read f"))) == 1
    assert capsys.readouterr().err == "lstmkit x: cannot read f\n"
    assert run_guarded("lstmkit x", raises(CommandError("error: bad size", status=2))) == 2
    assert capsys.readouterr().err == "lstmkit x: error: bad size\n"
    assert run_guarded("lstmkit x", raises(ValueError("bad")), (ValueError,)) == 2
    assert capsys.readouterr().err == "lstmkit x: error: bad\n"
    assert run_guarded("lstmkit x", raises(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "\nlstmkit x: interrupted\n"
    with pytest.raises(ValueError, match="a bug"):  # not declared the user's: a traceback
        run_guarded("lstmkit x", raises(ValueError("a bug")))
