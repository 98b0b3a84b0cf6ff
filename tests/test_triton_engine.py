"""engine="triton" against torch.nn.LSTM, run by Triton's interpreter on CPU tensors.

The kernels are the ones the GPU runs; TRITON_INTERPRET=1 makes triton execute them with
numpy instead of compiling them. Triton decides that when the kernels are defined, so
conftest.py sets the variable before anything imports triton.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest

# Triton chooses between compiler and interpreter when it is first imported; conftest.py
# sets TRITON_INTERPRET=1 before anything imports it. Check that it worked rather than
# silently testing nothing.
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import lstmkit  # noqa: E402
import lstmkit.kernels.triton.lstm as tk  # noqa: E402
from harness import TOL, assert_close, packed_input, padded_input, pair, run_differential  # noqa: E402
from lstmkit.engines import reference
from lstmkit.engines.triton import engine as triton_engine  # noqa: E402
from lstmkit.engines.base import LayerParams  # noqa: E402

assert tk.mode() == "interpreted", f"triton kernels are not interpreted (mode {tk.mode()!r}): set TRITON_INTERPRET=1 first"


ENGINE = "triton"
DTYPES = [torch.float64, torch.float32]


@pytest.fixture
def gpu_tiles():
    """Run with the GPU's small tiles: several programs per step, several K iterations,
    ragged edges on every tile dimension."""
    triton_engine.TILES = (16, 16, 16)
    yield
    triton_engine.TILES = None


def _cfg(bias=True, bidir=False, proj=0, layers=1, I=4, H=6, batch_first=False):
    return dict(input_size=I, hidden_size=H, num_layers=layers, bias=bias, batch_first=batch_first,
                bidirectional=bidir, proj_size=proj)


def _state(cfg, N, dtype, seed=3):
    h_shape, c_shape = lstmkit.LSTMConfig(**cfg).state_shapes(N)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h_shape, generator=g, dtype=dtype), torch.randn(c_shape, generator=g, dtype=dtype)


# ---- against torch.nn.LSTM: outputs and every gradient -----------------------------------------
OPTS = [  # bias, bidirectional, proj_size, num_layers
    (True, False, 0, 1), (False, False, 0, 1), (True, True, 0, 1), (True, False, 3, 1),
    (False, True, 3, 1), (True, True, 0, 2), (True, True, 3, 2), (False, False, 3, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: f"b{int(o[0])}d{int(o[1])}p{o[2]}l{o[3]}")
def test_padded_vs_torch(opts, dtype):
    bias, bidir, proj, layers = opts
    cfg = _cfg(bias, bidir, proj, layers, batch_first=bidir)
    ref, ours = pair(cfg, ENGINE, dtype)
    make = padded_input(5, 3, cfg["input_size"], dtype, batch_first=cfg["batch_first"])
    run_differential(ref, ours, make)
    run_differential(ref, ours, make, hx=_state(cfg, 3, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: f"b{int(o[0])}d{int(o[1])}p{o[2]}l{o[3]}")
def test_packed_vs_torch(opts, dtype):
    bias, bidir, proj, layers = opts
    cfg = _cfg(bias, bidir, proj, layers)
    ref, ours = pair(cfg, ENGINE, dtype)
    lengths = [2, 6, 1, 4, 6]  # unsorted, ties, a length-1 sequence
    make = packed_input(lengths, cfg["input_size"], dtype, enforce_sorted=False)
    run_differential(ref, ours, make, hx=_state(cfg, len(lengths), dtype))


@pytest.mark.parametrize("proj", [0, 5])
def test_gpu_tiles_vs_torch(gpu_tiles, proj):
    # H=40, B=20, I=19: 2 x 3 programs per step, 3 K iterations (5 with 4H in backward),
    # every tile ragged; packed lengths make the batch shrink and (in reverse) grow.
    cfg = _cfg(True, True, proj, 1, I=19, H=40)
    ref, ours = pair(cfg, ENGINE, torch.float64)
    lengths = [7, 7, 6, 6, 5, 5, 5, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 1, 1, 7]
    make = packed_input(lengths, 19, torch.float64, enforce_sorted=False)
    run_differential(ref, ours, make, hx=_state(cfg, len(lengths), torch.float64))


@settings(max_examples=8)
@given(
    I=st.integers(1, 6), H=st.integers(1, 9), layers=st.integers(1, 2), bias=st.booleans(),
    bidir=st.booleans(), proj=st.integers(0, 8), use_hx=st.booleans(),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), packed=st.booleans(),
    f32=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_configs(I, H, layers, bias, bidir, proj, use_hx, lengths, packed, f32, seed):
    proj = proj if proj < H else 0
    dtype = torch.float32 if f32 else torch.float64
    cfg = _cfg(bias, bidir, proj, layers, I=I, H=H)
    ref, ours = pair(cfg, ENGINE, dtype, seed=seed)
    if packed:
        make = packed_input(lengths, I, dtype, enforce_sorted=False, seed=seed)
    else:
        make = padded_input(max(lengths), len(lengths), I, dtype, seed=seed)
    run_differential(ref, ours, make, hx=_state(cfg, len(lengths), dtype, seed) if use_hx else None)


def test_unbatched_and_cell():
    ref, ours = pair(_cfg(proj=2), ENGINE)
    x = torch.randn(4, 4, dtype=torch.float64)
    ya, (ha, ca) = ref(x)
    yb, (hb, cb) = ours(x)
    for a, b in ((ya, yb), (ha, hb), (ca, cb)):
        assert_close(b, a, TOL[torch.float64])

    torch.manual_seed(0)
    cell = nn.LSTMCell(4, 6, dtype=torch.float64)
    mine = lstmkit.LSTMCell(4, 6, dtype=torch.float64, engine=ENGINE)
    mine.load_state_dict(cell.state_dict())
    x = torch.randn(3, 4, dtype=torch.float64)
    hx = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    for a, b in zip(cell(x, hx), mine(x, hx)):
        assert_close(b, a, TOL[torch.float64])


def test_empty_batch():
    ref, ours = pair(_cfg(bidir=True, layers=2), ENGINE)
    x = torch.randn(3, 0, 4, dtype=torch.float64)
    ya, (ha, _) = ref(x)
    yb, (hb, _) = ours(x)
    assert ya.shape == yb.shape and ha.shape == hb.shape


# ---- half precision: fp32 accumulation, against the fp32 reference --------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)], ids=["f16", "bf16"])
@pytest.mark.parametrize("proj", [0, 3])
def test_half_precision_vs_fp32(dtype, tol, proj):
    cfg = _cfg(True, True, proj, 1, I=5, H=8)
    torch.manual_seed(0)
    ref32 = lstmkit.LSTM(**cfg, engine="reference")
    half = lstmkit.LSTM(**cfg, engine=ENGINE).to(dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in ref32.state_dict().items()})
    ref32.load_state_dict({k: v.to(dtype).float() for k, v in ref32.state_dict().items()})  # same rounded weights
    lengths = [5, 3, 5, 1]
    x = torch.randn(5, len(lengths), 5).to(dtype)
    h0, c0 = (t.to(dtype) for t in _state(cfg, len(lengths), torch.float32))
    outs, grads = [], []
    for m, cast in ((ref32, torch.float32), (half, dtype)):
        xi = x.to(cast).requires_grad_(True)
        hx = [t.to(cast).requires_grad_(True) for t in (h0, c0)]
        packed = nn.utils.rnn.pack_padded_sequence(xi, torch.tensor(lengths), enforce_sorted=False)
        y, (h, c) = m(packed, tuple(hx))
        g = torch.Generator().manual_seed(1)
        flat = [y.data, h, c]
        sum((t.float() * torch.randn(t.shape, generator=g)).sum() for t in flat).backward()
        assert all(t.dtype == cast for t in flat)
        outs.append(flat)
        grads.append([xi.grad, *(t.grad for t in hx), *(p.grad for p in m.parameters())])
    for a, b in zip(outs[0] + grads[0], outs[1] + grads[1]):
        assert b.dtype == dtype
        assert_close(b.float(), a, tol)


# ---- the driver directly -------------------------------------------------------------------------
def _layer(I=3, H=5, P=5, B=4, total=10, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    p = LayerParams(r(4 * H, I), r(4 * H, P), r(4 * H), r(4 * H), r(P, H) if P != H else None)
    return r(total, I), r(B, P), r(B, H), p


@pytest.mark.parametrize("reverse", [False, True])
def test_no_grad_path_matches_reference(reverse):
    x, h0, c0, p = _layer(P=2)
    bs = [4, 3, 2, 1]
    with torch.no_grad():
        a = triton_engine.lstm_layer(x, bs, h0, c0, p, reverse=reverse)
    b = reference.lstm_layer(x, bs, h0, c0, p, reverse=reverse)
    for u, v in zip(a, b):
        assert_close(u, v, TOL[torch.float64])


def test_only_some_inputs_need_grad():
    x, h0, c0, p = _layer(total=8, B=2)
    w = p.w_hh.clone().requires_grad_(True)
    p = p._replace(w_hh=w)
    y, h, c = triton_engine.lstm_layer(x, [2, 2, 2, 2], h0, c0, p)
    (gw,) = torch.autograd.grad(y.sum() + c.sum(), [w])
    w2 = p.w_hh.detach().clone().requires_grad_(True)
    y, h, c = reference.lstm_layer(x, [2, 2, 2, 2], h0, c0, p._replace(w_hh=w2))
    (gr,) = torch.autograd.grad(y.sum() + c.sum(), [w2])
    assert_close(gw, gr, TOL[torch.float64])


def test_bad_dtype_is_type_error():
    x, h0, c0, p = _layer()
    with pytest.raises(TypeError, match="triton"):
        triton_engine.lstm_layer(x.to(torch.complex64), [4, 3, 2, 1], h0, c0, p)


def test_variant_falls_back_to_reference_with_one_warning(monkeypatch):
    x, h0, c0, p = _layer()
    calls = []

    def fake_reference(*args, **kwargs):
        calls.append(kwargs.get("variant"))
        return "ran reference"

    monkeypatch.setattr(reference, "lstm_layer", fake_reference)
    monkeypatch.setattr(triton_engine, "_warned_variant", False)
    with pytest.warns(UserWarning, match="reference"):
        assert triton_engine.lstm_layer(x, [4, 3, 2, 1], h0, c0, p, variant="v") == "ran reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_engine.lstm_layer(x, [4, 3, 2, 1], h0, c0, p, variant="v")
    assert calls == ["v", "v"]


def test_cpu_tensors_without_interpreter_is_clear_error():
    # A fresh process without TRITON_INTERPRET: the kernels are compiled-mode kernels, and
    # CPU tensors must be refused with a message that says what to do.
    code = (
        "import torch, lstmkit\n"
        "m = lstmkit.LSTM(3, 4, engine='triton')\n"
        "try:\n"
        "    m(torch.randn(2, 1, 3))\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RuntimeError:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout


# ---- the CUDA-graph path, with a stand-in for the capture ---------------------------------------------
def test_graph_path_static_buffers(monkeypatch):
    # On the GPU, _capture records the step loop into a CUDA graph and returns its replay.
    # Here the "replay" re-runs the loop on the same static buffers, which is what a graph
    # does; so this checks everything around the capture: inputs copied in, outputs copied
    # out before the next replay (two layer-directions share a graph), cache keys.
    replays = []

    def fake_capture(fn):
        fn()  # the warm-up run

        def replay():
            replays.append(1)
            fn()
        return replay

    monkeypatch.setattr(triton_engine, "CUDA_GRAPHS", True)
    monkeypatch.setattr(triton_engine, "GRAPH_DEVICES", ("cpu",))
    monkeypatch.setattr(triton_engine, "_capture", fake_capture)
    monkeypatch.setattr(triton_engine, "_graphs", triton_engine._Graphs())
    for proj, packed in ((0, False), (3, True)):
        cfg = _cfg(True, True, proj, 1, I=5, H=6)
        ref, ours = pair(cfg, ENGINE, torch.float64)
        for seed in range(3):  # eager, then captured, then replayed; new data every call
            if packed:
                make = packed_input([4, 2, 4, 1], 5, torch.float64, enforce_sorted=False, seed=seed)
            else:
                make = padded_input(4, 3, 5, torch.float64, seed=seed)
            run_differential(ref, ours, make, hx=_state(cfg, 4 if packed else 3, torch.float64, seed), seed=seed)
            with torch.no_grad():  # the no-grad forward has its own graphs (no saved gates)
                y = ours(make()[0])[0]
                y_ref = ref(make()[0])[0]
            assert_close(y.data if packed else y, y_ref.data if packed else y_ref, TOL[torch.float64])
    assert len(triton_engine._graphs.graphs) > 0 and len(replays) > 0


def test_without_triton_import_error_and_auto_falls_back(monkeypatch):
    import lstmkit.engines as engines

    monkeypatch.setitem(sys.modules, "triton", None)  # "not installed"
    monkeypatch.delitem(sys.modules, "lstmkit.engines.triton.engine")
    with pytest.raises(ImportError, match="triton"):
        importlib.import_module("lstmkit.engines.triton.engine")
    assert not engines.is_available("triton")  # so engine="auto" picks another engine


def test_module_variants_run_on_reference_with_a_warning(monkeypatch):
    import lstmkit.engines as engines

    monkeypatch.setattr(engines, "_warned_variant_fallback", set())
    torch.manual_seed(0)
    ours = lstmkit.LSTM(4, 6, layer_norm=True, peephole=True, dtype=torch.float64, engine=ENGINE)
    ref = lstmkit.LSTM(4, 6, layer_norm=True, peephole=True, dtype=torch.float64, engine="reference")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="triton"):
        y, _ = ours(x)
    assert_close(y, ref(x)[0], TOL[torch.float64])


# ---- compatibility: TF32 setting, gate-interleaved layout, small tiles ---------------------------
def test_tf32_setting_read_never_raises():
    # torch >= 2.9 raises RuntimeError on reading the legacy allow_tf32 once a program has set
    # the newer fp32_precision; the engine must read whichever is in force without raising.
    matmul = torch.backends.cuda.matmul
    try:
        matmul.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):
            matmul.allow_tf32  # noqa: B018 - the trap the engine avoids
        assert triton_engine.tf32_enabled() is True
        matmul.fp32_precision = "ieee"
        assert triton_engine.tf32_enabled() is False
    finally:
        matmul.fp32_precision = "none"
    assert triton_engine.tf32_enabled() is bool(matmul.allow_tf32)


def test_interleave_perm_and_back():
    H = 5
    w = torch.arange(4 * H * 2, dtype=torch.float64).reshape(4 * H, 2)
    perm = triton_engine.interleave_perm(H, "cpu")
    inter = w[perm]
    for j in range(H):
        for k in range(4):
            assert torch.equal(inter[4 * j + k], w[k * H + j])  # gate k of unit j at column 4j + k
    g = torch.randn(3, 4 * H, dtype=torch.float64)
    assert torch.equal(triton_engine.deinterleave(g[:, perm]), g)


@pytest.mark.parametrize("proj", [0, 3])
def test_smallest_tiles_vs_torch(proj):
    # BLOCK_H = 4: the GPU's smallest forward tile (16 gate columns per dot), 2 programs over
    # H=6 with a ragged edge; BLOCK_B = 16 > B.
    triton_engine.TILES = (16, 4, 16)
    try:
        cfg = _cfg(True, True, proj, 1, I=5, H=6)
        ref, ours = pair(cfg, ENGINE, torch.float64)
        make = packed_input([3, 1, 3], 5, torch.float64, enforce_sorted=False)
        run_differential(ref, ours, make, hx=_state(cfg, 3, torch.float64))
    finally:
        triton_engine.TILES = None


# ---- dtypes the engine receives: one compute dtype, autocast off inside -----------------------------
def _mixed_layer(dtype, seed=0):
    x, h0, c0, p = _layer(I=3, H=5, P=5, B=3, total=8, dtype=torch.float32, seed=seed)
    return x.to(dtype), h0, c0, p


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_mixed_dtypes_compute_in_input_dtype(dtype, autocast):
    # The frontend casts x under autocast (torch.nn.LSTM's rule); the engine must then run with
    # fp32 weights / state without mixing dtypes in a dot or a GEMM (Triton refuses fp16 x fp32),
    # return x's dtype, and hand back gradients in each leaf's own dtype.
    x, h0, c0, p = _mixed_layer(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, h0, c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh)]
    bs = [3, 3, 1, 1]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        y, h, c = triton_engine.lstm_layer(leaves[0], bs, leaves[1], leaves[2], LayerParams(*leaves[3:]))
    assert y.dtype == h.dtype == c.dtype == dtype
    (y.float().sum() + h.float().sum() + c.float().sum()).backward()
    assert [t.grad.dtype for t in leaves] == [t.dtype for t in leaves]
    # Against the reference in fp32 on the same values rounded to the compute dtype.
    rounded = [t.detach().to(dtype).float().requires_grad_(True) for t in leaves]
    yr, hr_, cr = reference.lstm_layer(rounded[0], bs, rounded[1], rounded[2], LayerParams(*rounded[3:]))
    (yr.sum() + hr_.sum() + cr.sum()).backward()
    tol = 4e-2 if dtype == torch.bfloat16 else 1e-2
    for a, b in zip([y, h, c] + [t.grad for t in leaves], [yr, hr_, cr] + [t.grad for t in rounded]):
        assert_close(a.float(), b, tol)


# ---- the cached launcher, with a stand-in for Triton's compiled kernel -------------------------------
class _FakeCompiled:
    def __init__(self, log, refuse=False):
        self.log, self.refuse = log, refuse

    def __getitem__(self, grid):
        def runner(*args):
            if self.refuse:
                raise TypeError("launcher takes 7 arguments")
            grid[2]  # noqa: B018 - Triton's handle reads grid[0], grid[1], grid[2]
            self.log.append(("cached", grid, args))
        return runner


class _FakeKernel:
    """Triton's JITFunction surface the Launcher uses: .fn, .do_not_specialize, [grid](...)."""

    do_not_specialize = ["row"]

    def __init__(self, refuse=False):
        self.log, self.refuse = [], refuse

        def fn(ptr, row, n, BLOCK: int):  # noqa: N803 - a constexpr, as in the real kernels
            pass
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return _FakeCompiled(self.log, self.refuse)
        return launch


