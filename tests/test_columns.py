"""The forward time loop split by hidden units over an OpenMP team (kernels/numba/columns.py),
launched through a compiled team body (kernels/numba/team.py, threads.run_compiled).

The split must give bitwise the row kernel's results (each unit's pre-activation is the same
chain of multiply-adds, lstm.py's gate pass the same code), whatever the number of parts and
the team's size, forward and reverse, padded and packed (rows that end, rows that join), and
the module must take it where columns_pay says so, matching torch.nn.LSTM."""

import numpy as np
import pytest
import torch
from torch.nn.utils import rnn as nn_utils

import lstmkit
from lstmkit.engines.numba import binding
from lstmkit.kernels.numba import blas, caches, columns, lstm
from lstmkit.kernels.numba.simd import LANES

from harness import TOL, require_team, torch_threads


@pytest.fixture(autouse=True)
def team(monkeypatch):
    require_team(monkeypatch)  # here the split must run
    yield


def _case(rng, T, B, I, H, dtype, packed):
    w_ih = (rng.standard_normal((4 * H, I)) * 0.3).astype(dtype)
    w_hh = (rng.standard_normal((4 * H, H)) * 0.3).astype(dtype)
    b = (rng.standard_normal(4 * H) * 0.1).astype(dtype)
    if packed:
        lengths = np.sort(rng.integers(1, T + 1, B))[::-1].copy()
        lengths[0] = T
        bs = np.array([(lengths > t).sum() for t in range(T)], np.int64)
    else:
        bs = np.full(T, B, np.int64)
    x = rng.standard_normal((int(bs.sum()), I)).astype(dtype)
    h0, c0 = (rng.standard_normal((B, H)).astype(dtype) for _ in range(2))
    return x, bs, h0, c0, w_ih, w_hh, b


def _run_columns(x, bs, h0, c0, w_ih, w_hh, b, reverse, parts, team_threads, precompute):
    wps, bps, units = columns.pack_columns(w_ih, w_hh, b, parts)
    total, (B, H) = x.shape[0], h0.shape
    y, h, c = np.full((total, H), np.nan, x.dtype), np.full((B, H), np.nan, x.dtype), np.full((B, H), np.nan, x.dtype)
    xproj = lstm.input_projection(x, w_ih, b) if precompute else None
    assert columns.run_columns(team_threads, x, bs, h0, c0, wps, bps, units, reverse, y, h, c, xproj)
    return y, h, c


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("precompute", [False, True], ids=["fused", "xproj"])
@pytest.mark.parametrize("parts,team_threads", [(2, 2), (3, 2), (2, 1), (1, 2), (4, 4)])
def test_bitwise_the_row_kernel(dtype, reverse, packed, precompute, parts, team_threads):
    """Against lstm_forward, the row kernel, with the input projection fused into the step
    product or made first (the same numpy GEMM for both)."""
    rng = np.random.default_rng(parts * 10 + team_threads)
    for T, B, I, H in [(1, 1, 5, 3 * LANES), (40, 1, 7, 2 * LANES + 5), (13, 3, 20, 130), (6, 4, 300, 40)]:
        x, bs, h0, c0, w_ih, w_hh, b = _case(rng, T, B, I, H, dtype, packed)
        want = lstm.lstm_forward(x, bs, h0, c0, w_ih, w_hh, b, reverse=reverse, precompute=precompute)
        got = _run_columns(x, bs, h0, c0, w_ih, w_hh, b, reverse, parts, team_threads, precompute)
        for g, w in zip(got, want):
            assert np.array_equal(g, w), (T, B, I, H)


def test_unit_bounds_cover_every_unit_in_lane_multiples():
    for H in (1, 15, 16, 17, 64, 130, 512):
        for parts in (1, 2, 3, 4, 7):
            u = columns.unit_bounds(H, parts)
            assert u[0] == 0 and u[-1] == H and np.all(np.diff(u) >= 0)
            assert all(v % LANES == 0 or v == H for v in u[1:-1])  # a part may be empty


def test_a_job_takes_only_contiguous_arrays():
    from lstmkit.kernels.numba.team import encode

    a = np.zeros((4, 6), np.float32)
    assert encode((a, 3, True))[0] == 1 + 3 + 1 + 1  # len, then ptr + 2 dims, 3, True
    with pytest.raises(Exception, match="C-contiguous"):
        encode((a[:, ::2],))


