"""LSTM variants (layer_norm, peephole, zoneout, recurrent_dropout, weight_drop, forget_bias).

The oracle is `loop_lstm` below: a plain per-step loop over padded (T, N, .) tensors that
writes each formula out by hand (layer norm with its mean and variance too). The module
draws its random masks in lstmkit.nn.variants; the tests record them (see `recorded`) and
feed the very same masks to the oracle.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstmkit
from lstmkit.nn import variants
from lstmkit.config import LSTMConfig
from lstmkit.engines import LayerParams, reference
from lstmkit.nn.variants import LayerVariant

from harness import TOL, TOL_SAME_KERNELS, assert_all_close, assert_close

ENGINES = ["reference", "numba"]
SAME = TOL_SAME_KERNELS[torch.float64]


# ---- the oracle: a plain loop, one formula per line ------------------------------------------------
def ln(v, w, b, eps=1e-5):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps) * w + b


def loop_layer(x, h, c, P: dict, masks: dict, reverse: bool):
    """x (T, N, I), h (N, P), c (N, H). P: this layer-direction's parameters by short name.
    masks: zc (T, N, H), zh (T, N, P) zoneout d's; m (N, P) recurrent mask; w_hh (weight-dropped)."""
    H = c.shape[1]
    w_hh = masks.get("w_hh", P["weight_hh"])
    ys = [None] * x.shape[0]
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        a_x = x[t] @ P["weight_ih"].T
        a_h = (h * masks["m"] if "m" in masks else h) @ w_hh.T
        if "layer_norm_ih_weight" in P:
            a_x = ln(a_x, P["layer_norm_ih_weight"], P["layer_norm_ih_bias"])
            a_h = ln(a_h, P["layer_norm_hh_weight"], P["layer_norm_hh_bias"])
        z = a_x + a_h
        if "bias_ih" in P:
            z = z + P["bias_ih"] + P["bias_hh"]
        zi, zf, zg, zo = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
        if "weight_peephole" in P:
            zi = zi + P["weight_peephole"][0] * c
            zf = zf + P["weight_peephole"][1] * c
        c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
        if "weight_peephole" in P:
            zo = zo + P["weight_peephole"][2] * c_new
        c_show = ln(c_new, P["layer_norm_cell_weight"], P["layer_norm_cell_bias"]) if "layer_norm_cell_weight" in P else c_new
        h_new = torch.sigmoid(zo) * torch.tanh(c_show)
        if "weight_hr" in P:
            h_new = h_new @ P["weight_hr"].T
        if "zc" in masks:
            c_new = masks["zc"][t] * c + (1 - masks["zc"][t]) * c_new
        if "zh" in masks:
            h_new = masks["zh"][t] * h + (1 - masks["zh"][t]) * h_new
        h, c = h_new, c_new
        ys[t] = h
    return torch.stack(ys), h, c


def loop_lstm(m: lstmkit.LSTM, x, h0, c0, rec: list):
    """The whole multi-layer (bi)LSTM on padded x (T, N, I), using the masks in `rec`
    (one dict per layer-direction, in call order). No inter-layer dropout."""
    cfg = m.config
    T, N = x.shape[:2]
    hs, cs = [], []
    for k in range(cfg.num_layers):
        outs = []
        for d in range(cfg.num_directions):
            idx = k * cfg.num_directions + d
            sfx = f"_l{k}{cfg.suffix(d)}"
            P = {n[: -len(sfx)]: getattr(m, n) for n, _ in cfg.layer_param_shapes(k, d)}
            y, h, c = loop_layer(x, h0[idx], c0[idx], P, rec[idx], reverse=d == 1)
            outs.append(y)
            hs.append(h)
            cs.append(c)
        x = torch.cat(outs, dim=2)
    return x, torch.stack(hs), torch.stack(cs)


