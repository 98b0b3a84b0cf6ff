"""lstmkit.runtime: torch-free inference, checked against torch.nn.LSTM (the oracle)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file
from torch import nn

import lstmkit
from lstmkit import runtime

from harness import TOL, TOL_SAME_KERNELS, assert_all_close, assert_close

SAME = TOL_SAME_KERNELS[torch.float64]


def oracle_and_runtime(tmp_path, cfg: dict, dtype, via: str, seed: int = 0):
    """(nn.LSTM, Runtime) with identical weights, written as a plain state_dict or by lstmkit.save."""
    torch.manual_seed(seed)
    ref = nn.LSTM(**cfg, dtype=dtype).eval()
    path = tmp_path / f"{via}.safetensors"
    if via == "plain":
        save_file(ref.state_dict(), path)
        rt = runtime.load(path, batch_first=cfg.get("batch_first", False))
    else:
        lstmkit.save(lstmkit.LSTM.from_torch(ref), path)
        rt = runtime.load(path)
    return ref, rt


def check(ref, rt, x, state=None):
    dtype = ref.weight_ih_l0.dtype
    with torch.no_grad():
        want = ref(torch.from_numpy(x), None if state is None else tuple(map(torch.from_numpy, state)))
    got = rt(x, state)
    got_all, want_all = (got[0], *got[1]), (want[0], *want[1])
    assert all(a.dtype == x.dtype for a in got_all)
    assert_all_close(got_all, want_all, TOL[dtype], ["output", "h_n", "c_n"])
    return got


@settings(max_examples=12)
@given(
    layers=st.integers(1, 3), bidir=st.booleans(), bias=st.booleans(), batch_first=st.booleans(),
    proj=st.booleans(), T=st.integers(1, 5), N=st.integers(1, 3), f64=st.booleans(), via=st.sampled_from(["plain", "save"]),
    with_state=st.booleans(),
)
def test_matches_nn_lstm(tmp_path_factory, layers, bidir, bias, batch_first, proj, T, N, f64, via, with_state):
    dtype = torch.float64 if f64 else torch.float32
    cfg = dict(input_size=3, hidden_size=5, num_layers=layers, bias=bias, batch_first=batch_first,
               bidirectional=bidir, proj_size=2 if proj else 0)
    ref, rt = oracle_and_runtime(tmp_path_factory.mktemp("rt"), cfg, dtype, via)
    rng = np.random.default_rng(T * 10 + N)
    npdt = np.float64 if f64 else np.float32
    x = rng.standard_normal((N, T, 3) if batch_first else (T, N, 3)).astype(npdt)
    state = None
    if with_state:
        D = 2 if bidir else 1
        state = (rng.standard_normal((D * layers, N, 2 if proj else 5)).astype(npdt),
                 rng.standard_normal((D * layers, N, 5)).astype(npdt))
    check(ref, rt, x, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unbatched(tmp_path, dtype):
    ref, rt = oracle_and_runtime(tmp_path, dict(input_size=4, hidden_size=6, num_layers=2, proj_size=3), dtype, "save")
    npdt = np.float32 if dtype == torch.float32 else np.float64
    x = np.random.default_rng(0).standard_normal((7, 4)).astype(npdt)
    out, (h, c) = check(ref, rt, x)
    assert out.shape == (7, 3) and h.shape == (2, 3) and c.shape == (2, 6)
    check(ref, rt, x, (h, c))  # a 2-D state goes with 2-D input


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_equals_full_sequence(tmp_path, batch_first, chunk):
    """Feeding the returned state back in, chunk by chunk, reproduces the whole-sequence call."""
    cfg = dict(input_size=4, hidden_size=8, num_layers=2, batch_first=batch_first, proj_size=3)
    _, rt = oracle_and_runtime(tmp_path, cfg, torch.float64, "save")
    T, N = 7, 2
    x = np.random.default_rng(1).standard_normal((N, T, 4) if batch_first else (T, N, 4))
    full, (h_full, c_full) = rt(x)
    state, outs = None, []
    for t0 in range(0, T, chunk):
        part = x[:, t0 : t0 + chunk] if batch_first else x[t0 : t0 + chunk]
        y, state = rt(part, state)
        outs.append(y)
    streamed = np.concatenate(outs, axis=1 if batch_first else 0)
    assert_all_close([streamed, *state], [full, h_full, c_full], SAME)
    # unbatched, one step at a time
    seq = x[0] if batch_first else x[:, 0]
    full1, _ = rt(seq)
    state, ys = None, []
    for t in range(T):
        y, state = rt(seq[t : t + 1], state)
        ys.append(y)
    assert_close(np.concatenate(ys), full1, SAME)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("N", [1, 3])
def test_one_step_lane_streams_like_the_full_sequence(tmp_path, batch_first, N):
    """One layer, one direction: steps take Runtime._one_step (lstm.one_step). Streamed with the
    state fed back, with no state, with a state the caller made, and from a non-contiguous
    input, it gives the full-sequence call's numbers; its shared zero state never leaks out."""
    cfg = dict(input_size=5, hidden_size=8, batch_first=batch_first)
    ref, rt = oracle_and_runtime(tmp_path, cfg, torch.float64, "save")
    T = 6
    x = np.random.default_rng(2).standard_normal((N, T, 5) if batch_first else (T, N, 5))
    full, (h_full, c_full) = check(ref, rt, x)
    step = (lambda t: x[:, t : t + 1]) if batch_first else (lambda t: x[t : t + 1])
    state, outs = None, []
    for t in range(T):
        part = step(t)
        assert part.flags.c_contiguous == (not batch_first or N == 1)  # batch_first slices: the general path
        y, state = rt(np.ascontiguousarray(part) if t % 2 else part, state)
        outs.append(y)
    assert_all_close([np.concatenate(outs, axis=1 if batch_first else 0), *state], [full, h_full, c_full], SAME)
    assert rt._one_step_lane  # the lane was planned ...
    first, (h1, c1) = rt(np.ascontiguousarray(step(0)))
    assert_close(first, full[:, :1] if batch_first else full[:1], SAME)
    h1[...] = 7.0  # ... and the returned state is the caller's, not the lane's zeros
    c1[...] = 7.0
    again, _ = rt(np.ascontiguousarray(step(0)))
    assert_close(again, first, SAME)
    own = (np.full((1, N, 8), 0.5), np.full((1, N, 8), -0.25))  # a state the caller made: checked, then used
    check(ref, rt, np.ascontiguousarray(step(1)), own)


