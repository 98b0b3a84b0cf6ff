"""The Numba CPU engine: kernels/lstm.py bound to torch.

lstm_layer(x, batch_sizes, h0, c0, p, reverse) has the engine interface of base.py.

Two paths:
  - nothing needs a gradient (torch.no_grad(), inference_mode, or no input requires
    grad): call the forward kernel directly on numpy views of the tensors and save
    nothing. This path is kept thin because one-step calls at batch 1 cost a few
    microseconds of arithmetic: no autograd.Function.
  - otherwise: a torch.autograd.Function whose forward saves the gate activations
    (total, 4H) and cell states (total, H) and whose backward runs the BPTT kernel.

dtypes: the kernels take float32 and float64. Other dtypes (bfloat16, float16) raise
TypeError here; engine="auto" sends them to the reference engine (engines/__init__.py).

Threads: the kernels' GEMMs run in the BLAS that Numba links (scipy's OpenBLAS, a
pthreads pool separate from torch's OpenMP pool); all the heavy work of one call runs
in that single pool, set to one thread (see _set_threads for the measurements, and
LSTMKIT_BLAS_THREADS to change it).
"""
from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from ...kernels.numba.lstm import forward_core, gate_backward_step, gate_step, lstm_backward
from ..base import LayerParams, step_offsets
from ..double_backward import differentiable_backward

SUPPORTED_DTYPES = (torch.float32, torch.float64)

# ---- threads -----------------------------------------------------------------------------------
# A BLAS call split over threads ends in a barrier, and the recurrence makes one call per
# time step. Measured on the 2-core machine, quiet (BENCHMARKS.md, "Threads"): with the
# per-step GEMM on 2 OpenBLAS threads, T=100 N=32 H=256 inference took 44 ms against 36 ms
# on one thread, and char-LM training fell from 15,900 to 9,800 chars/s — the OpenBLAS
# threads and torch's OpenMP threads spin-wait for work and take the cores from each
# other. So by default the kernels' BLAS runs on ONE thread, whatever torch uses.
# LSTMKIT_BLAS_THREADS=n lets steps of >= 2^20 multiply-adds use n threads (0: torch's
# count), for machines where that pays.
_BIG_STEP = 1 << 20
_BLAS_THREADS = int(os.environ.get("LSTMKIT_BLAS_THREADS", "1"))
_blas_libs = [None]  # threadpoolctl controllers of the BLAS Numba calls
_blas_now = [None]  # the thread count it is set to


def _blas_lib_controllers():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a dependency, but a broken install should still compute
        return []
    import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS Numba calls, so the controller sees it)

    # Only scipy's OpenBLAS (the one Numba calls), not numpy's or torch's pools.
    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    return [lib for lib in libs if "scipy.libs" in lib.filepath or "scipy/" in lib.filepath]


def _set_threads(step_macs: int) -> None:
    n = 1
    if _BLAS_THREADS != 1 and step_macs >= _BIG_STEP:
        n = _BLAS_THREADS or torch.get_num_threads()
    if n == _blas_now[0]:
        return
    if _blas_libs[0] is None:
        _blas_libs[0] = _blas_lib_controllers()
    for lib in _blas_libs[0]:
        lib.set_num_threads(n)
    _blas_now[0] = n


# ---- weights: numpy views, cached ------------------------------------------------------------------
# The kernels read the weights in torch's layout (BLAS takes W^T without a copy) and add
# b_ih and b_hh in the gate pass, so the only per-call work is making numpy views of the
# parameters. Those views are cached per tensor: a view shares the tensor's memory, so any
# in-place update (optimizer.step(), p.data.add_(), gradcheck's perturbations) is seen
# without invalidation; a tensor re-pointed to other memory (p.data = ...) or resized
# is a miss (data_ptr/shape checked), and entries die with their tensor (weakref).
_views: dict = {}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _param_view(t: torch.Tensor) -> np.ndarray:
    e = _views.get(id(t))
    if e is not None and e[0]() is t and e[1] == t.data_ptr() and e[2].shape == t.shape:
        return e[2]
    if not t.is_contiguous():  # a copy would go stale: don't cache it
        return _np(t)
    a = t.detach().numpy()
    key = id(t)
    _views[key] = (weakref.ref(t, lambda _, k=key: _views.pop(k, None)), t.data_ptr(), a)
    return a