def test_columns_pay_rule():
    assert columns.columns_pay(1, 100, 64, 128, 128, 4, 2)
    assert not columns.columns_pay(1, 100, 64, 128, 128, 4, 1)  # one thread
    assert not columns.columns_pay(16, 100, 64, 128, 128, 4, 2)  # enough rows to split by rows
    assert not columns.columns_pay(1, 1, 64, 128, 128, 4, 2)  # one small step: the team costs more
    assert columns.columns_pay(1, 1, 128, 512, 512, 4, 2)  # one big step
    assert not columns.columns_pay(1, 100, 64, 128, 32, 4, 2)  # projection: not split
    assert columns.columns_pay_training(1, 100, 128, 512, 512, 4, 2)  # 5 MiB of weights
    assert not columns.columns_pay_training(1, 100, 64, 256, 256, 4, 2)  # 1.3 MiB: inference only
    # From 1.5 MiB where the threads do not divide the rows (one would idle or run alone).
    assert columns.columns_pay_training(1, 100, 128, 256, 256, 4, 2)
    assert columns.columns_pay_training(3, 100, 128, 256, 256, 4, 2)
    assert not columns.columns_pay_training(2, 100, 128, 256, 256, 4, 2)
    assert not columns.columns_pay_training(4, 100, 128, 256, 256, 4, 2)
    assert columns.columns_pay_training(4, 100, 128, 512, 512, 4, 2)  # 5 MiB: any rows up to MAX_ROWS
    assert columns.columns_precompute(100, 128, 512, 4, 2) and not columns.columns_precompute(1, 128, 512, 4, 2)
    assert not columns.columns_precompute(100, 64, 128, 4, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw,shape", [
    (dict(), (30, 1)),
    (dict(num_layers=2), (12, 3)),
    (dict(batch_first=True), (4, 9)),  # (N, L)
    (dict(), (1, 1)),  # one step: the parameters read as they are, not split
    (dict(input_size=640), (5, 2)),  # 3.4 MiB of float32 weights: the input projection made first
])
def test_module_takes_the_split_at_two_threads_and_matches_torch(dtype, kw, shape):
    torch.manual_seed(0)
    kw = dict(input_size=64) | kw
    ref = torch.nn.LSTM(hidden_size=256, dtype=dtype, **kw)
    m = lstmkit.LSTM.from_torch(ref)
    x = torch.randn(shape + (kw["input_size"],), dtype=dtype)
    h0 = torch.randn(ref.num_layers * (2 if ref.bidirectional else 1), x.shape[0 if ref.batch_first else 1], 256,
                     dtype=dtype)
    with torch_threads(2):
        with torch.no_grad():
            y, (h, c) = m(x, (h0, torch.zeros_like(h0)))
            yt, (ht, ct) = ref(x, (h0, torch.zeros_like(h0)))
    N, T = shape if ref.batch_first else shape[::-1]
    if T == 1:  # one step reads the parameters as they are, unsplit (Runtime.live_step, binding.live_step)
        runtime = m.__dict__.get("_runtime")
        assert runtime is None or not runtime[1]._columns
    else:
        split = bool(m.__dict__["_runtime"][1]._columns)
        assert split == columns.columns_pay(N, T, kw["input_size"], 256, 256, x.element_size(), 2)
        assert split
    for a, b in ((y, yt), (h, ht), (c, ct)):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("parts,team_threads", [(2, 2), (3, 2), (2, 1), (4, 4)])
