"""kernels/numba/gemm.py: the big products around the time loops on the micro-kernel, the rows
of the result split over threads. Against numpy in float64, a split against one chunk bit for
bit, and the engine's gradients through it against torch.nn.LSTM."""
import numpy as np
import pytest
import torch

from lstmkit.engines.numba import binding, mkl
from lstmkit.kernels.numba import gemm

from harness import TOL, packed_input, pair, run_differential, tensor_input, torch_threads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,G", [(1, 1, 1), (7, 5, 3), (64, 33, 40), (129, 70, 96), (300, 257, 64)])
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_matmul_rows_equals_numpy_and_any_split_gives_the_same_bits(dtype, M, K, G, a_transposed, b_transposed,
                                                                   monkeypatch):
    rng = np.random.default_rng(M * K * G)
    a = rng.standard_normal((K, M) if a_transposed else (M, K)).astype(dtype)
    a = a.T if a_transposed else a  # a transposed view, read as it is
    b = rng.standard_normal((G, K) if b_transposed else (K, G)).astype(dtype)
    want = a.astype(np.float64) @ (b.T if b_transposed else b).astype(np.float64)
    one = gemm.matmul_rows(a, b, b_transposed, 1)
    assert one.shape[0] == M and one.shape[1] >= G
    np.testing.assert_allclose(one[:, :G], want, rtol=0, atol=(1e-4 if dtype == np.float32 else 1e-12) * np.sqrt(K))
    monkeypatch.setattr(gemm, "MIN_SPLIT_MACS", 0)  # split whatever the size
    for threads in (2, 3):
        assert np.array_equal(gemm.matmul_rows(a, b, b_transposed, threads)[:, :G], one[:, :G])
    packed = np.zeros(gemm.packed_shape(b, b_transposed), dtype)
    out = np.full((M, one.shape[1]), np.nan, dtype)
    assert gemm.matmul_rows(a, b, b_transposed, 2, out=out, packed=packed) is out
    assert np.array_equal(out[:, :G], one[:, :G])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M", [1, 63, 64, 65, 200, 1031])
def test_the_bias_is_added_row_block_by_row_block_with_the_bits_of_an_add_after(dtype, M, monkeypatch):
    """matmul_rows(bias=b): each row is its product plus b, the same bits as adding b after the
    whole product, for one chunk or several, row blocks ending anywhere (gemm.l2_rows)."""
    rng = np.random.default_rng(M)
    K, G = 37, 2 * gemm.block_width(dtype)
    x, w = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((G, K)).astype(dtype)
    b = rng.standard_normal(G).astype(dtype)
    want = gemm.matmul_rows(x, w, True, 1)[:, :G] + b
    assert not np.array_equal(want, want - b)  # b is not lost in the rounding
    monkeypatch.setattr(gemm, "MIN_SPLIT_MACS", 0)
    for threads in (1, 2, 3):
        assert np.array_equal(gemm.matmul_rows(x, w, True, threads, bias=b)[:, :G], want)
    with pytest.raises(ValueError, match="bias"):
        gemm.matmul_rows(x, w, True, 1, bias=b[:-1])
    with pytest.raises(ValueError, match="bias"):
        gemm.matmul_rows(x, w, True, 1, bias=b.astype(np.float16))