@pytest.mark.parametrize("kw", [dict(), dict(proj_size=3), dict(bias=False), dict(batch_first=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [1, 2])  # up to LIVE_STEP_MAX_ROWS: live steps
def test_step_at_same_bits_as_step_on(kw, dtype, N):
    """Runtime.step_at (x by address: the module's streaming lane) against step_on (x as an
    array) on the same lane: bitwise the same outputs and state, from zeros and from a state
    of the program's own, and the runtime's record of the state it returned alike."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(7, 6, dtype=dtype, **kw).eval()
    x = torch.randn(N, 1, 7, dtype=dtype) if kw.get("batch_first") else torch.randn(1, N, 7, dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            m(x)
            m(x)
    finally:
        torch.set_num_threads(threads)
    lane = m.__dict__["_lane"]
    rt, plan = m.__dict__["_runtime"][1], lane[6]
    assert lane[-1] and rt.at_lane(plan)  # the lane reads x by address
    P = kw.get("proj_size", 6)
    own = (torch.randn(1, N, P, dtype=dtype).numpy(), torch.randn(1, N, 6, dtype=dtype).numpy())
    for state in (plan[3], own):
        y1, s1 = rt.step_at(plan, x.data_ptr(), x.shape, state)
        r1 = rt._returned
        y2, s2 = rt.step_on(plan, x.numpy(), state)
        assert np.array_equal(y1, y2) and np.array_equal(s1[0], s2[0]) and np.array_equal(s1[1], s2[1])
        assert r1[1:] == rt._returned[1:] and r1[0] is s1
        with torch.no_grad():
            want = m(x, tuple(map(torch.from_numpy, state)))
        assert torch.equal(torch.from_numpy(y1), want[0]) and torch.equal(torch.from_numpy(s1[0]), want[1][0])


def test_two_threads_streaming_on_one_runtime(tmp_path):
    """Each stream feeds back its own state; interleaved calls from another thread
    (another batch size) must not leak into it (the kernels release the GIL)."""
    import threading

    _, rt = oracle_and_runtime(tmp_path, dict(input_size=3, hidden_size=16, num_layers=2), torch.float64, "save")
    rng = np.random.default_rng(0)
    xs = {N: rng.standard_normal((40, N, 3)) for N in (1, 3)}
    want = {N: rt(xs[N])[0] for N in xs}
    got = {}

    def stream(N):
        state, ys = None, []
        for t in range(40):
            y, state = rt(xs[N][t : t + 1], state)
            ys.append(y)
        got[N] = np.concatenate(ys)

    threads = [threading.Thread(target=stream, args=(N,)) for N in xs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for N in xs:
        assert_close(got[N], want[N], SAME)


def test_matches_module_eval_with_training_only_variants(tmp_path):
    """Recurrent dropout and weight drop are training noise: the runtime equals torch.nn.LSTM
    with the same weights. (Not module.eval() under no_grad: that call runs a Runtime too, so
    a runtime that mishandled these options would agree with itself.)"""
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 5, num_layers=2, dropout=0.3, recurrent_dropout=0.2, weight_drop=0.4, forget_bias=1.0).eval()
    lstmkit.save(m, tmp_path / "v.safetensors")
    rt = runtime.load(tmp_path / "v.safetensors")
    ref = nn.LSTM(3, 5, num_layers=2, dropout=0.3).eval()
    ref.load_state_dict(m.state_dict(), strict=True)  # these options add no parameters
    x = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(np.float32)
    with torch.no_grad():
        want, (h, c) = ref(torch.from_numpy(x))
    got, (h2, c2) = rt(x)
    assert_all_close([got, h2, c2], [want, h, c], TOL[torch.float32])


@pytest.mark.parametrize("variants", [
    dict(layer_norm=True), dict(peephole=True), dict(zoneout=(0.1, 0.3)),
    dict(layer_norm=True, peephole=True, zoneout=0.2, proj_size=3, bidirectional=True, num_layers=2),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_variants_run_in_inference_form(tmp_path, variants, dtype):
    """layer_norm / peephole as trained, zoneout with its expectation: equal to module.eval()
    on the reference engine (plain torch ops), saved by lstmkit.save."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(4, 6, **variants, dtype=dtype, engine="reference")
    with torch.no_grad():  # peepholes and layer-norm gains start at 0 / 1: make them matter
        for p in m.parameters():
            p.normal_(0, 0.5)
    m.eval()
    lstmkit.save(m, tmp_path / "v.safetensors")
    rt = runtime.load(tmp_path / "v.safetensors")
    x = torch.randn(5, 2, 4, dtype=dtype)
    with torch.no_grad():
        want, (h, c) = m(x)
    got, (h2, c2) = rt(x.numpy())
    assert_all_close([got, h2, c2], [want, h, c], TOL[dtype])


@pytest.mark.parametrize("I, H, N", [(4, 6, 2), (96, 192, 1)])
def test_variant_runtime_projection_paths_and_streaming(I, H, N):
    """The variant runtime makes x W_ih^T per step in its loop (small weights per row) or as one
    GEMM first (precompute_input): both equal the reference module in eval, and streaming one
    step at a time with the returned state equals the whole sequence."""
    from lstmkit.kernels.numba.lstm import precompute_input

    assert precompute_input(N, 7, I, H, H, 8, 1, few_rows=False) == (I == 96)  # the variant runtime's two paths
    torch.manual_seed(1)
    m = lstmkit.LSTM(I, H, layer_norm=True, peephole=True, zoneout=0.2, dtype=torch.float64, engine="reference")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.eval()
    rt = runtime.Runtime(m.config, {k: v.detach().numpy() for k, v in m.state_dict().items()})
    x = torch.randn(7, N, I, dtype=torch.float64)
    with torch.no_grad():
        want, (h, c) = m(x)
    got, (h2, c2) = rt(x.numpy())
    assert_all_close([got, h2, c2], [want, h, c], TOL[torch.float64])
    state, steps = None, []
    for t in range(7):
        y, state = rt(x[t : t + 1].numpy(), state)
        steps.append(y)
    assert_all_close([np.concatenate(steps), state[0], state[1]], [want, h, c], TOL[torch.float64])


def test_prefix_and_attributes(tmp_path):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 3)
            self.encoder = nn.LSTM(3, 4)
            self.decoder = nn.LSTM(4, 6, num_layers=2, bidirectional=True)

    m = Model()
    path = tmp_path / "model.safetensors"
    save_file(m.state_dict(), path)
    with pytest.raises(ValueError, match="2 LSTMs .*'decoder.'.*prefix="):
        runtime.load(path)
    rt = runtime.load(path, prefix="decoder.")
    assert (rt.input_size, rt.hidden_size, rt.num_layers, rt.bidirectional) == (4, 6, 2, True)
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    check(m.decoder.eval(), rt, x)
    with pytest.raises(ValueError, match="prefix 'nope.'"):
        runtime.load(path, prefix="nope.")


def test_bad_input_errors(tmp_path):
    _, rt = oracle_and_runtime(tmp_path, dict(input_size=3, hidden_size=4, num_layers=2), torch.float32, "save")
    x = np.zeros((2, 1, 3), np.float32)
    with pytest.raises(ValueError, match="dtype"):
        rt(x.astype(np.float64))
    with pytest.raises(RuntimeError, match="input_size. Expected 3, got 5"):
        rt(np.zeros((2, 1, 5), np.float32))
    with pytest.raises(ValueError, match="2D or 3D"):
        rt(np.zeros(3, np.float32))
    with pytest.raises(RuntimeError, match="larger than 0"):
        rt(np.zeros((0, 1, 3), np.float32))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 1, 4\)"):
        rt(x, (np.zeros((1, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32)))
    with pytest.raises(RuntimeError, match="should also be 3-D"):
        rt(x, (np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32)))
    with pytest.raises(TypeError, match="tuple"):
        rt(x, np.zeros((2, 1, 4), np.float32))
    with pytest.raises(ValueError, match=r"hidden\[1\] dtype"):
        rt(x, (np.zeros((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float64)))
    _, state = rt(x)  # a returned state is reused only where it fits
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 3, 4\)"):
        rt(np.zeros((2, 3, 3), np.float32), state)
    with pytest.raises(RuntimeError, match="should also be 2-D"):
        rt(np.zeros((2, 3), np.float32), state)