def test_training_forward_and_backward_bitwise_the_row_kernels(dtype, reverse, packed, parts, team_threads):
    """forward_columns(save=True) writes bitwise what forward_core(save=True) writes;
    backward_columns what backward_core writes with dx after the loop, to rounding: the unit
    loop of gate_backward_row on a part's slices compiles to other vector code than on whole
    rows (ULPs in float64)."""
    rng = np.random.default_rng(parts * 7 + team_threads)
    for T, B, I, H in [(1, 1, 5, 3 * LANES), (30, 1, 7, 2 * LANES + 5), (11, 3, 20, 130), (6, 4, 30, 40)]:
        x, bs, h0, c0, w_ih, w_hh, b = _case(rng, T, B, I, H, dtype, packed)
        y1, h1, c1, saved = lstm.lstm_forward(x, bs, h0, c0, w_ih, w_hh, b, reverse=reverse, save=True)
        total = x.shape[0]
        wps, bps, units = columns.pack_columns(w_ih, w_hh, b, parts)
        y, h, c = np.empty((total, H), dtype), np.empty((B, H), dtype), np.empty((B, H), dtype)
        acts, cells = np.full((total, 4 * H), np.nan, dtype), np.full((total, H), np.nan, dtype)
        assert columns.run_columns(team_threads, x, bs, h0, c0, wps, bps, units, reverse, y, h, c, None, acts, cells)
        for g, w in zip((y, h, c, acts, cells), (y1, h1, c1, *saved)):
            assert np.array_equal(g, w), (T, B, I, H)

        dy = rng.standard_normal((total, H)).astype(dtype)
        dh_n, dc_n = rng.standard_normal((B, H)).astype(dtype), rng.standard_normal((B, H)).astype(dtype)
        want = lstm.lstm_backward(x, bs, h0, c0, w_ih, w_hh, None, reverse, y1, saved, dy, dh_n, dc_n,
                                  dx_after=True)
        wbs, units_b = columns.pack_columns_backward(w_hh, parts)
        dh, dc = dh_n.copy(), dc_n.copy()
        dgates, h_prev = np.full((total, 4 * H), np.nan, dtype), np.full((total, H), np.nan, dtype)
        assert columns.run_columns_backward(team_threads, bs, h0, c0, wbs, units_b, reverse, acts, cells, y, dy,
                                            dh, dc, dgates, h_prev)
        dw_ih, dw_hh, db = np.dot(dgates.T, x), np.dot(dgates.T, h_prev), dgates.sum(0)
        dx = np.dot(dgates, w_ih)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for name, g, w in zip(("dx", "dh0", "dc0", "dw_ih", "dw_hh", "db"), (dx, dh, dc, dw_ih, dw_hh, db), want):
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"{name} {(T, B, I, H)}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw,N,packed", [
    (dict(), 1, False),
    (dict(num_layers=2, bidirectional=True), 3, True),  # packed, enforce_sorted=False: rows end and join
    (dict(batch_first=True), 4, False),
])
def test_training_at_two_threads_takes_the_split_and_matches_torch(dtype, kw, N, packed, monkeypatch):
    """A training step (forward saving, backward) at batch 1-4 on 2 threads runs split by hidden
    units; outputs and every gradient match torch.nn.LSTM."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from lstmkit.engines.numba import binding

    used = []
    for name in ("run_columns", "run_columns_backward"):
        real = getattr(binding, name)
        monkeypatch.setattr(binding, name, lambda *a, real=real, name=name, **k: used.append(name) or real(*a, **k))
    monkeypatch.setattr(columns, "TRAIN_MIN_PART_BYTES", 0)  # the rule wants 2 MiB a part: small sizes here
    monkeypatch.setattr(columns, "TRAIN_MIN_PART_BYTES_UNEVEN", 0)
    torch.manual_seed(N)
    ref = torch.nn.LSTM(64, 256, dtype=dtype, **kw)
    m = lstmkit.LSTM.from_torch(ref, engine="numba")
    T = 20  # over binding.FEW_STEPS_MAX_ROWS rows even at N = 1: the time-loop kernels
    x = torch.randn((N, T, 64) if ref.batch_first else (T, N, 64), dtype=dtype)
    lengths = torch.tensor([20, 9, 14][:N])
    with torch_threads(2):
        results = []
        for mod in (m, ref):
            xi = x.clone().requires_grad_(True)
            inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) if packed else xi
            out, (h, c) = mod(inp)
            y = out.data if packed else out
            loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=dtype)).sum() + h.square().sum() + 3 * c.sum()
            results.append([y, h, c, *torch.autograd.grad(loss, [xi, *mod.parameters()])])
    assert "run_columns" in used and "run_columns_backward" in used
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("wanted,packed", [(False, False), (True, False), (False, True)])
def test_training_on_the_biggest_weights_splits_units_on_the_micro_kernel(wanted, packed, monkeypatch):
    """A training step of 12 rows on hidden 1024 at 2 threads runs split by hidden units, forward
    and backward, on the micro-kernel's products where MKL is not wanted (binding._big_columns),
    by rows where it is; outputs and every gradient match torch.nn.LSTM either way, padded or
    packed (enforce_sorted=False: rows end at different steps)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from lstmkit.engines.numba import binding, mkl

    monkeypatch.setattr(mkl, "_wanted", [wanted])  # on any CPU (mkl.wanted)
    used = []
    for name in ("run_columns", "run_columns_backward"):
        real = getattr(binding, name)
        monkeypatch.setattr(binding, name, lambda *a, real=real, name=name, **k: used.append((name, k.get("gemm", 0)))
                            or real(*a, **k))
    monkeypatch.setattr(columns, "WIDE_MAX_ROWS", 4)  # on Intel, MKL's wide split would take 12 rows
    torch.manual_seed(0)
    ref = torch.nn.LSTM(16, 1024)
    m = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = torch.randn(3, 12, 16)
    lengths = torch.tensor([3, 1, 2, 3, 2, 1, 3, 3, 1, 2, 2, 3])
    with torch_threads(2):
        results = []
        for mod in (m, ref):
            xi = x.clone().requires_grad_(True)
            out, (h, c) = mod(pack_padded_sequence(xi, lengths, enforce_sorted=False) if packed else xi)
            out = out.data if packed else out
            loss = (out * torch.linspace(-1, 1, 1024)).sum() + h.square().sum() + 3 * c.sum()
            results.append([out, h, c, *torch.autograd.grad(loss, [xi, *mod.parameters()])])
    assert used == ([] if wanted else [("run_columns", 0), ("run_columns_backward", 0)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_without_a_compiled_body_the_rows_path_runs(monkeypatch):
    """While the body is not at hand (prefetch's child compiling it), run_columns steps aside
    and the module's call runs on the row kernel: the same numbers as torch."""
    monkeypatch.setattr(columns, "team_body", lambda dtype: None)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(64, 256)
    m = lstmkit.LSTM.from_torch(ref)
    x = torch.randn(30, 1, 64)
    with torch_threads(2):
        with torch.no_grad():
            got, want = m(x), ref(x)
    assert m.__dict__["_runtime"][1]._columns  # the split was asked for ...
    torch.testing.assert_close(got[0], want[0], rtol=TOL[torch.float32], atol=TOL[torch.float32])  # ... rows ran


def test_one_step_lane_steps_aside_when_the_thread_count_grows():
    """Runtime._one_step remembers per (rows, threads) whether a step is its own: a big step
    first run on 1 thread must still split once torch has 2. A runtime of its own weights (the
    module's reads its parameters as they are at one step, unsplit), called as the engine calls it."""
    import dataclasses

    from lstmkit.runtime import Runtime

    torch.manual_seed(0)
    ref = torch.nn.LSTM(128, 512)
    m = lstmkit.LSTM.from_torch(ref)
    weights = {n: p.detach().numpy() for n, p in zip(m._flat_weights_names, m.parameters())}
    runtime = Runtime(dataclasses.replace(m.config, batch_first=False), weights)
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        with torch_threads(1):
            binding.run_inference(runtime, x.numpy(), None)
            assert not runtime._columns
        with torch_threads(2):
            got, want = binding.run_inference(runtime, x.numpy(), None), ref(x)
    assert runtime._columns
    torch.testing.assert_close(torch.from_numpy(got[0]), want[0], rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_gradient_penalty_through_the_split_matches_torch(monkeypatch):
    """create_graph=True (a gradient penalty) on a model whose training runs split by units:
    the first backward is backward_columns, the second goes through it to the parameters."""
    from lstmkit.engines.numba import binding

    used = []
    real = binding.run_columns_backward
    monkeypatch.setattr(binding, "run_columns_backward", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr(columns, "TRAIN_MIN_PART_BYTES", 0)
    monkeypatch.setattr(columns, "TRAIN_MIN_PART_BYTES_UNEVEN", 0)
    monkeypatch.setattr(binding, "ONE_ROW_FEW_STEPS_MAX_STEPS", 0)  # one row a step: the time loop, not few steps
    torch.manual_seed(0)
    ref = torch.nn.LSTM(32, 64, dtype=torch.float64)
    m = lstmkit.LSTM.from_torch(ref)
    x = torch.randn(20, 1, 32, dtype=torch.float64)
    with torch_threads(2):
        results = []
        for mod in (m, ref):
            xi = x.clone().requires_grad_(True)
            y, _ = mod(xi)
            (g,) = torch.autograd.grad(y.square().sum(), xi, create_graph=True)
            results.append([y, g, *torch.autograd.grad(g.square().sum(), list(mod.parameters()))])
    assert used
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=TOL[torch.float64], atol=TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw,shape", [
    (dict(num_layers=2, bidirectional=True), (12, 3)),
    (dict(bidirectional=True), (30, 1)),
    (dict(bidirectional=True, batch_first=True, proj_size=48), (16, 20)),  # (N, L)
    (dict(num_layers=3, bidirectional=True), (1, 5)),  # one step of more rows than the live lane's
    (dict(bidirectional=True, input_size=640), (5, 2)),  # the input projection made first, per direction
])
@pytest.mark.parametrize("openmp", [True, False])
def test_bidirectional_layers_run_both_directions_at_once(dtype, kw, shape, openmp, monkeypatch):
    """At 2 threads each direction of a bidirectional layer runs on a thread of its own (all its
    rows, no split, no barrier): the same bits as one thread, which runs them one after the
    other (to rounding where torch's GEMM makes the input projection first: its sums depend on
    its thread count), and torch.nn.LSTM's numbers. Without an OpenMP team, on Python threads."""
    from lstmkit.kernels.numba import threads as kernel_threads
    from lstmkit.runtime import model as runtime_model

    if not openmp:
        monkeypatch.setattr(kernel_threads, "_omp", {})
    pairs = []
    real_pair = runtime_model.run_pair
    monkeypatch.setattr(runtime_model, "run_pair", lambda *a, **k: pairs.append(1) or real_pair(*a, **k))
    torch.manual_seed(0)
    kw = dict(input_size=64) | kw
    ref = torch.nn.LSTM(hidden_size=96, dtype=dtype, **kw)
    x = torch.randn(shape + (kw["input_size"],), dtype=dtype)
    out = {}
    for threads in (1, 2):
        m = lstmkit.LSTM.from_torch(ref)
        with torch_threads(threads), torch.no_grad():
            out[threads] = m(x)
    assert len(pairs) == ref.num_layers  # at 2 threads, every layer; at 1, none
    (y1, (h1, c1)), (y2, (h2, c2)) = out[1], out[2]
    for a, b in ((y1, y2), (h1, h2), (c1, c2)):
        if kw["input_size"] == 640:
            torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])
        else:
            assert torch.equal(a, b)
    with torch.no_grad():
        yt, (ht, ct) = ref(x)
    for a, b in ((y2, yt), (h2, ht), (c2, ct)):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("H", [20, 100, 300])
