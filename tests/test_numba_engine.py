"""The Numba engine: kernels vs the reference engine vs torch.nn.LSTM, and what is special
about it (float32 activations, huge inputs, views cache, threads, dtype rule).

The module-level differential suite (tests/test_lstm.py) already runs for engine="numba";
here we test the numpy-level kernel API directly and the engine's own behaviour.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from lstmkit.engines import auto_engine_name, reference
from lstmkit.engines.numba import engine as numba_engine
from lstmkit.engines.base import LayerParams
from lstmkit.kernels.numba import lstm_backward, lstm_forward
from lstmkit.kernels.numba.activations import _P, _Q, _pade_coefficients

from harness import TOL, assert_close


# ---- one layer-direction: numpy kernels vs the reference engine --------------------------------------
def layer_case(I, H, proj, bias, lengths, dtype, seed):
    """Random packed inputs and parameters of one layer-direction (torch tensors, requires_grad)."""
    g = torch.Generator().manual_seed(seed)
    P = proj or H
    lengths = sorted(lengths, reverse=True)
    batch_sizes = [sum(1 for n in lengths if n > t) for t in range(lengths[0])]
    B, total = batch_sizes[0], sum(batch_sizes)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True)  # noqa: E731
    x, h0, c0 = r(total, I), r(B, P), r(B, H)
    p = LayerParams(r(4 * H, I) * 0.5, r(4 * H, P) * 0.5, r(4 * H) if bias else None, r(4 * H) if bias else None,
                    r(P, H) if proj else None)
    p = LayerParams(*[t.detach().requires_grad_(True) if t is not None else None for t in p])
    return x, batch_sizes, h0, c0, p


def np_(t):
    return None if t is None else t.detach().numpy()


@given(
    I=st.integers(1, 6), H=st.integers(1, 7), proj=st.integers(0, 3), bias=st.booleans(), reverse=st.booleans(),
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=4), f32=st.booleans(), seed=st.integers(0, 99),
)
def test_kernels_match_reference_engine(I, H, proj, bias, reverse, lengths, f32, seed):
    proj = proj if proj < H else 0
    dtype = torch.float32 if f32 else torch.float64
    tol = TOL[dtype]
    x, bs, h0, c0, p = layer_case(I, H, proj, bias, lengths, dtype, seed)
    y, h_n, c_n = reference.lstm_layer(x, bs, h0, c0, p, reverse)
    g = torch.Generator().manual_seed(seed + 1)
    gy, gh, gc = (torch.randn(t.shape, generator=g, dtype=dtype) for t in (y, h_n, c_n))
    leaves = [x, h0, c0] + [t for t in p if t is not None]
    want = torch.autograd.grad((y * gy).sum() + (h_n * gh).sum() + (c_n * gc).sum(), leaves)

    b = np_(p.b_ih + p.b_hh) if bias else None
    args = (np_(x), bs, np_(h0), np_(c0), np_(p.w_ih), np_(p.w_hh), b, np_(p.w_hr), reverse)
    y2, h2, c2, saved = lstm_forward(*args, save=True)
    y3, h3, c3 = lstm_forward(*args)  # the inference path gives the same numbers
    for a, w, what in ((y2, y, "y"), (h2, h_n, "h_n"), (c2, c_n, "c_n"), (y3, y, "y (no save)"), (h3, h_n, "h_n"), (c3, c_n, "c_n")):
        assert a.dtype == x.detach().numpy().dtype
        assert_close(torch.from_numpy(a), w.detach(), tol, what)

    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = lstm_backward(
        np_(x), bs, np_(h0), np_(c0), np_(p.w_ih), np_(p.w_hh), np_(p.w_hr), reverse, y2, saved,
        gy.numpy(), gh.numpy(), gc.numpy())
    got = [dx, dh0, dc0, dw_ih, dw_hh] + ([db, db] if bias else []) + ([dw_hr] if proj else [])
    names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    names = names[:5] + (names[5:7] if bias else []) + (["w_hr"] if proj else [])
    for a, w, n in zip(got, want, names):
        assert_close(torch.from_numpy(a), w, tol, f"grad {n}")
    assert (dw_hr is None) == (not proj)


def test_kernel_rejects_bad_dtype_and_shapes():
    x = np.zeros((2, 3), np.float16)
    with pytest.raises(TypeError, match="float32 or float64"):
        lstm_forward(x, [1, 1], np.zeros((1, 4)), np.zeros((1, 4)), np.zeros((16, 3)), np.zeros((16, 4)))
    with pytest.raises(ValueError, match="shape"):
        lstm_forward(np.zeros((2, 3)), [1, 1], np.zeros((1, 4)), np.zeros((1, 4)), np.zeros((16, 5)), np.zeros((16, 4)))


# ---- the torch engine: numba vs reference vs torch.nn.LSTM, three ways -------------------------------
def three_way(cfg, dtype, make_x, hx=False, seed=0):
    torch.manual_seed(seed)
    ref = nn.LSTM(**cfg, dtype=dtype)
    mods = [ref, lstmkit.LSTM.from_torch(ref, engine="numba"), lstmkit.LSTM.from_torch(ref, engine="reference")]
    D, L = (2 if cfg.get("bidirectional") else 1), cfg.get("num_layers", 1)
    results = []
    for m in mods:
        x = make_x()
        state = None
        if hx:
            g = torch.Generator().manual_seed(seed + 7)
            N = x.batch_sizes[0].item() if hasattr(x, "batch_sizes") else x.shape[1]
            P = cfg.get("proj_size") or cfg["hidden_size"]
            state = (torch.randn(D * L, N, P, generator=g, dtype=dtype).requires_grad_(True),
                     torch.randn(D * L, N, cfg["hidden_size"], generator=g, dtype=dtype).requires_grad_(True))
        y, (h, c) = m(x, state)
        y = y.data if hasattr(y, "batch_sizes") else y
        g = torch.Generator().manual_seed(seed + 3)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=dtype)).sum() for t in (y, h, c))
        loss.backward()
        grads = [p.grad for p in m.parameters()] + ([s.grad for s in state] if state else [])
        results.append(([y, h, c], grads))
    tol = TOL[dtype]
    (o_t, g_t), (o_n, g_n), (o_r, g_r) = results
    for a, b, r in zip(o_n, o_t, o_r):
        assert_close(a, b, tol, "numba vs torch")
        assert_close(a, r, tol, "numba vs reference")
    for a, b, r in zip(g_n, g_t, g_r):
        assert_close(a, b, tol, "grad numba vs torch")
        assert_close(a, r, tol, "grad numba vs reference")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cfg", [
    dict(input_size=5, hidden_size=8),
    dict(input_size=5, hidden_size=8, num_layers=2, bidirectional=True, proj_size=3),
    dict(input_size=4, hidden_size=6, bias=False, bidirectional=True),
])
def test_three_way_padded(cfg, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, cfg["input_size"], generator=g, dtype=dtype)
    three_way(cfg, dtype, lambda: x.clone().requires_grad_(True), hx=True)


@given(
    H=st.integers(1, 6), proj=st.integers(0, 2), bias=st.booleans(), bidir=st.booleans(), layers=st.integers(1, 2),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=5), hx=st.booleans(), f32=st.booleans(),
)
def test_three_way_packed_random(H, proj, bias, bidir, layers, lengths, hx, f32):
    dtype = torch.float32 if f32 else torch.float64
    cfg = dict(input_size=3, hidden_size=H, num_layers=layers, bias=bias, bidirectional=bidir,
               proj_size=proj if proj < H else 0)
    x = torch.randn(max(lengths), len(lengths), 3, dtype=dtype, generator=torch.Generator().manual_seed(len(lengths)))
    three_way(cfg, dtype, lambda: pack_padded_sequence(x.clone().requires_grad_(True), torch.tensor(lengths),
                                                        enforce_sorted=False), hx=hx)


def test_gradcheck_layer_packed_reverse_proj_nobias():
    for reverse in (False, True):
        for bias, proj in ((True, 2), (False, 0)):
            x, bs, h0, c0, p = layer_case(2, 3, proj, bias, [3, 2, 2, 1], torch.float64, seed=5)
            leaves = [t for t in p if t is not None]
            n = len(leaves)

            def f(x, h0, c0, *ws):
                it = iter(ws)
                pp = LayerParams(*[next(it) if t is not None else None for t in p])
                return numba_engine.lstm_layer(x, bs, h0, c0, pp, reverse)

            assert torch.autograd.gradcheck(f, (x, h0, c0, *leaves)), (reverse, bias, proj, n)


# ---- float32 activations ------------------------------------------------------------------------------
def test_pade_coefficients_are_the_continued_fraction():
    assert _pade_coefficients(12) == (_P, _Q)


def test_float32_activations_accuracy_and_limits():
    from numba import njit

    from lstmkit.kernels.numba.activations import sigmoid, tanh

    @njit
    def both(x, t, s):
        for k in range(x.shape[0]):
            t[k] = tanh(x[k])
            s[k] = sigmoid(x[k])

    for dt, tol in ((np.float32, 4.5e-7), (np.float64, 1e-15)):
        x = np.concatenate([np.linspace(-30, 30, 200001), [0.0, 1e-30, -1e-30, 1e30, -1e30, np.inf, -np.inf, 800, -800]]).astype(dt)
        t, s = np.empty_like(x), np.empty_like(x)
        both(x, t, s)
        x64 = x.astype(np.float64)
        assert np.isfinite(t).all() and np.isfinite(s).all()
        assert np.abs(t - np.tanh(x64)).max() <= tol
        assert np.abs(s - 0.5 * (1 + np.tanh(x64 / 2))).max() <= tol
        assert np.all(np.abs(t) <= 1) and np.all((s >= 0) & (s <= 1))
        assert t[-4] == 1 and t[-3] == -1 and s[-4] == 1 and s[-3] == 0  # +inf, -inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-30, 1e6, 1e30])
def test_huge_and_tiny_inputs(dtype, scale):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, bidirectional=True, dtype=dtype)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = (torch.randn(4, 2, 3, dtype=dtype) * scale).requires_grad_(True)
    y, (h, c) = ours(x)
    assert torch.isfinite(y).all() and torch.isfinite(h).all() and torch.isfinite(c).all()
    (y.sum() + c.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())
    with torch.no_grad():
        yr, (hr, cr) = ref(x)
    tol = TOL[dtype]
    for a, b in ((y, yr), (h, hr), (c, cr)):
        assert_close(a.detach(), b, tol)


# ---- the engine's own behaviour ---------------------------------------------------------------------------
def test_non_contiguous_inputs_states_and_weights():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, num_layers=2, dtype=torch.float64)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    # a weight stored transposed (non-contiguous view), in both modules
    w = ref.weight_hh_l1.detach().t().contiguous().t()
    for m in (ref, ours):
        m.weight_hh_l1 = nn.Parameter(w.clone().t().contiguous().t())
        assert not m.weight_hh_l1.is_contiguous()
    x = torch.randn(3, 5, 4, dtype=torch.float64).transpose(0, 1)[:, ::2]  # (5, 2, 4), strided
    h0 = torch.randn(2, 4, 6, dtype=torch.float64)[:, ::2]
    c0 = torch.randn(2, 2, 6, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous() and not h0.is_contiguous()
    a, b = ours(x, (h0, c0)), ref(x, (h0, c0))
    assert_close(a[0], b[0], 1e-10)
    assert_close(a[1][1], b[1][1], 1e-10)
    a[0].sum().backward()
    b[0].sum().backward()
    assert_close(ours.weight_hh_l1.grad, ref.weight_hh_l1.grad, 1e-10)


def test_parameter_updates_are_seen():
    """Cached numpy views must follow in-place updates, .data updates and replaced parameters."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, dtype=torch.float64)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def check():
        with torch.no_grad():
            assert_close(ours(x)[0], ref(x)[0], 1e-10)
        assert_close(ours(x)[0], ref(x)[0], 1e-10)

    check()
    for m in (ref, ours):
        with torch.no_grad():
            m.weight_ih_l0.mul_(1.5)
        m.bias_hh_l0.data.add_(0.25)  # bypasses the version counter
    check()
    new = torch.randn(16, 4, dtype=torch.float64)
    for m in (ref, ours):
        m.weight_hh_l0.data = new.clone()  # re-pointed to other memory
    check()
    for m in (ref, ours):
        m.bias_ih_l0 = nn.Parameter(torch.randn(16, dtype=torch.float64))
    ours.bias_ih_l0.data.copy_(ref.bias_ih_l0.data)
    check()


