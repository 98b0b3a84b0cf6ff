"""The per-step products through MKL's packed GEMM (kernels/numba/blas.py, engines/numba/mkl.py).

The engine sends a time loop's step products there when its weights outgrow L2; here the
thresholds are lowered so that small, fast configurations take that path, and every result is
checked against torch.nn.LSTM (float32: MKL's path exists for float32 only), then the split
over threads and the switch itself."""
import ctypes

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import lstmkit
from lstmkit.engines.numba import binding, mkl
from lstmkit.kernels.numba import caches

from harness import TOL, assert_all_close, pair, require_team, run_differential, tensor_input, torch_threads

pytestmark = pytest.mark.skipif(mkl._find() is None, reason="torch's library exports no MKL packed GEMM here")


@pytest.fixture(autouse=True)
def mkl_wanted(monkeypatch):
    """MKL's path on any CPU (by default it is taken on Intel's only: mkl.wanted)."""
    monkeypatch.setattr(mkl, "_wanted", [True])


@pytest.fixture
def every_product_to_mkl(monkeypatch):
    """Count the packings, and make every float32 product of 1+ rows go to MKL."""
    monkeypatch.setattr(mkl, "MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(mkl, "MIN_FORWARD_WEIGHT_BYTES", 0)
    monkeypatch.setattr(mkl, "MIN_ROWS", 1)
    monkeypatch.setattr(caches, "_l2", [0])  # training calls too (mkl.training_tile_max_bytes)
    packed = []
    real = mkl.pack
    monkeypatch.setattr(mkl, "pack", lambda *a, **k: packed.append(a[1]) or real(*a, **k))
    real_parts = mkl.pack_parts  # the units split's (columns.wide_columns_pay: with no L2, past it)
    monkeypatch.setattr(mkl, "pack_parts", lambda *a, **k: packed.append("parts") or real_parts(*a, **k))
    return packed


@pytest.mark.parametrize("cfg", [
    dict(input_size=5, hidden_size=7),
    dict(input_size=4, hidden_size=6, proj_size=3, num_layers=2),
    dict(input_size=3, hidden_size=9, bidirectional=True, bias=False),
])
@pytest.mark.parametrize("precompute", [False, True])
def test_training_through_mkl_matches_nn_lstm(every_product_to_mkl, monkeypatch, cfg, precompute):
    """Outputs and every gradient, with x W_ih^T in the step product or precomputed, dx in the
    loop or after it (the packed W is then [W_ih | W_hh] or W_hh alone, each way)."""
    monkeypatch.setattr(binding, "precompute_input", lambda *a: precompute)
    monkeypatch.setattr(binding, "dx_after_loop", lambda *a: precompute)
    ref, ours = pair(cfg, "numba", torch.float32)
    run_differential(ref, ours, tensor_input(torch.randn(7, 5, cfg["input_size"])))
    assert {True, False} <= set(every_product_to_mkl)  # forward (W^T) and backward (W) packings


def test_packed_unsorted_input_through_mkl(every_product_to_mkl):
    """PackedSequence from enforce_sorted=False: at later steps a chunk has fewer rows."""
    ref, ours = pair(dict(input_size=4, hidden_size=8), "numba", torch.float32)
    seqs = [torch.randn(n, 4) for n in (3, 9, 1, 6, 9, 2)]

    def make():
        leaves = [s.clone().requires_grad_(True) for s in seqs]
        return pack_sequence(leaves, enforce_sorted=False), leaves

    run_differential(ref, ours, make)
    assert every_product_to_mkl


def test_inference_through_mkl_matches_nn_lstm(every_product_to_mkl):
    """The no-grad fast path (the torch-free runtime with MKL plugged in) and a streaming loop."""
    ref, ours = pair(dict(input_size=6, hidden_size=10, num_layers=2), "numba", torch.float32)
    x = torch.randn(12, 5, 6)
    with torch.no_grad():
        want, (h, c) = ref(x)
        got, (h2, c2) = ours(x)
        assert_all_close([got, h2, c2], [want, h, c], TOL[torch.float32])
        state, ys = None, []
        for t in range(12):
            y, state = ours(x[t : t + 1], state)
            ys.append(y)
    assert_all_close([torch.cat(ys), *state], [want, h, c], TOL[torch.float32])
    assert every_product_to_mkl


def test_split_over_threads_through_mkl(every_product_to_mkl, monkeypatch):
    """Forced into 3 chunks, the loops agree with one chunk to float32 rounding (MKL may sum a
    row's product in another order for another number of rows: unlike the micro-kernel's, its
    results are not bitwise the same across splits), and the same split gives bitwise the same
    numbers run after run."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(4, 8, engine="numba")
    x = torch.randn(6, 7, 4)

    def run(chunks):
        monkeypatch.setattr(binding, "chunks_for", lambda batch, macs: chunks)
        xi = x.clone().requires_grad_(True)
        y, (h, c) = m(xi)
        (y.sum() + h.sum() * 2 + c.sum() * 3).backward()
        grads = [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
        return [y.detach(), h.detach(), c.detach(), xi.grad, *grads]

    one, split = run(1), run(3)
    assert_all_close(split, one, TOL[torch.float32])
    for a, b in zip(run(3), split):
        assert torch.equal(a, b)


def test_float64_and_the_switch_keep_the_micro_kernel(monkeypatch):
    assert not mkl.use(4096, 4096, 64, np.float64)
    assert mkl.use(4096, 4096, 64, np.float32)
    assert not mkl.use(4096, 4096, mkl.MIN_ROWS - 1, np.float32)
    assert not mkl.use(16, 16, 64, np.float32)  # W in L2: the micro-kernel
    assert not mkl.use(192, 512, 16, np.float32)  # hidden 128 (384 KiB): the backward's micro-kernel,
    assert mkl.use(192, 512, 16, np.float32, forward=True)  # the forward's MKL, from 5 rows a chunk
    assert mkl.use(192, 512, 5, np.float32, forward=True)
    assert not mkl.use(192, 512, 4, np.float32, forward=True) and mkl.use(1024, 1024, 4, np.float32, forward=True)
    assert not mkl.use(128, 256, 16, np.float32, forward=True)  # hidden 64: the micro-kernel both ways
    monkeypatch.setattr(mkl, "_entry", [])
    monkeypatch.setenv("LSTMKIT_MKL", "0")
    assert not mkl.use(4096, 4096, 64, np.float32)


@pytest.mark.parametrize("flag,intel,want", [("", True, True), ("", False, False), ("1", False, True),
                                             ("0", True, False)])
def test_mkl_is_wanted_on_intel_cpus_or_when_asked(monkeypatch, flag, intel, want):
    """Unset, LSTMKIT_MKL takes MKL on Intel CPUs only (elsewhere MKL runs its AVX2 code, far
    slower than the micro-kernel); 1 forces it, 0 turns it off."""
    monkeypatch.setattr(mkl, "_wanted", [])
    monkeypatch.setattr(mkl, "_intel_cpu", lambda: intel)
    monkeypatch.setenv("LSTMKIT_MKL", flag)
    assert mkl.wanted() is want
    assert mkl.use(4096, 4096, 64, np.float32) is (want and flag != "0")


@pytest.mark.parametrize("opts", [dict(peephole=True, zoneout=0.2, recurrent_dropout=0.3),
                                  dict(layer_norm=True, proj_size=3, bidirectional=True)])
def test_variant_kernel_through_mkl_matches_the_reference(every_product_to_mkl, opts):
    """The variant kernel's recurrent products through MKL: outputs and every gradient equal the
    reference engine's (the variants' readable spec) on the same masks."""
    def run(engine):
        torch.manual_seed(0)
        m = lstmkit.LSTM(5, 8, engine=engine, **opts)
        torch.manual_seed(1)  # the same masks
        x = torch.randn(6, 4, 5, requires_grad=True)
        y, (h, c) = m(x)
        (y.sin().sum() + h.sum() + c.sum()).backward()
        return [y, h, c, x.grad, *(p.grad for p in m.parameters())]

    got = run("numba")
    assert {True, False} <= set(every_product_to_mkl)
    assert_all_close([t.detach() for t in got], [t.detach() for t in run("reference")], TOL[torch.float32])


@pytest.mark.parametrize("N", [5, 6, 7])
def test_five_to_seven_rows_take_mkl_by_default(N, monkeypatch):
    """With the engine's own thresholds, a forward of 5-7 rows at hidden 128 (384 KiB of
    weights) makes its step products on MKL (mkl.MIN_FORWARD_ROWS): training and inference on
    one thread match torch.nn.LSTM."""
    calls = []
    real = mkl.pack
    monkeypatch.setattr(mkl, "pack", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    torch.set_num_threads(1)
    ref, ours = pair(dict(input_size=64, hidden_size=128), "numba", torch.float32)
    x = torch.randn(9, N, 64)
    with torch.no_grad():
        assert_all_close(list(ours(x)[0:1]) + list(ours(x)[1]), [ref(x)[0], *ref(x)[1]], TOL[torch.float32])
    assert N in calls  # packed for products of N rows
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    for m, xg in zip((ours, ref), xs):
        y, (h, c) = m(xg)
        (y.square().sum() + h.sum() + c.sum()).backward()
    assert_all_close([xs[0].grad, *(p.grad for p in ours.parameters())],
                     [xs[1].grad, *(p.grad for p in ref.parameters())], TOL[torch.float32])


def test_padded_rows_rule():
    """MKL's products of 5-7 rows on weights from 3 MiB are computed on 8 (blas.padded_rows)."""
    from lstmkit.kernels.numba.blas import padded_rows

    assert [padded_rows(n, 512, 1536) for n in range(1, 10)] == [1, 2, 3, 4, 8, 8, 8, 8, 9]
    assert padded_rows(6, 384, 1536) == 6 and padded_rows(6, 1280, 2048) == 8
    assert padded_rows(6, 768, 1024) == 8  # a part at 2 threads of input 256, hidden 512 (the test below)