@pytest.mark.parametrize("N", [1, 2])
@pytest.mark.parametrize("team_threads", [2, 3])
def test_a_live_step_split_by_units_is_bitwise_the_unsplit_step(dtype, H, N, team_threads):
    """one_step_live_split: each team thread computes the units of its part
    (lstm.live_part_units, cut at multiples of LANES, some parts empty at H=20 on 3 threads)
    by the same operations as one_step_live: the same bits, every unit written, whatever the turn."""
    rng = np.random.default_rng(H + N)
    I = 37
    w_ih, w_hh = (rng.standard_normal((4 * H, I)) * 0.3).astype(dtype), (rng.standard_normal((4 * H, H)) * 0.3).astype(dtype)
    b_ih, b_hh = (rng.standard_normal(4 * H).astype(dtype) for _ in range(2))
    x = rng.standard_normal((1, N, I)).astype(dtype)
    h0, c0 = (rng.standard_normal((1, N, H)).astype(dtype) for _ in range(2))
    one = [np.empty((1, N, H), dtype) for _ in range(3)]
    lstm.one_step_live(x, h0, c0, w_ih, w_hh, b_ih, b_hh, np.empty((0, H), dtype), *one)
    for turn in (0, 1):  # every other row of input reads the rows of W backwards (lstm.live_turn)
        split = [np.full((1, N, H), np.nan, dtype) for _ in range(3)]
        assert lstm.one_step_live_split(team_threads, x, h0, c0, w_ih, w_hh, b_ih, b_hh, *split, turn)
        for a, b in zip(one, split):
            np.testing.assert_array_equal(a, b)
    cuts = [lstm.live_part_units(H, k, team_threads) for k in range(team_threads)]
    assert cuts[0][0] == 0 and cuts[-1][1] == H
    assert all(u0 % LANES == 0 and u0 <= u1 and u1 == v0 for (u0, u1), (v0, _) in zip(cuts, cuts[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw,shape,splits", [
    (dict(), (1, 1, 128), 1),
    (dict(), (1, 2, 128), 1),
    (dict(), (1, 128), 1),  # unbatched
    (dict(num_layers=2, bidirectional=True), (1, 2, 128), 4),
    (dict(batch_first=True, num_layers=2), (2, 1, 128), 2),
    (dict(proj_size=64), (1, 1, 128), 0),  # the projection needs every unit: unsplit
    (dict(hidden_size=64), (1, 1, 128), 0),  # 192 KiB of weights: the team would cost more than it saves
])
def test_a_live_step_of_big_weights_splits_its_units_over_the_threads(dtype, kw, shape, splits, monkeypatch):
    """At 2 threads a streaming step whose layer weights outgrow a core's L2
    (runtime.model.LIVE_SPLIT_MIN_WEIGHT_BYTES) runs each layer-direction with its hidden units
    split over the team, still on the parameters as they are (a p.data update is seen at once):
    bitwise one thread's results, and torch.nn.LSTM's, step after step with the state fed back."""
    from lstmkit.runtime import model as runtime_model

    calls = []
    real = runtime_model.one_step_live_split
    monkeypatch.setattr(runtime_model, "one_step_live_split", lambda *a: calls.append(a[0]) or real(*a))
    torch.manual_seed(0)
    kw = dict(input_size=128, hidden_size=256) | kw
    ref = torch.nn.LSTM(dtype=dtype, **kw).eval()
    xs = torch.randn((3,) + shape, dtype=dtype)
    out = {}
    for threads in (1, 2):
        m = lstmkit.LSTM.from_torch(ref).eval()
        calls.clear()
        with torch_threads(threads), torch.no_grad():
            state, steps = None, []
            for k, x in enumerate(xs):
                if k == 2:  # an update no version counter records
                    for p in m.parameters():
                        p.data.mul_(0.5)
                y, state = m(x, state)
                steps.append((y, *state))
        out[threads] = steps
        assert calls == [2] * (3 * splits if threads == 2 else 0)
    for s1, s2 in zip(out[1], out[2]):
        for a, b in zip(s1, s2):
            assert torch.equal(a, b)
    with torch.no_grad():
        state = None
        for k, (x, step) in enumerate(zip(xs, out[2])):
            if k == 2:
                for p in ref.parameters():
                    p.data.mul_(0.5)
            y, state = ref(x, state)
            for a, b in zip(step, (y, *state)):
                torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])


