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
from lstmkit.engines.numba import binding
from lstmkit.engines.numba import engine as numba_engine
from lstmkit.engines.base import LayerParams
from lstmkit.kernels.numba import lstm_backward, lstm_forward
from lstmkit.kernels.numba.activations import TANH_DENOMINATOR, TANH_NUMERATOR, pade_coefficients

from harness import TOL, assert_close, packed_input, pair, require_team, run_differential, tensor_input, torch_threads


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
    """The numba engine against torch.nn.LSTM and against the reference engine, through the
    shared harness: outputs and the gradients of h0, c0 and every parameter."""
    ref, ours = pair(cfg, "numba", dtype, seed)
    spec = lstmkit.LSTM.from_torch(ref, engine="reference")
    state = None
    if hx:
        x = make_x()
        N = x.batch_sizes[0].item() if hasattr(x, "batch_sizes") else x.shape[1]
        g = torch.Generator().manual_seed(seed + 7)
        state = tuple(torch.randn(s, generator=g, dtype=dtype) for s in ours.config.state_shapes(N))
    make = lambda: (make_x(), [])  # noqa: E731  (the input's own gradient is not compared here)
    run_differential(ref, ours, make, state, seed=seed + 3)
    run_differential(spec, ours, make, state, seed=seed + 3)


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
    assert pade_coefficients(12) == (TANH_NUMERATOR, TANH_DENOMINATOR)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("H", [1, 16, 21, 40, 48, 64])
def test_gate_rows_vector_blocks_and_tail_match_the_formulas(dtype, H):
    """gate_row / gate_backward_row (vector blocks of LANES units, then the scalar tail; float64
    all scalar) against the LSTM formulas in float64 numpy, on rows that are column ranges of
    bigger arrays (the pointers the time loop passes): what is outside the row stays untouched."""
    from lstmkit.kernels.numba.lstm import gate_backward_row, gate_row

    rng = np.random.default_rng(H)
    r = lambda *s: (rng.standard_normal(s) * 2).astype(dtype)  # noqa: E731
    q, b, c, dh, dc = r(4 * H), r(4 * H), r(H), r(H), r(H)
    big = np.full((3, 4 * H + 8), 7.0, dtype)  # a: row 1, columns 3 : 3 + 4H
    hbig = np.full((2, H + 5), 7.0, dtype)  # h: row 1, columns 5 :
    c_out = c.copy()
    gate_row(q, b, big[1, 3 : 3 + 4 * H], c_out, hbig[1, 5:])
    z = (q + b).astype(np.float64)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    i, f, g, o = sig(z[:H]), sig(z[H : 2 * H]), np.tanh(z[2 * H : 3 * H]), sig(z[3 * H :])
    c1 = f * c + i * g
    tol = 2e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(big[1, 3 : 3 + 4 * H], np.concatenate([i, f, g, o]), atol=tol, rtol=tol)
    np.testing.assert_allclose(c_out, c1, atol=tol, rtol=tol)
    np.testing.assert_allclose(hbig[1, 5:], o * np.tanh(c1), atol=tol, rtol=tol)
    assert (big[[0, 2]] == 7).all() and (big[1, :3] == 7).all() and (big[1, 3 + 4 * H :] == 7).all()
    assert (hbig[0] == 7).all() and (hbig[1, :5] == 7).all()

    a = big[1, 3 : 3 + 4 * H].copy()
    cprev, cell = r(H), c_out.copy()
    dg, hpre, dc_out = np.full(4 * H, np.nan, dtype), np.full(H, np.nan, dtype), dc.copy()
    gate_backward_row(a, cell, cprev, dh, dc_out, dg, hpre, True)
    a64 = a.astype(np.float64)
    i, f, g, o = a64[:H], a64[H : 2 * H], a64[2 * H : 3 * H], a64[3 * H :]
    tc = np.tanh(cell.astype(np.float64))
    dct = dc + dh * o * (1 - tc * tc)
    want = np.concatenate([dct * g * i * (1 - i), dct * cprev * f * (1 - f), dct * i * (1 - g * g),
                           dh * tc * o * (1 - o)])
    np.testing.assert_allclose(dg, want, atol=4 * tol, rtol=4 * tol)
    np.testing.assert_allclose(dc_out, dct * f, atol=4 * tol, rtol=4 * tol)
    np.testing.assert_allclose(hpre, o * tc, atol=tol, rtol=tol)
    hpre_kept = np.full(H, 5.0, dtype)
    gate_backward_row(a, cell, cprev, dh, dc.copy(), dg, hpre_kept, False)
    assert (hpre_kept == 5).all()  # want_hpre False: not written


def test_row_pointers():
    from numba import njit

    from lstmkit.kernels.numba.rows import add_p, copy_p, ptr_add, row_ptr

    @njit
    def go(a, b, v):
        copy_p(ptr_add(row_ptr(a, 1), 2), row_ptr(b, 0), 3)  # a[1, 2:5] = b[0, :3]
        add_p(row_ptr(a, 2), row_ptr(v, 1), 2)  # a[2, :2] += v[1:3]

    a, b, v = np.zeros((3, 6)), np.arange(12.0).reshape(2, 6), np.array([10.0, 20.0, 30.0, 40.0])
    go(a, b, v)
    want = np.zeros((3, 6))
    want[1, 2:5] = [0, 1, 2]
    want[2, :2] = [20, 30]
    assert np.array_equal(a, want)


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
    assert_close(a[0], b[0], TOL[torch.float64])
    assert_close(a[1][1], b[1][1], TOL[torch.float64])
    a[0].sum().backward()
    b[0].sum().backward()
    assert_close(ours.weight_hh_l1.grad, ref.weight_hh_l1.grad, TOL[torch.float64])


