"""lstmkit.save / lstmkit.load: weights and the whole configuration survive a round trip."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lstmkit

CONFIGS = [
    dict(input_size=3, hidden_size=5),
    dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25),
    dict(input_size=2, hidden_size=7, num_layers=3, bias=False, proj_size=3),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip(tmp_path, cfg, dtype):
    torch.manual_seed(0)
    m = lstmkit.LSTM(**cfg, dtype=dtype)
    path = tmp_path / "m.safetensors"
    lstmkit.save(m, path)
    back = lstmkit.load(path)
    assert isinstance(back, lstmkit.LSTM)
    assert back.config == m.config
    assert back.weight_ih_l0.dtype == dtype
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randn(4, 3, cfg["input_size"], dtype=dtype)
    m.eval(), back.eval()
    with torch.no_grad():
        for a, b in zip(torch.utils._pytree.tree_leaves(m(x)), torch.utils._pytree.tree_leaves(back(x))):
            assert torch.equal(a, b)


def test_file_is_a_plain_state_dict_with_config_metadata(tmp_path):
    m = lstmkit.LSTM(3, 4, num_layers=2, batch_first=True)
    path = tmp_path / "m.safetensors"
    lstmkit.save(m, path)
    ref = nn.LSTM(3, 4, num_layers=2, batch_first=True)
    ref.load_state_dict(load_file(path), strict=True)  # any safetensors reader sees nn.LSTM's names
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lstmkit"
    cfg = json.loads(meta["lstmkit.config"])
    assert cfg["batch_first"] is True and cfg["num_layers"] == 2


@pytest.mark.parametrize(
    "variants",
    [
        dict(layer_norm=True),
        dict(peephole=True, zoneout=(0.1, 0.2)),
        dict(recurrent_dropout=0.3, weight_drop=0.2, forget_bias=1.0),
    ],
)
def test_variants_survive(tmp_path, variants):
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 4, num_layers=2, **variants)
    path = tmp_path / "v.safetensors"
    lstmkit.save(m, path)
    back = lstmkit.load(path)
    assert back.config == m.config
    assert dict(back.state_dict()).keys() == dict(m.state_dict()).keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])


def test_save_torch_lstm_and_engine_kwarg(tmp_path):
    ref = nn.LSTM(3, 4, bidirectional=True)
    path = tmp_path / "t.safetensors"
    lstmkit.save(ref, path)
    back = lstmkit.load(path, engine="reference")
    assert back.engine == "reference" and back.bidirectional
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        assert torch.allclose(ref(x)[0], back(x)[0], atol=1e-6)


def test_errors(tmp_path):
    with pytest.raises(TypeError, match="lstmkit.LSTM or torch.nn.LSTM"):
        lstmkit.save(nn.GRU(2, 3), tmp_path / "g.safetensors")
    with pytest.raises(FileNotFoundError):
        lstmkit.load(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file(nn.LSTM(2, 3).state_dict(), plain)
    with pytest.raises(ValueError, match="not written by lstmkit.save"):
        lstmkit.load(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        lstmkit.load(junk)