def record_masks(mp):
    """Record the masks the module draws (as padded (T, N, .) tensors for the oracle).
    Returns finish() -> one dict per layer-direction, in call order."""
    drawn, dropped = [], []
    real_variant, real_drop = variants.layer_variant, variants.drop_weights

    def layer_variant(module, layer, direction, batch_sizes, x):
        v = real_variant(module, layer, direction, batch_sizes, x)
        T, N = len(batch_sizes), batch_sizes[0]
        e = {}
        if v.zoneout_c is not None:
            e["zc"] = v.zoneout_c.view(T, N, -1)
        if v.zoneout_h is not None:
            e["zh"] = v.zoneout_h.view(T, N, -1)
        if v.rec_mask is not None:
            e["m"] = v.rec_mask
        drawn.append(e)
        return v

    def drop_weights(w_hh, p, training):
        w = real_drop(w_hh, p, training)
        dropped.append(w)
        return w

    mp.setattr(variants, "layer_variant", layer_variant)
    mp.setattr(variants, "drop_weights", drop_weights)

    def finish(n):
        out = [{} for _ in range(n)]
        for e, d in zip(out, drawn or [{}] * n):
            e.update(d)
        for e, w in zip(out, dropped):
            e["w_hh"] = w
        drawn.clear()
        dropped.clear()
        return out

    return finish


@pytest.fixture
def recorded(monkeypatch):
    return record_masks(monkeypatch)


def run_both(m, x, hx, recorded, check_grads=True):
    """Module vs oracle on padded x (T, N, I): outputs and all gradients."""
    finish = recorded
    dtype = x.dtype
    tol = TOL[dtype]
    x = x.clone().requires_grad_()
    h0, c0 = (t.clone().requires_grad_() for t in hx)
    y, (h, c) = m(x, (h0, c0))
    cfg = m.config
    rec = finish(cfg.num_layers * cfg.num_directions)
    x2, h02, c02 = (t.detach().clone().requires_grad_() for t in (x, h0, c0))
    y2, h2, c2 = loop_lstm(m, x2, h02, c02, rec)
    assert_all_close([y, h, c], [y2, h2, c2], tol, ["y", "h_n", "c_n"])
    if not check_grads:
        return
    gens = torch.Generator().manual_seed(7)
    gy, gh, gc = (torch.randn(t.shape, generator=gens, dtype=dtype) for t in (y, h, c))
    params = list(m.parameters())
    g1 = torch.autograd.grad((y * gy).sum() + (h * gh).sum() + (c * gc).sum(), [x, h0, c0] + params, retain_graph=True)
    g2 = torch.autograd.grad((y2 * gy).sum() + (h2 * gh).sum() + (c2 * gc).sum(), [x2, h02, c02] + params)
    names = ["x", "h0", "c0"] + [n for n, _ in m.named_parameters()]
    assert_all_close(g1, g2, tol, [f"grad {n}" for n in names])


VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout": dict(zoneout=0.3),
    "zoneout_pair": dict(zoneout=(0.5, 0.2)),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "weight_drop": dict(weight_drop=0.5),
    "forget_bias": dict(forget_bias=1.0),
    "all": dict(layer_norm=True, peephole=True, zoneout=(0.3, 0.2), recurrent_dropout=0.3, weight_drop=0.3, forget_bias=1.0),
}
SHAPES = {
    "plain": dict(),
    "bi2proj": dict(num_layers=2, bidirectional=True, proj_size=3),
}


