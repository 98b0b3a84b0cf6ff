"""The Triton engine: one layer-direction on the GPU, forward and backward; or both
directions of a bidirectional layer in the same launches (lstm_layer_pair).

Same interface and equations as engines/reference.py. Per call:

    forward   xw = x W_ih^T                                  one GEMM for all steps (cuBLAS)
              for each step t:  lstm_fwd_step                fused: h W_hh^T + gates + c, h
                                rows_matmul_step             y_t = h_t W_hr^T (proj_size > 0 only)
    backward  for each step t, last to first:
                                rows_matmul_step             (proj_size > 0 only) dy_t + dgates_{t+1} W_hh
                                lstm_bwd_step                fused: the recurrent (or W_hr) GEMM of dh,
                                                             gate grads, dc
              dx, dW_ih, dW_hh, dW_hr, db                    one GEMM / reduction each, over all steps

The step loops launch kernels and nothing else (no torch op per step): the rows of the
previous step, including sequences that start late in the reverse direction of packed
input, are read by the kernels from two sources (the previous step's rows, h0 / c0).

Directions. Every tensor of the driver below carries a leading direction axis D: D=1 for
lstm_layer (one direction, either way), D=2 for lstm_layer_pair (slot 0 forward, slot 1
reverse). The weights, h0 and c0 are stacked once per call (differentiably, so autograd
hands each direction its own gradients), the input projection is one batched GEMM, and each
step launch's grid has a direction axis of size D: at loop iteration s the forward slot
runs time step s and the reverse slot time step T-1-s (backward: the other way round), so
a bidirectional layer costs T launches per pass instead of 2T.

The 4H-wide buffers are gate-interleaved (see kernels/triton/lstm.py): the weights are
permuted once per call (interleave_perm), the gate gradients un-permuted once after the
backward loop. The step kernels are called through cached launchers (launcher.py), not
JITFunction.run. A step loop whose shapes and batch_sizes were seen before is recorded
into a CUDA graph and replayed (on by default on CUDA; LSTMKIT_TRITON_GRAPHS=0 turns it
off; see _Graphs).

Dtypes: the compute dtype is x's dtype (under autocast the frontend casts x first, as
torch.nn.LSTM's rules say); h0, c0 and the weights are cast to it here, differentiably,
and torch's autocast is switched off inside the engine so every GEMM and every tl.dot
sees operands of that one dtype.

Tensors must be on CUDA, or on the CPU when triton runs its interpreter
(TRITON_INTERPRET=1 in the environment before the process first imports triton) - that
is how the tests run.

Importing this module raises ModuleNotFoundError (name "triton") when triton is not
installed, so engine="auto" falls back to another engine. engine="auto" itself uses this
engine only after its kernels pass a self-check on the device (selfcheck.py).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections import OrderedDict

import torch

try:
    import triton  # noqa: F401
except ImportError as e:  # engine="auto" treats this as "engine not available"
    # ModuleNotFoundError naming triton: engines.is_available reads exactly that as "not installed".
    raise ModuleNotFoundError("engine='triton' needs the triton package (pip install triton)", name="triton") from e

from ...kernels.triton import lstm as tk
from ..base import LayerParams, step_offsets
from .launcher import Launcher
from ..double_backward import differentiable_backward

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tests set this to (BLOCK_B, BLOCK_H, BLOCK_K) to run the GPU's small tiles (many programs,
# several K iterations, ragged edges) in the interpreter.
TILES = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _interpreted() -> bool:
    # Read at call time: the tests may re-import the kernels module in interpreter mode.
    return tk.mode() == "interpreted"


def _check(x: torch.Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"engine='triton' supports {[str(d) for d in DTYPES]}, got {x.dtype}")
    if tk.mode() == "mixed":
        raise RuntimeError(
            "engine='triton': TRITON_INTERPRET changed after triton was imported, so triton is half "
            "in interpreter mode; set (or unset) it before anything imports triton"
        )
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and _interpreted():
        return
    if x.device.type == "cpu":
        raise RuntimeError(
            "engine='triton' runs on CUDA tensors; it accepts CPU tensors only under the Triton "
            "interpreter: set TRITON_INTERPRET=1 in the environment before the process first imports "
            "triton (or use engine='reference' / 'numba' on the CPU)"
        )
    raise RuntimeError(f"engine='triton' runs on CUDA tensors, got a tensor on {x.device}")


_SM_COUNT = {}
_FORCED = threading.local()  # .options: a _Cfg.options() tuple every _Cfg of this thread takes


@contextlib.contextmanager
def forced_options(options: tuple):
    """Within the block, this thread's calls compile with `options` (a _Cfg.options() tuple)
    whatever their shapes: the self-check runs a tiny problem through a big call's kernels."""
    _FORCED.options = options
    try:
        yield
    finally:
        _FORCED.options = None