def test_parameter_updates_are_seen():
    """Cached numpy views must follow in-place updates, .data updates and replaced parameters."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, dtype=torch.float64)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def check():
        with torch.no_grad():
            assert_close(ours(x)[0], ref(x)[0], TOL[torch.float64])
        assert_close(ours(x)[0], ref(x)[0], TOL[torch.float64])

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
    # the engine's Function is in the graph (behind a view), not a fallback to torch ops
    nodes, seen = [y.grad_fn], set()
    while nodes:
        node = nodes.pop()
        seen.add(type(node).__name__)
        nodes.extend(n for n, _ in node.next_functions if n is not None)
    assert any("LSTMFunction" in name for name in seen), seen


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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 1, 64, 128), (3, 2, 8, 16), (40, 1, 64, 128), (30, 32, 128, 256),
                                   (20, 6, 128, 384), (10, 3, 64, 512)],
                         ids=lambda s: "T{}N{}I{}H{}".format(*s))
def test_two_calls_in_one_graph_then_backward_twice(shape, threads, monkeypatch):
    """A program that runs the module twice before one backward (a siamese pair, a sequence and
    its continuation), then backward again with retain_graph: each call's saved tensors are its
    own, never a scratch buffer the other call wrote over, on every path (one step, a few steps,
    the micro-kernel and MKL time loops, the rows and the units splits). Against torch.nn.LSTM,
    float32, every gradient."""
    T, N, I, H = shape
    require_team(monkeypatch)
    torch.manual_seed(0)
    ref = nn.LSTM(I, H)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x1, x2 = torch.randn(T, N, I), torch.randn(T, N, I)
    grads = []
    with torch_threads(threads):
        for m in (ref, ours):
            a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
            y1, (h1, c1) = m(a)
            y2, _ = m(b * 1.5, (h1, c1))  # the second call starts from the first's state
            loss = (y1 * y2).sum() + y2.square().sum()
            loss.backward(retain_graph=True)
            first = [p.grad.clone() for p in m.parameters()] + [a.grad.clone(), b.grad.clone()]
            loss.backward()  # accumulates: twice the first
            grads.append(first + [p.grad for p in m.parameters()])
    for got, want in zip(grads[1], grads[0]):
        assert_close(got, want, TOL[torch.float32])


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


def test_variant_kernels_call_no_blas_from_numba():
    """The variant kernels leave their GEMMs to torch: their compiled time loops call no BLAS
    through Numba (np.dot there runs scipy's OpenBLAS, a second thread pool whose spinning
    fought torch's for the cores)."""
    from lstmkit.kernels.numba import variants

    m = lstmkit.LSTM(3, 4, layer_norm=True, peephole=True, zoneout=0.1, proj_size=2, engine="numba")
    y, _ = m(torch.randn(5, 2, 3))
    y.sum().backward()
    for kernel in (variants.forward_chunk, variants.backward_chunk):
        assert kernel.signatures
        for ir in kernel.inspect_llvm().values():
            assert "xxgemm" not in ir and "xxgemv" not in ir and "xxdot" not in ir


# ---- the batch split: rows in chunks, one thread each ---------------------------------------------------
def test_chunks_hold_two_rows_or_more_or_one_row_each():
    from lstmkit.kernels.numba.lstm import MIN_SPLIT_MACS, chunks_for

    big = MIN_SPLIT_MACS
    assert [chunks_for(n, big, 2) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 1, 2, 2, 2]
    assert [chunks_for(n, big, 4) for n in (3, 4, 5, 6, 7, 8, 100)] == [3, 4, 2, 3, 3, 4, 4]
    assert chunks_for(64, big - 1, 2) == 1  # too little work to split
    assert chunks_for(64, big, 1) == 1


def test_chunk_bounds_cover_the_rows_and_balance_the_work():
    from lstmkit.kernels.numba.lstm import chunk_bounds

    assert chunk_bounds([5] * 3, 2).tolist() == [0, 2, 5]
    assert chunk_bounds([3, 3], 8).tolist() == [0, 1, 2, 3]  # fewer rows than threads: one row each
    assert chunk_bounds([1], 4).tolist() == [0, 1]
    assert chunk_bounds([4, 4], 1).tolist() == [0, 4]
    lengths = [500, 400, 300, 200, 100, 50, 10, 1]
    bs = [sum(n > t for n in lengths) for t in range(lengths[0])]
    b = chunk_bounds(bs, 2).tolist()
    work = [sum(lengths[b[k]:b[k + 1]]) for k in range(len(b) - 1)]
    assert b[0] == 0 and b[-1] == len(lengths) and all(x < y for x, y in zip(b, b[1:]))
    assert max(work) <= sum(lengths) * 0.5 + max(lengths)  # the longest row is the granularity


def _layer_numpy(lengths, I, H, proj, dtype, seed):
    x, bs, h0, c0, p = layer_case(I, H, proj, True, lengths, dtype, seed)
    b = np_(p.b_ih + p.b_hh)
    return (np_(x), bs, np_(h0), np_(c0), np_(p.w_ih), np_(p.w_hh), b, np_(p.w_hr)), (x, h0, c0, p)


def _run_chunks(args, reverse, chunks, seed=3, dx_after=False):
    x, bs, h0, c0, w_ih, w_hh, b, w_hr = args
    y, h, c, saved = lstm_forward(x, bs, h0, c0, w_ih, w_hh, b, w_hr, reverse, save=True, chunks=chunks)
    yi, hi, ci = lstm_forward(x, bs, h0, c0, w_ih, w_hh, b, w_hr, reverse, chunks=chunks)
    g = np.random.default_rng(seed)
    dy, dh, dc = (g.standard_normal(a.shape).astype(a.dtype) for a in (y, h, c))
    grads = lstm_backward(x, bs, h0, c0, w_ih, w_hh, w_hr, reverse, y, saved, dy, dh, dc, chunks=chunks,
                          dx_after=dx_after)
    return [y, h, c, yi, hi, ci] + [gr for gr in grads if gr is not None]


@pytest.mark.parametrize("lengths", [
    [4], [4, 4], [5, 5, 5], [3, 3, 3, 3, 3], [6, 6, 6, 6, 6, 6, 6],  # N = 1, 2, 3, odd
    [9, 7, 7, 4, 2, 1, 1],  # packed: lengths ending inside a chunk
    [1, 1, 1], [8, 1],
    [37, 20], [40],  # 1-2 rows: the input part made ahead (16 steps of one row, 8 of two), blocks left part-full
])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 2])
def test_every_batch_split_gives_bitwise_the_same_results(lengths, reverse, proj):
    """1, 2, 3, 4 and more chunks than rows: every row is computed by the same operations in the
    same order whichever chunk holds it, so outputs, state and every gradient are bitwise equal;
    and they match the reference engine."""
    for dtype in (torch.float64, torch.float32):
        args, (x, h0, c0, p) = _layer_numpy(lengths, 3, 5, proj, dtype, seed=len(lengths))
        one = _run_chunks(args, reverse, 1)
        for chunks in (2, 3, 4, len(lengths) + 3):
            split = _run_chunks(args, reverse, chunks)
            for a, b in zip(split, one):
                assert np.array_equal(a, b), (chunks, lengths)
        y, h, c = reference.lstm_layer(x, args[1], h0, c0, p, reverse)
        for a, w in zip(one[:3], (y, h, c)):
            assert_close(torch.from_numpy(a), w.detach(), TOL[dtype])
        xs, bs, h0n, c0n, w_ih, w_hh, b, w_hr = args
        for chunks in (1, 2):  # the input projection as one GEMM before the loop, dx after it
            pre = lstm_forward(xs, bs, h0n, c0n, w_ih, w_hh, b, w_hr, reverse, chunks=chunks, precompute=True)
            for a, w in zip(pre, (y, h, c)):
                assert_close(torch.from_numpy(a), w.detach(), TOL[dtype])
            after = _run_chunks(args, reverse, chunks, dx_after=True)
            for a, w in zip(after, one):
                assert_close(torch.from_numpy(a), torch.from_numpy(w), TOL[dtype])


@given(
    I=st.integers(1, 40), H=st.integers(1, 40), proj=st.integers(0, 5), reverse=st.booleans(),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=9), chunks=st.integers(2, 5), f32=st.booleans(),
)
def test_random_configs_split_equals_one_chunk_and_reference(I, H, proj, reverse, lengths, chunks, f32):
    """Sizes around the micro-kernel's blocks (8 and 4 rows, 16/32 columns) and any split."""
    proj = proj if proj < H else 0
    dtype = torch.float32 if f32 else torch.float64
    args, (x, h0, c0, p) = _layer_numpy(lengths, I, H, proj, dtype, seed=I + H)
    one = _run_chunks(args, reverse, 1)
    split = _run_chunks(args, reverse, chunks)
    for a, b in zip(split, one):
        assert np.array_equal(a, b)
    y, h, c = reference.lstm_layer(x, args[1], h0, c0, p, reverse)
    for a, w in zip(one[:3], (y, h, c)):
        assert_close(torch.from_numpy(a), w.detach(), TOL[dtype])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("K,G", [(1, 1), (7, 33), (64, 512), (3, 17)])