def test_bad_input_errors_on_the_one_step_path(tmp_path):
    """One layer, one step: Runtime._one_step's own checks give the general path's errors."""
    _, rt = oracle_and_runtime(tmp_path, dict(input_size=3, hidden_size=4), torch.float32, "save")
    x = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 4\)"):
        rt(x, (np.zeros((1, 1, 4), np.float32), np.zeros((1, 2, 4), np.float32)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(1, 2, 4\)"):
        rt(x, (np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 5), np.float32)))
    with pytest.raises(RuntimeError, match="should also be 3-D"):
        rt(x, (np.zeros((1, 4), np.float32), np.zeros((1, 4), np.float32)))
    with pytest.raises(ValueError, match=r"hidden\[0\] dtype"):
        rt(x, (np.zeros((1, 2, 4), np.float64), np.zeros((1, 2, 4), np.float32)))
    with pytest.raises(TypeError, match="tuple"):
        rt(x, np.zeros((1, 2, 4), np.float32))
    with pytest.raises(RuntimeError, match="input_size. Expected 3, got 5"):
        rt(np.zeros((1, 2, 5), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        rt(x.astype(np.float64))
    _, state = rt(x)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 3, 4\)"):
        rt(np.zeros((1, 3, 3), np.float32), state)  # a returned state is reused only where it fits


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        runtime.load(tmp_path / "missing.safetensors")
    save_file(nn.GRU(3, 4).state_dict(), tmp_path / "gru.safetensors")
    with pytest.raises(ValueError, match="no LSTM"):
        runtime.load(tmp_path / "gru.safetensors")
    sd = nn.LSTM(3, 4, num_layers=2).state_dict()
    del sd["weight_hh_l1"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="weight_hh_l1.* is missing"):
        runtime.load(tmp_path / "broken.safetensors")
    save_file({k: v.to(torch.int32) for k, v in nn.LSTM(3, 4).state_dict().items()}, tmp_path / "int.safetensors")
    with pytest.raises(TypeError, match="I32"):
        runtime.load(tmp_path / "int.safetensors")


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_weights_run_in_float32(tmp_path, half):
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, num_layers=2).to(half)
    save_file(ref.state_dict(), tmp_path / "half.safetensors")
    rt = runtime.load(tmp_path / "half.safetensors")
    assert rt.dtype == np.float32
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    check(ref.float().eval(), rt, x)  # exactly the widened weights