def test_cached_launcher_reuses_compiled_kernel_per_specialization(monkeypatch):
    from lstmkit.engines.triton import launcher as launcher_mod

    monkeypatch.setattr(launcher_mod, "_disabled_reason", None)
    k = _FakeKernel()
    launch = launcher_mod.Launcher(k, interpreted=False, BLOCK=16, num_warps=4)
    t = torch.zeros(64)
    launch((2, 1), t, 0, 32)  # compile + launch through kernel[grid]
    launch((2, 1), t, 5, 32)  # row is never specialized: same kernel, cached handle
    launch((3, 1), t, 7, 32)
    assert [e[0] for e in k.log] == ["jit", "cached", "cached"]
    assert k.log[1] == ("cached", (2, 1, 1), (t, 5, 32, 16))  # constexprs appended in signature order
    assert k.log[0][3] == dict(BLOCK=16, num_warps=4)
    launch((2, 1), t, 0, 1)  # n == 1 specializes differently: compile again
    launch((2, 1), t[1:], 0, 32)  # a misaligned pointer too
    assert [e[0] for e in k.log[3:]] == ["jit", "jit"]


def test_cached_launcher_falls_back_when_triton_refuses(monkeypatch):
    from lstmkit.engines.triton import launcher as launcher_mod

    monkeypatch.setattr(launcher_mod, "_disabled_reason", None)
    k = _FakeKernel(refuse=True)
    launch = launcher_mod.Launcher(k, interpreted=False, BLOCK=16)
    t = torch.zeros(64)
    launch((1,), t, 0, 32)
    with pytest.warns(RuntimeWarning, match="refused the cached kernel launch"):
        launch((1,), t, 1, 32)  # refused -> relaunched the normal way
    launch((1,), t, 2, 32)
    assert [e[0] for e in k.log] == ["jit", "jit", "jit"]
    assert launcher_mod.fast_launch_disabled_reason().startswith("TypeError")


