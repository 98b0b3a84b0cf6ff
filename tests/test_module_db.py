"""PyTorch's own module test cases, run against lstmkit.LSTM / lstmkit.LSTMCell.

torch ships its module test database (torch.testing._internal.common_modules.module_db):
for nn.LSTM and nn.LSTMCell, sample constructor arguments and inputs (unbatched, with and
without state, bias, batch_first, bidirectional, proj_size) with a reference function, and
error samples with the expected exception type and message. This harness feeds those
samples to lstmkit's classes and makes the checks PyTorch's test/test_modules.py makes
(written here from its list of checks, not copied): forward vs the reference function and
vs the torch module with the same weights, .float()/.double(), factory kwargs, repr, pickling
and deepcopy, non-contiguous inputs and output gradients, gradcheck and gradgradcheck of the
total and of each parameter's partial derivative (float64, train and eval), contiguous
outputs and gradients, construction under torch.device("meta"), and the error samples.
"""
from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn
from torch._subclasses.meta_utils import assert_metadata_eq
from torch.autograd import gradcheck, gradgradcheck
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
from torch.testing._internal.common_utils import freeze_rng_state
from torch.utils._pytree import tree_flatten, tree_map

import lstmkit
from harness import TOL, TOL_SAME_KERNELS, assert_all_close

OURS = {nn.LSTM: lstmkit.LSTM, nn.LSTMCell: lstmkit.LSTMCell}
INFOS = {info.module_cls: info for info in module_db if info.module_cls in OURS}
assert set(INFOS) == set(OURS), "torch's module_db lost its nn.LSTM / nn.LSTMCell entries"
DTYPES = [torch.float32, torch.float64]


def _samples(torch_cls, dtype, training, requires_grad=False, device="cpu"):
    info = INFOS[torch_cls]
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad, training=training)


def _build(cls, sample, dtype, training, engine=None):
    args, kwargs = sample.constructor_input.args, dict(sample.constructor_input.kwargs)
    if engine is not None:
        kwargs["engine"] = engine
    m = cls(*args, **kwargs).to(dtype)
    m.train(training)
    return m


def _forward_args(sample):
    return sample.forward_input.args, sample.forward_input.kwargs


def _tensors(obj):
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _leaves(obj):
    """The tensors (and Nones: no gradient) of a nested output, in order, for assert_all_close."""
    return [t for t in tree_flatten(obj)[0] if t is None or isinstance(t, torch.Tensor)]


CASES = [(c, k) for c in OURS for k in range(len(_samples(c, torch.float64, True)))]
CASE_IDS = [f"{c.__name__}-{k}" for c, k in CASES]
MODES = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# The default engine (numba here) in both modes; the reference engine, tested at length
# elsewhere, in training only, to keep CI time down.
ENGINE_MODES = pytest.mark.parametrize("engine, training", [("auto", True), ("auto", False), ("reference", True)],
                                       ids=["auto-train", "auto-eval", "reference-train"])


def _case(torch_cls, k, dtype, training, requires_grad=False):
    return _samples(torch_cls, dtype, training, requires_grad)[k]


# ---- forward: reference function, torch's module, .float()/.double() --------------------------------
@pytest.mark.parametrize("torch_cls, k", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@ENGINE_MODES
def test_forward(torch_cls, k, dtype, training, engine):
    sample = _case(torch_cls, k, dtype, training)
    args, kwargs = _forward_args(sample)
    with freeze_rng_state():
        m = _build(OURS[torch_cls], sample, dtype, training, engine)
        out = m(*args, **kwargs)
        if sample.reference_fn is not None:  # the unbatched call as a batch of one (it passes the parameters itself)
            assert_all_close(_leaves(out), _leaves(sample.reference_fn(m, *args, **kwargs)), TOL[dtype])
        ref = _build(torch_cls, sample, dtype, training)
        ref.load_state_dict(m.state_dict())
        assert_all_close(_leaves(out), _leaves(ref(*args, **kwargs)), TOL[dtype])
        # The conversion methods move every parameter, and the module still runs.
        other = torch.float32 if dtype == torch.float64 else torch.float64
        for convert, want in ((methodcaller_for(other), other), (methodcaller_for(dtype), dtype)):
            convert(m)
            assert all(p.dtype == want and p.device.type == "cpu" for p in m.parameters())
            m(*tree_map(lambda t: t.to(want) if isinstance(t, torch.Tensor) else t, args), **kwargs)


def methodcaller_for(dtype):
    return {torch.float32: lambda m: m.float(), torch.float64: lambda m: m.double()}[dtype]


# ---- construction: factory kwargs, meta device, repr ----------------------------------------------------
@pytest.mark.parametrize("torch_cls, k", CASES, ids=CASE_IDS)
def test_factory_kwargs_meta_and_repr(torch_cls, k):
    sample = _case(torch_cls, k, torch.float64, True)
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    cls = OURS[torch_cls]
    for dtype in DTYPES:
        m = cls(*args, **kwargs, device="cpu", dtype=dtype)
        assert all(p.dtype == dtype and p.device == torch.device("cpu") for p in m.parameters())
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in torch_cls(*args, **kwargs).named_parameters()]
    m = cls(*args, **kwargs, device="meta")
    assert all(p.is_meta for p in m.parameters())
    # Under a meta device context no memory is touched, and every parameter has the
    # metadata (shape, dtype, strides, requires_grad) of the CPU module's.
    m_cpu = cls(*args, **kwargs)
    with torch.device("meta"):
        m_meta = cls(*args, **kwargs)
    pairs = list(zip(m_meta.parameters(), m_cpu.parameters())) + list(zip(m_meta.buffers(), m_cpu.buffers()))
    assert len(pairs) == len(list(m_cpu.parameters())) + len(list(m_cpu.buffers()))
    for p_meta, p_cpu in pairs:
        assert p_meta.is_meta
        assert_metadata_eq(lambda a, b, msg=None: _assert_equal(a, b, msg), p_meta, p_cpu)
    # repr / str: torch's text for the same arguments (lstmkit adds only options torch lacks).
    assert cls.__name__ == torch_cls.__name__
    assert repr(m_cpu) == repr(torch_cls(*args, **kwargs))
    assert str(m_cpu) == repr(m_cpu)


