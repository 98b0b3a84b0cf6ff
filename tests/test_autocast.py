"""torch.autocast: lstmkit.LSTM / LSTMCell compute and return the dtypes torch.nn.LSTM / LSTMCell do.

CPU autocast runs here against torch itself: output, h_n, c_n dtypes and values, and the
dtypes of the gradients. The CUDA rules (nn/autocast.py) cannot run without a GPU; the rule
functions are tested directly, and the module's use of a plan is tested on CPU by a plan
that casts (the same code path a CUDA plan takes).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from lstmkit.nn import autocast as lstm_autocast

BF16 = torch.bfloat16

CONFIGS = {
    "plain": dict(input_size=4, hidden_size=5),
    "bidir_2layers": dict(input_size=4, hidden_size=5, num_layers=2, bidirectional=True),
    "proj": dict(input_size=4, hidden_size=5, proj_size=3),
    "batch_first_no_bias": dict(input_size=4, hidden_size=5, batch_first=True, bias=False),
}


def _flat(out):
    y, (h, c) = out
    return [y.data if hasattr(y, "batch_sizes") else y, h, c]


def _run(module, make_input, hx=None, grad=True):
    torch.manual_seed(0)
    x, leaf = make_input()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=BF16):
        out = _flat(module(x, hx))
    grads = None
    if grad:
        module.zero_grad()
        sum(t.float().sum() * (k + 1) for k, t in enumerate(out)).backward()
        grads = [leaf.grad] + [p.grad for p in module.parameters()]
    return out, grads


def _inputs(cfg, packed=False):
    shape = (3, 2, 4) if cfg.get("batch_first") else (2, 3, 4)  # 2 steps (or batch 2), 3 batch
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)

    def make():
        x = base.clone().requires_grad_(True)
        if packed:
            return pack_padded_sequence(x, torch.tensor([2, 1, 2]), batch_first=cfg.get("batch_first", False),
                                        enforce_sorted=False), x
        return x, x

    return make


def _compare(ref_out, ours_out, ref_grads=None, ours_grads=None):
    for a, b in zip(ref_out, ours_out):
        assert b.dtype == a.dtype, f"{b.dtype} != torch's {a.dtype}"
        # bfloat16 keeps 8 bits of mantissa; torch and lstmkit round at different places.
        torch.testing.assert_close(b.float(), a.float(), rtol=0.05, atol=0.03)
    if ref_grads is not None:
        for a, b in zip(ref_grads, ours_grads):
            assert (a is None) == (b is None)
            if a is not None:
                assert b.dtype == a.dtype
                torch.testing.assert_close(b, a, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("engine", ["auto", "reference"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_lstm_cpu_bf16_matches_torch(engine, config, packed, grad):
    cfg = CONFIGS[config]
    torch.manual_seed(0)
    ref = nn.LSTM(**cfg)
    ours = lstmkit.LSTM.from_torch(ref, engine=engine)
    make = _inputs(cfg, packed)
    r_out, r_grads = _run(ref, make, grad=grad)
    o_out, o_grads = _run(ours, make, grad=grad)
    _compare(r_out, o_out, r_grads, o_grads)


@pytest.mark.parametrize("state_dtype", [torch.float32, BF16])
def test_lstm_cpu_bf16_with_state_and_unbatched(state_dtype):
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, num_layers=2)
    ours = lstmkit.LSTM.from_torch(ref)
    hx = (torch.randn(2, 3, 5).to(state_dtype), torch.randn(2, 3, 5).to(state_dtype))
    make = _inputs(CONFIGS["plain"])
    _compare(*[_run(m, make, hx)[0] for m in (ref, ours)])
    unbatched = lambda: (torch.randn(2, 4, generator=torch.Generator().manual_seed(2)),) * 2  # noqa: E731
    _compare(*[_run(m, unbatched, grad=False)[0] for m in (ref, ours)])


def test_lstm_autocast_disabled_and_float64():
    ours = lstmkit.LSTM(4, 5)
    x = torch.randn(2, 3, 4)
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert ours(x)[0].dtype == torch.float32
    d = lstmkit.LSTM(4, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=BF16):  # float64 is not eligible for a cast: as torch, computed in float64
        assert [t.dtype for t in _flat(d(x.double()))] == [torch.float64] * 3
        with pytest.raises(ValueError, match="does not match weight dtype"):  # torch: a RuntimeError
            ours(x.double())  # float32 weights are cast, the float64 input is not: they differ


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_cell_cpu_bf16_matches_torch(engine):
    """CPU autocast: float32 in, float32 out, as with torch. (torch's cell runs its gate matmuls
    in bfloat16 and the rest in float32; lstmkit computes all of it in float32, so the values
    agree to bfloat16's precision.)"""
    torch.manual_seed(0)
    ref = nn.LSTMCell(4, 5)
    ours = lstmkit.LSTMCell(4, 5, engine=engine)
    ours.load_state_dict(ref.state_dict())
    x0 = torch.randn(3, 4)
    outs = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=BF16):
            h, c = m(x)
        (h.sum() + 2 * c.sum()).backward()
        outs.append(([h, c], [x.grad, m.weight_ih.grad]))
    for (a_out, a_g), (b_out, b_g) in [outs]:
        for a, b in zip(a_out + a_g, b_out + b_g):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(b, a, rtol=0.02, atol=0.01)


