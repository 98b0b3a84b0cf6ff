"""Concurrency: one module / one runtime object called from several Python threads at once (as
a web server does) gives, in every thread, exactly what serial calls give.

The jobs differ in shape (batch, length, streaming state) so that a scratch buffer, a cached
array or a "last call" shortcut shared between calls would hand one thread another's numbers.
The kernels release the GIL (nogil), so the threads really overlap in the kernels.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import lstmkit
from lstmkit import runtime

THREADS = 4
ROUNDS = 6


def _run_concurrently(jobs, call, compare):
    """Serial results first; then THREADS threads, released together, each running every job
    ROUNDS times in its own order; every result must equal the serial one."""
    expected = [call(job) for job in jobs]
    start = threading.Barrier(THREADS)
    failures = []

    def worker(k):
        try:
            start.wait()
            for r in range(ROUNDS):
                for j in range(len(jobs)):
                    i = (j * (k + 1) + r) % len(jobs)  # each thread its own interleaving
                    compare(call(jobs[i]), expected[i])
        except Exception as e:  # noqa: BLE001  (reported below, with the thread)
            failures.append((k, repr(e)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


def _same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-12)


def _inputs(I, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, N, I, generator=g, dtype=torch.float64) for L, N in shapes]


# Batch 1 one-step (the streaming fast path), small batches (all-Numba loop), batch 16 at hidden 128
# (big steps: the torch-GEMM loop), and a longer sequence.
SHAPES = [(1, 1), (5, 3), (3, 16), (9, 2)]


def _module(engine="auto", **kw):
    torch.manual_seed(0)
    return lstmkit.LSTM(8, 128, dtype=torch.float64, engine=engine, **kw).eval()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True, proj_size=16),
                                dict(layer_norm=True, zoneout=0.2)], ids=["plain", "bidir_proj", "variant"])
def test_module_inference_from_threads(mode, kw):
    m = _module(**kw)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    xs = _inputs(8, SHAPES)
    hxs = [tuple(torch.randn(s, dtype=torch.float64) for s in m.config.state_shapes(x.shape[1])) for x in xs]

    def call(k):
        with ctx():
            y, (h, c) = m(xs[k], hxs[k] if k % 2 else None)
        return y.clone(), h.clone(), c.clone()

    _run_concurrently(list(range(len(xs))), call, _same)


def test_module_streaming_from_threads():
    """Each thread streams its own sequence one step at a time, feeding back the state the
    module returned: the module remembers the last state it returned (a shortcut), which
    must never give one thread another thread's state."""
    m = _module()
    seqs = _inputs(8, [(6, 1), (6, 2), (6, 1), (6, 3)], seed=1)

    def call(k):
        state, ys = None, []
        with torch.no_grad():
            for t in range(seqs[k].shape[0]):
                y, state = m(seqs[k][t : t + 1], state)
                ys.append(y.clone())
        return torch.cat(ys), state[0].clone(), state[1].clone()

    _run_concurrently(list(range(len(seqs))), call, _same)


@pytest.mark.parametrize("engine", ["numba", "reference"])
@pytest.mark.parametrize("kw", [dict(), dict(layer_norm=True, peephole=True)], ids=["plain", "variant"])
def test_module_training_step_from_threads(engine, kw):
    """Forward + backward (autograd.grad: no shared .grad accumulation) at once from several threads."""
    m = _module(engine=engine, **kw).train()
    xs = _inputs(8, SHAPES[1:], seed=2)
    params = list(m.parameters())

    def call(k):
        x = xs[k].clone().requires_grad_(True)
        y, (h, c) = m(x)
        loss = y.square().sum() + h.sum() + 2 * c.sum()
        return [t.detach() for t in (y, *torch.autograd.grad(loss, [x, *params]))]

    _run_concurrently(list(range(len(xs))), call, _same)


def test_runtime_from_threads():
    """One lstmkit.runtime.Runtime shared by threads: batched calls of different shapes, and
    streaming calls that feed back the state the runtime returned."""
    m = _module(num_layers=2)
    rt = runtime.Runtime(m.config, {n: p.detach().numpy() for n, p in m.named_parameters()})
    xs = [x.numpy() for x in _inputs(8, SHAPES, seed=3)]

    def call(k):
        if k < len(xs):
            y, (h, c) = rt(xs[k])
            return y.copy(), h.copy(), c.copy()
        x = xs[k - len(xs)]  # stream it step by step
        state, ys = None, []
        for t in range(x.shape[0]):
            y, state = rt(x[t : t + 1], state)
            ys.append(y.copy())
        return np.concatenate(ys), state[0].copy(), state[1].copy()

    _run_concurrently(list(range(2 * len(xs))), call, _same)


def test_runtime_matches_module():
    """The serial reference the runtime's concurrent test compares against is itself right."""
    m = _module()
    rt = runtime.Runtime(m.config, {n: p.detach().numpy() for n, p in m.named_parameters()})
    x = _inputs(8, [(4, 3)], seed=4)[0]
    with torch.enable_grad():  # the module's general (autograd) path, not the runtime it uses in no_grad
        y, (h, c) = m(x.requires_grad_(True))
    ry, (rh, rc) = rt(x.detach().numpy())
    _same((ry, rh, rc), (y.detach(), h.detach(), c.detach()))