def _assert_equal(a, b, msg=None):
    assert a == b, msg or f"{a!r} != {b!r}"


# ---- pickling and deepcopy ---------------------------------------------------------------------------
@pytest.mark.parametrize("torch_cls, k", CASES, ids=CASE_IDS)
@MODES
def test_pickle_and_deepcopy(torch_cls, k, training):
    sample = _case(torch_cls, k, torch.float64, training)
    args, kwargs = _forward_args(sample)
    with freeze_rng_state():
        m = _build(OURS[torch_cls], sample, torch.float64, training)
        out = m(*args, **kwargs)
        with torch.no_grad():
            m(*args, **kwargs)  # the inference fast path caches a runtime: it must not be saved
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        copies = [torch.load(buf, weights_only=False), copy.deepcopy(m)]
        for c in copies:
            assert type(c) is type(m) and c.training == training
            assert_all_close(_leaves(c(*args, **kwargs)), _leaves(out), 0)  # bitwise: the same weights
            for (n, p), (_, q) in zip(m.named_parameters(), c.named_parameters()):
                assert p.data_ptr() != q.data_ptr(), f"{n} shares memory with the original"


# ---- non-contiguous inputs and output gradients --------------------------------------------------------
def _non_contiguous(t):
    """The same values, strided (every other element of a doubled last dim)."""
    out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    assert not out.is_contiguous() or out.numel() <= 1
    return out.requires_grad_(t.requires_grad)


def _grads_of(m, args, kwargs, grad_out):
    for t in _tensors((args, kwargs)) + list(m.parameters()):
        t.grad = None
    with freeze_rng_state():
        out = m(*args, **kwargs)
    outs = tree_flatten(out)[0]
    torch.autograd.backward(outs, tree_flatten(grad_out)[0])
    return out, [t.grad for t in _tensors((args, kwargs))], [p.grad for p in m.parameters()]


@pytest.mark.parametrize("torch_cls, k", CASES, ids=CASE_IDS)
@ENGINE_MODES
def test_non_contiguous_tensors(torch_cls, k, training, engine):
    sample = _case(torch_cls, k, torch.float64, training, requires_grad=True)
    args, kwargs = _forward_args(sample)
    m = _build(OURS[torch_cls], sample, torch.float64, training, engine)
    with freeze_rng_state():
        out = m(*args, **kwargs)
    g = torch.Generator().manual_seed(0)
    grad_out = tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), out)
    expected = _grads_of(m, args, kwargs, grad_out)
    nc_args = tree_map(_non_contiguous, args)
    nc_grad = tree_map(_non_contiguous, grad_out)
    for a, go in itertools.product((args, nc_args), (grad_out, nc_grad)):
        got = _grads_of(m, a, kwargs, go)
        assert_all_close(_leaves(got), _leaves(expected), TOL_SAME_KERNELS[torch.float64])
        for t in tree_flatten(got[0])[0]:
            assert t.is_contiguous(), "outputs are contiguous whatever the input's strides"
    for t in tree_flatten(expected[1:])[0]:
        assert t is None or t.is_contiguous(), "gradients of contiguous tensors are contiguous"