def make(opts, shape, engine, dtype=torch.float64, seed=0, I=4, H=5):
    torch.manual_seed(seed)
    m = lstmkit.LSTM(I, H, **shape, engine=engine, **opts).to(dtype)
    # Non-trivial LN parameters, so a swapped weight and bias would show.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("layer_norm"):
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_variant_matches_loop(name, shape, engine, training, recorded):
    opts = VARIANTS[name]
    m = make(opts, SHAPES[shape], engine).train(training)
    cfg = m.config
    T, N = 6, 3
    x = torch.randn(T, N, cfg.input_size, dtype=torch.float64)
    h_shape, c_shape = cfg.state_shapes(N)
    hx = (torch.randn(h_shape, dtype=torch.float64), torch.randn(c_shape, dtype=torch.float64))
    run_both(m, x, hx, recorded)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_float32_matches_loop(engine, recorded):
    m = make(VARIANTS["all"], SHAPES["bi2proj"], engine, dtype=torch.float32)
    x = torch.randn(5, 2, 4)
    h_shape, c_shape = m.config.state_shapes(2)
    run_both(m, x, (torch.randn(h_shape), torch.randn(c_shape)), recorded)


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_first_unbatched_and_default_state(engine):
    m = make(dict(layer_norm=True, peephole=True, zoneout=0.2), dict(batch_first=True, num_layers=2), engine).eval()
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    y, (h, c) = m(x)
    y1, (h1, c1) = m(x[1])  # unbatched: same as row 1 of the batch
    assert_all_close([y1, h1], [y[1], h[:, 1]], SAME)
    zeros = (torch.zeros(2, 3, 5, dtype=torch.float64),) * 2
    y0, _ = m(x, zeros)
    assert torch.equal(y0, y)


# ---- packed input -------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_packed_equals_per_sequence_eval(engine):
    opts = dict(layer_norm=True, peephole=True, zoneout=(0.3, 0.1))
    m = make(opts, dict(num_layers=2, bidirectional=True, proj_size=2), engine).eval()
    lengths = [2, 5, 3, 5, 1]
    seqs = [torch.randn(L, 4, dtype=torch.float64) for L in lengths]
    h0 = torch.randn(4, len(seqs), 2, dtype=torch.float64)
    c0 = torch.randn(4, len(seqs), 5, dtype=torch.float64)
    out, (h, c) = m(pack_sequence(seqs, enforce_sorted=False), (h0, c0))
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(out)
    for j, s in enumerate(seqs):
        yj, (hj, cj) = m(s[:, None], (h0[:, j : j + 1], c0[:, j : j + 1]))
        assert_all_close([yj[:, 0], hj[:, 0], cj[:, 0]], [y[: len(s), j], h[:, j], c[:, j]], SAME)


def random_variant(H, P, batch_sizes, dtype, train=True, gen=None, requires_grad=False):
    total, B = sum(batch_sizes), batch_sizes[0]
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    bern = lambda *s, p: torch.bernoulli(torch.full(s, p, dtype=dtype), generator=gen)  # noqa: E731
    return LayerVariant(
        ln_ih_w=r(4 * H), ln_ih_b=r(4 * H), ln_hh_w=r(4 * H), ln_hh_b=r(4 * H), ln_c_w=r(H), ln_c_b=r(H),
        w_peep=r(3, H),
        zoneout_c=bern(total, H, p=0.3) if train else torch.full((total, H), 0.3, dtype=dtype),
        zoneout_h=bern(total, P, p=0.4) if train else torch.full((total, P), 0.4, dtype=dtype),
        rec_mask=bern(B, P, p=0.7) / 0.7,
    )


def random_params(I, H, P, dtype, gen=None, requires_grad=False):
    r = lambda *s: (0.5 * torch.randn(*s, generator=gen, dtype=dtype)).requires_grad_(requires_grad)  # noqa: E731
    return LayerParams(r(4 * H, I), r(4 * H, P), r(4 * H), r(4 * H), r(P, H) if P != H else None)