def test_inference_saves_nothing_and_training_path_uses_autograd_function():
    m = lstmkit.LSTM(3, 4, engine="numba")
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        y, (h, c) = m(x)
    assert y.grad_fn is None and h.grad_fn is None
    with torch.inference_mode():
        y, _ = m(x)
    assert y.grad_fn is None
    for p in m.parameters():
        p.requires_grad_(False)
    assert m(x)[0].grad_fn is None  # nothing requires grad: the thin path
    for p in m.parameters():
        p.requires_grad_(True)
    y, _ = m(x)
    assert "LSTMFunction" in type(y.grad_fn).__name__ or y.grad_fn is not None


def test_backward_twice_with_retain_graph():
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 4, bidirectional=True, engine="numba").double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    y.sum().backward(retain_graph=True)
    g1 = x.grad.clone()
    x.grad = None
    y.sum().backward()
    assert_close(x.grad, g1, 0)


def test_dtype_rule():
    """bfloat16/float16 on CPU: engine='auto' computes them on the reference engine;
    engine='numba' refuses them with a TypeError."""
    for dt in (torch.bfloat16, torch.float16):
        x = torch.randn(3, 2, 4).to(dt)
        assert auto_engine_name(x) == "reference"
        torch.manual_seed(0)
        auto = lstmkit.LSTM(4, 5).to(dt)
        refm = lstmkit.LSTM(4, 5, engine="reference").to(dt)
        refm.load_state_dict(auto.state_dict())
        ya, yr = auto(x)[0], refm(x)[0]
        assert ya.dtype == dt and torch.equal(ya, yr)
        numba = lstmkit.LSTM(4, 5, engine="numba").to(dt)
        with pytest.raises(TypeError, match="float32 or float64"):
            numba(x)
    assert auto_engine_name(torch.randn(2, dtype=torch.float32)) == "numba"
    assert auto_engine_name(torch.randn(2, dtype=torch.float64)) == "numba"


