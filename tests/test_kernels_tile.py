"""The per-step product (kernels/numba/tile.py) at its block boundaries: rows around the 8- and
4-row tiles, K around the K_BLOCK passes (each pass's sums go on from the last's), and a whole
LSTM whose products cross both, against torch.nn.LSTM."""
import numpy as np
import pytest
import torch

import lstmkit
from lstmkit.kernels.numba import tile

from harness import TOL, assert_all_close

KB = tile.K_BLOCK


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [0, 1, 37, KB - 1, KB, KB + 1, 2 * KB + 5])
# column blocks: the last 1-3 rows take them four or two at a time, then one
@pytest.mark.parametrize("G", [70, 300])
def test_matmul_equals_numpy_and_rows_are_bitwise_the_same_in_any_tile_and_block_order(dtype, K, G):
    rng = np.random.default_rng(K)
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 17, 19):
        a = rng.standard_normal((n, K)).astype(dtype)
        w = rng.standard_normal((K, G)).astype(dtype)
        wp = tile.pack(w, False)
        out = np.full((n, tile.padded_width(wp)), 7.0, dtype)  # stale values must not leak in
        tile.matmul(a, n, wp, out, False, tile.WHOLE_K)
        tol = 1e-4 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(out[:, :G], a @ w, rtol=tol, atol=tol * max(1, K))
        assert not out[:, G:].any()  # zero-padded columns stay zero
        flipped = np.full_like(out, 7.0)  # the column blocks in the opposite order: the same bits
        tile.matmul(a, n, wp, flipped, True, tile.WHOLE_K)
        assert np.array_equal(flipped, out), n
        for r in range(n):  # the same row alone (1-row tiles) gives the same bits, either order
            for flip in (False, True):
                alone = np.zeros((1, tile.padded_width(wp)), dtype)
                tile.matmul(np.ascontiguousarray(a[r : r + 1]), 1, wp, alone, flip, tile.WHOLE_K)
                assert np.array_equal(alone[0], out[r]), (n, r, flip)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K1,K2,G", [(64, 128, 512), (7, 0, 33), (0, 5, 40), (3, 4, 64)])
