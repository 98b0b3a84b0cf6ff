"""lstmkit.LSTM / LSTMCell against torch.nn.LSTM / nn.LSTMCell: every option, every
input form, outputs and every gradient, for every CPU engine."""
from __future__ import annotations

import copy
import itertools
import pickle
import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence
from torch.overrides import TorchFunctionMode, resolve_name

import lstmkit
from harness import TOL, TOL_SAME_KERNELS, assert_all_close, assert_close, flat_output, packed_input, padded_input, pair, run_differential

DTYPES = [torch.float64, torch.float32]
OPTIONS = list(itertools.product([True, False], repeat=5))  # bias, batch_first, bidir, proj, 2 layers


def _cfg(bias, batch_first, bidir, proj, two_layers, I=4, H=6):
    return dict(
        input_size=I, hidden_size=H, num_layers=2 if two_layers else 1, bias=bias,
        batch_first=batch_first, bidirectional=bidir, proj_size=3 if proj else 0,
    )


def _state(cfg, N, dtype, seed=3):
    m = lstmkit.LSTMConfig(**cfg)
    h_shape, c_shape = m.state_shapes(N)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h_shape, generator=g, dtype=dtype), torch.randn(c_shape, generator=g, dtype=dtype)


# ---- every option combination, padded and packed ---------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join("bBdpl"[i] if v else "-" for i, v in enumerate(o)))
def test_padded_all_options(engine, opts, dtype):
    cfg = _cfg(*opts)
    ref, ours = pair(cfg, engine, dtype)
    L, N = 5, 3
    make = padded_input(L, N, cfg["input_size"], dtype, batch_first=cfg["batch_first"])
    run_differential(ref, ours, make)  # zero initial state
    run_differential(ref, ours, make, hx=_state(cfg, N, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join("bBdpl"[i] if v else "-" for i, v in enumerate(o)))
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_all_options(engine, opts, dtype, enforce_sorted):
    cfg = _cfg(*opts)
    ref, ours = pair(cfg, engine, dtype)
    lengths = [6, 6, 4, 1] if enforce_sorted else [2, 6, 1, 4, 6]
    make = packed_input(lengths, cfg["input_size"], dtype, enforce_sorted, cfg["batch_first"])
    oa, ob = run_differential(ref, ours, make, hx=_state(cfg, len(lengths), dtype))
    ya, yb = oa[0], ob[0]
    assert isinstance(yb, PackedSequence)
    assert torch.equal(ya.batch_sizes, yb.batch_sizes)
    for a, b in ((ya.sorted_indices, yb.sorted_indices), (ya.unsorted_indices, yb.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    run_differential(ref, ours, make)


# ---- random configurations -------------------------------------------------------------------------
@given(
    # H past 16 too: float32 gate passes run 8/16-unit vector blocks plus a scalar tail
    I=st.integers(1, 7), H=st.one_of(st.integers(1, 9), st.integers(14, 35)), layers=st.integers(1, 3), bias=st.booleans(),
    batch_first=st.booleans(), bidir=st.booleans(), proj=st.integers(0, 8), use_hx=st.booleans(),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=5), packed=st.booleans(),
    f32=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_configs(engine, I, H, layers, bias, batch_first, bidir, proj, use_hx, lengths, packed, f32, seed):
    proj = proj if proj < H else 0
    dtype = torch.float32 if f32 else torch.float64
    cfg = dict(input_size=I, hidden_size=H, num_layers=layers, bias=bias, batch_first=batch_first,
               bidirectional=bidir, proj_size=proj)
    ref, ours = pair(cfg, engine, dtype, seed=seed)
    if packed:
        make = packed_input(lengths, I, dtype, enforce_sorted=False, batch_first=batch_first, seed=seed)
    else:
        make = padded_input(max(lengths), len(lengths), I, dtype, batch_first, seed=seed)
    hx = _state(cfg, len(lengths), dtype, seed) if use_hx else None
    run_differential(ref, ours, make, hx=hx, seed=seed)


# ---- unbatched input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidir,proj", [(False, 0), (True, 2)])
def test_unbatched(engine, batch_first, bidir, proj):
    cfg = dict(input_size=3, hidden_size=5, num_layers=2, batch_first=batch_first, bidirectional=bidir, proj_size=proj)
    ref, ours = pair(cfg, engine)
    x = torch.randn(4, 3, dtype=torch.float64)

    def make():
        xi = x.clone().requires_grad_(True)
        return xi, [xi]

    h, c = _state(cfg, 1, torch.float64)
    oa, ob = run_differential(ref, ours, make, hx=(h[:, 0], c[:, 0]))
    assert ob[0].shape == oa[0].shape == (4, (2 if bidir else 1) * (proj or 5))
    assert ob[1][0].shape == (4 if bidir else 2, proj or 5)
    run_differential(ref, ours, make)


# ---- dropout, train/eval, edge sizes -----------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_matches_torch_rng(engine, packed):
    """Inter-layer dropout draws the same masks from the same RNG state as torch."""
    cfg = dict(input_size=4, hidden_size=6, num_layers=3, dropout=0.4, bidirectional=True)
    ref, ours = pair(cfg, engine)
    ref.train(), ours.train()
    make = packed_input([5, 3, 2], 4, torch.float64) if packed else padded_input(5, 3, 4, torch.float64)
    torch.manual_seed(11)
    oa = ref(make()[0])
    torch.manual_seed(11)
    ob = ours(make()[0])
    assert_all_close(flat_output(ob), flat_output(oa), TOL[torch.float64])
    # and dropout really acts: a different seed changes the output, eval mode removes it
    torch.manual_seed(12)
    oc = ours(make()[0])
    assert (flat_output(oc)[0] - flat_output(ob)[0]).abs().max() > 1e-3
    ref.eval(), ours.eval()
    run_differential(ref, ours, make)


def test_dropout_between_layers_only(engine):
    """h_n of the last layer and the output are untouched by dropout with one layer."""
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        ref, ours = pair(dict(input_size=3, hidden_size=4, dropout=0.5), engine)
    ours.train()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    a, b = ours(x), ours(x)
    assert torch.equal(a[0], b[0])


def test_batch_size_zero(engine):
    ref, ours = pair(dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True), engine)
    x = torch.randn(5, 0, 3, dtype=torch.float64, requires_grad=True)
    y, (h, c) = ours(x)
    ya, (ha, ca) = ref(x)
    assert y.shape == ya.shape and h.shape == ha.shape and c.shape == ca.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_sequence_length_zero_is_error(engine):
    _, ours = pair(dict(input_size=3, hidden_size=4), engine)
    with pytest.raises(RuntimeError, match="sequence length"):
        ours(torch.randn(0, 2, 3, dtype=torch.float64))


@pytest.mark.slow
def test_gradcheck(engine):
    cfg = dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True, proj_size=2)
    _, ours = pair(cfg, engine)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = list(ours.parameters())

    def f(x, h0, c0, *ps):
        y, (h, c) = torch.func.functional_call(ours, dict(zip([n for n, _ in ours.named_parameters()], ps)), (x, (h0, c0)))
        return y, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *[p.detach().requires_grad_(True) for p in params]))
    packed = pack_sequence([torch.randn(3, 2, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)])

    def g(data):
        y, (h, c) = ours(PackedSequence(data, packed.batch_sizes))
        return y.data, h, c

    assert torch.autograd.gradcheck(g, (packed.data.clone().requires_grad_(True),))