@pytest.mark.slow  # a subprocess
def test_runtime_does_not_import_torch():
    code = (
        "import sys, lstmkit\n"
        "assert 'torch' not in sys.modules and 'numba' not in sys.modules, 'import lstmkit is not lazy'\n"
        "lstmkit.save, lstmkit.load, lstmkit.export_onnx  # exported, loaded on first use\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = (
        "import sys, lstmkit.runtime, lstmkit.kernels\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the torch-free install ------------------------------------------------------------------------
_VENV_SCRIPT = r"""
import json, subprocess, sys
import numpy as np
try:
    import torch  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    sys.exit("torch is importable in the torch-free virtualenv")
import lstmkit
try:
    lstmkit.LSTM
except ImportError as e:
    assert "lstmkit[torch]" in str(e), str(e)
else:
    sys.exit("lstmkit.LSTM did not raise ImportError without torch")
from lstmkit import runtime

want = np.load(sys.argv[2])
rt = runtime.load(sys.argv[1])
out, (h, c) = rt(want["x"])
for name, got in (("out", out), ("h", h), ("c", c)):
    err = float(np.abs(got - want[name]).max())
    assert err <= 1e-5, (name, err)
state, steps = None, []  # streaming, one step at a time
for t in range(want["x"].shape[1]):
    y, state = rt(want["x"][:, t : t + 1], state)
    steps.append(y)
assert np.abs(np.concatenate(steps, axis=1) - out).max() <= 1e-6
rows = json.loads(subprocess.run([sys.argv[3], "inspect", sys.argv[1], "--json"], check=True,
                                 capture_output=True, text=True).stdout)
assert rows[0]["hidden_size"] == 8 and rows[0]["num_layers"] == 2, rows
print("torch-free runtime OK")
"""


@pytest.mark.slow
@pytest.mark.network
def test_fresh_virtualenv_without_torch(tmp_path):
    """pip install the project (core dependencies only) into a new virtualenv and run the runtime there.

    Needs the package index (pip's cache makes reruns quick). No skip when it is unreachable:
    the test fails with pip's message.
    """
    import os
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # Build from a copy, so pip's in-tree build leaves nothing in the working tree.
    src = tmp_path / "project"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.nbi", "*.nbc"))

    torch.manual_seed(0)
    m = lstmkit.LSTM(5, 8, num_layers=2, batch_first=True).eval()
    lstmkit.save(m, tmp_path / "m.safetensors")
    x = torch.randn(2, 6, 5)
    ref = torch.nn.LSTM(5, 8, num_layers=2, batch_first=True)  # the oracle: under no_grad the module
    ref.load_state_dict(m.state_dict())  # itself runs the runtime, which is what is being checked
    with torch.no_grad():
        out, (h, c) = ref(x)
    np.savez(tmp_path / "want.npz", x=x.numpy(), out=out.numpy(), h=h.numpy(), c=c.numpy())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, exe = venv / "bin" / "python", venv / "bin" / "lstmkit"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(src)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert pip.returncode == 0, f"pip install of the project failed (is the package index reachable?):\n{pip.stderr[-3000:]}"
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, env=env).stdout
    assert "torch" not in freeze.lower(), freeze
    (tmp_path / "check.py").write_text(_VENV_SCRIPT)
    r = subprocess.run([str(py), str(tmp_path / "check.py"), str(tmp_path / "m.safetensors"), str(tmp_path / "want.npz"), str(exe)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0 and "torch-free runtime OK" in r.stdout, r.stdout + r.stderr