def test_loop_launcher_keys_once(monkeypatch):
    from lstmkit.engines.triton import launcher as launcher_mod

    monkeypatch.setattr(launcher_mod, "_disabled_reason", None)
    k = _FakeKernel()
    loop = launcher_mod.Launcher(k, interpreted=False, BLOCK=16).loop()
    t = torch.zeros(64)
    for row in range(4):
        loop((1,), t, row, 32)
    assert [e[0] for e in k.log] == ["jit", "cached", "cached", "cached"]
    monkeypatch.setattr(launcher_mod, "CHECK_LOOP_KEYS", True)
    with pytest.raises(AssertionError, match="specialization changed"):
        loop((1,), t[1:], 0, 32)  # a broken promise is caught when the check is on


def test_step_loops_keep_the_loop_launcher_promise(monkeypatch):
    # Only do_not_specialize arguments may change between the steps of a loop: checked on
    # every step for every kernel, padded and packed, both directions, with and without proj.
    from lstmkit.engines.triton import launcher as launcher_mod

    monkeypatch.setattr(launcher_mod, "CHECK_LOOP_KEYS", True)
    for proj in (0, 3):
        cfg = _cfg(True, True, proj, 1, I=4, H=5)
        ref, ours = pair(cfg, ENGINE, torch.float64)
        run_differential(ref, ours, packed_input([3, 1, 2], 4, torch.float64, enforce_sorted=False),
                         hx=_state(cfg, 3, torch.float64))