# ---- parameters, state_dict, init, repr ---------------------------------------------------------------------
@pytest.mark.parametrize("opts", OPTIONS[::3])
def test_parameters_match_torch(opts):
    cfg = _cfg(*opts, I=5, H=7)
    torch.manual_seed(0)
    ref = nn.LSTM(**cfg)
    torch.manual_seed(0)
    ours = lstmkit.LSTM(**cfg)
    # same names, shapes, registration order and (same RNG) the same default init
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    assert repr(ref) == repr(ours)
    assert sum(p.numel() for p in ref.parameters()) == ours.config.num_parameters()
    # state_dict moves both ways with strict=True
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    back = ours.to_torch()
    assert isinstance(back, nn.LSTM) and repr(back) == repr(ref)
    for a, b in zip(back.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    assert [len(w) for w in ours.all_weights] == [len(w) for w in ref.all_weights]


def test_config_is_the_one_source_of_the_torch_variant_split():
    from lstmkit.config import GATES, ONNX_GATES, LSTMConfig, onnx_gate_rows

    ref = nn.LSTM(3, 5, 2, bias=False, batch_first=True, dropout=0.25, bidirectional=True, proj_size=2)
    cfg = LSTMConfig.from_module(ref)
    assert nn.LSTM(**cfg.torch_kwargs()).state_dict().keys() == ref.state_dict().keys()
    assert [tuple(v.shape) for v in ref.state_dict().values()] == [s for _, s in cfg.param_shapes()]
    assert cfg.variant_kwargs() == {} and not cfg.has_variant
    ours = lstmkit.LSTM(3, 4, peephole=True, zoneout=(0.1, 0.2), forget_bias=1.0)
    assert LSTMConfig.from_module(ours) is ours.config
    assert ours.config.variant_kwargs() == dict(peephole=True, zoneout=(0.1, 0.2), forget_bias=1.0)
    assert lstmkit.LSTM(*ours.config.torch_args(), **ours.config.variant_kwargs()).config == ours.config
    only_init = LSTMConfig(3, 4, forget_bias=1.0)
    assert only_init.has_variant and not only_init.changes_forward and not only_init.needs_variant_kernel(True)
    assert not LSTMConfig(3, 4, recurrent_dropout=0.2).needs_variant_kernel(training=False)
    with pytest.raises(TypeError, match="save expects"):
        LSTMConfig.from_module(nn.GRU(3, 4), "save")
    # the ONNX row order is GATES reordered to ONNX_GATES, block by block
    rows = onnx_gate_rows(2)
    assert [GATES[r // 2] for r in rows] == [g for g in ONNX_GATES for _ in range(2)]


def test_init_bound_and_reset():
    ours = lstmkit.LSTM(3, 16)
    for p in ours.parameters():
        assert p.abs().max() <= 0.25
    before = ours.weight_hh_l0.detach().clone()
    ours.reset_parameters()
    assert not torch.equal(before, ours.weight_hh_l0)


def test_dtype_and_device_kwargs():
    m = lstmkit.LSTM(3, 4, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m.double().float().weight_ih_l0.dtype == torch.float32


def test_drop_in_inside_a_model(engine):
    """Replacing nn.LSTM by lstmkit.LSTM in a model changes nothing else."""

    class Model(nn.Module):
        def __init__(self, rnn_cls, **kw):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.rnn = rnn_cls(4, 8, num_layers=2, batch_first=True, **kw)
            self.head = nn.Linear(8, 10)

        def forward(self, tokens, state=None):
            y, state = self.rnn(self.emb(tokens), state)
            return self.head(y), state

    torch.manual_seed(0)
    a = Model(nn.LSTM).double()
    torch.manual_seed(0)
    b = Model(lstmkit.LSTM, engine=engine).double()
    b.load_state_dict(a.state_dict(), strict=True)
    tokens = torch.randint(0, 10, (3, 7))
    la, sa = a(tokens)
    lb, sb = b(tokens)
    assert_close(lb, la, TOL[torch.float64])
    la2, _ = a(tokens, sa)
    lb2, _ = b(tokens, sb)
    assert_close(lb2, la2, TOL[torch.float64])


# ---- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, exc, arg",
    [
        (dict(input_size=3.0, hidden_size=4), TypeError, "input_size"),
        (dict(input_size=3, hidden_size="4"), TypeError, "hidden_size"),
        (dict(input_size=0, hidden_size=4), ValueError, "input_size"),
        (dict(input_size=3, hidden_size=0), ValueError, "hidden_size"),
        (dict(input_size=3, hidden_size=4, num_layers=0), ValueError, "num_layers"),
        (dict(input_size=3, hidden_size=4, num_layers=2.0), TypeError, "num_layers"),
        (dict(input_size=3, hidden_size=4, proj_size=4), ValueError, "proj_size"),
        (dict(input_size=3, hidden_size=4, proj_size=-1), ValueError, "proj_size"),
        (dict(input_size=3, hidden_size=4, dropout=1.5), ValueError, "dropout"),
        (dict(input_size=3, hidden_size=4, dropout=True), ValueError, "dropout"),
        (dict(input_size=3, hidden_size=4, bias=1), TypeError, "bias"),
        (dict(input_size=3, hidden_size=4, batch_first="yes"), TypeError, "batch_first"),
    ],
)
def test_constructor_errors(kwargs, exc, arg):
    with pytest.raises(exc, match=arg):
        lstmkit.LSTM(**kwargs)
    if arg != "num_layers" or exc is not TypeError:  # torch fails late there, with an unrelated message
        with pytest.raises(exc):
            nn.LSTM(**kwargs)


def test_engine_name_error():
    with pytest.raises(ValueError, match="engine"):
        lstmkit.LSTM(3, 4, engine="cudnn")


def _forget_numba_engine(monkeypatch):
    """Make the next import of the numba engine and kernels run again (monkeypatch restores them)."""
    import sys

    for name in [n for n in sys.modules if n.startswith(("lstmkit.engines.numba", "lstmkit.kernels.numba"))]:
        monkeypatch.delitem(sys.modules, name)


def test_engine_unavailable_only_when_its_package_is_missing(monkeypatch):
    import sys

    from lstmkit.engines import is_available

    _forget_numba_engine(monkeypatch)
    monkeypatch.setitem(sys.modules, "numba", None)  # "not installed"
    assert not is_available("numba")


def test_engine_internal_import_error_is_loud(monkeypatch):
    # A broken lstmkit import must not pass for "numba is not installed" and silently make
    # engine="auto" run the slow reference engine.
    import sys

    from lstmkit.engines import is_available

    _forget_numba_engine(monkeypatch)
    monkeypatch.setitem(sys.modules, "lstmkit.kernels.numba.lstm", None)
    with pytest.raises(ImportError, match="lstmkit.kernels.numba.lstm"):
        is_available("numba")
    with pytest.raises(ImportError, match="lstmkit.kernels.numba.lstm"):
        lstmkit.LSTM(3, 4)(torch.randn(2, 1, 3))


def test_cli_internal_import_error_is_loud(monkeypatch):
    import sys

    from lstmkit.cli import main

    monkeypatch.delitem(sys.modules, "lstmkit.cli.params", raising=False)
    monkeypatch.setitem(sys.modules, "lstmkit.describe", None)
    with pytest.raises(ImportError, match="lstmkit.describe"):
        main(["params", "3", "4"])


def _errors(m, *args):
    try:
        m(*args)
    except Exception as e:  # noqa: BLE001
        return type(e)
    return None


@pytest.mark.parametrize(
    "make_args",
    [
        lambda: (torch.randn(2, 3, 4, 3),),  # 4-D
        lambda: (torch.randn(5, 2, 7),),  # wrong feature size
        lambda: (torch.randn(5, 2, 3, dtype=torch.float64),),  # dtype mismatch
        lambda: (torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))),  # h0 batch
        lambda: (torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 5))),  # c0 size
        lambda: (torch.randn(5, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))),  # 2-D hx for 3-D input
        lambda: (torch.randn(5, 3), (torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))),  # 3-D hx, 2-D input
        lambda: (torch.randn(0, 2, 3),),  # empty sequence
        lambda: (torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),)),  # one state tensor: IndexError
        lambda: (torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),) * 3),  # three: RuntimeError
        lambda: (torch.randn(1, 2, 3), (torch.zeros(1, 2, 4),) * 3),  # the same for one step
        lambda: (torch.randn(5, 2, 3), ()),
    ],
)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_forward_errors_same_type_as_torch(engine, make_args, grad):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4)
    ours = lstmkit.LSTM.from_torch(ref, engine=engine)
    args = make_args()
    with torch.set_grad_enabled(grad):
        expected = _errors(ref, *args)
        assert expected is not None
        assert _errors(ours, *args) is expected


