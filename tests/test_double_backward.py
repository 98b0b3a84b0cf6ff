"""Double backward (create_graph=True) on every engine and variant, for LSTM and LSTMCell.

The fused engines compute the single backward with kernels autograd cannot see through;
when that backward is itself differentiated, engines/double_backward.py recomputes it
with differentiable ops. These tests check the second derivatives numerically
(gradgradcheck, float64) and against torch.nn.LSTM / nn.LSTMCell's own double backward
(a gradient-penalty loss), and that the plain backward never takes the slow path.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from harness import TOL, assert_close
from lstmkit.engines import double_backward

ENGINES = ["reference", "numba", "triton"]  # triton: in the interpreter (conftest sets TRITON_INTERPRET)
F64 = torch.float64


def _as_function(module, packed_lengths=None, seed=None):
    """f(x, h0, c0, *params) -> (y, h_n, c_n) of `module`, for gradcheck. With `seed`, every
    call draws the same random masks (zoneout, dropouts), so f is a deterministic function."""
    names = [n for n, _ in module.named_parameters()]

    def f(x, h0, c0, *params):
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            inp = x
            if packed_lengths is not None:
                inp = pack_padded_sequence(x, torch.tensor(packed_lengths), enforce_sorted=False)
            y, (h, c) = functional_call(module, dict(zip(names, params)), (inp, (h0, c0)))
        return (y.data if packed_lengths is not None else y), h, c

    return f


def _inputs(module, L, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = module.config
    h_shape, c_shape = cfg.state_shapes(N)
    x = torch.randn(L, N, cfg.input_size, generator=g, dtype=F64, requires_grad=True)
    h0 = torch.randn(h_shape, generator=g, dtype=F64, requires_grad=True)
    c0 = torch.randn(c_shape, generator=g, dtype=F64, requires_grad=True)
    return (x, h0, c0, *module.parameters())


def _make(engine, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("input_size", 2)
    kw.setdefault("hidden_size", 2)
    return lstmkit.LSTM(**kw, dtype=F64, engine=engine)


def _check_second_order(f, inputs, fast):
    # Full Jacobians for the small plain cases; fast_mode (a random projection of the same
    # Jacobians, which still catches a backward treated as constant) where the full ones cost
    # minutes: the interpreted Triton kernels and the variants' many parameters.
    assert gradcheck(f, inputs, fast_mode=fast)
    assert gradgradcheck(f, inputs, fast_mode=fast)


CONFIGS = {
    "plain": dict(),
    "proj_size": dict(hidden_size=3, proj_size=2),
    "bidirectional": dict(bidirectional=True),
    "two_layers_no_bias": dict(num_layers=2, bias=False),
}


# The fused engines share the differentiable recomputation; what is engine-specific is the hook
# in each autograd Function, so the interpreted (slow) Triton engine runs the plain case here and
# the bidirectional packed case below.
LSTM_CASES = [(e, c) for e in ("reference", "numba") for c in CONFIGS] + [("triton", "plain")]


@pytest.mark.parametrize("engine, config", LSTM_CASES)
def test_gradgradcheck_lstm(engine, config):
    m = _make(engine, **CONFIGS[config])
    _check_second_order(_as_function(m), _inputs(m, L=2, N=2), fast=engine == "triton")


@pytest.mark.parametrize("engine", ENGINES)
def test_gradgradcheck_packed(engine):
    m = _make(engine, bidirectional=True)
    _check_second_order(_as_function(m, packed_lengths=[1, 3, 2]), _inputs(m, L=3, N=3), fast=engine == "triton")


VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout": dict(zoneout=(0.3, 0.4)),
    "recurrent_dropout": dict(recurrent_dropout=0.5),
    "weight_drop": dict(weight_drop=0.5),
    "forget_bias": dict(forget_bias=1.0),
    "all_with_proj_bidir": dict(layer_norm=True, peephole=True, zoneout=0.3, recurrent_dropout=0.3,
                                weight_drop=0.3, proj_size=1, bidirectional=True),
}


# The reference engine is plain autograd: one combined case; the fused numba variant engine:
# each variant, in training (masks drawn) and, where eval computes something else, in eval.
VARIANT_CASES = [("numba", v, True) for v in VARIANTS] + [
    ("numba", "zoneout", False), ("numba", "layer_norm", False), ("reference", "layer_norm", True)]


@pytest.mark.parametrize("engine, variant, training", VARIANT_CASES)
def test_gradgradcheck_variants(engine, variant, training):
    m = _make(engine, **VARIANTS[variant]).train(training)
    f = _as_function(m, packed_lengths=[2, 1] if variant == "all_with_proj_bidir" else None, seed=3)
    _check_second_order(f, _inputs(m, L=2, N=2), fast=True)


def test_gradgradcheck_variants_triton_falls_back_differentiably(monkeypatch):
    import lstmkit.engines as engines

    # The fallback warns once per process: forget earlier tests' warning (order must not matter).
    monkeypatch.setattr(engines, "_warned_variant_fallback", set())
    m = _make("triton", layer_norm=True, zoneout=0.3, hidden_size=3, proj_size=2)
    with pytest.warns(UserWarning, match="reference engine"):
        m(torch.randn(1, 1, 2, dtype=F64))
    _check_second_order(_as_function(m, seed=1), _inputs(m, L=2, N=1), fast=True)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck_cell(engine, bias):
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(2, 3, bias=bias, dtype=F64, engine=engine)
    names = [n for n, _ in cell.named_parameters()]
    g = torch.Generator().manual_seed(1)
    x, h0, c0 = (torch.randn(2, k, generator=g, dtype=F64, requires_grad=True) for k in (2, 3, 3))

    def f(x, h0, c0, *params):
        return functional_call(cell, dict(zip(names, params)), (x, (h0, c0)))

    _check_second_order(f, (x, h0, c0, *cell.parameters()), fast=engine == "triton")


def test_gradgradcheck_compile_op():
    """The torch.library op torch.compile uses has a differentiable backward too."""
    from lstmkit.engines.base import LayerParams
    from lstmkit.engines.numba import compile_ops

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64, requires_grad=True)  # noqa: E731
    H, P = 3, 2
    inputs = (r(5, 2), r(2, P), r(2, H), r(4 * H, 2), r(4 * H, P), r(4 * H), r(4 * H), r(P, H))

    def f(x, h0, c0, *w):
        return compile_ops.lstm_layer(x, [2, 2, 1], h0, c0, LayerParams(*w), reverse=True)

    _check_second_order(f, inputs, fast=False)


# ---- against torch.nn.LSTM's own double backward: a gradient penalty -----------------------------
def _penalty_grads(module, inp, state, leaves):
    """d/d(leaves) of  loss + |d loss / d(x, params)|^2,  loss = a fixed random projection of
    the outputs: the WGAN-GP / gradient-penalty pattern, create_graph=True."""
    out, (h, c) = module(inp, state)
    y = out.data if hasattr(out, "batch_sizes") else out
    g = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (y, h, c))
    params = list(module.parameters())
    first = torch.autograd.grad(loss, [leaves[0], *params], create_graph=True)
    penalty = loss + sum(d.square().sum() for d in first)
    return torch.autograd.grad(penalty, leaves + params)


PENALTY_CONFIGS = {
    "plain": dict(input_size=3, hidden_size=4),
    "proj_bidir_2layers": dict(input_size=3, hidden_size=4, proj_size=2, bidirectional=True, num_layers=2),
    "batch_first_no_bias": dict(input_size=3, hidden_size=4, batch_first=True, bias=False),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", list(PENALTY_CONFIGS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradient_penalty_matches_torch(engine, config, packed):
    cfg = PENALTY_CONFIGS[config]
    torch.manual_seed(0)
    ref = nn.LSTM(**cfg, dtype=F64)
    ours = lstmkit.LSTM.from_torch(ref, engine=engine)
    g = torch.Generator().manual_seed(1)
    L, N = 4, 3
    batch_first = cfg.get("batch_first", False)
    x0 = torch.randn((N, L, 3) if batch_first else (L, N, 3), generator=g, dtype=F64)
    h_shape = ((2 if cfg.get("bidirectional") else 1) * cfg.get("num_layers", 1), N)
    h00 = torch.randn(*h_shape, cfg.get("proj_size") or 4, generator=g, dtype=F64)
    c00 = torch.randn(*h_shape, 4, generator=g, dtype=F64)
    results = []
    for m in (ref, ours):
        x, h0, c0 = (t.clone().requires_grad_(True) for t in (x0, h00, c00))
        inp = pack_padded_sequence(x, torch.tensor([4, 2, 3]), batch_first=batch_first,
                                   enforce_sorted=False) if packed else x
        results.append(_penalty_grads(m, inp, (h0, c0), [x, h0, c0]))
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert_close(b, a, TOL[F64])


@pytest.mark.parametrize("engine", ENGINES)
def test_cell_gradient_penalty_matches_torch(engine):
    torch.manual_seed(0)
    ref = nn.LSTMCell(3, 4, dtype=F64)
    ours = lstmkit.LSTMCell(3, 4, dtype=F64, engine=engine)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x0, h00, c00 = (torch.randn(2, k, generator=g, dtype=F64) for k in (3, 4, 4))
    results = []
    for m in (ref, ours):
        x, h0, c0 = (t.clone().requires_grad_(True) for t in (x0, h00, c00))
        h, c = m(x, (h0, c0))
        h2, c2 = m(h.tanh()[:, :3] + x, (h, c))  # two steps, so the recurrence is differentiated too
        loss = (h2 * torch.linspace(-1, 1, 4, dtype=F64)).sum() + c2.sum()
        first = torch.autograd.grad(loss, [x, *m.parameters()], create_graph=True)
        penalty = sum(d.square().sum() for d in first)
        results.append(torch.autograd.grad(penalty, [x, h0, c0, *m.parameters()]))
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert_close(b, a, TOL[F64])


def test_hessian_vector_product_matches_torch():
    """A Hessian-vector product w.r.t. the weights (the MAML / second-order optimizer pattern)."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, dtype=F64)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = torch.randn(5, 2, 3, dtype=F64)
    vs = [torch.randn_like(p) for p in ref.parameters()]
    hvps = []
    for m in (ref, ours):
        params = list(m.parameters())
        loss = m(x)[0].square().sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hvps.append(torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), params))
    assert len(hvps[0]) == len(hvps[1])
    for a, b in zip(*hvps):
        assert_close(b, a, TOL[F64])