# ---- both directions of a bidirectional layer in one launch per step -------------------------------
def _count_launches(monkeypatch):
    """Record (kernel name, grid) of every kernel launch the engine makes from now on."""
    from lstmkit.engines.triton import launcher as launcher_mod

    launches = []
    real = launcher_mod.Launcher.__call__

    def counting(self, grid, *args, key=None):
        launches.append((self.kernel.fn.__name__, tuple(grid)))
        return real(self, grid, *args, key=key)

    monkeypatch.setattr(launcher_mod.Launcher, "__call__", counting)
    return launches


@pytest.mark.parametrize("proj", [0, 3])
def test_bidirectional_runs_both_directions_in_one_launch_per_step(proj, monkeypatch):
    # Packed and sorted (the other bidirectional cases above are padded or unsorted): the
    # reverse direction's batch grows while the forward's shrinks, inside the same launches.
    from collections import Counter

    layers, lengths = (1 if proj else 2), [4, 3, 1]
    T = max(lengths)
    cfg = _cfg(True, True, proj, layers, I=3, H=5)
    ref, ours = pair(cfg, ENGINE, torch.float64)
    make = packed_input(lengths, 3, torch.float64, enforce_sorted=True)
    launches = _count_launches(monkeypatch)
    run_differential(ref, ours, make, hx=_state(cfg, len(lengths), torch.float64))
    expected = {"lstm_fwd_step": layers * T, "lstm_bwd_step": layers * T}
    if proj:  # the projection: one launch per step forward, one backward
        expected["rows_matmul_step"] = 2 * layers * T
    assert Counter(name for name, _ in launches) == expected
    assert all(grid[2] == 2 for _, grid in launches)  # the grid's direction axis holds both

    if proj:
        return
    launches.clear()  # one direction: the same kernels with one direction slot
    uni = _cfg(True, False, proj, 1, I=3, H=5)
    ref, ours = pair(uni, ENGINE, torch.float32)
    run_differential(ref, ours, packed_input(lengths, 3, torch.float32, enforce_sorted=True))
    assert len(launches) == 2 * T and all(grid[2] == 1 for _, grid in launches)