_zeros: dict = {}


def _zeros_of(shape, dtype) -> np.ndarray:
    """Shared zeros standing in for a missing bias, projection or saved cells. The kernels
    never write them (sizes 4H or 0); they stay writeable so Numba compiles one
    specialisation, not a second one for read-only arrays."""
    key = (shape, dtype)
    z = _zeros.get(key)
    if z is None:
        z = _zeros[key] = np.zeros(shape, dtype)
    return z


def _weights(p: LayerParams, H: int):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) as contiguous numpy arrays (zeros for missing ones)."""
    w_ih = _param_view(p.w_ih)
    dt = w_ih.dtype
    if p.b_ih is not None:
        b_ih, b_hh = _param_view(p.b_ih), _param_view(p.b_hh)
    else:
        b_ih = b_hh = _zeros_of((4 * H,), dt)
    w_hr = _param_view(p.w_hr) if p.w_hr is not None else _zeros_of((0, H), dt)
    return w_ih, _param_view(p.w_hh), b_ih, b_hh, w_hr


def _check(x: torch.Tensor, p: LayerParams | None = None) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"engine='numba' computes in float32 or float64, got {x.dtype}; use engine='auto' "
            "(which runs other dtypes on the reference engine) or convert the model and input"
        )
    if x.device.type != "cpu":
        raise RuntimeError(f"engine='numba' runs on CPU tensors, got a tensor on {x.device}")
    if p is not None and p.w_ih.dtype != x.dtype:
        raise TypeError(f"engine='numba': input dtype {x.dtype} does not match weight dtype {p.w_ih.dtype}")


def _forward(x, batch_sizes, h0, c0, weights, reverse, save):
    """Run the forward kernel; returns numpy (y, h_n, c_n, acts, cells)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    xn, h0n, c0n = _np(x), _np(h0), _np(c0)
    dt = xn.dtype
    total = xn.shape[0]
    B, H = c0n.shape
    P = h0n.shape[1]
    acts = np.empty((total, 4 * H), dt)
    y = np.empty((total, P), dt)
    h_n = np.empty((B, P), dt)
    c_n = np.empty((B, H), dt)
    cells = np.empty((total, H), dt) if save else _zeros_of((0, H), dt)
    if B >= _TORCH_GEMM_MIN_BATCH and B * P * 4 * H >= _TORCH_GEMM_MIN:
        _forward_torch_gemm(xn, batch_sizes, h0n, c0n, weights, reverse, acts, y, h_n, c_n, cells, save)
    else:
        bsz = np.asarray(batch_sizes, dtype=np.int64)
        forward_core(xn, bsz, h0n, c0n, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, acts, y, h_n, c_n, cells, save)
    return y, h_n, c_n, acts, cells


# Big steps (batch >= 8 and batch x P x 4H >= 2^20 multiply-adds, e.g. batch 32 at hidden 256): the
# per-step product through OpenBLAS from Numba repacks W_hh every call on one core
# (~175 us at batch 32 / hidden 256), while torch's MKL GEMM uses torch's threads without
# a second pool fighting them. Measured, T=100 N=32 I=128 H=256 forward: 33 ms all-Numba
# vs 15.5 ms with the GEMMs in torch at 2 threads (26 vs 33 ms at 1). So for big steps the
# engine runs forward_core's loop here in Python: the GEMMs in torch, the fused gate pass
# (kernels.gate_step) in Numba, the same buffers, so backward_core takes over unchanged.
_TORCH_GEMM_MIN = 1 << 20
_TORCH_GEMM_MIN_BATCH = 8  # batch 1 at hidden 512 is 2^20 too, but a GEMV: the all-Numba loop wins