@pytest.mark.parametrize("threads,I,H", [(1, 128, 448), (2, 128, 448), (2, 256, 512)])
def test_products_padded_to_eight_rows_match_nn_lstm(threads, I, H, monkeypatch):
    """Step products of 5-7 rows on weights from 3 MiB run on 8 (the spare rows: zeros, or rows of
    earlier steps). Hidden 448, input 128: [W_ih | W_hh] of 4 MiB and W_hh of 3 MiB, so on one
    thread (rows split) the forward and the backward pad; on two threads (units split) hidden
    512, input 256: each part of [W_ih | W_hh] 3 MiB, so its forward pads. Padded input of 6 rows
    and a PackedSequence whose steps run 7 rows down to 1, inference and training: outputs and
    every gradient against torch.nn.LSTM."""
    require_team(monkeypatch)  # at 2 threads the units split must run, even with a cold compile cache
    monkeypatch.setattr(caches, "_l2", [0])  # training on MKL too, whatever this machine's L2
    calls = []
    real = mkl.pack
    # the units split's parts of [W_ih | W_hh]^T, packed per thread for the padded products
    monkeypatch.setattr(mkl, "pack_parts", lambda *a, real=mkl.pack_parts: calls.append((True, True)) or real(*a))
    seqs = [torch.randn(n, I) for n in (5, 2, 6, 1, 7, 4, 3)]
    with torch_threads(threads):
        ref, ours = pair(dict(input_size=I, hidden_size=H), "numba", torch.float32)
        try:
            mkl.pack = lambda *a, **k: calls.append((a[1], k.get("padded"))) or real(*a, **k)
            x = torch.randn(3, 6, I)
            with torch.no_grad():
                assert_all_close([ours(x)[0], *ours(x)[1]], [ref(x)[0], *ref(x)[1]], TOL[torch.float32])
            run_differential(ref, ours, tensor_input(torch.randn(3, 6, I)))

            def make():
                leaves = [s.clone().requires_grad_(True) for s in seqs]
                return pack_sequence(leaves, enforce_sorted=False), leaves

            run_differential(ref, ours, make)
        finally:
            mkl.pack = real
    # packed for the padded products: the forward's W^T, and on one thread the backward's W
    assert (True, True) in calls and (threads == 1) == ((False, True) in calls)