def test_engine_without_pair_hook_runs_directions_one_by_one(monkeypatch):
    import lstmkit.engines as engines

    x = torch.zeros(1, 1, dtype=torch.float64)
    assert engines.get_pair_fn("triton", x) is triton_engine.lstm_layer_pair
    assert engines.get_pair_fn("triton", x, variant=True) is None
    assert engines.get_pair_fn("reference", x) is None  # no hook: the module's per-direction loop
    monkeypatch.delattr(triton_engine, "lstm_layer_pair")
    assert engines.get_pair_fn("triton", x) is None
    launches = _count_launches(monkeypatch)
    cfg = _cfg(True, True, 0, 1, I=3, H=4)
    ref, ours = pair(cfg, ENGINE, torch.float64)
    run_differential(ref, ours, padded_input(3, 2, 3, torch.float64))
    assert len(launches) == 2 * 2 * 3 and all(grid[2] == 1 for _, grid in launches)


def test_paired_double_backward_recomputes_each_direction(monkeypatch):
    # create_graph=True through the paired Function: differentiable_backward once per
    # direction, and the second derivatives agree with torch.nn.LSTM's (a gradient penalty).
    calls = []
    real = triton_engine.differentiable_backward

    def counting(engine, inputs, grad_outputs, batch_sizes, reverse, *args, **kwargs):
        calls.append(reverse)
        return real(engine, inputs, grad_outputs, batch_sizes, reverse, *args, **kwargs)

    monkeypatch.setattr(triton_engine, "differentiable_backward", counting)
    cfg = _cfg(True, True, 2, 1, I=3, H=4)
    ref, ours = pair(cfg, ENGINE, torch.float64)
    x0 = torch.randn(3, 2, 3, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        x = x0.clone().requires_grad_(True)
        inp = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 2]))
        y, (h, c) = m(inp)
        loss = (y.data * torch.linspace(-1, 1, y.data.shape[1], dtype=torch.float64)).sum() + h.sum() + c.sum()
        first = torch.autograd.grad(loss, [x, *m.parameters()], create_graph=True)
        results.append(torch.autograd.grad(sum(d.square().sum() for d in first), [x, *m.parameters()]))
    assert sorted(calls) == [False, True]
    for a, b in zip(*results):
        assert_close(b, a, TOL[torch.float64])