def kernel_options(x: torch.Tensor, B: int, H: int, P: int) -> tuple:
    """The compile-time options a call with input x, batch B, hidden H, h width P uses."""
    return _Cfg(x, B, H, P).options()


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def tf32_enabled() -> bool:
    """Whether torch.matmul may use TF32 for fp32 on CUDA; never raises.

    torch >= 2.9 has the `fp32_precision` setting ("tf32", "ieee", or "none": follow the
    legacy flag). Reading the legacy `allow_tf32` raises RuntimeError once a program has
    mixed the two APIs, so it is read last and a failure counts as "no TF32" (IEEE fp32,
    the more accurate choice).
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", "none")
    except (RuntimeError, AttributeError):
        precision = "none"
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except (RuntimeError, AttributeError):
        return False


class _Cfg:
    """Tile sizes and flags for one call (all steps share them)."""

    def __init__(self, x: torch.Tensor, B: int, H: int, K: int):
        interp = _interpreted()
        dt = x.dtype
        self.device = str(x.device)
        self.acc = torch.float64 if dt == torch.float64 else torch.float32
        self.acc_f64 = dt == torch.float64
        # The interpreter's dot mishandles bf16 operands (numpy has no bf16); on the GPU
        # bf16 goes to the tensor cores as is.
        self.upcast = interp and dt == torch.bfloat16
        if dt == torch.float32:
            self.precision = "tf32" if (x.is_cuda and tf32_enabled()) else "ieee"  # torch.matmul's rule
        else:
            self.precision = "ieee" if dt == torch.float64 else "tf32"  # fp16/bf16: irrelevant
        self.warps, self.stages = 4, 3
        if interp:  # few, big programs: the interpreter pays per op, not per element
            self.bb = min(64, max(16, _next_pow2(B)))
            self.bh = min(128, max(4, _next_pow2(H)))
            self.bk = min(128, max(16, _next_pow2(max(K, 4 * H))))
            self.bh_bwd = self.bh
            self.bn = min(128, max(16, _next_pow2(K)))
        else:
            # One step is a small GEMM (B x K) @ (K x 4H) that must fill the GPU by itself:
            # start from the smallest tiles (BLOCK_H = 4 hidden units = 16 gate columns,
            # tl.dot's minimum) and grow them only while there are programs to spare (more
            # than two per SM). Untuned first guess, to be revisited on a GPU.
            n_sm = _sm_count(x.device)
            self.bb, self.bh = 16, 4
            while self.bh < 32 and triton.cdiv(B, self.bb) * triton.cdiv(H, self.bh) > 2 * n_sm:
                self.bh *= 2
            while self.bb < 64 and triton.cdiv(B, self.bb) * triton.cdiv(H, self.bh) > 2 * n_sm:
                self.bb *= 2
            # The backward's recurrent dot has N = BLOCK_H: at least 16.
            self.bh_bwd = max(16, self.bh)
            self.bn = 32  # the projection's output columns per program
            self.bk = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}.get(dt, 16)
            if dt == torch.float64:
                self.stages = 2  # fp64 tiles are big: keep the pipeline's shared memory in bounds
        if TILES is not None:
            self.bb, self.bh, self.bk = TILES
            self.bh_bwd = self.bn = max(16, self.bh)
        forced = getattr(_FORCED, "options", None)
        if forced is not None:  # a self-check reproducing another call's compiled kernels
            (self.acc_f64, self.upcast, self.precision, self.bb, self.bh, self.bh_bwd, self.bn, self.bk,
             self.warps, self.stages) = forced

    def grid(self, bs: int, H: int, D: int, bwd: bool = False):
        """(row blocks, hidden-unit blocks, direction slots) of a step kernel's launch."""
        return (triton.cdiv(bs, self.bb), triton.cdiv(H, self.bh_bwd if bwd else self.bh), D)

    def launcher(self, kernel, bwd: bool = False, **constexprs):
        """The cached launcher of kernel with this call's compile-time options (kept across calls)."""
        meta = dict(ACC_F64=self.acc_f64, UPCAST_DOT=self.upcast, PRECISION=self.precision, BLOCK_B=self.bb,
                    BLOCK_H=self.bh_bwd if bwd else self.bh, BLOCK_K=self.bk, num_warps=self.warps,
                    num_stages=self.stages, **constexprs)
        key = (kernel, self.device, _interpreted(), tuple(sorted(meta.items())))
        launcher = _LAUNCHERS.get(key)
        if launcher is None:
            launcher = _LAUNCHERS[key] = Launcher(kernel, _interpreted(), dns=_declared_dns(kernel), **meta)
        return launcher

    def proj_launcher(self, **constexprs):
        """The cached launcher of rows_matmul_step (the projection's per-step GEMMs)."""
        meta = dict(ACC_F64=self.acc_f64, UPCAST_DOT=self.upcast, PRECISION=self.precision, BLOCK_B=self.bb,
                    BLOCK_N=self.bn, BLOCK_K=self.bk, num_warps=self.warps, num_stages=self.stages, **constexprs)
        key = (tk.rows_matmul_step, self.device, _interpreted(), tuple(sorted(meta.items())))
        launcher = _LAUNCHERS.get(key)
        if launcher is None:
            launcher = _LAUNCHERS[key] = Launcher(tk.rows_matmul_step, _interpreted(),
                                                  dns=tk.DO_NOT_SPECIALIZE["rows_matmul_step"], **meta)
        return launcher

    def grid_n(self, bs: int, N: int, D: int):
        return (triton.cdiv(bs, self.bb), triton.cdiv(N, self.bn), D)

    def options(self) -> tuple:
        """Everything about this call that selects a different compiled kernel."""
        return (self.acc_f64, self.upcast, self.precision, self.bb, self.bh, self.bh_bwd, self.bn, self.bk,
                self.warps, self.stages)