def layer_fn(engine):
    if engine == "numba":
        from lstmkit.engines.numba import variants as numba_variants

        return numba_variants.lstm_layer
    return reference.lstm_layer


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reverse", [False, True])
def test_packed_equals_per_sequence_training_masks(engine, reverse):
    """One layer-direction over packed data with training masks == each sequence alone
    with its own rows of the masks."""
    g = torch.Generator().manual_seed(3)
    I, H, P = 3, 4, 2
    batch_sizes = [4, 4, 3, 1, 1]
    lengths = [sum(bs > j for bs in batch_sizes) for j in range(4)]
    offsets = [sum(batch_sizes[:t]) for t in range(len(batch_sizes))]
    x = torch.randn(sum(batch_sizes), I, generator=g, dtype=torch.float64)
    h0 = torch.randn(4, P, generator=g, dtype=torch.float64)
    c0 = torch.randn(4, H, generator=g, dtype=torch.float64)
    p = random_params(I, H, P, torch.float64, g)
    v = random_variant(H, P, batch_sizes, torch.float64, gen=g)
    fn = layer_fn(engine)
    y, h, c = fn(x, batch_sizes, h0, c0, p, reverse=reverse, variant=v)
    for j, L in enumerate(lengths):
        rows = [offsets[t] + j for t in range(L)]
        vj = v._replace(zoneout_c=v.zoneout_c[rows], zoneout_h=v.zoneout_h[rows], rec_mask=v.rec_mask[j : j + 1])
        yj, hj, cj = fn(x[rows], [1] * L, h0[j : j + 1], c0[j : j + 1], p, reverse=reverse, variant=vj)
        assert_all_close([yj, hj, cj], [y[rows], h[j : j + 1], c[j : j + 1]], SAME)


# ---- gradcheck ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [False, True])
def test_gradcheck(engine, reverse, proj):
    g = torch.Generator().manual_seed(5)
    I, H = 3, 3
    P = 2 if proj else H
    batch_sizes = [3, 2, 2, 1]
    p = random_params(I, H, P, torch.float64, g, requires_grad=True)
    v = random_variant(H, P, batch_sizes, torch.float64, gen=g, requires_grad=False)
    v = v._replace(**{k: getattr(v, k).requires_grad_() for k in ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b", "w_peep")})
    x = torch.randn(sum(batch_sizes), I, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, P, generator=g, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, H, generator=g, dtype=torch.float64, requires_grad=True)
    fn = layer_fn(engine)
    pnames = [n for n in p._fields if getattr(p, n) is not None]
    vnames = ["ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b", "w_peep"]

    def f(x, h0, c0, *ts):
        pp = p._replace(**dict(zip(pnames, ts[: len(pnames)])))
        vv = v._replace(**dict(zip(vnames, ts[len(pnames) :])))
        return fn(x, batch_sizes, h0, c0, pp, reverse=reverse, variant=vv)

    inputs = (x, h0, c0, *[getattr(p, n) for n in pnames], *[getattr(v, n) for n in vnames])
    # The reference engine's backward is autograd's own: fast mode (random directions) is
    # enough there and 10x cheaper. The fused engine's hand-written backward gets the full check.
    assert torch.autograd.gradcheck(f, inputs, atol=1e-7, fast_mode=engine == "reference")


# ---- behaviour of the masks -----------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_eval_deterministic_and_training_masks_change(engine):
    for opts in (dict(zoneout=0.3), dict(recurrent_dropout=0.3), dict(weight_drop=0.3)):
        m = make(opts, dict(num_layers=2), engine)
        x = torch.randn(6, 3, 4, dtype=torch.float64)
        a, b = m(x)[0], m(x)[0]
        assert not torch.equal(a, b), f"{opts}: two training calls gave the same output"
        torch.manual_seed(11)
        a = m(x)[0]
        torch.manual_seed(11)
        b = m(x)[0]
        assert torch.equal(a, b), f"{opts}: seeded training calls differ"
        m.eval()
        a, b = m(x)[0], m(x)[0]
        assert torch.equal(a, b), f"{opts}: eval is not deterministic"


def test_mask_statistics():
    torch.manual_seed(0)
    m = lstmkit.LSTM(2, 50, zoneout=(0.3, 0.6), recurrent_dropout=0.25)
    v = variants.layer_variant(m, 0, 0, [200] * 20, torch.zeros(1, dtype=torch.float64))
    assert abs(v.zoneout_c.mean().item() - 0.3) < 0.02 and abs(v.zoneout_h.mean().item() - 0.6) < 0.02
    assert set(v.rec_mask.unique().tolist()) == {0.0, 1 / 0.75}
    assert abs((v.rec_mask == 0).double().mean().item() - 0.25) < 0.02
    zc = v.zoneout_c.view(20, 200, 50)
    assert not torch.equal(zc[0], zc[1])  # fresh zoneout mask every step
    w = variants.drop_weights(torch.ones(400, 50), 0.5, True)
    assert set(w.unique().tolist()) == {0.0, 2.0}
    m.eval()
    v = variants.layer_variant(m, 0, 0, [3] * 2, torch.zeros(1))
    assert v.rec_mask is None and torch.all(v.zoneout_c == 0.3) and torch.all(v.zoneout_h == 0.6)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.5, 0.97, 1.0])
