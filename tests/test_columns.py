"""The forward time loop split by hidden units over an OpenMP team (kernels/numba/columns.py),
launched through a compiled team body (kernels/numba/team.py, threads.run_compiled).

The split must give bitwise the row kernel's results (each unit's pre-activation is the same
chain of multiply-adds, lstm.py's gate pass the same code), whatever the number of parts and
the team's size, forward and reverse, padded and packed (rows that end, rows that join), and
the module must take it where columns_pay says so, matching torch.nn.LSTM."""
import numpy as np
import pytest
import torch

import lstmkit
from lstmkit.engines.numba.binding import share_torch_threads
from lstmkit.kernels.numba import columns, lstm
from lstmkit.kernels.numba.simd import LANES

from harness import TOL


@pytest.fixture(autouse=True)
def team():
    # torch's CPU build runs its threads on OpenMP: the split needs that team.
    assert share_torch_threads(), "no OpenMP runtime found in torch: the column split cannot run"
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
    assert columns.columns_precompute(100, 128, 512, 4, 2) and not columns.columns_precompute(1, 128, 512, 4, 2)
    assert not columns.columns_precompute(100, 64, 128, 4, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw,shape", [
    (dict(), (30, 1)),
    (dict(num_layers=2, bidirectional=True), (12, 3)),
    (dict(batch_first=True), (4, 9)),  # (N, L)
    (dict(), (1, 1)),  # one step: split as the rule says (float64's weights are twice the bytes)
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
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            y, (h, c) = m(x, (h0, torch.zeros_like(h0)))
            yt, (ht, ct) = ref(x, (h0, torch.zeros_like(h0)))
    finally:
        torch.set_num_threads(before)
    split = bool(m.__dict__["_runtime"][1]._columns)
    N, T = shape if ref.batch_first else shape[::-1]
    assert split == columns.columns_pay(N, T, kw["input_size"], 256, 256, x.element_size(), 2)
    assert split or shape == (1, 1)
    for a, b in ((y, yt), (h, ht), (c, ct)):
        torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype])