def test_variant_products_padded_to_eight_rows_match_the_reference():
    """The variant kernel's step products of 6 rows on a W_hh of 3 MiB (hidden 448) run on 8
    (blas.padded_rows), forward and backward: outputs and every gradient equal the reference engine's, one thread,
    layer norm and peepholes, padded input and a PackedSequence whose steps run 7 rows down to 1;
    and in eval mode (zoneout too), where the module's runtime runs the variant kernel on MKL."""
    calls = []
    real = mkl.pack

    def run(engine, make):
        torch.manual_seed(0)
        m = lstmkit.LSTM(16, 448, engine=engine, layer_norm=True, peephole=True)
        x, leaves = make()
        y, (h, c) = m(x)
        ((y.data if hasattr(y, "batch_sizes") else y).sin().sum() + h.sum() + c.sum()).backward()
        return [getattr(y, "data", y), h, c, *(t.grad for t in leaves), *(p.grad for p in m.parameters())]

    def padded():
        x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        return x, [x]

    def packed():
        g = torch.Generator().manual_seed(2)
        leaves = [torch.randn(n, 16, generator=g).requires_grad_(True) for n in (5, 2, 6, 1, 7, 4, 3)]
        return pack_sequence(leaves, enforce_sorted=False), leaves

    def evaluated(engine):  # the module's inference fast path: the torch-free runtime's variant layer
        torch.manual_seed(0)
        m = lstmkit.LSTM(16, 448, engine=engine, layer_norm=True, peephole=True, zoneout=0.2).eval()
        with torch.no_grad():
            y, (h, c) = m(padded()[0])
        return [y, h, c]

    with torch_threads(1):
        for make in (padded, packed, None):
            try:
                mkl.pack = lambda *a, **k: calls.append((a[1], k.get("padded"))) or real(*a, **k)
                got = evaluated("numba") if make is None else run("numba", make)
            finally:
                mkl.pack = real
            want = evaluated("reference") if make is None else run("reference", make)
            assert_all_close([t.detach() for t in got], [t.detach() for t in want], TOL[torch.float32])
            # packed for the padded products: the forward's W_hh^T, and in training the backward's W_hh
            assert (True, True) in calls and ((False, True) in calls) == (make is not None)
            calls.clear()