def _mkl_column_weights(w_ih, w_hh, units, pre, rows, as_a=False):
    from lstmkit.engines.numba import mkl

    assert mkl._find() is not None, "torch's library exports no MKL packed GEMM here"
    return mkl.pack_parts(w_ih, w_hh, units, pre, rows, as_a)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True, "as A"], ids=["padded", "packed", "padded-W-as-A"])
@pytest.mark.parametrize("precompute", [False, True], ids=["fused", "xproj"])
@pytest.mark.parametrize("parts", [2, 3])
def test_the_unit_split_on_mkl_products_matches_the_row_kernel(reverse, packed, precompute, parts):
    """forward_columns with its step products on MKL's packed GEMM (each part's W_s laid out for
    it, engines/numba/mkl.pack_parts; for padded input also as the A matrix, the products then
    transposed): the row kernel's numbers to float32 rounding (MKL sums in its own order), every
    row written, and bitwise the same on a second run, saving or not."""
    as_a = packed == "as A"
    packed = packed is True
    rng = np.random.default_rng(parts + 2 * packed + 4 * reverse)
    for T, B, I, H in [(30, 9, 20, 100), (7, 16, 64, 2 * LANES + 3), (5, 5, 33, 70)]:
        x, bs, h0, c0, w_ih, w_hh, b = _case(rng, T, B, I, H, np.float32, packed)
        want = lstm.lstm_forward(x, bs, h0, c0, w_ih, w_hh, b, reverse=reverse, save=True)
        wps, bps, units = columns.pack_columns(w_ih, w_hh, b, parts, panels=False)
        gemm, wgs = _mkl_column_weights(w_ih, w_hh, units, precompute, B, as_a)
        assert (gemm & blas.PACKED_A != 0) == as_a
        xproj = lstm.input_projection(x, w_ih, b) if precompute else None
        runs = []
        for _ in range(2):
            total = x.shape[0]
            y, h, c = (np.full(s, np.nan, np.float32) for s in ((total, H), (B, H), (B, H)))
            acts, cells = np.full((total, 4 * H), np.nan, np.float32), np.full((total, H), np.nan, np.float32)
            assert columns.run_columns(2, x, bs, h0, c0, wps, bps, units, reverse, y, h, c, xproj, acts, cells,
                                       gemm=gemm, wgs=wgs)
            runs.append((y, h, c, acts, cells))
        y, h, c, acts, cells = runs[0]
        for g, w in zip((y, h, c, acts, cells), (want[0], want[1], want[2], want[3][0], want[3][1])):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        for a, b2 in zip(*runs):
            assert np.array_equal(a, b2)