# ---- gradcheck / gradgradcheck: total and per-parameter partial derivatives ---------------------------
def _gradient_checks(torch_cls, k, training, engine, check, partials=False):
    sample = _case(torch_cls, k, torch.float64, training, requires_grad=True)
    args, kwargs = _forward_args(sample)
    assert not kwargs
    m = _build(OURS[torch_cls], sample, torch.float64, training, engine)
    params = tuple(m.parameters())
    flat_args, spec = tree_flatten(args)

    def fn(*flat):
        new_args = torch.utils._pytree.tree_unflatten(list(flat[: len(flat_args)]), spec)
        with freeze_rng_state():
            return tree_flatten(m(*new_args))[0]

    assert check(fn, (*flat_args, *params))
    if not partials:
        return
    # Each parameter alone (the others frozen): the partial derivatives.
    for p in params:
        p.requires_grad_(False)
    try:
        for p in params:
            p.requires_grad_(True)
            assert check(fn, (*flat_args, *params))
            p.requires_grad_(False)
    finally:
        for p in params:
            p.requires_grad_(True)


# fast_mode: a random projection of the same Jacobians (torch's own module tests use it for
# slow modules); a backward treated as constant, or a wrong entry, still fails it.
def _gradcheck(f, x):
    return gradcheck(f, x, fast_mode=True)


def _gradgradcheck(f, x):
    return gradgradcheck(f, x, fast_mode=True)


@pytest.mark.parametrize("torch_cls, k", CASES, ids=CASE_IDS)
@MODES
def test_gradcheck(torch_cls, k, training):
    _gradient_checks(torch_cls, k, training, "auto", _gradcheck)


@pytest.mark.parametrize("torch_cls, k", CASES, ids=CASE_IDS)
@ENGINE_MODES
def test_gradgradcheck(torch_cls, k, training, engine):
    _gradient_checks(torch_cls, k, training, engine, _gradgradcheck)


# Each parameter's partial derivative on its own costs one check per parameter (up to 20 for
# a 2-layer bidirectional LSTM), so on the samples with a given state, bidirectional and
# proj_size, with bias (batch-first) and without (not), and both LSTMCells.
def _full_samples():
    out = []
    for c, k in CASES:
        sample = _case(c, k, torch.float64, True)
        kw = sample.constructor_input.kwargs
        if c is nn.LSTMCell or (kw["bidirectional"] and kw["proj_size"] and len(sample.forward_input.args) == 2
                                and kw["bias"] == kw["batch_first"]):
            out.append(pytest.param(c, k, id=f"{c.__name__}-{k}"))
    return out


@pytest.mark.parametrize("torch_cls, k", _full_samples())
@pytest.mark.parametrize("check", [_gradcheck, _gradgradcheck], ids=["gradcheck", "gradgradcheck"])
def test_partial_derivatives(torch_cls, k, check):
    _gradient_checks(torch_cls, k, True, "auto", check, partials=True)


# ---- train / eval ---------------------------------------------------------------------------------------
# Only the classes whose ModuleInfo says train and eval do not differ (nn.LSTMCell): for nn.LSTM
# (marked as differing: dropout) the check has nothing to assert. test_forward compares both
# modes of every sample with torch.
SAME_IN_TRAIN_AND_EVAL = [pytest.param(c, k, id=f"{c.__name__}-{k}") for c, k in CASES
                          if not INFOS[c].train_and_eval_differ]


@pytest.mark.parametrize("torch_cls, k", SAME_IN_TRAIN_AND_EVAL)
def test_forward_never_reads_training_where_train_and_eval_agree(torch_cls, k):
    sample = _case(torch_cls, k, torch.float64, True)
    m = _build(OURS[torch_cls], sample, torch.float64, True)
    delattr(m, "training")
    args, kwargs = _forward_args(sample)
    m(*args, **kwargs)  # an AttributeError about 'training' here: forward read it


# ---- the error samples ---------------------------------------------------------------------------------
def _error_samples():
    out = []
    for torch_cls in OURS:
        info = INFOS[torch_cls]
        for dtype in DTYPES:
            for k, e in enumerate(info.module_error_inputs_func(info, device="cpu", dtype=dtype,
                                                               requires_grad=False, training=True)):
                out.append(pytest.param(torch_cls, e, id=f"{torch_cls.__name__}-{dtype}-{k}"))
    return out


@pytest.mark.parametrize("torch_cls, error", _error_samples())
def test_errors(torch_cls, error):
    sample = error.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    cls = OURS[torch_cls]
    if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(error.error_type, match=error.error_regex):
            cls(*args, **kwargs)
    else:
        assert error.error_on == ModuleErrorEnum.FORWARD_ERROR
        m = cls(*args, **kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            m(*sample.forward_input.args, **sample.forward_input.kwargs)
        # torch raises the same (the sample is torch's own expectation).
        with pytest.raises(error.error_type, match=error.error_regex):
            torch_cls(*args, **kwargs)(*sample.forward_input.args, **sample.forward_input.kwargs)


def test_every_sample_is_run():
    """The harness covers what torch ships (a torch upgrade that adds samples is seen here)."""
    assert len(CASES) == sum(len(_samples(c, torch.float64, True)) for c in OURS) >= 18
    assert len(_error_samples()) >= 20
    assert {p.values[0] for p in SAME_IN_TRAIN_AND_EVAL} == {nn.LSTMCell}