# ---- engine="auto" trusts Triton only after a self-check -------------------------------------------
class _RaisingKernel:
    """Looks like the real kernel (signature, do_not_specialize), fails to compile."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            raise RuntimeError("PTX compile failed (forced)")
        return launch


class _WrongKernel(_RaisingKernel):
    """The real forward kernel, then h is nudged: a kernel that computes wrong numbers."""

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.real[grid](*args, **meta)
            args[11].add_(1e-3)  # h_ptr
        return launch


@pytest.fixture
def auto_uses_triton_on_cpu(monkeypatch):
    """engine="auto" picks Triton for CPU tensors, and self-checks them (fresh verdicts)."""
    import lstmkit.engines as engines
    from lstmkit.engines.triton import selfcheck

    monkeypatch.setattr(engines, "auto_engine_name", lambda x: "triton")
    monkeypatch.setattr(selfcheck, "DEVICES", ("cpu",))
    monkeypatch.setattr(selfcheck, "VERDICTS", {})
    return selfcheck


def test_auto_self_check_passes_and_runs_triton(auto_uses_triton_on_cpu, monkeypatch):
    calls = []
    for name in ("lstm_layer", "lstm_layer_pair"):
        real = getattr(triton_engine, name)
        monkeypatch.setattr(triton_engine, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    ref, ours = pair(_cfg(True, True, 3, 1), "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no self-check failure
        run_differential(ref, ours, padded_input(4, 2, 4, torch.float64))
    verdicts = auto_uses_triton_on_cpu.VERDICTS
    assert len(verdicts) == 1 and list(verdicts.values()) == [None]
    # The check: one direction and the pair, each with and without grad; then the
    # bidirectional model's own call, paired.
    assert calls == ["lstm_layer"] * 2 + ["lstm_layer_pair"] * 3


@pytest.mark.parametrize("bad", ["raises", "wrong"])
def test_auto_self_check_failure_warns_once_and_uses_reference(auto_uses_triton_on_cpu, monkeypatch, bad):
    monkeypatch.setattr(tk, "lstm_fwd_step", (_RaisingKernel if bad == "raises" else _WrongKernel)(tk.lstm_fwd_step))
    ref, ours = pair(_cfg(True, False, 0, 1), "auto")
    make = padded_input(4, 2, 4, torch.float64)
    with pytest.warns(RuntimeWarning, match="self-check.*(forced|max error).*report"):
        run_differential(ref, ours, make)  # right numbers: the reference engine ran
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per device, dtype and kernel options
        run_differential(ref, ours, make)
    (reason,) = auto_uses_triton_on_cpu.VERDICTS.values()
    assert ("PTX compile failed" in reason) if bad == "raises" else ("max error" in reason)
    # engine="triton" is not protected: it fails loudly (or, here, is visibly wrong).
    direct = lstmkit.LSTM.from_torch(ref, engine="triton")
    if bad == "raises":
        with pytest.raises(RuntimeError, match="forced"):
            direct(make()[0])
    else:
        assert not torch.allclose(direct(make()[0])[0], ref(make()[0])[0], atol=1e-6)


# ---- benchmarks/gpu.py runs end to end (CPU dry run under the interpreter) ---------------------------
def test_gpu_benchmark_dry_run_writes_its_report(tmp_path):
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    out = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["meta"]["dry_run"] is True and report["skipped"] == []
    assert report["checks"] and all(c["ok"] for c in report["checks"]), report["checks"]
    assert report["meta"]["self_check_fp32"] == "trusted"
    assert len(report["rows"]) == 3
    for row in report["rows"]:
        assert row["check_ok"], row
        for key in ("cudnn", "lstmkit", "lstmkit_graphs"):
            assert row[f"{key}_fwd_ms"] > 0 and row[f"{key}_fwdbwd_ms"] > 0, row
    section = (tmp_path / "gpu_section.md").read_text()
    assert section.startswith("## GPU engine (Triton)") and "NOT A MEASUREMENT" in section
    assert section.count("\n| ") == 1 + len(report["rows"])  # header + one line per case
    assert not list(tmp_path.glob("*.tmp"))


# ---- the kernels compile for the GPU (no GPU needed: Triton's compiler and ptxas run on the CPU) ------
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    # What the interpreter cannot check: the compiler's type rules (tl.dot's out_dtype against
    # an fp64 accumulator fails on Triton 3.6 without it), the gate split/join layouts, shared
    # memory. One option set per kernel and dtype here; `python -m
    # lstmkit.engines.triton.aot_check` compiles all of them.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # really compile, whatever an earlier run cached
    out = subprocess.run([sys.executable, "-m", "lstmkit.engines.triton.aot_check", "--quick"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert out.stdout.count("\nok ") >= 20 and "0 failures" in out.stdout, out.stdout[-2000:]


# ---- compiled Triton on a real GPU (runs only where torch sees CUDA) ---------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="hardware tier: needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_compiled_on_gpu_vs_torch_subprocess():
    # In a fresh process without TRITON_INTERPRET: the kernels compile for the GPU, the cached
    # launcher and CUDA graphs are used, and everything still agrees with torch.nn.LSTM (cuDNN)
    # at the tests' tolerances (fp32 with TF32 off).
    code = r"""