_LAUNCHERS = {}  # (kernel, device, interpreted, options) -> Launcher


def _declared_dns(kernel) -> tuple:
    """The kernels module's do_not_specialize list for kernel (stand-ins in tests included)."""
    fn = getattr(kernel, "fn", None)
    return tk.DO_NOT_SPECIALIZE.get(getattr(fn, "__name__", ""), ())


_PERMS = {}


def interleave_perm(H: int, device) -> torch.Tensor:
    """perm with perm[4*j + k] = k*H + j: rows of a (4H, .) weight in the kernels' gate-interleaved order."""
    key = (H, str(device))
    if key not in _PERMS:
        j = torch.arange(H)
        _PERMS[key] = (torch.arange(4)[None, :] * H + j[:, None]).reshape(-1).to(device)
    return _PERMS[key]


def deinterleave(g: torch.Tensor) -> torch.Tensor:
    """(..., 4H) interleaved (column 4*j + k) -> torch's gate-major order (column k*H + j)."""
    four_h = g.shape[-1]
    return g.unflatten(-1, (four_h // 4, 4)).transpose(-1, -2).flatten(-2)


def _final_rows(batch_sizes: list[int], last: bool, device) -> torch.Tensor:
    """Packed row of each sequence at its last (last=True) or first step in time.

    Forward direction: h_n sits at each sequence's last step, h0 feeds step 0.
    Reverse direction: h_n sits at step 0, h0 feeds each sequence's last step.
    """
    B = batch_sizes[0]
    bs = torch.tensor(batch_sizes)
    if not last:
        return torch.arange(B, device=device)
    offsets = torch.cumsum(bs, 0) - bs
    lengths = (bs[None, :] > torch.arange(B)[:, None]).sum(1)  # (B,)
    return (offsets[lengths - 1] + torch.arange(B)).to(device)


def _prev_rows(batch_sizes: list[int], reverse: bool, device) -> torch.Tensor:
    """For every packed row, the row of cat([y, h0]) that held its h_{t-1}. (total,)"""
    T = len(batch_sizes)
    bs = torch.tensor(batch_sizes)
    offsets = torch.cumsum(bs, 0) - bs
    total = int(bs.sum())
    step = torch.repeat_interleave(torch.arange(T), bs)  # (total,)
    r = torch.arange(total) - offsets[step]  # row within its step = sequence index
    prev = step + 1 if reverse else step - 1
    pc = prev.clamp(0, T - 1)
    from_y = (prev >= 0) & (prev < T) & (r < bs[pc])
    return torch.where(from_y, offsets[pc] + r, total + r).to(device)


# ---- the recurrence: kernel launches over buffers ------------------------------------------------
# The step loops only launch kernels on the tensors of a buffer dict `b`, so they can run
# eagerly or be recorded once into a CUDA graph and replayed (see _Graphs).

def _prev_step(batch_sizes, offsets, t, reverse):
    """(row where the step before t starts, how many of t's rows continue from it); rows past
    that count start from h0 / c0 (the first step, or new sequences joining in reverse)."""
    prev = t + 1 if reverse else t - 1
    if not 0 <= prev < len(batch_sizes):
        return 0, 0
    return offsets[prev], min(batch_sizes[prev], batch_sizes[t])


def _step_times(T: int, s: int, reverses: tuple, backward: bool) -> list:
    """The time step each direction slot runs at loop iteration s: forward in time for a
    forward direction's forward pass (and for a reverse direction's backward pass), else
    from the last step down - so the two directions of a pair walk opposite ways."""
    return [T - 1 - s if reverse != backward else s for reverse in reverses]


# The step loops' per-iteration arguments depend on batch_sizes and the directions only:
# computed once per shape, so an iteration's host work is the launch itself.
@functools.lru_cache(maxsize=64)
def _fwd_schedule(batch_sizes: tuple, reverses: tuple) -> tuple:
    """Per loop iteration: (rows of the larger slot, slot 0's (prev_row, n_prev, row0, bs),
    the same for slot 1, which repeats slot 0 when there is one direction)."""
    T, offsets = len(batch_sizes), step_offsets(batch_sizes)
    schedule = []
    for s in range(T):
        per = [(*_prev_step(batch_sizes, offsets, t, rev), offsets[t], batch_sizes[t])
               for t, rev in zip(_step_times(T, s, reverses, False), reverses)]
        schedule.append((max(p[3] for p in per), per[0], per[-1]))
    return tuple(schedule)


@functools.lru_cache(maxsize=64)
def _bwd_schedule(batch_sizes: tuple, reverses: tuple) -> tuple:
    """Per loop iteration: (rows of the larger slot, slot 0's (next_row, n_next, prev_row,
    n_prev, row0, bs), the same for slot 1); next: the step after t in the forward pass."""
    T, offsets = len(batch_sizes), step_offsets(batch_sizes)
    schedule = []
    for s in range(T):
        per = []
        for t, rev in zip(_step_times(T, s, reverses, True), reverses):
            nxt = (t - 1 if rev else t + 1) if s > 0 else None
            n_next = min(batch_sizes[nxt], batch_sizes[t]) if nxt is not None else 0
            next_row = offsets[nxt] if nxt is not None else 0
            per.append((next_row, n_next, *_prev_step(batch_sizes, offsets, t, rev), offsets[t], batch_sizes[t]))
        schedule.append((max(p[5] for p in per), per[0], per[-1]))
    return tuple(schedule)


def _fwd_loop(b, batch_sizes, reverses, cfg, store_gates):
    """Forward over all steps, every direction slot in the same launches: kernel launches
    only, no torch op. Reads b: xw, wt, bias, h0, c0, w_hrt (W_hr^T, proj only); writes b: y,
    hr, cs, gates (all stacked over the directions on a leading axis)."""
    xw, y, hr, cs = b["xw"], b["y"], b["hr"], b["cs"]
    h0, c0, w_hrt = b["h0"], b["c0"], b["w_hrt"]
    gates = b["gates"] if store_gates else xw  # xw: an unused dummy pointer
    has_bias = b["bias"] is not None
    bias = b["bias"] if has_bias else xw
    D, total, H = cs.shape
    B, P = h0.shape[1], y.shape[2]
    step = cfg.launcher(tk.lstm_fwd_step, HAS_BIAS=has_bias, STORE_GATES=store_gates).loop()
    project = cfg.proj_launcher(HAS_BASE=False, HAS_ALT=False).loop()
    for n_rows, (prev_row, n_prev, row0, bs), second in _fwd_schedule(tuple(batch_sizes), reverses):
        step(cfg.grid(n_rows, H, D), xw, b["wt"], bias, y, h0, cs, c0, prev_row, n_prev,
             gates, cs, hr, hr.stride(1), row0, bs, *second, total, B, H, P)
        if w_hrt is not None:  # y_t = h_t W_hr^T
            row0_r, bs_r = second[2], second[3]
            project(cfg.grid_n(n_rows, P, D), y, row0, P, y, 0, 0, hr, row0, H, w_hrt, y, 0, bs, bs,
                    row0_r, 0, row0_r, bs_r, bs_r, total, B, P, H)


def _bwd_loop(b, batch_sizes, reverses, cfg):
    """Backward over all steps, each direction slot from its last step in time to its first,
    all slots in the same launches: kernel launches only. Reads b: dy, dh_n, gates, cs, c0,
    w_hh (interleaved rows), w_hr; updates b["dc"] in place (dL/dc_n in, dL/dc0 out); writes
    b: dg, dhp (proj only: dL/dy_t including the recurrence)."""
    dy, dh_n, dc, dg = b["dy"], b["dh_n"], b["dc"], b["dg"]
    gates, cs, c0, w_hh, w_hr = b["gates"], b["cs"], b["c0"], b["w_hh"], b["w_hr"]
    D, total, H = cs.shape
    B, P = c0.shape[1], dy.shape[2]
    proj = w_hr is not None
    # Without a projection the recurrent GEMM of dh is fused into the step kernel; with one,
    # rows_matmul_step first sums dL/dy_t and the recurrence (width P), and the step kernel
    # takes that back through W_hr.
    step = cfg.launcher(tk.lstm_bwd_step, bwd=True, HAS_DH=not proj, HAS_DHN=not proj).loop()
    recurrence = cfg.proj_launcher(HAS_BASE=True, HAS_ALT=True).loop()
    for n_rows, first, second in _bwd_schedule(tuple(batch_sizes), reverses):
        next_row, n_next, prev_row, n_prev, row0, bs = first
        next_row_r, n_next_r, prev_row_r, n_prev_r, row0_r, bs_r = second
        if not proj:
            step(cfg.grid(n_rows, H, D, bwd=True), dy, row0, P, dg, next_row, 4 * H, n_next, w_hh, 4 * H,
                 dh_n, dh_n.stride(1), dg, gates, cs, cs, c0, prev_row, n_prev, dc, row0, bs,
                 row0_r, next_row_r, n_next_r, prev_row_r, n_prev_r, row0_r, bs_r, total, B, H)
        else:
            dhp = b["dhp"]
            recurrence(cfg.grid_n(n_rows, P, D), dhp, row0, P, dy, row0, P, dg, next_row, 4 * H, w_hh,
                       dh_n, dh_n.stride(1), n_next, bs, row0_r, row0_r, next_row_r, n_next_r, bs_r,
                       total, B, P, 4 * H)
            step(cfg.grid(n_rows, H, D, bwd=True), dy, 0, 0, dhp, row0, P, bs, w_hr, P,
                 dh_n, 0, dg, gates, cs, cs, c0, prev_row, n_prev, dc, row0, bs,
                 0, row0_r, bs_r, prev_row_r, n_prev_r, row0_r, bs_r, total, B, H)


# ---- CUDA graphs -----------------------------------------------------------------------------------
# One fused kernel per step means T launches per layer (both directions share them); at small batch the launch
# cost, not the GPU, sets the pace. A step loop whose shapes and batch_sizes were seen
# before is recorded once into a CUDA graph over static buffers and replayed: inputs are
# copied in, outputs copied out. Padded batches repeat their batch_sizes; packed batches
# with new lengths each time run eagerly (a loop is captured on its second sighting, so
# one-off shapes never pay for it). On by default on CUDA; LSTMKIT_TRITON_GRAPHS=0 (or
# triton_engine.CUDA_GRAPHS = False) turns it off. Not used while the caller is itself
# capturing a graph. A capture that fails leaves that key eager for good (never an error).
CUDA_GRAPHS = os.environ.get("LSTMKIT_TRITON_GRAPHS", "1") != "0"
GRAPH_DEVICES = ("cuda",)  # tests add "cpu" with a stand-in for _capture
MAX_GRAPHS = 16


def _capture(fn):
    """Record fn's GPU work into a CUDA graph; return the replay function."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture, as torch.cuda.graphs advises
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may allocate
        fn()
    return graph.replay


class _Graphs:
    """key -> (static buffer dict, replay); a key seen once is only remembered."""

    def __init__(self):
        self.seen = set()
        self.failed = {}  # key -> why its capture failed (runs eagerly)
        self.graphs = OrderedDict()

    def get(self, key, make_buffers, loop):
        """The static buffers and replay for key, or None while key is new (run eagerly)."""
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        if key not in self.seen or key in self.failed:
            self.seen.add(key)
            return None
        b = make_buffers()
        for v in b.values():  # the first capture runs on whatever is there: make it finite
            if v is not None:
                v.zero_()
        try:
            entry = (b, _capture(lambda: loop(b)))
        except Exception as e:  # noqa: BLE001 - a graph is an optimization: run eagerly instead
            self.failed[key] = f"{type(e).__name__}: {e}"
            if len(self.failed) == 1:
                warnings.warn(f"lstmkit triton engine: CUDA graph capture failed ({self.failed[key]}); "
                              "running this shape without graphs", RuntimeWarning, stacklevel=4)
            return None
        self.graphs[key] = entry
        if len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return entry


_graphs = _Graphs()


def clear_graphs() -> None:
    """Drop every captured graph and its static buffers (they hold GPU memory)."""
    global _graphs
    _graphs = _Graphs()


def _use_graphs(x) -> bool:
    return CUDA_GRAPHS and x.device.type in GRAPH_DEVICES and not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _copy_in(b, src: dict):
    for k, v in src.items():
        if v is not None:
            b[k].copy_(v)


# ---- forward and backward of one layer-direction, or of both directions of a layer ------------------
# Every tensor here has a leading direction axis D (1, or 2 for a bidirectional pair: slot 0
# forward in time, slot 1 reverse); `reverses` says which way each slot runs.

def _per_direction_rows(rows_of, reverses, D_rows: int, device) -> torch.Tensor:
    """Row indices into a (D * D_rows, .) view of a stacked buffer: rows_of(reverse) (built on
    the CPU) of each slot, copied to device once."""
    return torch.cat([rows_of(rev) + d * D_rows for d, rev in enumerate(reverses)]).to(device)


def _forward(x, batch_sizes, h0, c0, p: LayerParams, reverses: tuple, store_gates: bool):
    """Run the recurrence of every direction slot. h0 (D, B, P), c0 (D, B, H), p: stacked
    (D, ...) weights. Returns y (D, total, P), h_n, c_n and the buffers backward needs."""
    total = x.shape[0]
    D, B, P = h0.shape
    H = c0.shape[2]
    dt, dev = x.dtype, x.device
    cfg = _Cfg(x, B, H, P)
    proj = p.w_hr is not None
    has_bias = p.b_ih is not None
    perm = interleave_perm(H, dev)  # the kernels' gate-interleaved order of the 4H axis
    w_ih_t = p.w_ih[:, perm].transpose(1, 2)  # (D, I, 4H): x W_ih^T comes out interleaved
    bias = (p.b_ih.to(cfg.acc) + p.b_hh.to(cfg.acc))[:, perm] if has_bias else None  # (D, 4H)

    def make_buffers(static=True):
        """The loop's outputs; with static=True (a CUDA graph's buffers) its inputs too."""
        e = lambda *shape, dtype=dt: torch.empty((D, *shape), device=dev, dtype=dtype)  # noqa: E731
        b = dict(y=e(total, P), cs=e(total, H, dtype=cfg.acc),  # c stays in the accumulation dtype
                 gates=e(total, 4 * H) if store_gates else None)
        b["hr"] = e(total, H) if proj else b["y"]  # o * tanh(c), before the projection
        if static:
            b.update(xw=e(total, 4 * H), wt=e(P, 4 * H), bias=e(4 * H, dtype=cfg.acc) if has_bias else None,
                     h0=e(B, P), c0=e(B, H, dtype=cfg.acc), w_hrt=e(H, P) if proj else None)
        return b

    loop = lambda b: _fwd_loop(b, batch_sizes, reverses, cfg, store_gates)  # noqa: E731
    key = ("fwd", dev, dt, tuple(batch_sizes), reverses, B, H, P, has_bias, proj, store_gates, repr(vars(cfg)))
    graph = _graphs.get(key, make_buffers, loop) if _use_graphs(x) else None
    if graph is None:  # eager: the inputs themselves and fresh outputs
        b = make_buffers(static=False)
        b.update(xw=torch.matmul(x, w_ih_t),  # the input projection: one (batched) GEMM for all steps
                 wt=p.w_hh[:, perm].transpose(1, 2).contiguous(), bias=bias,
                 h0=h0.contiguous(), c0=c0.to(cfg.acc).contiguous(),
                 w_hrt=p.w_hr.transpose(1, 2).contiguous() if proj else None)
        loop(b)
    else:
        b, replay = graph
        torch.matmul(x, w_ih_t, out=b["xw"])
        _copy_in(b, dict(wt=p.w_hh[:, perm].transpose(1, 2), bias=bias, h0=h0, c0=c0,
                         w_hrt=p.w_hr.transpose(1, 2) if proj else None))
        replay()
        # The next replay overwrites the static buffers: keep copies of what outlives this call.
        b = {k: (v.clone() if k in ("y", "hr", "cs", "gates", "h0", "c0") and v is not None else v)
             for k, v in b.items()}
        if not proj:
            b["hr"] = b["y"]
    y, cs = b["y"], b["cs"]
    last = _per_direction_rows(lambda rev: _final_rows(batch_sizes, not rev, "cpu"), reverses, total, dev)
    h_n = y.reshape(D * total, P)[last].view(D, B, P)
    c_n = cs.reshape(D * total, H)[last].view(D, B, H).to(dt)
    return y, h_n, c_n, (b["gates"] if store_gates else None, cs, b["hr"], b["h0"], b["c0"])


def _backward(saved, dy, dh_n, dc_n, batch_sizes, reverses, needs):
    x, p, y, (gates, cs, hr, h0, c0) = saved
    total = x.shape[0]
    D, B, P = h0.shape
    H = c0.shape[2]
    dt, dev = x.dtype, x.device
    cfg = _Cfg(x, B, H, P)
    proj = p.w_hr is not None

    def make_buffers(static=True):
        """The loop's outputs; with static=True (a CUDA graph's buffers) its inputs too."""
        e = lambda *shape, dtype=dt: torch.empty((D, *shape), device=dev, dtype=dtype)  # noqa: E731
        b = dict(dg=e(total, 4 * H),  # gate pre-activation grads
                 dhp=e(total, P) if proj else None)  # dL/dy_t including the recurrence
        if static:
            b.update(dy=e(total, P), dh_n=e(B, P), dc=e(B, H, dtype=cfg.acc),
                     gates=e(total, 4 * H), cs=e(total, H, dtype=cfg.acc), c0=e(B, H, dtype=cfg.acc),
                     w_hh=e(4 * H, P), w_hr=e(P, H) if proj else None)
        return b

    loop = lambda b: _bwd_loop(b, batch_sizes, reverses, cfg)  # noqa: E731
    key = ("bwd", dev, dt, tuple(batch_sizes), reverses, B, H, P, proj, repr(vars(cfg)))
    graph = _graphs.get(key, make_buffers, loop) if _use_graphs(x) else None
    w_hh = p.w_hh[:, interleave_perm(H, dev)]  # rows in the interleaved order of dg
    inputs = dict(dy=dy, dh_n=dh_n, gates=gates, cs=cs, c0=c0, w_hh=w_hh, w_hr=p.w_hr)
    if graph is None:
        b = make_buffers(static=False)
        b.update({k: (v.contiguous() if v is not None else None) for k, v in inputs.items()})
        b["dc"] = dc_n.to(cfg.acc).contiguous().clone()  # dL/dc, updated in place step by step
        loop(b)
    else:
        b, replay = graph
        _copy_in(b, dict(inputs, dc=dc_n))
        replay()  # b's outputs are read right below, before any other replay can happen

    # What remains are GEMMs over all steps at once (batched over the directions), in torch's gate order.
    dg = deinterleave(b["dg"])  # (D, total, 4H)
    nx, nh0, nc0, nwih, nwhh, nbih, nbhh, nwhr = needs
    dx = None
    if nx:  # x fed every direction: the sum of their contributions
        dx = torch.matmul(dg, p.w_ih)  # (D, total, I)
        dx = dx[0] if D == 1 else dx.sum(0)
    dh0 = None
    if nh0:  # h0 of each sequence fed its first step in time: forward t=0, reverse its last
        first = _per_direction_rows(lambda rev: _final_rows(batch_sizes, rev, "cpu"), reverses, total, dev)
        dh0 = torch.matmul(dg.reshape(D * total, 4 * H)[first].view(D, B, 4 * H), p.w_hh)  # (D, B, P)
    dc0 = b["dc"].to(dt, copy=True) if nc0 else None
    dw_ih = torch.matmul(dg.transpose(1, 2), x) if nwih else None  # (D, 4H, I)
    dw_hh = None
    if nwhh:  # every row's h_{t-1}, from cat([y, h0]) of its own direction
        prev = _per_direction_rows(lambda rev: _prev_rows(batch_sizes, rev, "cpu"), reverses, total + B, dev)
        h_prev = torch.cat([y, h0], dim=1).reshape(D * (total + B), P)[prev].view(D, total, P)
        dw_hh = torch.matmul(dg.transpose(1, 2), h_prev)  # (D, 4H, P)
    db = dg.sum(1, dtype=cfg.acc).to(dt) if (nbih or nbhh) else None
    dw_hr = torch.matmul(b["dhp"].transpose(1, 2), hr) if (proj and nwhr) else None  # (D, P, H)
    return (dx, dh0, dc0, dw_ih, dw_hh,
            db if nbih else None, db if nbhh else None, dw_hr)


def _differentiable_grads(saved, grads_out, batch_sizes, reverses, needs):
    """create_graph=True: the gradients as differentiable tensors, one direction at a time
    through engines/double_backward.py, put back together like the stacked inputs."""
    x, *stacked = saved
    per_direction = []
    for d, rev in enumerate(reverses):
        inputs = (x, *(t[d] if t is not None else None for t in stacked))
        outs = [g[d] if g is not None else None for g in grads_out]
        per_direction.append(differentiable_backward("triton", inputs, outs, batch_sizes, rev, needs))
    result = []
    for k, gs in enumerate(zip(*per_direction)):
        if all(g is None for g in gs):
            result.append(None)
        elif k == 0:  # x: shared by the directions
            result.append(sum(g for g in gs if g is not None))
        else:  # a direction whose outputs got no gradient contributes zeros
            result.append(torch.stack([g if g is not None else torch.zeros_like(stacked[k - 1][d])
                                       for d, g in enumerate(gs)]))
    return tuple(result)


class _TritonLayer(torch.autograd.Function):
    """One layer over packed data, D direction slots (stacked inputs) in the same launches."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverses):
        p = LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr)
        y, h_n, c_n, bufs = _forward(x, batch_sizes, h0, c0, p, reverses, store_gates=True)
        ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, w_hr, y, *bufs, h0, c0)  # h0, c0: double backward only
        ctx.batch_sizes, ctx.reverses = batch_sizes, reverses
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        if torch.is_grad_enabled():  # create_graph=True: this backward is itself differentiated
            x, w_ih, w_hh, b_ih, b_hh, w_hr, *_, h0, c0 = ctx.saved_tensors
            grads = _differentiable_grads((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), (dy, dh_n, dc_n),
                                          ctx.batch_sizes, ctx.reverses, ctx.needs_input_grad[:8])
            return (*grads, None, None)
        x, w_ih, w_hh, b_ih, b_hh, w_hr, y, *bufs = ctx.saved_tensors[:-2]
        p = LayerParams(w_ih, w_hh, b_ih, b_hh, w_hr)
        with torch.autocast(x.device.type, enabled=False):
            grads = _backward((x, p, y, bufs), dy, dh_n, dc_n, ctx.batch_sizes, ctx.reverses,
                              ctx.needs_input_grad[:8])
        return (*grads, None, None)