@pytest.mark.parametrize("H", [70, 256])
def test_mkl_packs_parts_and_column_views_as_their_copies(H):
    """mkl.pack reads a block of columns by its row stride (pack_parts_backward's parts of W_hh)
    and pack_parts builds each part with one copy: the products on those packings are bitwise
    the products on the contiguous copies the older code packed (columns.part_rows, concatenated)."""
    from numba import njit

    from lstmkit.engines.numba import mkl
    from lstmkit.kernels.numba.blas import gemm_packed
    from lstmkit.kernels.numba.rows import row_ptr

    @njit
    def product(fn, a, wg, c):
        gemm_packed(fn, a.shape[0], c.shape[1], a.shape[1], row_ptr(a, 0), a.shape[1], row_ptr(wg, 0),
                    row_ptr(c, 0), c.shape[1])

    assert mkl._find() is not None, "torch's library exports no MKL packed GEMM here"
    rng = np.random.default_rng(H)
    I, rows = 48, 8
    w_ih, w_hh = (rng.standard_normal((4 * H, k)).astype(np.float32) for k in (I, H))
    units = columns.unit_bounds(H, 2)
    cases = [(mkl.pack_parts_backward(w_hh, units, rows),
              [np.ascontiguousarray(w_hh[:, units[s]:units[s + 1]]) for s in range(2)], False)]
    for pre in (False, True):
        rows_of = [columns.part_rows(H, units, s) for s in range(2)]
        copies = [w_hh[r] if pre else np.concatenate((w_ih[r], w_hh[r]), axis=1) for r in rows_of]
        cases.append((mkl.pack_parts(w_ih, w_hh, units, pre, rows), copies, True))
    for (fn, packed), copies, transposed in cases:
        _, reference = mkl._pack_each(copies, transposed, rows)
        for s, w in enumerate(copies):
            K, G = (w.shape[1], w.shape[0]) if transposed else w.shape
            a = rng.standard_normal((rows, K)).astype(np.float32)
            got, want = np.full((rows, G), np.nan, np.float32), np.full((rows, G), np.nan, np.float32)
            product(fn, a, packed[s : s + 1], got)
            product(fn, a, reference[s : s + 1], want)
            assert np.array_equal(got, want)
            np.testing.assert_allclose(got, a @ (w.T if transposed else w), rtol=1e-4, atol=1e-4)


def test_wide_columns_pay_rule(monkeypatch):
    monkeypatch.setattr(caches, "_l2", [2 << 20])  # the rule's measurements: a core's L2 of 2 MiB
    pay = columns.wide_columns_pay
    assert pay(8, 64, 192, 192, 4, 2) and pay(12, 64, 256, 256, 4, 2)  # chunks of < 8 rows, >= 512 KiB
    assert not pay(8, 64, 128, 128, 4, 2)  # 384 KiB: the rows split is as fast
    assert pay(64, 512, 1024, 1024, 4, 2) and pay(96, 128, 1024, 1024, 4, 2)  # W_hh of 16 MiB
    assert not pay(16, 128, 384, 384, 4, 2)  # 8-row chunks, W_hh of 2.25 MiB
    assert not pay(128, 128, 512, 512, 4, 2)  # many rows: the rows split wins
    assert not pay(4, 64, 1024, 1024, 4, 2)  # columns_pay's (micro-kernel) range
    assert not pay(12, 64, 256, 256, 8, 2) and not pay(12, 64, 256, 128, 4, 2) and not pay(12, 64, 256, 256, 4, 1)
    # Inference (nothing saved): chunks of up to 15 rows from 512 KiB of weights
    assert pay(16, 128, 384, 384, 4, 2, inference=True) and pay(30, 128, 256, 256, 4, 2, inference=True)
    assert pay(24, 128, 128, 128, 4, 2, inference=True) and not pay(24, 64, 128, 128, 4, 2, inference=True)
    assert not pay(32, 128, 256, 256, 4, 2, inference=True) and not pay(16, 128, 256, 256, 4, 2)
    assert not pay(24, 128, 256, 256, 8, 2, inference=True) and not pay(24, 128, 256, 256, 4, 1, inference=True)
    # Inference up to 48 rows on weights past L2, W_hh past half of it: each core of a rows split
    # would stream all of W from L3
    assert pay(32, 128, 384, 384, 4, 2, inference=True) and pay(48, 64, 384, 384, 4, 2, inference=True)
    assert pay(32, 128, 320, 320, 4, 2, inference=True) and not pay(64, 128, 384, 384, 4, 2, inference=True)
    assert not pay(32, 512, 256, 256, 4, 2, inference=True)  # W_hh of 1 MiB: half the L2
    assert not pay(32, 128, 384, 384, 4, 2)  # training: not measured so
    big = columns.big_weights_columns_pay  # W_hh of 16 MiB and more: inference 5-512 rows, training 5-16
    assert big(5, 1024, 1024, 4, 2) and big(97, 1024, 1024, 4, 2) and big(512, 2048, 2048, 4, 2)
    assert not big(4, 1024, 1024, 4, 2) and not big(513, 1024, 1024, 4, 2) and not big(128, 512, 512, 4, 2)
    assert big(16, 1024, 1024, 4, 2, training=True) and not big(17, 1024, 1024, 4, 2, training=True)
    assert not big(128, 1024, 1024, 8, 2) and not big(128, 1024, 512, 4, 2) and not big(128, 1024, 1024, 4, 1)