def _forward_torch_gemm(x, batch_sizes, h0, c0, weights, reverse, acts, y, h, c, cells, save):
    T = len(batch_sizes)
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    has_proj = w_hr.shape[0] > 0
    t_ = torch.from_numpy  # views: the tensors share the numpy buffers
    torch.mm(t_(x), t_(w_ih).t(), out=t_(acts))  # (total, 4H): the input projection of all steps
    h[:] = h0
    c[:] = c0
    B, H = c.shape
    q = np.empty((B, 4 * H), acts.dtype)  # h_{t-1} @ W_hh^T of one step
    hp = np.empty((B, H) if has_proj else (0, H), acts.dtype)  # h before the projection
    qt, ht, hpt, yt = t_(q), t_(h), t_(hp), t_(y)
    w_hh_t, w_hr_t = t_(w_hh).t(), t_(w_hr).t()
    offsets = step_offsets(batch_sizes)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        bs, o0 = batch_sizes[t], offsets[t]
        torch.mm(ht[:bs], w_hh_t, out=qt[:bs])  # (bs, P) @ (P, 4H)
        gate_step(acts[o0 : o0 + bs], q[:bs], b_ih, b_hh, c[:bs], hp[:bs] if has_proj else h[:bs],
                  cells[o0 : o0 + bs] if save else cells, save)
        if has_proj:
            torch.mm(hpt[:bs], w_hr_t, out=yt[o0 : o0 + bs])  # (bs, H) @ (H, P)
            h[:bs] = y[o0 : o0 + bs]
        else:
            y[o0 : o0 + bs] = h[:bs]


def _backward_torch_gemm(x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, reverse, y, saved, dy, dh_n, dc_n):
    """kernels.backward_core for big steps, with the GEMMs in torch (see _forward_torch_gemm):
    same arguments and results as kernels.lstm_backward."""
    acts, cells = saved
    T, dt = len(batch_sizes), x.dtype
    total, (B, H), P = x.shape[0], c0.shape, h0.shape[1]
    has_proj = w_hr is not None
    t_ = torch.from_numpy
    dh = np.zeros((B, P), dt) if dh_n is None else dh_n.copy()  # dL/dh carried backwards in time
    dc = np.zeros((B, H), dt) if dc_n is None else dc_n.copy()
    dgates = np.empty((total, 4 * H), dt)
    h_prev = np.empty((total, P), dt)  # h_{t-1} of every row, for dW_hh in one GEMM
    cprev = np.empty((B, H), dt)
    dhp = np.empty((B, H) if has_proj else (0, H), dt)
    hpre_all = np.empty((total, H) if has_proj else (0, H), dt)
    dh_all = np.empty((total, P) if has_proj else (0, P), dt)
    dht, dhpt, dgt = t_(dh), t_(dhp), t_(dgates)
    w_hh_t, w_hr_t = t_(w_hh), (t_(w_hr) if has_proj else None)
    offsets = step_offsets(batch_sizes)
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        bs, o0 = batch_sizes[t], offsets[t]
        tp = t + 1 if reverse else t - 1  # the step before t in the forward pass
        n_prev = (batch_sizes[tp] if tp < T else 0) if reverse else (bs if tp >= 0 else 0)
        p0 = offsets[tp] if n_prev > 0 else 0
        if dy is not None:
            dh[:bs] += dy[o0 : o0 + bs]
        if has_proj:
            dh_all[o0 : o0 + bs] = dh[:bs]
            torch.mm(dht[:bs], w_hr_t, out=dhpt[:bs])  # (bs, P) @ (P, H)
        cprev[:n_prev] = cells[p0 : p0 + n_prev]
        cprev[n_prev:bs] = c0[n_prev:bs]
        h_prev[o0 : o0 + n_prev] = y[p0 : p0 + n_prev]
        h_prev[o0 + n_prev : o0 + bs] = h0[n_prev:bs]
        gate_backward_step(acts[o0 : o0 + bs], cells[o0 : o0 + bs], cprev[:bs], dhp[:bs] if has_proj else dh[:bs],
                           dc[:bs], dgates[o0 : o0 + bs], hpre_all[o0 : o0 + bs] if has_proj else hpre_all, has_proj)
        torch.mm(dgt[o0 : o0 + bs], w_hh_t, out=dht[:bs])  # (bs, 4H) @ (4H, P): dh_{t-1}
    # Rows never touched again keep their last value: that is dh0 / dc0.
    dx = torch.mm(dgt, t_(w_ih)).numpy()  # (total, I)
    dw_ih = torch.mm(dgt.t(), t_(x)).numpy()  # (4H, I)
    dw_hh = torch.mm(dgt.t(), t_(h_prev)).numpy()  # (4H, P)
    db = dgt.sum(0).numpy()
    dw_hr = torch.mm(t_(dh_all).t(), t_(hpre_all)).numpy() if has_proj else None  # (P, H)
    return dx, dh, dc, dw_ih, dw_hh, db, dw_hr