def test_tile_matmul_matches_numpy(n, K, G):
    from lstmkit.kernels.numba.tile import WHOLE_K, matmul, pack, padded_width

    for dt, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        g = np.random.default_rng(n + K + G)
        a, w = g.standard_normal((n + 2, K)).astype(dt), g.standard_normal((G, K)).astype(dt)
        out = np.full((n + 2, padded_width(pack(w, True))), 7.0, dt)
        matmul(a, n, pack(w, True), out, False, WHOLE_K)
        assert np.abs(out[:n, :G] - a[:n] @ w.T).max() <= tol * max(1, K)
        assert (out[n:] == 7).all()  # rows past n untouched
        assert np.array_equal(pack(w.T.copy(), False), pack(w, True))


@pytest.fixture
def split_everything(monkeypatch):
    """Every call splits its rows, however small (the default keeps small calls on one thread)."""
    from lstmkit.kernels.numba import lstm as kernels

    monkeypatch.setattr(kernels, "MIN_SPLIT_MACS", 0)
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _train_step(m, x, hx, pack=None):
    """[y, h, c, y (no grad), dx, every parameter's grad] of one step; pack: input from padded x."""
    m.zero_grad()
    xx = x.clone().requires_grad_(True)
    y, (h, c) = m(pack(xx) if pack else xx, hx)
    y = y.data if hasattr(y, "batch_sizes") else y
    g = torch.Generator().manual_seed(1)
    ((y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + h.pow(2).sum() + c.sum()).backward()
    with torch.no_grad():
        yi = m(pack(x) if pack else x, hx)[0]
    yi = yi.data if hasattr(yi, "batch_sizes") else yi
    return [y.detach(), h.detach(), c.detach(), yi, xx.grad] + [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("N", [1, 2, 3, 5, 16])
def test_engine_deterministic_and_thread_counts_agree(N, split_everything):
    """The same input and thread count give bitwise the same outputs and gradients run after
    run; 1 and 2 threads agree to float32 rounding (the loop bitwise; the weight-gradient
    GEMMs may sum in another order)."""
    torch.manual_seed(N)
    m = lstmkit.LSTM(6, 20, num_layers=2, bidirectional=True, engine="numba")
    x = torch.randn(7, N, 6)
    runs = {}
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        got = _train_step(m, x, None)
        if threads in runs:
            for a, b in zip(got, runs[threads]):
                assert torch.equal(a, b)
        runs[threads] = got
    for a, b in zip(runs[1], runs[2]):
        assert_close(a, b, 1e-6)


def test_engine_packed_split_matches_torch(split_everything):
    """Packed, unsorted lengths that end inside a chunk, on 1 and 2 threads, against torch.nn.LSTM."""
    lengths = torch.tensor([3, 9, 1, 6, 6, 2, 9])
    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, bidirectional=True, proj_size=3, dtype=torch.float64)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = torch.randn(9, 7, 4, dtype=torch.float64)
    pack = lambda t: pack_padded_sequence(t, lengths, enforce_sorted=False)  # noqa: E731
    want = _train_step(ref, x, None, pack)
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        got = _train_step(ours, x, None, pack)
        for a, b in zip(got, want):
            assert_close(a, b, TOL[torch.float64])


def test_inference_weights_cache_follows_updates_and_dies_with_the_tensor():
    """The inference path's packed weights are rebuilt on an in-place update and never outlive
    their parameter."""
    import gc

    torch.manual_seed(0)
    ref = nn.LSTM(3, 4)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 3), torch.randn(2, 3)])  # not the fast path
    with torch.no_grad():
        assert_close(ours(x)[0].data, ref(x)[0].data, TOL[torch.float32])
        for m in (ref, ours):
            m.weight_hh_l0.add_(0.5)
        assert_close(ours(x)[0].data, ref(x)[0].data, TOL[torch.float32])
    slot = id(ours.weight_ih_l0)
    assert slot in binding._packs
    del ours, ref, m  # from_torch may share the parameters
    gc.collect()
    assert slot not in binding._packs