def test_forward_error_messages(engine):
    ours = lstmkit.LSTM(3, 4, num_layers=2, engine=engine)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 4\), got \[1, 2, 4\]"):
        ours(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(RuntimeError, match="Expected 3, got 7"):
        ours(torch.randn(5, 2, 7))
    with pytest.raises(ValueError, match="does not match weight dtype"):
        ours(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="dtype"):
        ours(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match="2D or 3D"):
        ours(torch.randn(3))
    packed = pack_sequence([torch.randn(3, 3), torch.randn(2, 3)])
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size"):
        ours(packed, (torch.zeros(2, 2, 4), torch.zeros(2, 3, 4)))
    with pytest.raises(IndexError, match="tuple"):  # torch.nn.LSTM's type: it indexes hx[1]
        ours(torch.randn(5, 2, 3), (torch.zeros(2, 2, 4),))
    with pytest.raises(TypeError, match="tuple"):
        ours(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))


# ---- the oracle is never the engine ---------------------------------------------------------------------------------
# torch's LSTM / RNN kernels by the names torch function modes report them (torch.*, torch._VF.*,
# torch._C._VariableFunctions.* as torch.*; torch.ops.aten.* as aten.*).
TORCH_LSTM_KERNEL = re.compile(r"^(torch|aten)\.(lstm|lstm_cell|_thnn_fused_lstm_cell|mkldnn_rnn_layer|_cudnn_rnn"
                               r"|miopen_rnn|quantized_lstm|quantized_lstm_cell|rnn_tanh|rnn_relu)\b")