def test_hash_masks_have_the_probability_and_no_pattern(p):
    """kernels/numba/masks.py: the share of ones is p (within 5 sigma of 400k draws), neighbours
    and rows are independent (P(both) = p^2), the seed fixes the mask and another seed changes it."""
    from lstmkit.kernels.numba.masks import bernoulli

    n = 400_000
    m = bernoulli((n // 100, 100), p, np.float32, seed=12345)
    assert m.dtype == np.float32 and m.shape == (n // 100, 100)
    assert set(np.unique(m).tolist()) <= {0.0, 1.0}
    sigma = max(math.sqrt(p * (1 - p) / n), 1e-12)
    assert abs(m.mean() - p) <= 5 * sigma
    flat = m.ravel().astype(np.float64)
    for lag in (1, 2, 100):  # the next unit, two along, the same unit one row later
        both = (flat[:-lag] * flat[lag:]).mean()
        assert abs(both - p * p) <= 5 * max(math.sqrt(p * p * (1 - p * p) / n), 1e-12), lag
    assert np.array_equal(m, bernoulli((n // 100, 100), p, np.float32, seed=12345))
    if 0 < p < 1:
        assert not np.array_equal(m, bernoulli((n // 100, 100), p, np.float32, seed=12346))
    assert np.array_equal(bernoulli((7,), p, np.float64, seed=-3), bernoulli((7,), p, np.float64, seed=2**64 - 3))


def test_weight_drop_gradient_reaches_raw_weight():
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 4, weight_drop=0.5, engine="reference").double()
    m(torch.randn(5, 2, 3, dtype=torch.float64))[0].sum().backward()
    g = m.weight_hh_l0.grad
    assert g is not None and (g == 0).any() and (g != 0).any()  # dropped entries get no gradient


def test_inter_layer_dropout_combines():
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 4, num_layers=2, dropout=0.5, layer_norm=True, zoneout=0.2, engine="reference").double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    m(x)[0].sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    m2 = make(dict(layer_norm=True, zoneout=0.2), dict(num_layers=2), "reference", I=3, H=4).eval()
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m(x)[0], m2(x)[0])  # eval: dropout off, nothing else differs


# ---- parameters, init, repr ------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True, proj_size=2, bias=False)])
def test_defaults_are_exactly_nn_lstm(cfg):
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, **cfg)
    torch.manual_seed(0)
    ours = lstmkit.LSTM(4, 5, **cfg)
    assert repr(ours) == repr(ref)
    sd, rsd = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(rsd) and all(torch.equal(sd[k], rsd[k]) for k in sd)


def test_variant_parameters_names_order_and_init():
    H = 5
    torch.manual_seed(0)
    m = lstmkit.LSTM(4, H, num_layers=2, bidirectional=True, layer_norm=True, peephole=True, forget_bias=1.5)
    torch.manual_seed(0)
    plain = nn.LSTM(4, H, num_layers=2, bidirectional=True)
    names = [n for n, _ in m.named_parameters()]
    std = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    extra = [f"layer_norm_{p}_{w}" for p in ("ih", "hh", "cell") for w in ("weight", "bias")] + ["weight_peephole"]
    want = [f"{n}_l{k}{s}" for k in range(2) for s in ("", "_reverse") for n in std + extra]
    assert names == want
    assert m.config.num_parameters() == sum(p.numel() for p in m.parameters())
    assert [n for n, _ in m.config.param_shapes()] == names
    for n, p in m.named_parameters():
        if n.startswith("layer_norm") and "_weight" in n:
            assert torch.all(p == 1)
        elif n.startswith("layer_norm"):
            assert torch.all(p == 0)
        elif n.startswith("weight_peephole"):
            assert p.shape == (3, H) and p.abs().max() <= 1 / math.sqrt(H) and p.std() > 0
    # forget_bias: bias_ih's forget slice shifted, at init and after reset_parameters()
    for _ in range(2):
        for k in range(2):
            for s in ("", "_reverse"):
                b = getattr(m, f"bias_ih_l{k}{s}")
                assert b[H : 2 * H].min() >= 1.5 - 1 / math.sqrt(H) and b[H : 2 * H].max() <= 1.5 + 1 / math.sqrt(H)
                assert b[:H].abs().max() <= 1 / math.sqrt(H) and b[2 * H :].abs().max() <= 1 / math.sqrt(H)
        m.reset_parameters()
    torch.manual_seed(0)
    fb = lstmkit.LSTM(4, H, forget_bias=2.0)
    torch.manual_seed(0)
    ref = nn.LSTM(4, H)
    shift = torch.zeros(4 * H)
    shift[H : 2 * H] = 2.0
    assert torch.allclose(fb.bias_ih_l0, ref.bias_ih_l0 + shift) and torch.equal(fb.bias_hh_l0, ref.bias_hh_l0)


def test_repr_and_config_roundtrip():
    m = lstmkit.LSTM(3, 4, zoneout=(0.1, 0.2), layer_norm=True)
    assert repr(m) == "LSTM(3, 4, layer_norm=True, zoneout=(0.1, 0.2))"
    c = m.config
    assert LSTMConfig.from_dict(c.to_dict()) == c
    assert LSTMConfig.from_dict({**c.to_dict(), "zoneout": [0.1, 0.2]}) == c  # JSON turns tuples into lists
    assert LSTMConfig(3, 4) == LSTMConfig(3, 4, layer_norm=False, zoneout=0.0)
    with pytest.raises(ValueError, match="to_torch"):
        m.to_torch()
    assert isinstance(lstmkit.LSTM(3, 4, forget_bias=1.0).to_torch(), nn.LSTM)  # only the init differs


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(zoneout=1.01), "zoneout"), (dict(zoneout=-0.1), "zoneout"), (dict(zoneout=(0.1, 2.0)), "zoneout"),
        (dict(zoneout=(0.1, 0.2, 0.3)), "zoneout"), (dict(zoneout="0.1"), "zoneout"),
        (dict(recurrent_dropout=1.0), "recurrent_dropout"), (dict(recurrent_dropout=-0.5), "recurrent_dropout"),
        (dict(weight_drop=1.0), "weight_drop"), (dict(weight_drop=float("nan")), "weight_drop"),
        (dict(forget_bias=1.0, bias=False), "forget_bias"),
    ],
)
def test_bad_options_raise_value_error(kw, name):
    with pytest.raises(ValueError, match=name):
        lstmkit.LSTM(3, 4, **kw)


def test_boundary_probabilities_accepted():
    m = lstmkit.LSTM(3, 4, zoneout=1.0, recurrent_dropout=0.0, engine="reference").double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64)
    c0 = torch.randn(1, 2, 4, dtype=torch.float64)
    y, (h, c) = m(x, (h0, c0))  # zoneout=1: every unit keeps its initial state
    assert torch.equal(h, h0) and torch.equal(c, c0) and torch.equal(y, h0.expand(4, 2, 4))
    with pytest.raises(TypeError):
        lstmkit.LSTM(3, 4, layer_norm=1)
    with pytest.raises(TypeError):
        lstmkit.LSTM(3, 4, forget_bias="1")


def test_engine_without_variant_support_falls_back_with_one_warning():
    from lstmkit import engines

    engines._warned_variant_fallback.discard("triton")
    x = torch.zeros(2, 3)
    with pytest.warns(UserWarning, match="reference"):
        fn = engines.get_layer_fn("triton", x, variant=True)
    assert fn is reference.lstm_layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engines.get_layer_fn("triton", x, variant=True)  # second time: silent


# ---- random configurations --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@given(
    data=st.data(),
    layers=st.integers(1, 2), bi=st.booleans(), proj=st.booleans(), bias=st.booleans(),
    ln_=st.booleans(), peep=st.booleans(), zc=st.sampled_from([0.0, 0.3, 1.0]), zh=st.sampled_from([0.0, 0.5]),
    rd=st.sampled_from([0.0, 0.4]), wd=st.sampled_from([0.0, 0.3]), training=st.booleans(),
)
def test_random_configs_match_loop(engine, data, layers, bi, proj, bias, ln_, peep, zc, zh, rd, wd, training):
    opts = dict(layer_norm=ln_, peephole=peep, zoneout=(zc, zh), recurrent_dropout=rd, weight_drop=wd)
    H = data.draw(st.integers(2, 5))
    shape = dict(num_layers=layers, bidirectional=bi, proj_size=1 if proj else 0, bias=bias)
    m = make(opts, shape, engine, I=3, H=H).train(training)
    T, N = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    x = torch.randn(T, N, 3, dtype=torch.float64)
    h_shape, c_shape = m.config.state_shapes(N)
    hx = (torch.randn(h_shape, dtype=torch.float64), torch.randn(c_shape, dtype=torch.float64))
    with pytest.MonkeyPatch.context() as mp:  # hypothesis and function-scoped fixtures don't mix
        run_both(m, x, hx, record_masks(mp))