def test_training_products_stay_on_the_micro_kernel_while_the_weights_fit_in_l2(monkeypatch):
    """A training call (weights laid out at every call) sends its products to MKL only from a
    core's L2 size of weights, but for a forward's on chunks of 8 rows and more from half of it;
    inference from the thresholds measured for it."""
    monkeypatch.setattr(caches, "_l2", [2 << 20])
    K, G = 192, 512  # 384 KiB: input 64, hidden 128
    assert mkl.use(K, G, 8, np.float32, forward=True)
    assert not mkl.use(K, G, 8, np.float32, forward=True, training=True)
    assert not mkl.use(256, 1024, 8, np.float32, training=True)  # W_hh of hidden 256: 1 MiB
    assert not mkl.use(512, 1024, 8, np.float32, training=True)  # the backward's on L2's 2 MiB
    assert mkl.use(512, 1024, 8, np.float32, forward=True, training=True)  # the forward's, 8 rows
    assert mkl.use(384, 1024, 16, np.float32, forward=True, training=True)  # 1.5 MiB, 16 rows
    assert not mkl.use(384, 1024, 6, np.float32, forward=True, training=True)  # ... 6 rows
    assert not mkl.use(256, 1024, 8, np.float32, forward=True, training=True)  # 1 MiB: half of L2
    assert mkl.use(640, 2048, 8, np.float32, forward=True, training=True)  # 5 MiB: hidden 512
    assert mkl.use(640, 2048, 4, np.float32, forward=True, training=True)
    assert mkl.use(512, 2048, 8, np.float32, training=True)


def test_l2_size_is_read_from_sysfs(tmp_path):
    for index, level, size in (("index0", "1", "48K"), ("index1", "1", "32K"), ("index2", "2", "1280K"),
                               ("index3", "3", "105M")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "level").write_text(level + "\n")
        (tmp_path / index / "size").write_text(size + "\n")
    assert caches.read_l2_bytes(str(tmp_path)) == 1280 << 10
    assert caches.read_l2_bytes(str(tmp_path / "nowhere")) == 0