def test_engine_rejects_mixed_dtypes():
    x, bs, h0, c0, p = layer_case(2, 3, 0, True, [2, 1], torch.float64, seed=0)
    with pytest.raises(TypeError, match="dtype"):
        numba_engine.lstm_layer(x.float(), bs, h0.float(), c0.float(), p)


@pytest.mark.parametrize("setting", [1, 0])
def test_blas_threads(setting, monkeypatch):
    """By default the kernels' BLAS runs one thread; with LSTMKIT_BLAS_THREADS=0 big steps
    use torch.get_num_threads() and small ones one thread."""
    monkeypatch.setattr(numba_engine, "_BLAS_THREADS", setting)
    import threadpoolctl
    small = lstmkit.LSTM(3, 4, engine="numba")
    big = lstmkit.LSTM(3, 512, engine="numba")  # (1, 512) @ (512, 2048) = 2^20 per step
    old = torch.get_num_threads()

    def scipy_blas_threads():
        info = [i for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas" and "scipy" in i["filepath"] and "numpy.libs" not in i["filepath"]]
        assert info
        return {i["num_threads"] for i in info}

    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                big(torch.randn(2, 1, 3))
            assert scipy_blas_threads() == ({n} if setting == 0 else {1})
            with torch.no_grad():
                small(torch.randn(2, 1, 3))
            assert scipy_blas_threads() == {1}
    finally:
        torch.set_num_threads(old)


# ---- big steps: GEMMs in torch, gate pass in the kernel (numba_engine._forward_torch_gemm) ------------
@pytest.fixture
def torch_gemm_everywhere():
    old = numba_engine._TORCH_GEMM_MIN, numba_engine._TORCH_GEMM_MIN_BATCH
    numba_engine._TORCH_GEMM_MIN = numba_engine._TORCH_GEMM_MIN_BATCH = 0  # every step takes the torch-GEMM path
    yield
    numba_engine._TORCH_GEMM_MIN, numba_engine._TORCH_GEMM_MIN_BATCH = old


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cfg", [
    dict(input_size=5, hidden_size=8),
    dict(input_size=5, hidden_size=8, num_layers=2, bidirectional=True, proj_size=3),
    dict(input_size=4, hidden_size=6, bias=False, bidirectional=True),
])
def test_torch_gemm_path_three_way(cfg, dtype, torch_gemm_everywhere):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, cfg["input_size"], generator=g, dtype=dtype)
    three_way(cfg, dtype, lambda: x.clone().requires_grad_(True), hx=True)
    lengths = [5, 7, 1, 3]
    xp = torch.randn(7, 4, cfg["input_size"], generator=g, dtype=dtype)
    three_way(cfg, dtype, lambda: pack_padded_sequence(xp.clone().requires_grad_(True), torch.tensor(lengths),
                                                        enforce_sorted=False), hx=True)