# ---- the fused engine against the reference engine ----------------------------------------------------
def fused_and_spec_errors(seed, I, H, lengths, dtype, reverse=False, proj=True, bias=True, ln_=True,
                          peep=True, zc=True, zh=False, rm=False, train=False):
    """One layer-direction of a variant LSTM run by the numba engine and by the reference engine in
    dtype, both compared with the reference in float64 on the same (dtype-rounded) inputs.
    Returns (reference error, numba error): each the worst over y, h_n, c_n and every gradient of
    |got - truth| / max(1, |truth|.max())."""
    g = torch.Generator().manual_seed(seed)
    P = H - 1 if proj else H
    lengths = sorted(lengths, reverse=True)
    batch_sizes = [sum(L > t for L in lengths) for t in range(lengths[0])]
    B, total = batch_sizes[0], sum(batch_sizes)
    p = random_params(I, H, P, dtype, g, requires_grad=True)
    if not bias:
        p = p._replace(b_ih=None, b_hh=None)
    v = random_variant(H, P, batch_sizes, dtype, train=train, gen=g)
    v = v._replace(
        **{n: getattr(v, n).requires_grad_() if ln_ else None for n in ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b")},
        w_peep=v.w_peep.requires_grad_() if peep else None,
        zoneout_c=v.zoneout_c if zc else None, zoneout_h=v.zoneout_h if zh else None,
        rec_mask=v.rec_mask if rm else None,
    )
    x = torch.randn(total, I, generator=g, dtype=dtype)
    h0 = torch.randn(B, P, generator=g, dtype=dtype)
    c0 = torch.randn(B, H, generator=g, dtype=dtype)

    def run(engine, dt):
        cast = lambda t, grad=True: None if t is None else t.detach().to(dt).requires_grad_(grad)  # noqa: E731
        pp = LayerParams(*[cast(t) for t in p])
        vv = LayerVariant(*[cast(t) for t in v[:7]], *[cast(t, False) for t in v[7:]])
        xx, hh, cc = cast(x), cast(h0), cast(c0)
        y, h, c = layer_fn(engine)(xx, batch_sizes, hh, cc, pp, reverse=reverse, variant=vv)
        # drawn in float64 then cast: randn in float32 draws other numbers for the same seed
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dt)
        gc = torch.randn(c.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dt)
        leaves = [t for t in (xx, hh, cc, *pp, *vv[:7]) if t is not None]
        grads = torch.autograd.grad((y * gy).sum() + h.sum() + (c * gc).sum(), leaves)
        return [t.double() for t in (y, h, c, *grads)]

    def err(got, want):
        return max(((a - b).abs().max() / max(1.0, b.abs().max().item())).item() for a, b in zip(got, want))

    truth = run("reference", torch.float64)
    return err(run("reference", dtype), truth), err(run("numba", dtype), truth)