class NoTorchLSTMKernels(TorchFunctionMode):
    """Fails on any call of torch's LSTM kernels, however it is reached (nn.LSTM, torch._VF,
    torch._C._VariableFunctions, torch.ops.aten), where patching names would miss some."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = resolve_name(func) or ""
        if TORCH_LSTM_KERNEL.match(name):
            raise AssertionError(f"an engine called PyTorch's LSTM kernel {name}")
        return func(*args, **(kwargs or {}))


def test_the_kernel_guard_catches_every_way_in():
    x, hx = torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    for call in (lambda: nn.LSTM(3, 4)(x[:, None]), lambda: nn.LSTMCell(3, 4)(x),
                 lambda: torch._C._VariableFunctions.lstm_cell(x, hx, w_ih, w_hh),
                 lambda: torch.ops.aten.lstm_cell(x, list(hx), w_ih, w_hh)):
        with pytest.raises(AssertionError, match="LSTM kernel"), NoTorchLSTMKernels():
            call()


def test_engines_never_call_torch_lstm_kernels(engine):
    with NoTorchLSTMKernels():
        m = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, engine=engine)
        y, _ = m(torch.randn(5, 2, 3))
        y.sum().backward()
        with torch.no_grad():
            m(torch.randn(5, 2, 3))  # the inference path too
        cell = lstmkit.LSTMCell(3, 4, engine=engine)
        h, c = cell(torch.randn(2, 3))
        (h.sum() + c.sum()).backward()


# ---- LSTMCell ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("use_hx", [True, False])
def test_cell_matches_torch(engine, dtype, bias, batched, use_hx):
    torch.manual_seed(0)
    ref = nn.LSTMCell(4, 6, bias=bias, dtype=dtype)
    ours = lstmkit.LSTMCell(4, 6, bias=bias, dtype=dtype, engine=engine)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ref) == repr(ours).replace(f", engine='{engine}'", "")
    shape = (3, 4) if batched else (4,)
    x = torch.randn(shape, dtype=dtype)
    hx = (torch.randn(shape[:-1] + (6,), dtype=dtype), torch.randn(shape[:-1] + (6,), dtype=dtype)) if use_hx else None
    outs = []
    for m in (ref, ours):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        hi = None if hx is None else tuple(t.clone().requires_grad_(True) for t in hx)
        h, c = m(xi, hi)
        (h * 1.7 + c * torch.arange(c.numel(), dtype=dtype).view(c.shape)).sum().backward()
        grads = [xi.grad] + ([] if hi is None else [t.grad for t in hi]) + [p.grad for p in m.parameters()]
        outs.append([h, c] + grads)
    for a, b in zip(*outs):
        assert_close(b, a, TOL[dtype])


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_cell_errors(engine, grad):
    """torch's error types, with grad (the general path) and without (the step of 1-2 rows
    declines what it cannot run, and the general path raises)."""
    torch.manual_seed(0)
    ref, ours = nn.LSTMCell(3, 4), lstmkit.LSTMCell(3, 4, engine=engine)
    cases = [
        (torch.randn(2, 5),),
        (torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(3, 4))),
        (torch.randn(2, 3), (torch.zeros(1, 4), torch.zeros(1, 4))),
        (torch.randn(2, 3), (torch.zeros(2, 5), torch.zeros(2, 5))),
        (torch.randn(3), (torch.zeros(2, 4), torch.zeros(2, 4))),
        (torch.randn(2, 3), (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4))),
        (torch.randn(2, 3, dtype=torch.float64),),
        (torch.randn(2, 3), (torch.zeros(2, 4),)),
        (torch.randn(2, 3, 3),),
        (torch.randn(2, 3), (torch.zeros(2, 4, 1), torch.zeros(2, 4))),
    ]
    with torch.set_grad_enabled(grad):
        for args in cases:
            expected = _errors(ref, *args)
            assert expected is not None and _errors(ours, *args) is expected, args
        with pytest.raises(RuntimeError, match="inconsistent input_size: got 5 expected 3"):
            ours(torch.randn(2, 5))


def _count_cell_steps(monkeypatch) -> list:
    """A list that gets an entry for each call of the cell's step without grad (binding.cell_step)."""
    from lstmkit.engines.numba import binding

    calls, step = [], binding.cell_step

    def spy(*args):
        calls.append(1)
        return step(*args)

    monkeypatch.setattr(binding, "cell_step", spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sizes", [(5, 7), (128, 256)], ids=["small", "split"])  # 1.5 MB: split at 2 threads
@pytest.mark.parametrize("threads", [1, 2])
def test_cell_step_without_grad(monkeypatch, dtype, bias, sizes, threads):
    """LSTMCell with nothing to record runs binding.cell_step: a few rows (a streaming policy's
    step) by address on its parameters as they are, more by torch's GEMMs on them. torch's
    numbers, batched and not, from zeros and from a state, under no_grad, inference_mode and
    with frozen parameters; updates in place (tracked by the version counter or not) and
    replaced parameters show at the next step on both; a state that needs grad and a
    non-contiguous input go the general path."""
    calls = _count_cell_steps(monkeypatch)
    I, H = sizes
    torch.manual_seed(0)
    ref = nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    ours = lstmkit.LSTMCell(I, H, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)

    def both(x, hx, fast=True):
        n = len(calls)
        got, want = ours(x, hx), ref(x, hx)
        for a, b in zip(got, want):
            assert_close(a, b, TOL[dtype])
            assert a.shape == b.shape and a.requires_grad == b.requires_grad
        assert len(calls) == n + fast, (x.shape, fast)

    try:
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                for shape in ((1, I), (2, I), (I,), (3, I), (7, I), (16, I)):
                    x = torch.randn(shape, dtype=dtype)
                    st = (torch.randn(shape[:-1] + (H,), dtype=dtype), torch.randn(shape[:-1] + (H,), dtype=dtype))
                    both(x, None)
                    both(x, st)
                    both(x, [st[0], st[1]])
                both(torch.randn(I, 2, dtype=dtype).t(), None, fast=False)
        with torch.no_grad():  # the parameters changed outside inference_mode (its tensors stay inference-only)
            for rows in (2, 16):
                for p, q in zip(ours.parameters(), ref.parameters()):
                    p.mul_(0.5)  # the version counter sees this
                    q.mul_(0.5)
                both(torch.randn(rows, I, dtype=dtype), None)
                for p, q in zip(ours.parameters(), ref.parameters()):
                    p.data.mul_(-1.5)  # this it does not
                    q.data.mul_(-1.5)
                both(torch.randn(rows, I, dtype=dtype), None)
                for p, q in zip(ours.parameters(), ref.parameters()):
                    new = torch.randn_like(p)
                    p.data, q.data = new, new.clone()
                both(torch.randn(rows, I, dtype=dtype), None)
        ours.requires_grad_(False)
        ref.requires_grad_(False)
        both(torch.randn(2, I, dtype=dtype), None)  # frozen, grad mode on: nothing to record
        x, st = torch.randn(2, I, dtype=dtype), torch.randn(2, H, dtype=dtype, requires_grad=True)
        both(x, (st, st.detach()), fast=False)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("I,H,threads,by_address", [
    (64, 128, 1, 6),    # 384 KiB: by address up to 6 rows
    (128, 256, 1, 6),   # 1.5 MiB: within a 2 MiB L2 too
    (128, 256, 2, 6),
    (128, 512, 1, 1),   # 2.6 MiB, past the L2: one row by address, more by the GEMMs
    (128, 512, 2, 1),
])
def test_cell_steps_by_address_up_to_6_rows_within_l2_and_1_past_it(monkeypatch, I, H, threads, by_address):
    """binding.cell_live: a cell's step runs by address (a pass over the weights a row) up to 6
    rows on weights within a core's L2 and one row past it; more rows by torch's GEMMs."""
    from lstmkit.engines.numba import binding
    from lstmkit.kernels.numba import caches

    monkeypatch.setattr(caches, "_l2", [2 << 20])
    w = binding.cell_weights(tuple(nn.LSTMCell(I, H).parameters()), None)
    assert [binding.cell_live(w, n, threads) >= 0 for n in range(1, 9)] == [n <= by_address for n in range(1, 9)]


def test_cell_step_pickles_and_tracks_parametrization(tmp_path):
    """After a step without grad: torch.save of the cell and torch.load under weights_only
    (the step's cache is not pickled), a deep copy that runs on its own weights, and a weight
    made at each call by a parametrization (read as the call makes it, not the cached one)."""
    torch.manual_seed(0)
    ours, ref = lstmkit.LSTMCell(4, 6), nn.LSTMCell(4, 6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 4)
    with torch.no_grad():
        ours(x)
    torch.save(ours, tmp_path / "cell.pt")
    loaded = torch.load(tmp_path / "cell.pt", weights_only=True)
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        twin.weight_hh.mul_(2)
        assert_close(loaded(x)[0], ref(x)[0], TOL[torch.float32])
        assert_close(ours(x)[0], ref(x)[0], TOL[torch.float32])
        ref.weight_hh.mul_(2)
        assert_close(twin(x)[0], ref(x)[0], TOL[torch.float32])
        nn.utils.parametrizations.weight_norm(ours, "weight_hh")
        nn.utils.parametrizations.weight_norm(ref, "weight_hh")
        ref.load_state_dict(ours.state_dict())
        ours.parametrizations.weight_hh.original0.mul_(3)
        ref.parametrizations.weight_hh.original0.mul_(3)
        assert_close(ours(x)[0], ref(x)[0], TOL[torch.float32])


def test_no_warning_for_default_construction():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lstmkit.LSTM(3, 4, num_layers=2, dropout=0.2)


# ---- inference (no grad): the module's fast path through the fused runtime ---------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "".join("bBdpl"[i] if v else "-" for i, v in enumerate(o)))
def test_inference_matches_torch(engine, opts, dtype):
    cfg = _cfg(*opts)
    ref, ours = pair(cfg, engine, dtype)
    x = torch.randn((3, 5, cfg["input_size"]) if cfg["batch_first"] else (5, 3, cfg["input_size"]), dtype=dtype)
    hx = _state(cfg, 3, dtype)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            for state in (None, hx):
                assert_all_close(flat_output(ours(x, state)), flat_output(ref(x, state)), TOL[dtype])
            first = x[0] if cfg["batch_first"] else x[:, 0]  # unbatched: the first sequence
            ya, _ = ref(first)
            yb, _ = ours(first)
            assert_close(yb, ya, TOL[dtype])


def test_inference_sees_weight_updates(engine):
    ref, ours = pair(dict(input_size=3, hidden_size=5, num_layers=2), engine)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
        assert ("_runtime" in ours.__dict__) == (engine == "numba")  # the fast path really ran
        copied = copy.deepcopy(ours)  # the runtime cache does not travel
        assert "_runtime" not in copied.__dict__ and "_runtime" not in pickle.loads(pickle.dumps(ours)).__dict__
        assert_close(copied(x)[0], ours(x)[0], 0)
        for p, q in zip(ref.parameters(), ours.parameters()):  # in place, as an optimizer does
            p.mul_(1.5)
            q.mul_(1.5)
        assert_close(ours(x)[0], ref(x)[0], TOL[torch.float64])
        new = torch.randn_like(ours.weight_hh_l1)
        ours.weight_hh_l1.data = new.clone()  # re-pointed to other memory
        ref.weight_hh_l1.data = new.clone()
        assert_close(ours(x)[0], ref(x)[0], TOL[torch.float64])
    ours.double().float()  # dtype change: a new runtime of the new dtype
    with torch.no_grad():
        assert ours(x.float())[0].dtype == torch.float32


@pytest.mark.parametrize("steps", [1, 6])
def test_frozen_model_without_no_grad_takes_the_fast_path(engine, steps):
    """A frozen model run on data with grad mode on records nothing: it takes the fast path
    (as under no_grad) and gives torch.nn.LSTM's numbers. Anything that requires grad (the
    input, the state, a parameter unfrozen) takes the autograd path: gradients as torch's."""
    ref, ours = pair(dict(input_size=3, hidden_size=5, num_layers=2), engine)
    ref.requires_grad_(False)
    ours.requires_grad_(False)
    x = torch.randn(steps, 2, 3, dtype=torch.float64)
    hx = (torch.randn(2, 2, 5, dtype=torch.float64), torch.randn(2, 2, 5, dtype=torch.float64))
    for state in (None, hx):
        y, (h, c) = ours(x, state)
        assert not (y.requires_grad or h.requires_grad or c.requires_grad)
        assert_all_close(flat_output((y, (h, c))), flat_output(ref(x, state)), TOL[torch.float64])
    assert ("_runtime" in ours.__dict__) == (engine == "numba")  # the fast path really ran

    def grads(m, xg, state, params):
        y, (h, c) = m(xg, state)
        (y.sum() + h.sum() + c.sum()).backward()
        return [t.grad for t in (xg, *(state or ()), *params)]

    for grad_input, grad_state, grad_params in ((True, False, False), (False, True, False), (False, False, True)):
        got, want = [], []
        for m, out in ((ours, got), (ref, want)):
            m.requires_grad_(grad_params)
            xg = x.clone().requires_grad_(grad_input)
            state = tuple(t.clone().requires_grad_(grad_state) for t in hx)
            wanted = [p for p in m.parameters()] if grad_params else []
            out += grads(m, xg, state, wanted)
            m.zero_grad(set_to_none=True)
        assert any(g is not None for g in got)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                assert_close(a, b, TOL[torch.float64])


def test_inference_streaming_equals_full_sequence(engine):
    _, ours = pair(dict(input_size=3, hidden_size=6, num_layers=2, bidirectional=False, proj_size=2), engine)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    with torch.inference_mode():
        full, (h_full, c_full) = ours(x)
        state, steps = None, []
        for t in range(7):
            y, state = ours(x[t : t + 1], state)
            steps.append(y)
    assert_close(torch.cat(steps), full, TOL_SAME_KERNELS[torch.float64])
    assert_close(state[0], h_full, TOL_SAME_KERNELS[torch.float64])
    assert_close(state[1], c_full, TOL_SAME_KERNELS[torch.float64])


def test_inference_errors_same_as_training_path(engine):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4)
    ours = lstmkit.LSTM.from_torch(ref, engine=engine)
    cases = [
        (torch.randn(5, 2, 7),),
        (torch.randn(5, 2, 3, dtype=torch.float64),),
        (torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))),
        (torch.randn(5, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))),
        (torch.randn(0, 2, 3),),
        (torch.randn(5, 2, 3), (torch.zeros(1, 2, 4, dtype=torch.float64), torch.zeros(1, 2, 4))),
    ]
    with torch.no_grad():
        for args in cases:
            expected = _errors(ref, *args)
            assert expected is not None and _errors(ours, *args) is expected, args