@pytest.mark.parametrize("kw,shape,packed", [
    (dict(hidden_size=192), (40, 8), False),
    (dict(hidden_size=256, batch_first=True), (12, 30), False),  # (N, L)
    (dict(hidden_size=512, input_size=32), (20, 6), False),
    (dict(hidden_size=256, num_layers=2), (9, 6), False),  # (bidirectional: both directions at once)
    (dict(hidden_size=1024, input_size=16), (3, 24), False),  # W_hh of 16 MiB
    (dict(hidden_size=256, input_size=128), (7, 22), False),  # chunks of 11 rows: inference only
])
@pytest.mark.parametrize("products", ["mkl", "tile"])
def test_module_takes_the_wide_unit_split_at_two_threads_and_matches_torch(kw, shape, packed, products, monkeypatch):
    """Inference at 5-96 rows on wide weights, 2 threads: every layer-direction split by hidden
    units with MKL's products (runtime.Runtime._by_columns, columns.wide_columns_pay), or the
    micro-kernel's where MKL is not wanted (Runtime._by_columns), torch.nn.LSTM's
    numbers, one thread's to float32 rounding, and bitwise the same on a second call. (A
    PackedSequence takes the engine's rows split: torch.nn.LSTM's packed path is slow anyway.)"""
    from lstmkit.engines.numba import mkl

    monkeypatch.setattr(mkl, "_wanted", [products == "mkl"])  # on any CPU (mkl.wanted)
    from lstmkit.runtime import model as runtime_model

    gemms = []
    real = runtime_model.run_columns
    monkeypatch.setattr(runtime_model, "run_columns", lambda *a, **k: gemms.append(k["gemm"]) or real(*a, **k))
    torch.manual_seed(0)
    kw = dict(input_size=64) | kw
    ref = torch.nn.LSTM(**kw).eval()
    x = torch.randn(shape + (kw["input_size"],))
    if packed:
        lengths = torch.randint(1, shape[0] + 1, (shape[1],))
        lengths[3] = shape[0]
        x = nn_utils.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out = {}
    for threads in (1, 2):
        m = lstmkit.LSTM.from_torch(ref).eval()
        with torch_threads(threads), torch.no_grad():
            out[threads] = m(x)
            if threads == 2:
                again = m(x)
    layer_directions = ref.num_layers * (2 if ref.bidirectional else 1)
    assert len(gemms) == 2 * layer_directions  # two calls at 2 threads, none at 1
    assert all((g != 0) is (products == "mkl") for g in gemms)
    with torch.no_grad():
        want = ref(x)
    flat = lambda o: (o[0].data if packed else o[0], *o[1])  # noqa: E731
    for a, b, w, c in zip(flat(out[2]), flat(again), flat(want), flat(out[1])):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wanted", [False, True])