@given(
    data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32]), reverse=st.booleans(),
    proj=st.booleans(), bias=st.booleans(), ln_=st.booleans(), peep=st.booleans(),
    zc=st.booleans(), zh=st.booleans(), rm=st.booleans(), train=st.booleans(),
)
def test_numba_engine_matches_reference_packed(data, dtype, reverse, proj, bias, ln_, peep, zc, zh, rm, train):
    seed, I, H = data.draw(st.integers(0, 10**6)), data.draw(st.integers(1, 4)), data.draw(st.integers(2, 6))
    lengths = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    spec_err, fused_err = fused_and_spec_errors(seed, I, H, lengths, dtype, reverse, proj, bias, ln_, peep, zc, zh, rm, train)
    if dtype == torch.float32 and ln_:
        # Layer norm over a few units is ill-conditioned in float32: the spec itself errs by up
        # to ~3e-4 and either engine can be the luckier one on a given draw, so one draw cannot
        # rank them (the statistical test below does). Here: no gross error.
        assert fused_err <= max(1e-3, 100 * spec_err)
    else:
        assert fused_err <= TOL[dtype]


def test_numba_engine_as_accurate_as_the_spec_with_layer_norm_float32():
    """Over fixed random draws of the ill-conditioned case (layer norm over 2-6 units, every
    variant part on), the fused engine's float32 error is the reference engine's, statistically:
    the median ratio near 1 and no long tail on the fused side."""
    rng = torch.Generator().manual_seed(0)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))  # noqa: E731
    ratios = []
    for _ in range(60):
        lengths = [draw(1, 5) for _ in range(draw(1, 4))]
        spec_err, fused_err = fused_and_spec_errors(draw(0, 10**6), draw(1, 4), draw(2, 6), lengths, torch.float32,
                                                    reverse=bool(draw(0, 1)), proj=bool(draw(0, 1)), zh=bool(draw(0, 1)),
                                                    rm=bool(draw(0, 1)), train=bool(draw(0, 1)))
        ratios.append(fused_err / spec_err)
    ratios.sort()
    assert ratios[len(ratios) // 2] <= 1.5, ratios  # measured ~1.0 (numba as accurate as torch's ops)
    assert ratios[int(0.9 * len(ratios))] <= 4.0, ratios  # measured ~2.5; either side has a tail


def test_engines_see_the_same_masks():
    """Masks are drawn by the module, so seeded training runs agree across engines."""
    opts = dict(layer_norm=True, peephole=True, zoneout=(0.3, 0.2), recurrent_dropout=0.3, weight_drop=0.3)
    a = make(opts, dict(num_layers=2, bidirectional=True), "reference")
    b = make(opts, dict(num_layers=2, bidirectional=True), "numba")
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.manual_seed(4)
    ya = a(x)[0]
    torch.manual_seed(4)
    yb = b(x)[0]
    assert_close(yb, ya, SAME)