@pytest.mark.parametrize("dtype,M", [(np.float32, 2 * 2069), (np.float64, 2 * 1037 + 3)])
def test_a_long_transposed_view_runs_in_row_blocks_with_the_same_bits(dtype, M):
    """Past gemm.ROW_BLOCKS_FROM_BYTES of a chunk's rows a K pass, a transposed view runs row
    block by row block: the same sums as the contiguous copy's path, row tails and K tails
    included, at 1 and 2 threads."""
    K, G = 300, 40  # two passes over K, the second partial
    assert M // 2 * min(K, gemm.K_BLOCK) * np.dtype(dtype).itemsize > gemm.ROW_BLOCKS_FROM_BYTES
    rng = np.random.default_rng(M)
    a = rng.standard_normal((K, M)).astype(dtype).T
    b = rng.standard_normal((K, G)).astype(dtype)
    want = gemm.matmul_rows(np.ascontiguousarray(a), b, False, 1)[:, :G]
    for threads in (1, 2):
        assert np.array_equal(gemm.matmul_rows(a, b, False, threads)[:, :G], want)
    np.testing.assert_allclose(want, a.astype(np.float64) @ b, rtol=0, atol=1e-3 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M", [256, 512, 1024 + 40])  # dgates^T's rows (4H); the last with a row block's tail
def test_a_transposed_view_with_its_k_1_kib_apart_is_copied_to_padded_rows_with_the_same_bits(dtype, M):
    """dgates^T with dgates' rows a multiple of 1 KiB long (hidden 64, 128, 256 ...): each block of
    a pass runs on a copy with longer rows (gemm.PAD_ELEMENTS), at any size: the same bits as the
    same values with rows of another length, K tails included."""
    K, G = 300, 64  # two passes over K, the second partial
    rng = np.random.default_rng(M)
    values = rng.standard_normal((K, M)).astype(dtype)
    b = rng.standard_normal((K, G)).astype(dtype)
    crowded = np.zeros((K, 1024 // np.dtype(dtype).itemsize * -(-M * np.dtype(dtype).itemsize // 1024)), dtype)
    crowded[:, :M] = values
    spread = np.zeros((K, M + 3), dtype)
    spread[:, :M] = values
    a, a_spread = crowded[:, :M].T, spread[:, :M].T
    assert a.strides[1] % 1024 == 0 and a_spread.strides[1] % 1024 != 0
    want = gemm.matmul_rows(np.ascontiguousarray(a), b, False, 1)[:, :G]
    for threads in (1, 2):
        assert np.array_equal(gemm.matmul_rows(a, b, False, threads)[:, :G], want)
        assert np.array_equal(gemm.matmul_rows(a_spread, b, False, threads)[:, :G], want)
    np.testing.assert_allclose(want, a.astype(np.float64) @ b, rtol=0, atol=1e-3 if dtype == np.float32 else 1e-11)


def test_row_bounds_split_into_whole_tiles():
    assert gemm.row_bounds(1000, 1 << 30, 2).tolist() == [0, 504, 1000]
    assert gemm.row_bounds(1000, 1 << 30, 1).tolist() == [0, 1000]
    assert gemm.row_bounds(12, 1 << 30, 2).tolist() == [0, 12]  # one tile's rows: no second chunk
    for M in range(1, 70):
        for threads in (1, 2, 3, 4):
            b = gemm.row_bounds(M, 1 << 30, threads).tolist()
            assert b[0] == 0 and b[-1] == M and 1 <= len(b) - 1 <= threads
            assert all(r1 > r0 and r0 % gemm.CHUNK_ROWS == 0 for r0, r1 in zip(b, b[1:]))
    assert gemm.row_bounds(1000, gemm.MIN_SPLIT_MACS - 1, 2).tolist() == [0, 1000]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cfg,shape", [
    (dict(input_size=64, hidden_size=64, num_layers=2, batch_first=True), (16, 40)),  # (N, L)
    (dict(input_size=32, hidden_size=32, bidirectional=True, proj_size=16), (30, 9)),
    (dict(input_size=96, hidden_size=96), None),  # packed, enforce_sorted=False
])
def test_training_through_the_own_gemm_matches_torch(cfg, shape, threads, monkeypatch):
    """The engine's input projection, dx and weight gradients on kernels/numba/gemm.py (what
    mkl.own_gemm takes on a CPU that is not Intel's; forced here on any CPU): outputs and every
    gradient as torch.nn.LSTM's, float32."""
    monkeypatch.setattr(mkl, "_own_gemm", [True])
    monkeypatch.setattr(binding, "OWN_GEMM_MIN_MACS", 0)
    calls = []
    real = gemm.matmul_rows
    monkeypatch.setattr(gemm, "matmul_rows", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    ref, ours = pair(cfg, "numba", torch.float32)
    if shape is None:
        make = packed_input([20, 3, 17, 1, 9, 20, 5], cfg["input_size"], torch.float32)
    else:
        make = tensor_input(torch.randn(shape + (cfg["input_size"],)))
    with torch_threads(threads):
        run_differential(ref, ours, make, tol=TOL[torch.float32])
    assert calls  # the own GEMM ran


def test_the_own_gemm_is_taken_off_intel_cpus_only(monkeypatch):
    monkeypatch.setattr(mkl, "_intel_cpu", lambda: False)
    monkeypatch.setattr(mkl, "_own_gemm", [])
    assert mkl.own_gemm()
    monkeypatch.setattr(mkl, "_intel_cpu", lambda: True)
    monkeypatch.setattr(mkl, "_own_gemm", [])
    assert not mkl.own_gemm()
    monkeypatch.setattr(mkl, "_own_gemm", [True])
    assert not binding._own_gemm(4096, 256, 1000, np.float64)  # float64: torch's GEMM
    assert not binding._own_gemm(4096, 256, 1000, np.float32)  # 1000 columns would come out padded
    assert not binding._own_gemm(16, 16, 128, np.float32)  # tiny: torch's
    assert binding._own_gemm(64, 64, 128, np.float32)  # small: the micro-kernel on one thread
    assert binding._own_gemm(4096, 256, 1024, np.float32)


def test_the_weight_gradients_read_dgates_in_place(monkeypatch):
    """binding.matmul on dgates^T hands the micro-kernel the transposed view itself: no copy of
    dgates (a copy made by the binding's as_numpy cost 2-3x the product inside a training step),
    and the product is a's."""
    monkeypatch.setattr(mkl, "_own_gemm", [True])
    monkeypatch.setattr(binding, "OWN_GEMM_MIN_MACS", 0)
    seen = []
    real = gemm.matmul_rows
    monkeypatch.setattr(gemm, "matmul_rows", lambda *a, **k: seen.append(a[0]) or real(*a, **k))
    for rows in (256, 1024):
        dg, xh = torch.randn(300, rows), torch.randn(300, 96)
        got = binding.matmul(dg.t(), xh)
        (a,) = seen
        assert not a.flags.c_contiguous and np.shares_memory(a, dg.numpy())
        assert got.is_contiguous() and got.shape == (rows, 96)
        torch.testing.assert_close(got, dg.double().t().mm(xh.double()).float(), rtol=1e-5, atol=1e-4)
        seen.clear()
