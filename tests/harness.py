"""The differential harness every test file uses: lstmkit against an oracle (torch.nn.LSTM,
or for variants a plain-loop implementation), outputs and every gradient, one tolerance table.

    from harness import TOL, assert_close, pair, padded_input, run_differential
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstmkit

# ---- the tolerance table ---------------------------------------------------------------------
# lstmkit vs the oracle: different kernels, different summation orders.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Two paths through the same kernels (compiled vs eager, fast path vs autograd path): only
# the order of a few additions may differ.
TOL_SAME_KERNELS = {torch.float64: 1e-12}


def tolerance(dtype, table: dict = TOL) -> float:
    return table[dtype if isinstance(dtype, torch.dtype) else _TORCH_DTYPE[np.dtype(dtype)]]


_TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


# ---- comparing ---------------------------------------------------------------------------------
def assert_close(a, b, tol, what=""):
    """|a - b| <= tol * max(1, max |b|): absolute below 1, relative above (gradients can be large).
    a, b: tensors or numpy arrays of the same shape."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert tuple(a.shape) == tuple(b.shape), f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 1.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} (scale {scale:.3g})"


def assert_all_close(got, want, tol, names=None):
    """Pairwise assert_close over two equally long lists; None must match None (no gradient)."""
    assert len(got) == len(want), f"{len(got)} results != {len(want)}"
    names = names or [f"item {k}" for k in range(len(want))]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), f"{name}: one is None"
        if a is not None:
            assert_close(a, b, tol, name)


def flat_output(out) -> list[torch.Tensor]:
    """[output (packed: its .data), h_n, c_n] of an LSTM call's (output, (h_n, c_n))."""
    y, (h, c) = out
    return [y.data if isinstance(y, PackedSequence) else y, h, c]


# ---- running ------------------------------------------------------------------------------------
def outputs_and_grads(module: nn.Module, make_input, hx=None, seed: int = 1):
    """Run module on make_input() (-> (input, leaves)) and optional (h0, c0), backpropagate
    fixed random output gradients (drawn from `seed`) and return
    (outputs [y, h_n, c_n], grads [each leaf, h0, c0, every parameter], the raw output)."""
    module.zero_grad()
    inp, leaves = make_input()
    state = None
    if hx is not None:
        state = tuple(t.detach().clone().requires_grad_(True) for t in hx)
        leaves = leaves + list(state)
    out = module(inp, state)
    flat = flat_output(out)
    g = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in flat)
    loss.backward()
    grads = [leaf.grad for leaf in leaves] + [p.grad for p in module.parameters()]
    return flat, grads, out


def run_differential(ref: nn.Module, ours: nn.Module, make_input, hx=None, seed: int = 1, tol=None):
    """The differential test: both modules on the same input (and optional (h0, c0)), the same
    random output gradients; outputs and the gradients of input, h0, c0 and every parameter
    agree within tol (default TOL[dtype]). Returns both raw outputs (ref's, ours)."""
    tol = TOL[ref.weight_ih_l0.dtype] if tol is None else tol
    fa, ga, oa = outputs_and_grads(ref, make_input, hx, seed)
    fb, gb, ob = outputs_and_grads(ours, make_input, hx, seed)
    assert_all_close(fb, fa, tol, ["output", "h_n", "c_n"])
    n_params = len(list(ref.parameters()))
    names = ["input", "h0", "c0"][: len(ga) - n_params] + [n for n, _ in ref.named_parameters()]
    assert_all_close(gb, ga, tol, [f"grad {n}" for n in names])
    return oa, ob


def pair(cfg: dict, engine: str, dtype=torch.float64, seed: int = 0):
    """(torch.nn.LSTM, lstmkit.LSTM) with identical weights."""
    torch.manual_seed(seed)
    ref = nn.LSTM(**cfg, dtype=dtype)
    ours = lstmkit.LSTM.from_torch(ref, engine=engine)
    return ref, ours


# ---- inputs: make() -> (module input, leaves whose gradients are compared) ----------------------
def tensor_input(x: torch.Tensor):
    """A fixed tensor as a fresh leaf on every call."""
    def make():
        xi = x.detach().clone().requires_grad_(True)
        return xi, [xi]

    return make


def padded_input(L, N, I, dtype, batch_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (N, L, I) if batch_first else (L, N, I)
    return tensor_input(torch.randn(shape, generator=g, dtype=dtype))


def packed_input(lengths, I, dtype, enforce_sorted=False, batch_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, N = max(lengths), len(lengths)
    x = torch.randn((N, L, I) if batch_first else (L, N, I), generator=g, dtype=dtype)

    def make():
        xi = x.clone().requires_grad_(True)
        return pack_padded_sequence(xi, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=enforce_sorted), [xi]

    return make


@contextlib.contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) for the block, the caller's count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def require_team(monkeypatch) -> None:
    """What the unit split needs to run: torch's OpenMP team adopted, and the team bodies taken as
    compiled (with a cold cache the prefetch child may still be compiling them, and the split
    would then step aside: team.team_bodies)."""
    from lstmkit.engines.numba.binding import share_torch_threads
    from lstmkit.kernels.numba import prefetch

    # torch's CPU build runs its threads on OpenMP: the split needs that team.
    assert share_torch_threads(), "no OpenMP runtime found in torch: the column split cannot run"
    monkeypatch.setattr(prefetch, "compiling", lambda name: False)