def test_torch_gemm_path_taken_for_big_steps(monkeypatch):
    """A batch-32 / hidden-256 step takes the torch-GEMM path, forward (inference and
    training) and backward, and agrees with the all-Numba kernels."""
    calls = []
    fwd, bwd = numba_engine._forward_torch_gemm, numba_engine._backward_torch_gemm
    monkeypatch.setattr(numba_engine, "_forward_torch_gemm", lambda *a: calls.append("f") or fwd(*a))
    monkeypatch.setattr(numba_engine, "_backward_torch_gemm", lambda *a: calls.append("b") or bwd(*a))
    torch.manual_seed(0)
    m = lstmkit.LSTM(16, 256, engine="numba")
    x = torch.randn(3, 32, 16, requires_grad=True)

    def run():
        m.zero_grad()
        x.grad = None
        with torch.no_grad():
            y_inf = m(x)[0]
        y, (h, c) = m(x)
        (y.sum() + h.pow(2).sum() + c.sum()).backward()
        return [y_inf, y, x.grad] + [p.grad for p in m.parameters()]

    big = run()
    assert calls == ["f", "f", "b"]
    monkeypatch.setattr(numba_engine, "_TORCH_GEMM_MIN", 1 << 62)
    small = run()
    assert calls == ["f", "f", "b"]
    for a, b in zip(big, small):
        assert_close(a, b, 1e-5)