import torch, lstmkit
from torch import nn
from lstmkit.engines.triton import launcher, selfcheck
from lstmkit.engines.triton import engine as te
torch.backends.cuda.matmul.fp32_precision = "ieee"
torch.backends.cudnn.rnn.fp32_precision = "ieee"
worst = {}
for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
    for bidir, proj, packed in ((False, 0, False), (True, 3, True), (True, 0, True)):
        torch.manual_seed(0)
        ref = nn.LSTM(19, 40, 2, bidirectional=bidir, proj_size=proj, device="cuda", dtype=dtype)
        for engine in ("triton", "auto"):
            ours = lstmkit.LSTM.from_torch(ref, engine=engine)
            for rep in range(3):  # eager, graph capture, graph replay
                x = torch.randn(9, 37, 19, device="cuda", dtype=dtype)
                lengths = torch.randint(1, 10, (37,)); lengths[0] = 9
                inp = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
                outs = []
                for m in (ref, ours):
                    m.zero_grad()
                    y, (h, c) = m(inp)
                    y = y.data if packed else y
                    (y.sum() + h.sum() + c.sum()).backward()
                    outs.append([y, h, c] + [p.grad for p in m.parameters()])
                err = max(((a - b).abs().max() / b.abs().max().clamp_min(1)).item() for b, a in zip(*outs))
                assert err <= tol, (dtype, bidir, proj, packed, engine, rep, err)
assert launcher.fast_launch_disabled_reason() is None, launcher.fast_launch_disabled_reason()
assert all(v is None for v in selfcheck.VERDICTS.values()), selfcheck.VERDICTS
assert te._graphs.graphs and not te._graphs.failed, te._graphs.failed
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
