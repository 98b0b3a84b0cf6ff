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


@pytest.mark.parametrize("sizes", [(8, 128), (128, 256)], ids=["one_thread", "split"])
def test_cell_steps_from_threads(sizes):
    """One LSTMCell stepped from several threads at once without grad (binding.cell_step: the
    step by address, split over the OpenMP team on the bigger weights, and 9 rows by torch's GEMMs
    and the gate kernel), batched and not, from zeros and from states: each thread gets the serial
    results."""
    I, H = sizes
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(I, H, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(s + (I,), generator=g, dtype=torch.float64) for s in ((1,), (2,), (), (9,))]  # 9: the GEMMs
    hxs = [tuple(torch.randn(x.shape[:-1] + (H,), generator=g, dtype=torch.float64) for _ in range(2)) for x in xs]

    def call(k):
        with torch.no_grad():
            h, c = cell(xs[k % 4], hxs[k % 4] if k >= 4 else None)
        return h, c

    _run_concurrently(list(range(8)), call, _same)


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


# ---- where a call's row chunks run (kernels/numba/threads.py) ------------------------------------
def _os_threads() -> set[int]:
    import os

    return {int(t) for t in os.listdir("/proc/self/task")}


def _chunk_threads(bounds):
    """run_chunks over `bounds`, each chunk recording the OS thread it ran on."""
    from lstmkit.kernels.numba.threads import run_chunks

    seen = {}

    def fn(r0, r1):
        seen[int(r0)] = threading.get_native_id()

    run_chunks(fn, bounds)
    return seen


@pytest.mark.skipif(not hasattr(threading, "get_native_id") or not __import__("os").path.isdir("/proc/self/task"),
                    reason="needs Linux's /proc/self/task")
def test_chunks_run_on_torchs_openmp_team():
    """With torch on OpenMP the chunks run on the threads torch's own ops run on: after a torch
    op at 2 threads, a split call starts no thread of its own, and its 2 chunks run on 2
    different threads (the caller and torch's worker)."""
    from lstmkit.engines.numba.binding import torch_openmp_library
    from lstmkit.kernels.numba import threads

    if torch_openmp_library() is None:
        pytest.skip("torch here does not run on OpenMP")
    assert threads.openmp_in_use()
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(512, 512)
        a.mm(a)  # torch's team of 2 threads exists now
        before = _os_threads()
        seen = _chunk_threads(np.array([0, 5, 10], np.int64))
        assert len(set(seen.values())) == 2 and threading.get_native_id() in seen.values()
        assert _os_threads() == before  # no new OS thread: the team's worker did chunk 2
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("team", [True, False], ids=["openmp_team", "own_threads"])
def test_chunk_exception_reaches_the_caller(team):
    """An error inside any chunk is raised in the caller (a callback from an OpenMP thread
    would otherwise print it and go on, leaving the output half written)."""
    from lstmkit.engines.numba.binding import share_torch_threads
    from lstmkit.kernels.numba import threads

    if not team:
        threads.use_openmp(None)
    try:
        def fn(r0, r1):
            if r0 == 3:
                raise ValueError("chunk 3 failed")

        with pytest.raises(ValueError, match="chunk 3 failed"):
            threads.run_chunks(fn, np.array([0, 3, 6], np.int64))
        done = []
        threads.run_chunks(lambda r0, r1: done.append(int(r0)), np.array([0, 3, 6, 9], np.int64))
        assert sorted(done) == [0, 3, 6]  # more chunks than a team of 2: every chunk still runs
    finally:
        share_torch_threads()