def test_training_takes_the_units_split_on_mkl_only_where_the_weights_outgrow_l2(monkeypatch):
    """At 2 threads and few rows a training call runs split by hidden units on MKL where the rows
    split would stream weights past L2 (hidden 384: 3 MiB of [W_ih | W_hh], 2.25 MiB of W_hh),
    not where the rows split keeps them on the micro-kernel (hidden 256: 1.5 / 1 MiB)."""
    monkeypatch.setattr(caches, "_l2", [2 << 20])
    f32 = np.dtype(np.float32)
    with torch_threads(2):
        assert binding._wide_columns(8, 128, 384, 384, f32, save=True)
        assert binding._wide_columns_backward(8, 128, 384, 384, f32)
        assert not binding._wide_columns(8, 128, 256, 256, f32, save=True)
        assert not binding._wide_columns_backward(8, 128, 256, 256, f32)
        assert binding._wide_columns(8, 128, 256, 256, f32, save=False)  # inference: as before


def test_packed_input_asks_mkl_about_its_mean_rows():
    """Padded input: a chunk's rows (the most). Packed sequences of unequal lengths: the mean rows
    a step, since a chunk's rows shrink as its sequences end (MKL's call on the last few costs
    more than the micro-kernel's small tiles), so the bench's packed case at 2 threads (16
    sequences, 4,000 rows in 500 steps) asks about 4 rows: the micro-kernel at hidden 128."""
    two = np.array([0, 8, 16])
    assert binding.paying_rows(16, 500, 16 * 500, two) == 8 == binding.chunk_rows(16, two)
    assert binding.paying_rows(5, 10, 50, np.array([0, 3, 5])) == 3  # padded, uneven chunks: the most
    assert binding.paying_rows(16, 500, 4000, two) == 4
    assert binding.paying_rows(16, 500, 4000, np.array([0, 16])) == 8
    assert not mkl.use(192, 512, 4, np.float32, forward=True) and mkl.use(192, 512, 8, np.float32, forward=True)


def _mkl_products(a, packed, G):
    """a (m, K) @ B through MKL's packed GEMM on B as packed (ctypes, as benchmarks/products.py)."""
    i, p = ctypes.c_int, ctypes.c_void_p
    compute = ctypes.CFUNCTYPE(None, i, i, i, i, i, i, p, i, p, i, ctypes.c_float, p, i)(mkl._find()[0])
    m, K = a.shape
    c = np.full((m, G), np.nan, np.float32)
    compute(101, 111, 151, m, G, K, a.ctypes.data, K, packed.ctypes.data, G, 0.0, c.ctypes.data, G)
    return c