_warned_variant = False


def _reference_for_variants(x, batch_sizes, h0, c0, p, reverse, variant):
    global _warned_variant
    if not _warned_variant:
        warnings.warn(
            "engine='triton' has no fused kernels for LSTM variants yet; "
            "running them with the reference engine",
            stacklevel=3,
        )
        _warned_variant = True
    from .. import reference

    return reference.lstm_layer(x, batch_sizes, h0, c0, p, reverse=reverse, variant=variant)


def _stack(params: list) -> LayerParams:
    """The directions' LayerParams as one of (D, ...) tensors (differentiable; a view for D=1)."""
    one = len(params) == 1
    return LayerParams(*(None if ts[0] is None else (ts[0].unsqueeze(0) if one else torch.stack(ts))
                         for ts in zip(*params)))


def _run(x, batch_sizes, h0, c0, p: LayerParams, reverses: tuple):
    """The fused layer for stacked (D, ...) h0, c0, p, in x's dtype: y, h_n, c_n stacked too."""
    tensors = (x, h0, c0, *p)
    with torch.autocast(x.device.type, enabled=False):  # the engine's own GEMMs stay in x's dtype
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return _TritonLayer.apply(x, h0, c0, *p, list(batch_sizes), reverses)
        with torch.no_grad():
            y, h_n, c_n, _ = _forward(x, batch_sizes, h0, c0, p, reverses, store_gates=False)
    return y, h_n, c_n