# ---- the plain training step stays fused ----------------------------------------------------------
@pytest.mark.parametrize("engine", ["numba", "triton"])
@pytest.mark.parametrize("kw", [dict(), dict(layer_norm=True)], ids=["plain", "layer_norm"])
def test_single_backward_never_recomputes(engine, kw, monkeypatch):
    calls = []
    real = double_backward.differentiable_backward

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    for mod in _engine_modules():
        monkeypatch.setattr(mod, "differentiable_backward", counting)
    m = _make(engine, **kw)
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    m(x)[0].sum().backward()
    assert calls == []
    torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    if not (engine == "triton" and kw):  # triton hands variants to the reference engine: nothing fused
        assert calls and set(calls) == {engine}


def _engine_modules():
    from lstmkit.engines.numba import compile_ops, engine, variants
    from lstmkit.engines.triton import engine as triton_engine

    return [engine, variants, compile_ops, triton_engine]


def test_not_twice_differentiable_error_names_engine_and_alternative():
    err = double_backward.not_twice_differentiable("numba", "some reason")
    assert isinstance(err, RuntimeError)
    assert "engine='numba'" in str(err) and "engine='reference'" in str(err) and "some reason" in str(err)


def test_saved_input_without_graph_raises_clear_error():
    """differentiable_backward refuses, with the engine's name, instead of returning a
    gradient without a graph when asked for a gradient of an input that lost its graph."""
    x = torch.randn(2, 2, dtype=F64)  # requires_grad=False, but the caller says it needs a grad
    h0 = c0 = torch.zeros(1, 2, dtype=F64)
    w = [torch.randn(8, 2, dtype=F64, requires_grad=True) for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"engine='triton'.*engine='reference'"):
        double_backward.differentiable_backward(
            "triton", (x, h0, c0, *w, None, None, None), (torch.ones(2, 2, dtype=F64), None, None),
            [1, 1], False, [True] + [False] * 7)