def _needs_grad(x, h0, c0, p) -> bool:
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or h0.requires_grad or c0.requires_grad:
        return True
    for t in p:
        if t is not None and t.requires_grad:
            return True
    return False


def lstm_layer(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool = False):
    if x.dtype not in SUPPORTED_DTYPES or not x.is_cpu or p.w_ih.dtype != x.dtype:
        _check(x, p)
    H = c0.shape[1]
    _set_threads(h0.shape[0] * h0.shape[1] * 4 * H)  # (B, P) @ (P, 4H) per step
    weights = _weights(p, H)
    if _needs_grad(x, h0, c0, p):
        return _LSTMFunction.apply(x, h0, c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, p.w_hr, batch_sizes, reverse, weights)
    # Inference: the kernel on numpy views, nothing saved.
    y, h_n, c_n, _, _ = _forward(x, batch_sizes, h0, c0, weights, bool(reverse), False)
    return torch.from_numpy(y), torch.from_numpy(h_n), torch.from_numpy(c_n)


class _LSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, weights):
        y, h_n, c_n, acts, cells = _forward(x, batch_sizes, h0, c0, weights, bool(reverse), True)
        y, h_n, c_n = torch.from_numpy(y), torch.from_numpy(h_n), torch.from_numpy(c_n)
        # Saved: inputs (no copies), the output y, and the kernel's acts + cells.
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, y, torch.from_numpy(acts), torch.from_numpy(cells),
                              b_ih, b_hh)  # the biases: for differentiable_backward only
        ctx.batch_sizes = batch_sizes
        ctx.reverse = bool(reverse)
        ctx.has_bias = b_ih is not None
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        if torch.is_grad_enabled():  # create_graph=True: this backward is itself differentiated
            x, h0, c0, w_ih, w_hh, w_hr, _, _, _, b_ih, b_hh = ctx.saved_tensors
            return (*differentiable_backward("numba", (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), (dy, dh_n, dc_n),
                                             ctx.batch_sizes, ctx.reverse, ctx.needs_input_grad), None, None, None)
        x, h0, c0, w_ih, w_hh, w_hr, y, acts, cells = ctx.saved_tensors[:9]
        opt = lambda t: None if t is None else _np(t)  # noqa: E731  (None: no projection / no gradient)
        B, P, H = h0.shape[0], h0.shape[1], c0.shape[1]
        backward = lstm_backward
        if B >= _TORCH_GEMM_MIN_BATCH and B * P * 4 * H >= _TORCH_GEMM_MIN:
            backward = _backward_torch_gemm
        _set_threads(B * P * 4 * H)
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = backward(
            _np(x), ctx.batch_sizes, _np(h0), _np(c0), _np(w_ih), _np(w_hh), opt(w_hr), ctx.reverse,
            y.detach().numpy(), (acts.numpy(), cells.numpy()), opt(dy), opt(dh_n), opt(dc_n))
        need = ctx.needs_input_grad
        t = lambda a, k: torch.from_numpy(a) if need[k] else None  # noqa: E731
        db_t = torch.from_numpy(db) if ctx.has_bias else None
        return (
            t(dx, 0), t(dh0, 1), t(dc0, 2), t(dw_ih, 3), t(dw_hh, 4),
            db_t if need[5] else None, db_t.clone() if ctx.has_bias and need[6] else None,
            t(dw_hr, 7) if w_hr is not None else None,
            None, None, None,
        )
