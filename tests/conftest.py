"""Shared helpers for the differential tests: lstmkit against torch.nn.LSTM."""
from __future__ import annotations

import importlib.util
import os

# Triton decides between compiling and interpreting when it is imported: CI has no GPU,
# so the triton engine's tests run its kernels in the interpreter on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import settings
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstmkit

settings.register_profile("lstmkit", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("lstmkit")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def cpu_engines() -> list[str]:
    """The engines that run on CPU tensors in every environment."""
    engines = ["reference"]
    if importlib.util.find_spec("lstmkit.engines.numba.engine") is not None:
        engines.append("numba")
    return engines


@pytest.fixture(params=cpu_engines(), scope="session")
def engine(request):
    return request.param


def pair(cfg: dict, engine: str, dtype=torch.float64, seed: int = 0):
    """(torch.nn.LSTM, lstmkit.LSTM) with identical weights."""
    torch.manual_seed(seed)
    ref = nn.LSTM(**cfg, dtype=dtype)
    ours = lstmkit.LSTM.from_torch(ref, engine=engine)
    return ref, ours


def _flat(out):
    y, (h, c) = out
    if isinstance(y, PackedSequence):
        y = y.data
    return [y, h, c]


def assert_close(a, b, tol, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.abs().max().item() if b.numel() else 1.0), f"{what}: max abs error {err:.3g} > {tol}"


def run_differential(ref: nn.Module, ours: nn.Module, make_input, hx=None, seed: int = 1):
    """Run both modules on the same input (and optional (h0, c0)), backpropagate the same
    random output gradients, and check outputs and gradients of input, h0, c0 and
    every parameter agree within TOL[dtype]."""
    dtype = ref.weight_ih_l0.dtype
    tol = TOL[dtype]
    results = []
    for m in (ref, ours):
        m.zero_grad()
        inp, leaves = make_input()
        state = None
        if hx is not None:
            state = tuple(t.detach().clone().requires_grad_(True) for t in hx)
            leaves = leaves + list(state)
        out = m(inp, state)
        flat = _flat(out)
        g = torch.Generator().manual_seed(seed)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in flat)
        loss.backward()
        grads = [leaf.grad for leaf in leaves] + [p.grad for p in m.parameters()]
        results.append((flat, grads, out))
    (fa, ga, oa), (fb, gb, ob) = results
    for name, a, b in zip(("output", "h_n", "c_n"), fb, fa):
        assert_close(a, b, tol, name)
    names = ["input", "h0", "c0"][: len(ga) - len(list(ref.parameters()))] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, gb, ga):
        assert (a is None) == (b is None), f"grad of {name}: one is None"
        if a is not None:
            assert_close(a, b, tol, f"grad {name}")
    return oa, ob


def padded_input(L, N, I, dtype, batch_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (N, L, I) if batch_first else (L, N, I)
    x = torch.randn(shape, generator=g, dtype=dtype)

    def make():
        xi = x.clone().requires_grad_(True)
        return xi, [xi]

    return make


def packed_input(lengths, I, dtype, enforce_sorted=False, batch_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, N = max(lengths), len(lengths)
    x = torch.randn((N, L, I) if batch_first else (L, N, I), generator=g, dtype=dtype)

    def make():
        xi = x.clone().requires_grad_(True)
        return pack_padded_sequence(xi, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=enforce_sorted), [xi]

    return make