@pytest.mark.parametrize("transposed", [True, False])
def test_the_numpy_packing_is_bitwise_the_compiled_one(dtype, K1, K2, G, transposed, monkeypatch):
    """pack2 packs with numpy's copies while the prefetch child compiles _pack2_into (a cold
    start): the same bits, zero padding included, into a buffer that held garbage."""
    rng = np.random.default_rng(K1 + K2 + G)
    if transposed:  # [w1 | w2]^T, w1 (G, K1), w2 (G, K2)
        w1, w2 = rng.standard_normal((G, K1)).astype(dtype), rng.standard_normal((G, K2)).astype(dtype)
    else:  # [w1 | w2], w1 (K, G1), w2 (K, G - G1)
        w1, w2 = rng.standard_normal((K1, G // 3)).astype(dtype), rng.standard_normal((K1, G - G // 3)).astype(dtype)
    compiled = tile.pack2(w1, w2, transposed)
    by_numpy = np.full_like(compiled, np.nan)
    tile._pack2_numpy(w1, w2, transposed, by_numpy)
    assert np.array_equal(by_numpy, compiled)
    monkeypatch.setattr(tile.prefetch, "compiling", lambda name: name == "tile._pack2_into")
    monkeypatch.setattr(tile, "_pack2_into", None)  # pack2 must not call it now
    assert np.array_equal(tile.pack2(w1, w2, transposed), compiled)


@pytest.mark.parametrize("k0", [0, 1, 30, KB - 1, KB + 3])
def test_matmul_from_row_k0_equals_the_product_of_the_parts(k0):
    """matmul(a, n, wp, out, flip, k0) = a[:, k0:] @ W[k0:] (the forward with x W_ih^T made
    before the loop passes k0 = I): the same bits as the product of contiguous copies of the
    parts, K passes counted from k0, in either block order."""
    rng = np.random.default_rng(k0)
    K, G = KB + 40, 70
    for n in (1, 3, 9):
        a = rng.standard_normal((n, K)).astype(np.float32)
        w = rng.standard_normal((K, G)).astype(np.float32)
        wp, wp_part = tile.pack(w, False), tile.pack(np.ascontiguousarray(w[k0:]), False)
        for flip in (False, True):
            out = np.full((n, tile.padded_width(wp)), 7.0, np.float32)
            tile.matmul(a, n, wp, out, flip, np.int64(k0))
            part = np.zeros_like(out)
            tile.matmul(np.ascontiguousarray(a[:, k0:]), n, wp_part, part, flip, tile.WHOLE_K)
            assert np.array_equal(out, part), (n, flip)
            np.testing.assert_allclose(out[:, :G], a[:, k0:] @ w[k0:], rtol=1e-4, atol=1e-3)


def test_the_time_loops_compile_one_matmul(tmp_path):
    """Every call site passes whole arrays and an int64 k0: a slice (another array type) or a
    literal 0 at one of them compiles another matmul and its tiles, about 1 s of a cold start.
    A fresh process with an empty compile cache (a cached kernel links its matmul in: nothing
    compiles) runs the float32 time loops, forward and backward: one matmul between them."""
    code = """
import torch, lstmkit
from lstmkit.kernels.numba import tile
torch.set_num_threads(1)
x = torch.randn(4, 20, 8, requires_grad=True)
lstmkit.LSTM(8, 16, engine="numba")(x)[0].sum().backward()
print(len(tile.matmul.signatures))
"""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), LSTMKIT_PREFETCH="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-1] == "1", out.stdout + out.stderr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [3, 9, 17])
def test_lstm_with_products_past_one_k_block_matches_torch(dtype, batch):
    """I + H and 4H both above K_BLOCK: forward [x | h] @ [W_ih | W_hh]^T and backward
    dgates @ [W_ih | W_hh] run in several passes; outputs and every gradient vs torch."""
    torch.manual_seed(batch)
    ours = lstmkit.LSTM(KB + 20, 70, engine="numba").to(dtype)
    ref = torch.nn.LSTM(KB + 20, 70).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(6, batch, KB + 20, dtype=dtype)
    results = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        y, (h, c) = m(xi)
        (y.sum() + (h * 2).sum() + (c * 3).sum()).backward()
        results.append([y, h, c, xi.grad, *(p.grad for p in m.parameters())])
    assert_all_close(results[0], results[1], TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K1,K2,G", [(5, 7, 3), (20, 45, 70), (64, 0, 33), (0, 40, 65), (37, 100, 300)])
def test_pack2_lays_out_both_parts_exactly(dtype, K1, K2, G):
    """pack2's layout, element by element: wp[b, k, j] = W[k, bV + j], zero past the columns;
    W = [w1 | w2]^T (transposed: the forward's [W_ih | W_hh]) or [w1 | w2] (the backward's),
    with the parts meeting inside a column block."""
    rng = np.random.default_rng(K1 + K2 + G)
    w1, w2 = rng.standard_normal((G, K1)).astype(dtype), rng.standard_normal((G, K2)).astype(dtype)
    # transposed: W = [w1 | w2]^T (K1 + K2, G); else W = [w1 | w2] (G, K1 + K2), with its
    # column blocks crossing from w1 into w2 where K1 is not a multiple of V.
    for transposed, W in ((True, np.concatenate([w1, w2], 1).T), (False, np.concatenate([w1, w2], 1))):
        junk = np.full(2 * W.size + 64, np.nan, np.float64)  # pack2 takes uninitialised memory: likely this
        del junk
        wp = tile.pack2(w1, w2, transposed)
        V = wp.shape[2]
        Kw, Gw = W.shape
        assert wp.shape == (-(-Gw // V), Kw, V)
        want = np.zeros((wp.shape[0] * V, Kw), dtype)
        want[:Gw] = W.T
        assert np.array_equal(wp.transpose(0, 2, 1).reshape(-1, Kw), want), transposed


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 512), (513, 96)])
def test_packed_weights_start_on_a_cache_line(shape):
    """The packed W starts on a 64-byte boundary, whatever the allocator gave (a 512-bit load
    straddling two cache lines made a whole time loop a third slower in some processes)."""
    from lstmkit.kernels.numba import columns
    from lstmkit.kernels.numba.tile import ALIGN, aligned_zeros, pack, pack2

    for dt in (np.float32, np.float64):
        w = np.ones(shape, dt)
        for wp in (pack(w, True), pack(w, False), pack2(w, w, True), pack2(w, w, False)):
            assert wp.ctypes.data % ALIGN == 0 and wp.flags.c_contiguous
        assert np.array_equal(pack(w, True), pack(w.T.copy(), False))
        for _ in range(8):  # whatever the heap's state
            z = aligned_zeros((3, shape[0], 5), dt)
            assert z.ctypes.data % ALIGN == 0 and z.shape == (3, shape[0], 5) and not z.any()
    H = 8
    wps, _, _ = columns.pack_columns(np.ones((4 * H, 3), np.float32), np.ones((4 * H, H), np.float32),
                                     np.zeros(4 * H, np.float32), 2)
    assert wps.ctypes.data % ALIGN == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K1, K2", [(64, 128), (1, 5), (13, 70), (16, 0), (0, 33), (8, 8), (31, 17)])
def test_row_dot_products_equal_numpy_and_a_row_is_bitwise_the_same_in_any_group(dtype, K1, K2):
    """lstm._rows_times2 (tile.rows_dot, eight, four and one rows at a time, then the rows' tails
    short of a vector): out += W1 v1 + W2 v2 for G rows around every group size; a row's bits do
    not depend on the rows it ran with (one_step_live_part runs slices of the rows
    one_step_live runs whole, and must give the same bits)."""
    from lstmkit.kernels.numba import lstm

    rng = np.random.default_rng(K1 * 100 + K2)
    L = 64 // np.dtype(dtype).itemsize if tile.AVX512 else 32 // np.dtype(dtype).itemsize
    for G in (1, 3, 4, 5, 8, 12, 13, 20, 4 * L + 3):
        w1 = rng.standard_normal((G, K1)).astype(dtype)
        w2 = rng.standard_normal((G, K2)).astype(dtype)
        v1, v2 = rng.standard_normal(K1).astype(dtype), rng.standard_normal(K2).astype(dtype)
        start = rng.standard_normal(G).astype(dtype)
        out = start.copy()
        lstm._rows_times2(w1, v1, w2, v2, out)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        want = start.astype(np.float64) + w1.astype(np.float64) @ v1 + w2.astype(np.float64) @ v2
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol * max(1, K1 + K2))
        for g0, g1 in ((0, 1), (G - 1, G), (1, G), (G // 2, G)):  # slices group the rows otherwise
            part = start[g0:g1].copy()
            lstm._rows_times2(w1[g0:g1], v1, w2[g0:g1], v2, part)
            assert np.array_equal(part, out[g0:g1]), (G, g0, g1)
        backwards = start.copy()  # the rows of W from the last one back (flip): the same bits
        lstm._rows_times2(w1, v1, w2, v2, backwards, True)
        assert np.array_equal(backwards, out), G


@pytest.mark.parametrize("N", [1, 2, 3])
def test_live_steps_read_every_other_row_of_input_backwards_with_the_same_bits(N):
    """one_step_live's turn flips the order of W's rows at every other row it reads (live_turn
    counts them across calls on the same weights): whatever the turn, the same outputs; the
    by-address step counts N rows a call in the weights' address array."""
    from lstmkit.kernels.numba import lstm

    rng = np.random.default_rng(N)
    I, H = 24, 13  # 4H = 52 rows of W: six groups of eight and four rows past them
    w_ih, w_hh = rng.standard_normal((4 * H, I)).astype(np.float32), rng.standard_normal((4 * H, H)).astype(np.float32)
    b_ih, b_hh = rng.standard_normal(4 * H).astype(np.float32), rng.standard_normal(4 * H).astype(np.float32)
    x = rng.standard_normal((1, N, I)).astype(np.float32)
    h0, c0 = rng.standard_normal((1, N, H)).astype(np.float32), rng.standard_normal((1, N, H)).astype(np.float32)
    no_proj = np.zeros((0, H), np.float32)

    def step(turn):
        y, h, c = np.empty((1, N, H), np.float32), np.empty((1, N, H), np.float32), np.empty((1, N, H), np.float32)
        lstm.one_step_live(x, h0, c0, w_ih, w_hh, b_ih, b_hh, no_proj, y, h, c, turn)
        return y, h, c

    first = step(0)
    for turn in (1, 2, 7):
        assert all(np.array_equal(a, b) for a, b in zip(step(turn), first)), turn
    addrs = np.array([a.ctypes.data for a in (w_ih, w_hh, b_ih, b_hh, no_proj)] + [0], np.int64)
    for call in range(3):
        y, h, c = np.empty((1, N, H), np.float32), np.empty((1, N, H), np.float32), np.empty((1, N, H), np.float32)
        lstm.one_step_live_at(x.ctypes.data, I, h0, c0, addrs, y, h, c)
        assert all(np.array_equal(a, b) for a, b in zip((y, h, c), first)), call
        assert addrs[lstm.LIVE_TURN] == N * (call + 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [32, 48, 64, 96])  # whole column blocks or not, by dtype (32 / 16 lanes)
@pytest.mark.parametrize("G", [1, 40, KB + 8, 4 * 130])  # the weights' rows: one K_BLOCK pass, or two
def test_one_step_backward_products_on_views_equal_numpy(dtype, K, G):
    """The one-step backward's products (kernels/numba/step.py): dgates W on W as it is, dgates^T
    x with dgates^T read in place, on packed_view where K is whole column blocks; each equal
    to numpy's, every row the same bits as packing W first (the time loops' path)."""
    from lstmkit.kernels.numba.step import outer_sum, outer_times, times_w

    rng = np.random.default_rng(K + G)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    assert tile.whole_blocks(np.empty((1, K), dtype)) == (K % tile.block_width(dtype) == 0)
    for n in (1, 2, 3, 5, 8, 9, 16):
        a = rng.standard_normal((n, G)).astype(dtype)
        w = rng.standard_normal((G, K)).astype(dtype)
        x = rng.standard_normal((n, K)).astype(dtype)
        out = np.full((n, K), 7.0, dtype)
        times_w(a, w, out)
        np.testing.assert_allclose(out, a @ w, rtol=tol, atol=tol * G)
        if tile.whole_blocks(w):
            wp = tile.pack(w, False)
            packed = np.zeros((n, tile.padded_width(wp)), dtype)
            tile.matmul(a, n, wp, packed, False, tile.WHOLE_K)
            assert np.array_equal(packed, out)
        outer = np.full((G, K), 7.0, dtype)
        outer_times(a, x, outer)
        np.testing.assert_allclose(outer, a.T @ x, rtol=tol, atol=tol * n)
        loops = np.full((G, K), 7.0, dtype)
        outer_sum(a, x, loops)
        assert np.array_equal(outer, loops)  # tiles by rows (n > 1) or loops: the same bits
        if tile.whole_blocks(x) and G % 4 == 0:  # matmul's rows all in tiles, as an outer product's 4H
            by_blocks, by_rows = np.full((G, K), 7.0, dtype), np.full((G, K), 7.0, dtype)
            tile.matmul(a.T, G, tile.packed_view(x), by_blocks, False, tile.WHOLE_K)
            tile.matmul_by_rows(a.T, G, tile.packed_view(x), by_rows)
            assert np.array_equal(by_rows, by_blocks)