def test_inference_of_many_rows_on_the_biggest_weights_splits_units_on_the_micro_kernel(wanted, monkeypatch):
    """100 rows (past WIDE_MAX_ROWS) on hidden 1024 at 2 threads: split by hidden units on the
    micro-kernel's products where MKL is not wanted (columns.big_weights_columns_pay), by rows
    where it is; torch.nn.LSTM's numbers either way, one thread's to float32 rounding."""
    from lstmkit.engines.numba import mkl
    from lstmkit.runtime import model as runtime_model

    monkeypatch.setattr(mkl, "_wanted", [wanted])  # on any CPU (mkl.wanted)
    calls = []
    real = runtime_model.run_columns
    monkeypatch.setattr(runtime_model, "run_columns", lambda *a, **k: calls.append(k["gemm"]) or real(*a, **k))
    torch.manual_seed(0)
    ref = torch.nn.LSTM(16, 1024).eval()
    x = torch.randn(3, 100, 16)
    out = {}
    for threads in (1, 2):
        m = lstmkit.LSTM.from_torch(ref).eval()
        with torch_threads(threads), torch.no_grad():
            out[threads] = m(x)
    assert calls == ([] if wanted else [0])  # one call split, on the micro-kernel (no MKL gemm)
    with torch.no_grad():
        want = ref(x)
    for a, w, c in zip((out[2][0], *out[2][1]), (want[0], *want[1]), (out[1][0], *out[1][1])):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,N,packed", [
    (dict(), 8, False),
    (dict(num_layers=2, bidirectional=True), 6, True),  # packed, enforce_sorted=False: rows end and join
    (dict(batch_first=True), 12, False),
])
def test_training_on_wide_weights_at_two_threads_takes_the_unit_split_on_mkl(kw, N, packed, monkeypatch):
    """A float32 training step at 5-15 rows on wide weights (hidden 384), 2 threads: the forward
    (saving) and the backward run split by hidden units with MKL's step products
    (columns.wide_columns_pay, wide_columns_pay_backward); outputs and every gradient match
    torch.nn.LSTM, and a second step gives the same bits."""
    from lstmkit.engines.numba import mkl

    monkeypatch.setattr(mkl, "_wanted", [True])  # on any CPU (mkl.wanted)
    monkeypatch.setattr(caches, "_l2", [0])  # and with any L2 (1.4 MiB parts: mkl.training_tile_max_bytes)
    from torch.nn.utils.rnn import pack_padded_sequence

    from lstmkit.engines.numba import binding

    used = []
    for name in ("run_columns", "run_columns_backward"):
        real = getattr(binding, name)
        monkeypatch.setattr(binding, name,
                            lambda *a, real=real, name=name, **k: used.append((name, k.get("gemm", a[-2]))) or real(*a, **k))
    torch.manual_seed(N)
    ref = torch.nn.LSTM(64, 384, **kw)
    m = lstmkit.LSTM.from_torch(ref, engine="numba")
    T = 12
    x = torch.randn((N, T, 64) if ref.batch_first else (T, N, 64))
    lengths = torch.randint(1, T + 1, (N,))
    lengths[N // 2] = T
    with torch_threads(2):
        results = []
        for mod in (m, m, ref):
            xi = x.clone().requires_grad_(True)
            inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) if packed else xi
            out, (h, c) = mod(inp)
            y = out.data if packed else out
            loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum() + h.square().sum() + 3 * c.sum()
            results.append([y, h, c, *torch.autograd.grad(loss, [xi, *mod.parameters()])])
    calls = 2 * ref.num_layers * (2 if ref.bidirectional else 1)  # two steps of ours
    assert sum(n == "run_columns" for n, _ in used) == calls
    assert sum(n == "run_columns_backward" for n, _ in used) == calls
    assert all(gemm != 0 for _, gemm in used)  # every one on MKL's products
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[2]):
        torch.testing.assert_close(a, b, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.parametrize("batch,I,H,threads,split", [
    (8, 128, 384, 2, True),     # chunks of fewer than 8 rows: any wide weights
    (16, 128, 384, 2, False),   # W_hh 2.25 MiB: the rows split
    (16, 128, 512, 2, True),    # W_hh 4 MiB: 16-32 rows split by units too
    (32, 128, 512, 2, True),
    (33, 128, 512, 2, False),   # past 32 rows: the rows split
    (48, 128, 1024, 2, False),
    (32, 128, 512, 1, False),   # one thread: nothing to split
])
def test_the_backward_splits_by_units_from_w_hh_of_4_mib_up_to_32_rows(batch, I, H, threads, split):
    """columns.wide_columns_pay_backward's rule: at 2 threads the backward runs split by hidden
    units at chunks of fewer than 8 rows, and at 16-32 rows from a W_hh of 4 MiB (hidden 512)."""
    assert columns.wide_columns_pay_backward(batch, I, H, H, 4, threads) is split


def _parts_as_pack2_lays_them_out(w_ih, w_hh, units, transposed):
    """Each part packed as tile.pack2 lays out its rows (transposed: unit_rows of W_ih and W_hh)
    or its columns of W_hh, blocks past a part's zero: the layout the kernels read."""
    from lstmkit.kernels.numba.tile import block_width, pack2

    H = w_hh.shape[0] // 4
    parts = []
    for s in range(units.shape[0] - 1):
        u0, u1 = units[s], units[s + 1]
        if transposed:
            parts.append(pack2(columns.unit_rows(w_ih, H, u0, u1), columns.unit_rows(w_hh, H, u0, u1), True))
        else:
            w = np.ascontiguousarray(w_hh[:, u0:u1])
            parts.append(pack2(w, w[:, :0], False))
    nb = max(p.shape[0] for p in parts)
    out = np.zeros((len(parts), nb, *parts[0].shape[1:]), w_hh.dtype)
    for s, p in enumerate(parts):
        out[s, : p.shape[0]] = p
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("I,H,parts", [(5, 48, 2), (64, 128, 2), (16, 80, 3), (33, 40, 2), (7, 16, 1), (128, 96, 4)])
def test_parts_packed_per_thread_are_the_layout_the_kernels_read(dtype, I, H, parts):
    """columns.pack_columns / pack_columns_backward pack each part on a thread of its own
    (pack_part_rows, pack_part_columns), straight from the weights: bitwise the layout of
    tile.pack2 on each part's rows (columns), runs of rows that cross a gate inside a column
    block included (parts of 16, 48 units), every element written (the buffer is not zeroed)."""
    rng = np.random.default_rng(H)
    w_ih = rng.standard_normal((4 * H, I)).astype(dtype)
    w_hh = rng.standard_normal((4 * H, H)).astype(dtype)
    b = rng.standard_normal(4 * H).astype(dtype)
    wps, bps, units = columns.pack_columns(w_ih, w_hh, b, parts)
    assert np.array_equal(wps, _parts_as_pack2_lays_them_out(w_ih, w_hh, units, True))
    wbs, units_b = columns.pack_columns_backward(w_hh, parts)
    assert np.array_equal(units, units_b)
    assert np.array_equal(wbs, _parts_as_pack2_lays_them_out(w_ih, w_hh, units, False))