def lstm_layer(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool = False, variant=None):
    """One layer-direction over packed data (see engines/reference.py for the contract)."""
    if variant is not None:  # layer norm, peepholes, ...: no fused kernels yet
        return _reference_for_variants(x, batch_sizes, h0, c0, p, reverse, variant)
    _check(x)
    if len(batch_sizes) == 0 or batch_sizes[0] == 0:  # nothing to run: the reference handles empties
        from .. import reference

        return reference.lstm_layer(x, batch_sizes, h0, c0, p, reverse=reverse)
    h0, c0, p = to_compute_dtype(x.dtype, h0, c0, p)
    y, h_n, c_n = _run(x, batch_sizes, h0.unsqueeze(0), c0.unsqueeze(0), _stack([p]), (reverse,))
    return y[0], h_n[0], c_n[0]


def lstm_layer_pair(x, batch_sizes, h0, c0, params):
    """Both directions of a bidirectional layer, forward (slot 0) and reverse (slot 1), in ONE
    kernel launch per step, forward and backward: h0 = (h0_f, h0_b), c0 = (c0_f, c0_b),
    params = (p_f, p_b). Returns ((y_f, h_f, c_f), (y_b, h_b, c_b)), each what lstm_layer
    returns for that direction. The module uses it when the engine module has it and the
    layer runs no variant (engines.get_pair_fn)."""
    _check(x)
    if len(batch_sizes) == 0 or batch_sizes[0] == 0:
        return tuple(lstm_layer(x, batch_sizes, h, c, p, reverse=d == 1) for d, (h, c, p) in enumerate(zip(h0, c0, params)))
    cast = [to_compute_dtype(x.dtype, h, c, p) for h, c, p in zip(h0, c0, params)]
    y, h_n, c_n = _run(x, batch_sizes, torch.stack([h for h, _, _ in cast]), torch.stack([c for _, c, _ in cast]),
                       _stack([p for _, _, p in cast]), (False, True))
    return (y[0], h_n[0], c_n[0]), (y[1], h_n[1], c_n[1])


def to_compute_dtype(dt: torch.dtype, h0, c0, p: LayerParams):
    """h0, c0 and the weights in the compute dtype dt (x's), by differentiable casts, so the
    kernels' dots and the engine's GEMMs never mix dtypes (autocast, or a caller that
    passes fp32 weights with fp16 data); their gradients come back in their own dtype."""
    cast = lambda t: t if t is None or t.dtype == dt else t.to(dt)  # noqa: E731
    return cast(h0), cast(c0), LayerParams(*(cast(t) for t in p))