@pytest.mark.parametrize("N", [2, 5, 16])
def test_own_threads_and_openmp_team_give_bitwise_the_same(N, monkeypatch):
    """Where the chunks run changes nothing in the numbers: a training step on torch's team
    (through compiled team bodies, and through Python callbacks) and on the kernels' own
    threads (LSTMKIT_OWN_THREADS=1), 2 threads, split however small."""
    from lstmkit.engines.numba.binding import share_torch_threads
    from lstmkit.kernels.numba import lstm as kernels
    from lstmkit.kernels.numba import threads

    monkeypatch.setattr(kernels, "MIN_SPLIT_MACS", 0)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.manual_seed(N)
    m = lstmkit.LSTM(6, 20, num_layers=2, bidirectional=True, engine="numba")
    x = torch.randn(9, N, 6, requires_grad=True)  # 9 * N rows: the time-loop kernels (binding.unpacked_path)

    def step():
        m.zero_grad()
        x.grad = None
        y, (h, c) = m(x)
        (y.square().sum() + h.sum() + c.sum()).backward()
        return [y.detach(), x.grad] + [p.grad.clone() for p in m.parameters()]

    from lstmkit.kernels.numba import prefetch

    monkeypatch.setattr(prefetch, "compiling", lambda name: False)  # the compiled bodies, not the fallback
    launched = []
    run_compiled = threads.run_compiled
    monkeypatch.setattr(threads, "run_compiled", lambda *a: launched.append(a[0]) or run_compiled(*a))
    try:
        on_team = step()  # compiled team bodies (team.py): no Python on the team's threads
        assert len(launched) >= 2 * 2 * 2  # 2 layers x 2 directions, forward and backward
        with monkeypatch.context() as m2:  # the same team, each thread calling back into Python
            m2.setattr(kernels, "forward_body", lambda dtype: None)
            m2.setattr(kernels, "backward_body", lambda dtype: None)
            n = len(launched)
            callbacks = step()
            assert len(launched) == n
        monkeypatch.setenv("LSTMKIT_OWN_THREADS", "1")
        assert not share_torch_threads() and not threads.openmp_in_use()
        own = step()
    finally:
        monkeypatch.delenv("LSTMKIT_OWN_THREADS")
        share_torch_threads()
        torch.set_num_threads(old)
    for a, b, c in zip(on_team, callbacks, own):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_split_calls_from_several_threads_at_once(monkeypatch):
    """Python threads that each make split calls at once (each becomes the master of its own
    OpenMP team) get exactly their serial results."""
    from lstmkit.kernels.numba import lstm as kernels

    monkeypatch.setattr(kernels, "MIN_SPLIT_MACS", 0)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = _module()
        jobs = _inputs(8, [(6, 4), (3, 7), (9, 2)])

        def call(x):
            with torch.no_grad():
                return m(x)[0]

        _run_concurrently(jobs, call, lambda a, b: _same([a], [b]))
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not hasattr(__import__("os"), "register_at_fork"), reason="needs fork")
@pytest.mark.parametrize("team", [True, False], ids=["openmp_team", "own_threads"])
def test_split_calls_work_in_a_forked_child(team):
    """A process forked after split calls (a multiprocessing worker, a pre-forking server) makes
    split calls of its own: the parent's OpenMP team and Python threads do not exist in the
    child (libgomp waited forever for them), so the child runs its chunks on fresh threads and
    gets the parent's numbers bitwise. (torch's own multi-threaded ops hang in such a child,
    so the child here compares in numpy.)"""
    import multiprocessing as mp

    from lstmkit.engines.numba.binding import share_torch_threads
    from lstmkit.kernels.numba import threads

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    if not team:
        threads.use_openmp(None)
    try:
        torch.manual_seed(0)
        m = lstmkit.LSTM(64, 128, engine="numba").eval()
        x = torch.randn(50, 16, 64)
        with torch.no_grad():
            want = m(x)[0].numpy().copy()  # split over 2 chunks in the parent

        def child(q):
            with torch.no_grad():
                q.put(float(np.abs(m(x)[0].numpy() - want).max()))

        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        p.join(60)
        if p.exitcode is None:
            p.kill()
        assert p.exitcode == 0, "the forked child hung or failed in a split call"
        assert q.get(timeout=5) == 0.0
    finally:
        share_torch_threads()
        torch.set_num_threads(old)