# ---- the rules as functions (CUDA included) -------------------------------------------------------------
def test_rules():
    plan = lstm_autocast.lstm_plan
    assert plan("cpu", BF16, packed=False, proj_size=0) == (BF16, None)
    assert plan("cpu", BF16, packed=False, proj_size=2) == (BF16, torch.float32)
    assert plan("cpu", torch.float16, packed=False, proj_size=0) == (torch.float16, None)
    assert plan("cpu", BF16, packed=True, proj_size=0) == (None, None)
    assert plan("cpu", BF16, packed=True, proj_size=2) == (BF16, torch.float32)
    for dt in (torch.float16, BF16):  # cuDNN's RNN runs in float16 whatever the autocast dtype
        for packed in (False, True):
            assert plan("cuda", dt, packed=packed, proj_size=0) == (torch.float16, None)
        assert lstm_autocast.cell_plan("cuda", dt) == (dt, None)  # lstm_cell: lower-precision list
    assert lstm_autocast.cell_plan("cpu", BF16) == (None, None)


def test_cast_only_eligible_tensors():
    t32, t64, i64 = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.long)
    out = lstm_autocast.cast((t32, t64, i64, None), torch.float16)
    assert [o.dtype if o is not None else None for o in out] == [torch.float16, torch.float64, torch.long, None]


@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell"])
def test_a_casting_plan_runs_like_cuda_would(cls, monkeypatch):
    """The CUDA plans cast to float16 (LSTM) or the autocast dtype (cell); the module code that
    applies a plan is device-independent, so a CPU run under a CUDA-like plan checks it: the
    outputs come in the plan's dtype and equal the module run in that dtype, and the gradients
    reach the float32 parameters in float32."""
    fp16 = torch.float16
    monkeypatch.setattr(lstm_autocast, "lstm_plan", lambda *a, **k: lstm_autocast.AutocastPlan(fp16))
    monkeypatch.setattr(lstm_autocast, "cell_plan", lambda *a, **k: lstm_autocast.AutocastPlan(fp16))
    torch.manual_seed(0)
    m = lstmkit.LSTM(4, 5, num_layers=2) if cls == "LSTM" else lstmkit.LSTMCell(4, 5)
    x = torch.randn(2, 3, 4) if cls == "LSTM" else torch.randn(3, 4)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        out = m(x)
    flat = _flat(out) if cls == "LSTM" else list(out)
    assert all(t.dtype == fp16 for t in flat)
    half = (lstmkit.LSTM(4, 5, num_layers=2, dtype=fp16) if cls == "LSTM"
            else lstmkit.LSTMCell(4, 5, dtype=fp16))
    half.load_state_dict({k: v.half() for k, v in m.state_dict().items()})
    want = _flat(half(x.detach().half())) if cls == "LSTM" else list(half(x.detach().half()))
    for a, b in zip(flat, want):
        torch.testing.assert_close(a, b)
    sum(t.float().sum() for t in flat).backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in m.parameters())