def _assert_rounding(c, want):
    """c within float32 rounding of sums of that many terms: 1e-5 of want's scale."""
    assert np.abs(c - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("I,H,parts,rows", [(128, 512, 2, 8), (64, 384, 2, 16), (40, 96, 3, 5), (256, 1024, 2, 6)])
def test_parts_packed_for_mkl_per_thread_give_the_serial_packings_products(I, H, parts, rows):
    """mkl.pack_parts (without the input projection first) and pack_parts_backward pack each part
    on a thread of its own, from compiled jobs that call MKL's pack by address: MKL's products on
    every part are those on the serial packing (mkl._part's copy, then mkl.pack) to float32
    rounding (MKL lays B out otherwise on a thread of a parallel region: its bytes differ, and at
    K = 4096 the products' last bits), those of the part's rows, and bitwise the same from one
    packing to the next."""
    from lstmkit.kernels.numba.columns import unit_bounds

    rng = np.random.default_rng(H + parts)
    w_ih = rng.standard_normal((4 * H, I)).astype(np.float32)
    w_hh = rng.standard_normal((4 * H, H)).astype(np.float32)
    units = unit_bounds(H, parts)
    K = I + H
    address, got = mkl.pack_parts(w_ih, w_hh, units, False, rows)
    again = mkl.pack_parts(w_ih, w_hh, units, False, rows)[1]
    parts_w = [mkl._part(w_ih, w_hh, units[s], units[s + 1], False) for s in range(parts)]
    want = mkl._pack_each(parts_w, True, rows, padded=True)[1]
    assert address == mkl._find()[0] and got.shape == want.shape
    for s in range(parts):
        a = rng.standard_normal((mkl.padded_rows.py_func(rows, K, parts_w[s].shape[0]), K)).astype(np.float32)
        c = _mkl_products(a, got[s], parts_w[s].shape[0])
        assert np.array_equal(c, _mkl_products(a, again[s], parts_w[s].shape[0]))
        _assert_rounding(c, _mkl_products(a, want[s], parts_w[s].shape[0]))
        _assert_rounding(c, a @ parts_w[s].T)
    address, got = mkl.pack_parts_backward(w_hh, units, rows)
    again = mkl.pack_parts_backward(w_hh, units, rows)[1]
    want = mkl._pack_each([w_hh[:, units[s]:units[s + 1]] for s in range(parts)], False, rows)[1]
    assert got.shape == want.shape
    for s in range(parts):
        cols = w_hh[:, units[s]:units[s + 1]]
        a = rng.standard_normal((rows, 4 * H)).astype(np.float32)
        c = _mkl_products(a, got[s], cols.shape[1])
        assert np.array_equal(c, _mkl_products(a, again[s], cols.shape[1]))
        _assert_rounding(c, _mkl_products(a, want[s], cols.shape[1]))
        _assert_rounding(c, a @ cols)


@pytest.fixture
def products_as_a(every_product_to_mkl, monkeypatch):
    """Every MKL forward product of padded input packed as the A matrix (mkl.packs_as_a), at any
    rows and sizes; counts the packings made that way."""
    monkeypatch.setattr(mkl, "packs_as_a", lambda K, G, rows: True)
    as_a = []
    real = mkl.pack
    monkeypatch.setattr(mkl, "pack", lambda *a, **k: as_a.append(k.get("as_a", False)) or real(*a, **k))
    return as_a


@pytest.mark.parametrize("cfg", [
    dict(input_size=5, hidden_size=7),
    dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True),
])
@pytest.mark.parametrize("precompute", [False, True])
def test_training_with_w_packed_as_the_a_matrix_matches_nn_lstm(products_as_a, monkeypatch, cfg, precompute):
    """The forward's products made transposed (blas.gemm_packed_a, then transpose_rows): outputs
    and every gradient, padded input of 1-9 rows, x W_ih^T in the product or precomputed."""
    monkeypatch.setattr(binding, "precompute_input", lambda *a: precompute)
    for N in (1, 5, 9):
        ref, ours = pair(cfg, "numba", torch.float32)
        run_differential(ref, ours, tensor_input(torch.randn(6, N, cfg["input_size"])))
    assert True in products_as_a


def test_inference_with_w_packed_as_the_a_matrix_matches_the_other_way(products_as_a, monkeypatch):
    """The no-grad fast path (the runtime) with W as MKL's A matrix: as torch.nn.LSTM, and as
    the packed-B products to float32 rounding; packed input keeps the B matrix (its chunks'
    rows shrink from step to step)."""
    ref, ours = pair(dict(input_size=6, hidden_size=10), "numba", torch.float32)
    x = torch.randn(9, 12, 6)
    with torch.no_grad():
        want = ref(x)[0]
        got = ours(x)[0]
        assert True in products_as_a
        assert_all_close([got], [want], TOL[torch.float32])
        monkeypatch.setattr(mkl, "packs_as_a", lambda K, G, rows: False)
        other = lstmkit.LSTM.from_torch(ref)(x)[0]
        assert_all_close([got], [other], 1e-6)
        products_as_a.clear()
        lengths = torch.tensor([9, 4, 7, 1, 9, 3, 2, 8, 5, 6, 9, 2])
        monkeypatch.setattr(mkl, "packs_as_a", lambda K, G, rows: True)
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        assert_all_close([ours(packed)[0].data], [ref(packed)[0].data], TOL[torch.float32])
        assert True not in products_as_a


def test_the_a_matrix_rule_takes_chunks_of_32_rows_on_weights_past_2_5_mib():
    assert mkl.packs_as_a(640, 2048, 32)  # input 128, hidden 512: 5 MiB
    assert not mkl.packs_as_a(640, 2048, 16) and not mkl.packs_as_a(640, 2048, 48)
    assert not mkl.packs_as_a(384, 1024, 32)  # hidden 256 (1.5 MiB): slower there