@pytest.mark.parametrize("opts", [dict(layer_norm=True), dict(peephole=True), dict(zoneout=(0.2, 0.1)),
                                  dict(recurrent_dropout=0.3, weight_drop=0.4), dict(layer_norm=True, peephole=True, proj_size=2)])
def test_inference_fast_path_with_variants_in_eval(engine, opts):
    """Under no_grad an eval-mode variant model gives what the autograd path gives."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 5, num_layers=2, bidirectional=True, engine=engine, dtype=torch.float64, **opts).eval()
    with torch.no_grad():
        for p in m.parameters():  # move layer-norm gains/biases off 1/0 so they matter
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    hx = tuple(torch.randn(s, dtype=torch.float64) for s in m.config.state_shapes(2))
    want = flat_output(m(x, hx))
    with torch.no_grad():
        got = flat_output(m(x, hx))
    assert_all_close(got, want, TOL[torch.float64])


# ---- the training fast path (LSTM._train_fast, LSTMCell._train_fast) ------------------------------------------------
def _count_general_path(monkeypatch) -> list:
    """A list that gets an entry for each call that reaches the general path's engine choice
    (nn/modules.get_layer_fn); the training fast path goes to the Numba engine's layer without it."""
    from lstmkit.nn import modules

    calls, choose = [], modules.get_layer_fn

    def spy(*args, **kwargs):
        calls.append(1)
        return choose(*args, **kwargs)

    monkeypatch.setattr(modules, "get_layer_fn", spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("T, N", [(1, 1), (1, 3), (4, 2)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("proj", [0, 2])
@pytest.mark.parametrize("hx", ["none", "given", "grad"])
def test_training_fast_path_matches_torch(monkeypatch, dtype, T, N, batch_first, proj, hx):
    """A recorded call of a one-layer, one-direction LSTM (a training step) goes straight to the
    Numba engine's layer where its input is laid out as the engine takes it (batch_first only at
    one step or one row), and gives torch.nn.LSTM's outputs and every gradient."""
    torch.manual_seed(T * 10 + N)
    ref = nn.LSTM(3, 5, proj_size=proj, batch_first=batch_first, dtype=dtype)
    ours = lstmkit.LSTM.from_torch(ref)
    general = _count_general_path(monkeypatch)
    x = torch.randn((N, T, 3) if batch_first else (T, N, 3), dtype=dtype)
    state = (torch.randn(1, N, proj or 5, dtype=dtype), torch.randn(1, N, 5, dtype=dtype))
    outs = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        si = tuple(t.clone().requires_grad_(hx == "grad") for t in state)
        y, (h, c) = m(xi, None if hx == "none" else si)
        (y * 1.3).sum().backward(inputs=[xi, *m.parameters()] + (list(si) if hx == "grad" else []))
        outs.append([y, h, c, xi.grad, *(si if hx == "grad" else ()), *(p.grad for p in m.parameters())])
    for a, b in zip(*outs):
        assert b is not None and a.shape == b.shape
        assert_close(b, a, TOL[dtype])
    assert len(general) == (1 if batch_first and T > 1 and N > 1 else 0)


def test_training_fast_path_declines_what_it_does_not_run(monkeypatch):
    """Stacked, bidirectional, variant, reference-engine, parametrized, non-contiguous and
    autocast calls take the general path (and still match torch.nn.LSTM)."""
    torch.manual_seed(0)
    general = _count_general_path(monkeypatch)
    x = torch.randn(4, 2, 3, requires_grad=True)
    cases = [lstmkit.LSTM(3, 5, num_layers=2), lstmkit.LSTM(3, 5, bidirectional=True), lstmkit.LSTM(3, 5, peephole=True),
             lstmkit.LSTM(3, 5, engine="reference"), nn.utils.parametrizations.weight_norm(lstmkit.LSTM(3, 5), "weight_hh_l0")]
    for m in cases:
        before = len(general)
        m(x)[0].sum().backward()
        assert len(general) > before, m
    m = lstmkit.LSTM(3, 5)
    before = len(general)
    m(torch.randn(2, 4, 3).transpose(0, 1).requires_grad_(True))[0].sum().backward()  # (4, 2, 3), not contiguous
    assert len(general) == before + 1


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("N", [1, 2, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("hx", ["none", "given", "grad"])
def test_cell_training_fast_path_matches_torch(monkeypatch, dtype, N, bias, batched, hx):
    """A recorded LSTMCell step goes straight to the Numba engine's layer and gives
    torch.nn.LSTMCell's outputs and every gradient."""
    torch.manual_seed(N)
    ref = nn.LSTMCell(4, 6, bias=bias, dtype=dtype)
    ours = lstmkit.LSTMCell(4, 6, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    general = _count_general_path(monkeypatch)
    shape = (N, 4) if batched else (4,)
    x = torch.randn(shape, dtype=dtype)
    state = tuple(torch.randn(shape[:-1] + (6,), dtype=dtype) for _ in range(2))
    outs = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        si = tuple(t.clone().requires_grad_(hx == "grad") for t in state)
        h, c = m(xi, None if hx == "none" else si)
        (h * 1.7 + c * 0.3).sum().backward()
        outs.append([h, c, xi.grad, *(t.grad for t in si if hx == "grad"), *(p.grad for p in m.parameters())])
    for a, b in zip(*outs):
        assert b is not None and a.shape == b.shape
        assert_close(b, a, TOL[dtype])
    assert general == []