# ---- one time step (T = 1): GEMMs on the weights as they are, no packing ----------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# 3: every product in the kernels (STEP_KERNEL_MAX_ROWS, STEP_FORWARD_KERNEL_MAX_ROWS); 4: the
# forward's in its kernel, the backward's as torch GEMMs; 6 and 11: the forward's as torch GEMMs,
# the backward's too, or on the micro-kernel where the widths are whole column blocks
# (STEP_TILES_MAX_ROWS)
@pytest.mark.parametrize("N", [1, 3, 4, 6, 11])
@pytest.mark.parametrize("cfg", [
    dict(input_size=5, hidden_size=8),
    dict(input_size=5, hidden_size=8, bias=False),
    dict(input_size=4, hidden_size=6, proj_size=3),
    dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, proj_size=2, bias=False),
    dict(input_size=3, hidden_size=40, num_layers=2, bidirectional=True),  # float32: vector gate blocks
    # Widths of whole column blocks (32 float32, 16 float64): the backward's products on the
    # micro-kernel (step.times_w, outer_times), the others on loops.
    dict(input_size=32, hidden_size=48),
    dict(input_size=64, hidden_size=40, proj_size=32, num_layers=2, bidirectional=True),
])
@pytest.mark.parametrize("hx", [False, True])
def test_one_step_matches_torch(cfg, N, dtype, hx):
    """T = 1 (the step path, reverse direction included) against torch.nn.LSTM: outputs and the
    gradients of input, h0, c0 and every parameter."""
    ref, ours = pair(cfg, "numba", dtype, seed=N)
    g = torch.Generator().manual_seed(N)
    x = torch.randn(1, N, cfg["input_size"], generator=g, dtype=dtype)
    state = tuple(torch.randn(s, generator=g, dtype=dtype) for s in ours.config.state_shapes(N)) if hx else None
    run_differential(ref, ours, tensor_input(x), state, seed=N + 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("proj", [0, 3])
def test_one_step_training_forward_has_the_lane_bits(dtype, proj):
    """A recorded one-step forward of a few rows makes its products as the streaming lane's
    kernel (lstm.one_step_live) does, so a training step and an inference step of the same
    model and input give the same bits."""
    from lstmkit.kernels.numba.lstm import one_step_live

    m = lstmkit.LSTM(7, 36, proj_size=proj, engine="numba").to(dtype)
    N = binding.STEP_FORWARD_KERNEL_MAX_ROWS
    x = torch.randn(1, N, 7, dtype=dtype, requires_grad=True)
    state = tuple(torch.randn(s, dtype=dtype) for s in m.config.state_shapes(N))
    y, (h, c) = m(x, state)
    assert y.requires_grad
    w = [t.detach().numpy() for t in m.layer_params(0, 0)[:4]]
    w_hr = m.weight_hr_l0.detach().numpy() if proj else np.empty((0, 36), w[0].dtype)
    P = proj or 36
    yn, hn, cn = np.empty((1, N, P), w[0].dtype), np.empty((1, N, P), w[0].dtype), np.empty((1, N, 36), w[0].dtype)
    one_step_live(x.detach().numpy(), state[0].numpy(), state[1].numpy(), *w, w_hr, yn, hn, cn)
    assert np.array_equal(y.detach().numpy(), yn) and np.array_equal(h.detach().numpy(), hn)
    assert np.array_equal(c.detach().numpy(), cn)


def test_one_step_packed_and_unbatched_match_torch():
    """Packed sequences that are all one step long, and an unbatched (I,)-per-step input."""
    ref, ours = pair(dict(input_size=3, hidden_size=5, bidirectional=True), "numba", torch.float64)
    run_differential(ref, ours, packed_input([1, 1, 1, 1], 3, torch.float64))
    run_differential(ref, ours, tensor_input(torch.randn(1, 3, dtype=torch.float64)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [2, 11])
def test_one_step_partial_gradients_match_torch(dtype, N):
    """Only some inputs need gradients (frozen W_ih and b_hh, an input without grad, a loss on h_n and c_n only):
    the step backward leaves the others out and the rest still match torch.nn.LSTM."""
    ref, ours = pair(dict(input_size=4, hidden_size=6, proj_size=2), "numba", dtype)
    for m in (ref, ours):
        m.weight_ih_l0.requires_grad_(False)
        m.bias_hh_l0.requires_grad_(False)
    x = torch.randn(1, N, 4, dtype=dtype)
    h0 = torch.randn(1, N, 2, dtype=dtype, requires_grad=True)
    c0 = torch.randn(1, N, 6, dtype=dtype)
    grads = []
    for m in (ref, ours):
        m.zero_grad()
        _, (h, c) = m(x, (h0, c0))
        grads.append(torch.autograd.grad((c * c).sum() + h.sum(), [h0, m.weight_hh_l0, m.bias_ih_l0, m.weight_hr_l0]))
    for a, b, n in zip(grads[1], grads[0], ["h0", "w_hh", "b_ih", "w_hr"]):
        assert_close(a, b, TOL[dtype], f"grad {n}")


def _count_calls(monkeypatch, module, calls: dict, names: dict) -> None:
    """Wrap module.<attr> for each (attr -> counter name) in names, counting into calls."""
    for attr, name in names.items():
        fn = getattr(module, attr)

        def wrapped(*args, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*args)

        monkeypatch.setattr(module, attr, wrapped)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_row_sequences_take_the_few_steps_path_up_to_its_length_and_size(monkeypatch, threads):
    """One row a step (batch 1) takes the few-steps kernels, no layout of the weights, up to
    ONE_ROW_FEW_STEPS_MAX_STEPS steps where W_ih and W_hh fit in L2 (one thread) or in
    ONE_ROW_FEW_STEPS_MAX_BYTES_THREADED (more); longer calls, bigger weights and two rows
    take the time-loop kernels. Gradients match torch.nn.LSTM's either way."""
    from lstmkit.kernels.numba import caches

    monkeypatch.setattr(caches, "_l2", [2 << 20])
    calls = {"pack": 0, "few": 0}
    _count_calls(monkeypatch, binding, calls, {"pack_forward": "pack", "pack_backward": "pack",
                                               "steps_forward_kernel": "few", "steps_backward_kernel": "few"})
    T_max = binding.ONE_ROW_FEW_STEPS_MAX_STEPS
    weight_bytes = lambda H: (8 + H) * 4 * H * 4  # noqa: E731  (input 8, float32)
    assert weight_bytes(160) <= binding.ONE_ROW_FEW_STEPS_MAX_BYTES_THREADED < weight_bytes(300) <= 2 << 20 < weight_bytes(400)
    with torch_threads(threads):
        for T, N, H, few in [(T_max, 1, 160, True), (T_max + 1, 1, 160, False), (40, 2, 160, False),
                             (40, 1, 300, threads == 1), (40, 1, 400, False)]:
            calls.update(pack=0, few=0)
            torch.manual_seed(T + H)
            ref = torch.nn.LSTM(8, H)
            ours = lstmkit.LSTM.from_torch(ref, engine="numba")
            run_differential(ref, ours, tensor_input(torch.randn(T, N, 8)))
            # (the time loops lay the weights out by pack_forward / pack_backward, or by parts, or for MKL)
            assert (calls["few"] == 2 and calls["pack"] == 0) if few else calls["few"] == 0, (T, N, H, calls)


def test_one_step_takes_the_step_path_without_packing(monkeypatch):
    """T = 1 forward and backward run the step kernels and never lay the weights out for the
    time-loop kernels; a longer call still does. (The rules where torch's GEMMs are not MKL's:
    mkl.own_gemm, forced here on any CPU; MKL's are the next test's.)"""
    from lstmkit.engines.numba import mkl

    monkeypatch.setattr(mkl, "_own_gemm", [True])
    calls = {"pack": 0, "step_forward": 0, "step_forward_all": 0, "step_backward": 0, "step_backward_all": 0}
    _count_calls(monkeypatch, binding, calls, {
        "pack_forward": "pack", "pack_backward": "pack", "step_forward_kernel": "step_forward",
        "step_forward_all_kernel": "step_forward_all", "step_backward_kernel": "step_backward",
        "step_backward_all_kernel": "step_backward_all", "step_backward_tiles_kernel": "step_backward_all"})
    m = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, engine="numba")
    y, (h, c) = m(torch.randn(1, 2, 3))
    (y.sum() + c.sum()).backward()
    assert calls == {"pack": 0, "step_forward": 0, "step_forward_all": 4, "step_backward": 0, "step_backward_all": 4}
    N = binding.STEP_KERNEL_MAX_ROWS + 1  # more rows: the backward's products as torch GEMMs
    assert N <= binding.STEP_FORWARD_KERNEL_MAX_ROWS
    y, _ = m(torch.randn(1, N, 3))
    y.sum().backward()
    assert calls == {"pack": 0, "step_forward": 0, "step_forward_all": 8, "step_backward": 4, "step_backward_all": 4}
    N = binding.STEP_FORWARD_KERNEL_MAX_ROWS + 1  # more rows: the forward's products as torch GEMMs too
    y, _ = m(torch.randn(1, N, 3))
    y.sum().backward()
    assert calls == {"pack": 0, "step_forward": 4, "step_forward_all": 8, "step_backward": 8, "step_backward_all": 4}
    y, _ = m(torch.randn(binding.FEW_STEPS_MAX_ROWS // 2 + 1, 2, 3))  # the time-loop kernels
    y.sum().backward()
    assert calls["pack"] == 8 and calls["step_forward"] == 4
    wide = lstmkit.LSTM(32, 40, proj_size=32, engine="numba")  # whole column blocks: in the kernel, to more rows
    # (as once the tiles are compiled: in a cold start the compiling child may still be at them,
    # and the products then go to torch meanwhile, binding.step_tiles_ready)
    monkeypatch.setattr(binding, "step_tiles_ready", lambda: True)
    for N, kernel in ((binding.STEP_TILES_MAX_ROWS, 1), (binding.STEP_TILES_MAX_ROWS + 1, 0)):
        before = dict(calls)
        y, _ = wide(torch.randn(1, N, 32))
        y.sum().backward()
        assert calls["step_backward_all"] - before["step_backward_all"] == kernel
        assert calls["step_backward"] - before["step_backward"] == 1 - kernel


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hidden, rows, in_kernel", [
    (32, 1, True), (32, binding.MKL_STEP_KERNEL_MAX_ROWS, True),  # [W_ih | W_hh] of 32 KiB
    (32, 8, False),  # whole column blocks (the tiles elsewhere), but MKL's GEMMs past 4 rows
    (224, 1, False),  # 0.9 MiB of weights: MKL's GEMMs at any rows
])
def test_one_step_leaves_big_or_many_row_products_to_mkl(monkeypatch, hidden, rows, in_kernel, threads):
    """Where torch's GEMMs are MKL's (an Intel CPU; forced here on any CPU) the one-step products
    stay in the kernels at a few rows on small weights only (on one thread: the forward's to 24 rows
    there, the backward's at any rows and weights the tiles take), and the gradients still match."""
    from lstmkit.engines.numba import mkl

    monkeypatch.setattr(mkl, "_own_gemm", [False])
    monkeypatch.setattr(binding, "_step_tiles", [True])
    calls = {"forward_all": 0, "forward": 0, "backward_all": 0, "backward": 0}
    _count_calls(monkeypatch, binding, calls, {
        "step_forward_all_kernel": "forward_all", "step_forward_kernel": "forward",
        "step_backward_all_kernel": "backward_all", "step_backward_tiles_kernel": "backward_all",
        "step_backward_kernel": "backward"})
    ref, ours = pair(dict(input_size=32, hidden_size=hidden), "numba", torch.float32, seed=rows)
    x = torch.randn(1, rows, 32, generator=torch.Generator().manual_seed(rows))
    with torch_threads(threads):
        run_differential(ref, ours, tensor_input(x), None, seed=rows)
    backward_in_kernel = in_kernel or threads == 1
    forward_in_kernel = in_kernel or (threads == 1 and rows <= binding.MKL_ONE_THREAD_FORWARD_KERNEL_MAX_ROWS
                                      and 4 * hidden * (32 + hidden) * 4 < binding.MKL_STEP_KERNEL_MAX_WEIGHT_BYTES)
    assert (calls["forward_all"] > 0, calls["backward_all"] > 0) == (forward_in_kernel, backward_in_kernel)
    assert (calls["forward"] > 0, calls["backward"] > 0) == (not forward_in_kernel, not backward_in_kernel)


def test_one_step_backward_does_without_the_tiles_while_they_compile(monkeypatch):
    """A cold start's first steps, while the compiling child has not cached step_backward_tiles,
    take step_backward_all's loops: the same bits, and the tiles once they are there."""
    from lstmkit.kernels.numba import prefetch

    calls = {"loops": 0, "tiles": 0}
    _count_calls(monkeypatch, binding, calls, {"step_backward_all_kernel": "loops", "step_backward_tiles_kernel": "tiles"})
    m = lstmkit.LSTM(32, 32, engine="numba")  # whole column blocks: the tiles' path
    x = torch.randn(1, 3, 32)
    grads = []
    for child_compiling in (True, False):
        monkeypatch.setattr(binding, "_step_tiles", [False])
        monkeypatch.setattr(prefetch, "compiling", lambda name: child_compiling and name == "step.step_backward_tiles")
        xi = x.clone().requires_grad_(True)
        y, (h, c) = m(xi)
        grads.append(torch.autograd.grad(y.pow(2).sum() + c.sum(), [xi, *m.parameters()]))
    assert calls == {"loops": 1, "tiles": 1}
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_one_step_double_backward_matches_torch():
    """create_graph through a T = 1 call (a gradient penalty) matches torch.nn.LSTM."""
    ref, ours = pair(dict(input_size=3, hidden_size=4, proj_size=2), "numba", torch.float64)
    x = torch.randn(1, 2, 3, dtype=torch.float64)
    res = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        y, (h, c) = m(xi)
        (gx,) = torch.autograd.grad((y.pow(2).sum() + c.sum()), xi, create_graph=True)
        res.append(torch.autograd.grad(gx.pow(2).sum(), list(m.parameters())))
    for a, b in zip(res[1], res[0]):
        assert_close(a, b, TOL[torch.float64])


# ---- a few time steps of a few rows: the recurrent product on W_hh as it is ---------------------------
@given(
    I=st.integers(1, 5), H=st.integers(1, 20), proj=st.integers(0, 3), bias=st.booleans(), bidir=st.booleans(),
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=4), packed=st.booleans(), hx=st.booleans(),
    f32=st.booleans(),
)
def test_few_steps_match_torch(I, H, proj, bias, bidir, lengths, packed, hx, f32):
    """A few steps of a few rows (padded and packed unsorted, both directions; most of them up to
    FEW_STEPS_MAX_ROWS rows in all, the few-steps path) against torch.nn.LSTM: outputs and every
    gradient, the input's included."""
    dtype = torch.float32 if f32 else torch.float64
    cfg = dict(input_size=I, hidden_size=H, bias=bias, bidirectional=bidir, proj_size=proj if proj < H else 0)
    ref, ours = pair(cfg, "numba", dtype, seed=len(lengths))
    N = len(lengths)
    g = torch.Generator().manual_seed(H)
    state = tuple(torch.randn(s, generator=g, dtype=dtype) for s in ours.config.state_shapes(N)) if hx else None
    if packed:
        make = packed_input(lengths, I, dtype, seed=N)
    else:
        make = tensor_input(torch.randn(max(lengths), N, I, generator=g, dtype=dtype))
    run_differential(ref, ours, make, state, seed=N + 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H, proj", [(64, 0), (40, 32)])
def test_few_steps_on_whole_vector_rows_match_torch(dtype, H, proj):
    """The few-steps kernels where P is whole vector blocks (64 floats, or 32 with a projection:
    the row products' vector parts with no tail), over rows that end at different steps (packed
    unsorted), both directions, from a given state: outputs and every gradient vs torch.nn.LSTM."""
    cfg = dict(input_size=5, hidden_size=H, bidirectional=True, proj_size=proj)
    ref, ours = pair(cfg, "numba", dtype, seed=H)
    lengths = [3, 7, 5]
    assert sum(lengths) <= binding.FEW_STEPS_MAX_ROWS
    g = torch.Generator().manual_seed(proj)
    state = tuple(torch.randn(s, generator=g, dtype=dtype) for s in ours.config.state_shapes(len(lengths)))
    run_differential(ref, ours, packed_input(lengths, 5, dtype, seed=H), state, seed=proj)


def test_few_steps_take_their_path(monkeypatch):
    """Several steps over up to FEW_STEPS_MAX_ROWS rows in all run the few-steps kernels and never
    pack the weights; two rows more run the time-loop kernels (one row a step: the next test)."""
    calls = {"pack": 0, "steps_forward": 0, "steps_backward": 0}
    _count_calls(monkeypatch, binding, calls, {
        "pack_forward": "pack", "pack_backward": "pack",
        "steps_forward_kernel": "steps_forward", "steps_backward_kernel": "steps_backward"})
    m = lstmkit.LSTM(3, 4, bidirectional=True, engine="numba")
    rows = binding.FEW_STEPS_MAX_ROWS
    assert rows % 2 == 0
    for shape, want in (((2, 1, 3), (0, 2, 2)), ((rows // 2, 2, 3), (0, 4, 4)), ((rows // 2 + 1, 2, 3), (4, 4, 4))):
        y, _ = m(torch.randn(shape))
        y.sum().backward()
        assert (calls["pack"], calls["steps_forward"], calls["steps_backward"]) == want, shape


@pytest.mark.parametrize("T", [1, 3, 30])  # one step, few steps, the time loop
def test_loss_on_one_output_only_matches_torch(T):
    """Unused outputs' gradients arrive as None (not zeros) in the engine's backward: a loss on
    c_n alone, or on y alone, still gives torch.nn.LSTM's gradients on every path."""
    ref, ours = pair(dict(input_size=3, hidden_size=5, bidirectional=True), "numba", torch.float64)
    x = torch.randn(T, 2, 3, dtype=torch.float64)
    for pick in (lambda y, h, c: c.sum(), lambda y, h, c: y.pow(2).sum()):
        grads = []
        for m in (ref, ours):
            xi = x.clone().requires_grad_(True)
            y, (h, c) = m(xi)
            grads.append(torch.autograd.grad(pick(y, h, c), [xi, *m.parameters()]))
        for a, b in zip(grads[1], grads[0]):
            assert_close(a, b, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_input_projection_before_the_loop_matches_torch(dtype, threads, split_everything, monkeypatch):
    """The paths that compute x W_ih^T + b as one GEMM before the time loop and dx = dgates W_ih
    after the backward's (taken for big weights, kernels' precompute_input and dx_after_loop)
    forced on for every call: training step and
    inference (the runtime) against torch.nn.LSTM, packed unsorted, bidirectional with
    projection, every row split."""
    from lstmkit.kernels.numba import lstm as kernels

    monkeypatch.setattr(kernels, "PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW", 0)
    monkeypatch.setattr(kernels, "PRECOMPUTE_MIN_WEIGHT_BYTES_PER_ROW_BLAS", 0)
    monkeypatch.setattr(kernels, "PRECOMPUTE_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(kernels, "weights_stay_in_l2", lambda nbytes, rows: False)
    monkeypatch.setattr(kernels, "DX_AFTER_MIN_WEIGHT_BYTES", 0)
    calls = []
    real = binding.input_projection
    monkeypatch.setattr(binding, "input_projection", lambda *a: calls.append(1) or real(*a))
    packed_with_input = []
    real_bw = binding.backward_weights
    monkeypatch.setattr(binding, "backward_weights", lambda p, with_input=True, *rest: packed_with_input.append(
                        with_input) or real_bw(p, with_input, *rest))
    torch.set_num_threads(threads)
    lengths = torch.tensor([3, 9, 1, 6, 6, 2, 9])
    torch.manual_seed(threads)
    ref = nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=4, dtype=dtype)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = torch.randn(9, 7, 5, dtype=dtype)
    pack = lambda t: pack_padded_sequence(t, lengths, enforce_sorted=False)  # noqa: E731
    for packer in (None, pack):
        want = _train_step(ref, x, None, packer)
        got = _train_step(ours, x, None, packer)
        for a, b in zip(got, want):
            assert_close(a, b, TOL[dtype])
    assert len(calls) >= 2 * 4 * 2  # both passes (train + no-grad) of 4 layer-directions, twice
    assert packed_with_input and not any(packed_with_input)  # every backward made dx after its loop


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [1, 2])
def test_one_or_two_rows_make_the_input_part_ahead_and_match_torch(dtype, N, monkeypatch):
    """Batch 1-2: x W_ih^T + b made in the loop, 16 rows ahead (kernels' lookahead_steps), never
    as a GEMM before it, on weights in L1, in L2 and past it, in training and in inference (the
    runtime), padded and packed (a row that ends inside a block of steps ahead), matching
    torch.nn.LSTM; the module's state fed back step by step gives the same as the whole call."""
    from lstmkit.kernels.numba.lstm import LOOKAHEAD_ROWS, lookahead_steps

    assert lookahead_steps(N, N) == LOOKAHEAD_ROWS // N and lookahead_steps(3, 1) == 0
    calls = []
    real = binding.input_projection
    monkeypatch.setattr(binding, "input_projection", lambda *a: calls.append(1) or real(*a))
    for I, H in ((128, 32), (64, 128), (96, 384)):  # W 80 KiB, 384 KiB, 2.6 MiB in float32
        torch.manual_seed(N + H)
        ref = nn.LSTM(I, H, dtype=dtype)
        ours = lstmkit.LSTM.from_torch(ref, engine="numba")
        x = torch.randn(37, N, I, dtype=dtype)
        with torch_threads(1):
            for a, b in zip(_train_step(ours, x, None, None), _train_step(ref, x, None, None)):
                assert_close(a, b, TOL[dtype])
            lengths = torch.tensor([37, 21][:N])
            for module in (ours, ref):
                packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
                with torch.no_grad():
                    out = module(packed)
                if module is ours:
                    got = out
            assert_close(got[0].data, out[0].data, TOL[dtype])
            assert_close(got[1][0], out[1][0], TOL[dtype])
            with torch.no_grad():
                whole = ours(x)
                assert_close(whole[0], ref(x)[0], TOL[dtype])
                state, steps = None, []
                for t in range(0, 37, 5):
                    y, state = ours(x[t : t + 5], state)
                    steps.append(y)
            assert_close(torch.cat(steps), whole[0], TOL[dtype])
        assert not calls, (I, H)


def _compare_training_steps(ours, ref, x, threads: int, input_grad: bool):
    """A training step of ours and of ref (2 layers) on x (L, N, I), padded and then packed unsorted
    (random lengths, one of L), from one random state, at `threads` threads: the gradients of the
    state, of x where input_grad, and of every parameter that asks for one, against each other."""
    L, N = x.shape[:2]
    lengths = torch.randint(1, L + 1, (N,))
    lengths[0] = L
    with torch_threads(threads):
        for packed in (False, True):
            grads = []
            state = torch.randn(2, 2, N, ref.hidden_size, dtype=x.dtype)
            for m in (ours, ref):
                m.zero_grad()
                xg = x.clone().requires_grad_(input_grad)
                h0, c0 = (s.clone().requires_grad_(True) for s in state)
                inp = pack_padded_sequence(xg, lengths, enforce_sorted=False) if packed else xg
                y, (h, c) = m(inp, (h0, c0))
                ((y.data if packed else y).square().sum() + h.sum() + c.square().sum()).backward()
                grads.append(([xg.grad] if input_grad else []) + [h0.grad, c0.grad]
                             + [p.grad for p in m.parameters() if p.requires_grad])
            assert len(grads[0]) == len(grads[1])
            for a, b in zip(*grads):
                assert_close(a, b, TOL[x.dtype])


@pytest.mark.parametrize("threads,hidden,N", [(1, 7, 5), (1, 96, 6), (2, 96, 2), (2, 160, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_input_without_grad_skips_dx(threads, hidden, N, dtype, monkeypatch):
    """An input of data (no requires_grad) asks for no dx: the time loop's backward leaves W_ih out
    of its step products and makes no dx after it (layer_backward's needs). Every gradient asked
    for (the weights', h0's, c0's) matches torch.nn.LSTM, padded and packed unsorted, with the
    rows split, the units split (2 threads, 2 rows) and the wide split (2 threads, 12 rows);
    a second layer's input still gets its gradient."""
    packed_with_input, dx_products = [], []
    real_bw = binding.backward_weights
    monkeypatch.setattr(binding, "backward_weights", lambda p, with_input=True, *rest: packed_with_input.append(
                        with_input) or real_bw(p, with_input, *rest))
    real_lb = numba_engine.layer_backward

    def layer_backward(*a, **k):
        out = real_lb(*a, **k)
        dx_products.append(out[0] is not None)
        return out

    monkeypatch.setattr(numba_engine, "layer_backward", layer_backward)
    torch.manual_seed(N)
    ref = nn.LSTM(8, hidden, num_layers=2, dtype=dtype)
    _compare_training_steps(lstmkit.LSTM.from_torch(ref, engine="numba"), ref, torch.randn(6, N, 8, dtype=dtype),
                            threads, input_grad=False)
    assert dx_products == [True, False] * 2  # per step: layer 1 (its input needs it), then layer 0
    if packed_with_input:  # the rows split, layer 1's backward then layer 0's, per step: layer 0 packed
        assert not any(packed_with_input[1::2])  # W_hh alone (no dx), layer 1 W_ih too where its dx
        assert all(packed_with_input[0::2]) == (hidden == 7)  # is in the loop


@pytest.mark.parametrize("threads,hidden,N", [(1, 7, 5), (1, 96, 6), (2, 96, 2), (2, 160, 12)])
def test_a_frozen_lstm_makes_no_weight_gradients(threads, hidden, N, monkeypatch):
    """Parameters with requires_grad=False (a frozen LSTM under a trained head and embedding):
    the time loop's backward makes no weight-gradient GEMMs, and dx, dh0, dc0 match
    torch.nn.LSTM, padded and packed unsorted, rows, units and wide splits."""
    made = []
    real_wg = binding.weight_gradients
    monkeypatch.setattr(binding, "weight_gradients", lambda *a: made.append(1) or real_wg(*a))
    torch.manual_seed(N)
    ref = nn.LSTM(8, hidden, num_layers=2).requires_grad_(False)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba").requires_grad_(False)
    _compare_training_steps(ours, ref, torch.randn(6, N, 8), threads, input_grad=True)
    assert all(p.grad is None for p in ours.parameters())
    assert not made


def test_a_frozen_variant_lstm_makes_no_weight_gradients(monkeypatch):
    """The variant kernel's backward (layer norm, peepholes) for a frozen LSTM: no
    weight-gradient GEMMs, and dx, dh0, dc0 equal the reference engine's (float64)."""
    from lstmkit.engines.numba import variants as numba_variants

    made = []
    real_wg = numba_variants.weight_gradients
    monkeypatch.setattr(numba_variants, "weight_gradients", lambda *a, **k: made.append(1) or real_wg(*a, **k))
    torch.manual_seed(0)
    kw = dict(num_layers=2, layer_norm=True, peephole=True, proj_size=3, dtype=torch.float64)
    ours = lstmkit.LSTM(4, 6, engine="numba", **kw).requires_grad_(False)
    ref = lstmkit.LSTM(4, 6, engine="reference", **kw).requires_grad_(False)
    ref.load_state_dict(ours.state_dict())
    x, state = torch.randn(7, 3, 4, dtype=torch.float64), torch.randn(2, 2, 3, 6, dtype=torch.float64)
    grads = []
    for m in (ours, ref):
        xg = x.clone().requires_grad_()
        h0, c0 = state[0][..., :3].clone().requires_grad_(), state[1].clone().requires_grad_()
        y, (h, c) = m(xg, (h0, c0))
        (y.square().sum() + h.sum() + c.square().sum()).backward()
        grads.append([xg.grad, h0.grad, c0.grad])
    for a, b in zip(*grads):
        assert_close(a, b, TOL[torch.float64])
    assert not made and all(p.grad is None for p in ours.parameters())


def test_the_input_gemm_rule(monkeypatch):
    """kernels' precompute_input: weight bytes per row of a chunk, whatever the rows (the big
    shapes of the bench's --extra gained 5-10 % from it on the micro-kernel), never for one step,
    for calls of 1-2 rows (their loop makes the input part ahead) or for weights that stay in L2
    (but at 1-2 rows a chunk of a bigger call, where W_hh stays in L1); with the products on
    MKL, from far more bytes a row. On a core with 1.25 MiB of L2."""
    from lstmkit.kernels.numba import caches
    from lstmkit.kernels.numba.lstm import precompute_input

    monkeypatch.setattr(caches, "_l2", [1280 << 10])

    assert precompute_input(64, 50, 512, 1024, 1024, 4, 1)  # 24 MiB over 64 rows
    assert precompute_input(128, 20, 256, 2048, 2048, 4, 2)  # 72 MiB over 64 rows a chunk
    assert precompute_input(16, 64, 256, 256, 256, 4, 1)  # the demo's second layer, 2 MiB over 16 rows
    assert not precompute_input(32, 64, 256, 256, 256, 4, 1)  # ... over 32 rows
    assert not precompute_input(32, 100, 128, 256, 256, 4, 1)
    assert not precompute_input(256, 100, 64, 128, 128, 4, 2)
    assert not precompute_input(1, 1, 512, 1024, 1024, 4, 1)  # one step
    # Weights that stay in L2 (up to 1 MiB): fused at any rows; above, by the bytes a row.
    assert not precompute_input(1, 100, 64, 128, 128, 4, 1)  # 384 KiB over one row
    assert not precompute_input(2, 100, 96, 192, 192, 4, 1)  # 864 KiB
    assert not precompute_input(1, 100, 128, 256, 256, 4, 1)  # 1.5 MiB over one row: made ahead in the loop
    assert precompute_input(8, 200, 128, 256, 256, 4, 2)  # ... over 4 rows a chunk
    # Fused products on MKL's packed GEMM (blas): from 1 MiB a row only.
    assert precompute_input(16, 100, 128, 1024, 1024, 4, 1, blas=True)  # 18 MiB over 16 rows
    assert not precompute_input(64, 50, 512, 1024, 1024, 4, 1, blas=True)  # 24 MiB over 64 rows
    assert not precompute_input(32, 100, 128, 512, 512, 4, 1, blas=True)
    assert not precompute_input(16, 64, 256, 256, 256, 4, 1, blas=True)  # the demo's second layer at 2 threads
    assert not precompute_input(32, 64, 256, 256, 256, 4, 2, blas=True)  # ... as two chunks of 16 rows
    # W_hh in L2 (up to 1 MiB), [W_ih | W_hh] past it: from 160 KiB a row, 128 KiB a row when split.
    assert precompute_input(12, 64, 256, 256, 256, 4, 1, blas=True)  # 2 MiB over 12 rows
    assert precompute_input(4, 64, 256, 192, 192, 4, 1, blas=True)  # 1.5 MiB over 4 rows
    assert precompute_input(16, 64, 256, 256, 256, 4, 2, blas=True)  # 2 MiB over two chunks of 8 rows
    assert precompute_input(32, 64, 512, 256, 256, 4, 2, blas=True)  # 3 MiB over 16 rows a chunk
    assert precompute_input(4, 64, 64, 256, 256, 4, 1, blas=True)  # 1.25 MiB over 4 rows
    assert not precompute_input(8, 64, 64, 256, 256, 4, 1, blas=True)  # ... over 8 rows: 160 KiB a row
    assert not precompute_input(4, 64, 16, 240, 240, 4, 1, blas=True)  # 960 KiB: stays in L2, fused
    assert not precompute_input(4, 64, 128, 384, 384, 4, 1, blas=True)  # W_hh of 2.25 MiB: 1 MiB a row
    # Calls of one or two rows on the micro-kernel make the input part ahead in their loop
    # (lstm.lookahead_steps), whatever the weights.
    for I, H in ((32, 64), (128, 128), (64, 128), (32, 32), (128, 512)):
        assert not precompute_input(1, 1000, I, H, H, 4, 1) and not precompute_input(2, 300, I, H, H, 4, 1)
    assert not precompute_input(2, 1000, 32, 64, 64, 4, 2)  # ... one row a chunk
    # One or two rows a chunk of a call of more: W_hh in L1 between steps (up to 64 KiB) and
    # [W_ih | W_hh] past it (48 KiB); or at one row, an input at least as wide as the hidden state.
    assert precompute_input(3, 1000, 32, 64, 64, 4, 3)  # W_hh 64 KiB, W 96 KiB, one row a chunk
    assert not precompute_input(3, 1000, 32, 32, 32, 4, 3)  # W 32 KiB: all in L1
    assert not precompute_input(3, 1000, 64, 32, 32, 4, 3)  # W 48 KiB: all in L1
    assert not precompute_input(3, 1000, 32, 64, 64, 8, 3)  # float64: W_hh 128 KiB, input narrower
    assert precompute_input(3, 300, 128, 128, 128, 4, 3)  # W_hh 256 KiB, input as wide
    assert not precompute_input(3, 300, 64, 128, 128, 4, 3)  # ... narrower
    assert precompute_input(4, 300, 64, 64, 64, 4, 2)  # two rows a chunk: W_hh 64 KiB, W_ih 64 KiB
    assert not precompute_input(4, 300, 32, 64, 64, 4, 2)  # ... W_ih 32 KiB
    assert not precompute_input(4, 300, 128, 128, 128, 4, 2)  # ... W_hh 256 KiB
    assert not precompute_input(3, 300, 256, 32, 32, 4, 1)  # three rows: the general rule
    assert not precompute_input(1, 1, 128, 64, 64, 4, 1)  # one step
    assert not precompute_input(1, 1000, 32, 64, 64, 4, 1, blas=True)  # products on MKL: the general rule
    assert not precompute_input(1, 1000, 32, 64, 64, 4, 1, few_rows=False)  # the variant kernels: likewise


def test_the_input_gemm_rule_keeps_weights_in_a_bigger_l2_fused_from_8_rows(monkeypatch):
    """With 2 MiB of L2 a core, weights up to three quarters of it (1.5 MiB) stay fused with the
    input at 8 rows a chunk and more; at fewer rows the GEMM first still pays (kernels' rule)."""
    from lstmkit.kernels.numba import caches
    from lstmkit.kernels.numba.lstm import precompute_input

    monkeypatch.setattr(caches, "_l2", [2 << 20])
    assert not precompute_input(8, 100, 128, 256, 256, 4, 1)  # 1.5 MiB over 8 rows
    assert not precompute_input(24, 100, 128, 256, 256, 4, 2)  # ... two chunks of 12
    assert precompute_input(4, 100, 128, 256, 256, 4, 1)  # ... over 4 rows
    assert precompute_input(4, 100, 128, 256, 256, 4, 2)  # ... two chunks of 2
    assert not precompute_input(1, 100, 128, 256, 256, 4, 1)  # ... one row: made ahead in the loop
    assert precompute_input(8, 100, 192, 256, 256, 4, 1)  # 1.75 MiB over 8 rows: past 3/4 of L2
    monkeypatch.setattr(caches, "_l2", [1280 << 10])
    assert precompute_input(8, 100, 128, 256, 256, 4, 1)  # 1.25 MiB of L2: 1.5 MiB over 8 rows


@pytest.mark.parametrize("variant, proj_size", [({}, 0), ({}, 3), ({"layer_norm": True, "peephole": True}, 0)])
def test_scratch_buffers_never_reach_what_a_backward_returns(variant, proj_size):
    """The backward's temporaries live in per-thread buffers reused by the next call
    (binding.scratch): gradients kept from one backward stay as they were after a second,
    different backward of the same shapes, and match torch's (variants: the reference engine)."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, proj_size=proj_size)
    ours = lstmkit.LSTM(6, 8, engine="numba", dtype=torch.float64, **kw, **variant)
    oracle = (lstmkit.LSTM(6, 8, engine="reference", dtype=torch.float64, **kw, **variant) if variant
              else nn.LSTM(6, 8, dtype=torch.float64, **kw))
    oracle.load_state_dict(ours.state_dict())
    xs = [torch.randn(30, 5, 6, dtype=torch.float64), torch.randn(30, 5, 6, dtype=torch.float64) * 3]
    kept = []
    for x in xs:
        x_ours = x.clone().requires_grad_()
        y, _ = ours(x_ours)
        grads = torch.autograd.grad(y.square().sum(), [x_ours, *ours.parameters()])
        kept.append((x, grads, [g.clone() for g in grads]))
    for x, grads, copies in kept:
        for g, c in zip(grads, copies):
            assert torch.equal(g, c)  # untouched by the later call
        x_ref = x.clone().requires_grad_()
        y, _ = oracle(x_ref)
        want = torch.autograd.grad(y.square().sum(), [x_ref, *oracle.parameters()])
        for g, w in zip(grads, want):
            assert_close(g, w, TOL[torch.float64])
    assert binding._scratch_pool.__dict__  # the buffers exist: this test covers them


def test_scratch_keeps_a_buffer_per_thread_and_name():
    b = binding.scratch("test_buffer", (2, 5), np.float64)
    a = binding.scratch("test_buffer", (3, 4), np.float32)
    assert a.shape == (3, 4) and b.shape == (2, 5) and b.dtype == np.float64 and a.flags.c_contiguous
    assert np.shares_memory(a, b)  # the same buffer, big enough for both
    grown = binding.scratch("test_buffer", (4, 5), np.float64)
    assert not np.shares_memory(grown, b) and np.shares_memory(grown, binding.scratch("test_buffer", (1,), np.int8))
    other = []
    import threading

    t = threading.Thread(target=lambda: other.append(binding.scratch("test_buffer", (3, 4), np.float32)))
    t.start()
    t.join()
    assert not np.shares_memory(a, other[0])  # another thread's own
    big = binding.SCRATCH_MAX_BYTES // 4 + 1
    assert not np.shares_memory(binding.scratch("test_buffer", (big,), np.float32),
                                binding.scratch("test_buffer", (big,), np.float32))  # not kept


@pytest.mark.parametrize("cfg", [
    dict(input_size=5, hidden_size=40),
    dict(input_size=4, hidden_size=6, proj_size=3, num_layers=2),
    dict(input_size=3, hidden_size=9, bidirectional=True, bias=False),
])
@pytest.mark.parametrize("N", [4, 9, 16])
def test_float32_without_mkl_runs_the_micro_kernel_and_matches_nn_lstm(monkeypatch, cfg, N):
    """Where torch's library has no MKL packed GEMM (or LSTMKIT_MKL=0), every float32 product is
    the micro-kernel's (tile.py: 8- and 4-row tiles here), which on this project's machines the
    forward of 4+ rows leaves to MKL: training, inference and packed input against nn.LSTM."""
    from lstmkit.engines.numba import mkl

    monkeypatch.setattr(mkl, "_entry", [None])
    packings = []
    real = mkl.pack
    monkeypatch.setattr(mkl, "pack", lambda *a: packings.append(1) or real(*a))
    ref, ours = pair(cfg, "numba", torch.float32)
    x = torch.randn(7, N, cfg["input_size"])
    run_differential(ref, ours, tensor_input(x))
    with torch.no_grad():
        assert_close(ours(x)[0], ref(x)[0], TOL[torch.float32])
        lengths = torch.arange(N, 0, -1).clamp(max=7)
        xp = pack_padded_sequence(x, lengths, enforce_sorted=False)
        assert_close(ours(xp)[0].data, ref(xp)[0].data, TOL[torch.float32])
    assert not packings
