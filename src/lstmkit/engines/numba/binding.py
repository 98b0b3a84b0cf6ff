"""The one binding of the Numba kernels to torch: numpy views, buffers, weights laid out for
the kernels, the thread policy and the inference fast path. The plain engine (engine.py),
the variant engine (variants.py), the torch.compile ops (compile_ops.py) and the module's
inference fast path (nn/modules.py) all go through here.

Threads: a call splits its batch rows into torch.get_num_threads() chunks (fewer for small
work, see chunks_for), each running the whole time loop on its own thread
(kernels/numba/lstm.py), and those threads are torch's own OpenMP team where torch runs on
OpenMP (share_torch_threads; kernels/numba/threads.py says why). The weight gradients after
the loop are torch GEMMs, on the same threads; the two never run at the same time. The
kernels call no BLAS of their own pool: a step product goes to the micro-kernel or to MKL's
packed GEMM (mkl.py), both on the calling chunk's thread.
"""
from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np
import torch

from ...kernels.numba.lstm import (
    backward_core, chunk_bounds, dx_after_loop, forward_core, pack_backward, pack_forward, precompute_input,
    same_words, weight_gradients,
)
from ...kernels.numba.lstm import cell_step_at, live_turn, one_step_live_split
from ...kernels.numba.lstm import chunks_for as kernel_chunks_for
from ...kernels.numba.columns import big_weights_columns_pay, columns_pay_training
from ...kernels.numba.columns import pack_columns, pack_columns_backward
from ...kernels.numba.columns import run_columns, wide_columns_pay, wide_columns_pay_backward
from ...kernels.numba.columns import run_columns_backward
from ...kernels.numba.step import step_backward as step_backward_kernel
from ...kernels.numba.step import step_backward_all as step_backward_all_kernel
from ...kernels.numba.step import step_backward_tiles as step_backward_tiles_kernel
from ...kernels.numba.step import step_forward as step_forward_kernel
from ...kernels.numba.step import step_forward_all as step_forward_all_kernel
from ...kernels.numba.step import steps_backward as steps_backward_kernel
from ...kernels.numba.step import steps_forward as steps_forward_kernel
from ...kernels.numba import buffers, caches, gemm, prefetch
from ...kernels.numba.threads import use_openmp
from ...kernels.numba.tile import aligned_bytes, aligned_view
from ...runtime.model import live_split
from ..base import LayerParams
from . import mkl

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_input(x: torch.Tensor, p: LayerParams | None = None) -> None:
    """torch's exception types for what the Numba kernels cannot take."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"engine='numba' computes in float32 or float64, got {x.dtype}; use engine='auto' "
            "(which runs other dtypes on the reference engine) or convert the model and input"
        )
    if x.device.type != "cpu":
        raise RuntimeError(f"engine='numba' runs on CPU tensors, got a tensor on {x.device}")
    if p is not None and p.w_ih.dtype != x.dtype:
        raise TypeError(f"engine='numba': input dtype {x.dtype} does not match weight dtype {p.w_ih.dtype}")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy view of t (a copy only when t is not contiguous, or is a negative
    view: torch._neg_view's lazy negation, which numpy cannot show: numpy(force=True) resolves
    it). One torch call where detach, resolve_neg, contiguous, numpy took four."""
    a = t.numpy(force=True)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def as_numpy_or(t, shape, dtype) -> np.ndarray:
    """as_numpy(t), or zeros of `shape` standing in for an absent tensor (the kernels read
    an absent part off an empty shape)."""
    return as_numpy(t) if t is not None else np.zeros(shape, dtype)


def needs_grad(tensors) -> bool:
    """Whether autograd has to record a call on these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- threads ----------------------------------------------------------------------------------------
def torch_openmp_library() -> str | None:
    """The path of the OpenMP runtime torch's own threads run on, when torch's parallel backend
    is OpenMP and the library is loaded in this process (Linux: found in /proc/self/maps,
    preferring one inside torch's folder); else None."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as f:
            loaded = {line.split()[-1] for line in f if "omp" in line and ".so" in line}
    except OSError:
        return None
    names = ("libgomp", "libiomp5", "libomp")
    found = sorted(p for p in loaded if os.path.basename(p).startswith(names))
    torch_dir = os.path.dirname(torch.__file__)
    found.sort(key=lambda p: not p.startswith(torch_dir))
    return found[0] if found else None


def share_torch_threads() -> bool:
    """Run the kernels' row chunks on torch's OpenMP team (kernels/numba/threads.py says why);
    LSTMKIT_OWN_THREADS=1 keeps them on the kernels' own Python threads."""
    if os.environ.get("LSTMKIT_OWN_THREADS", "") not in ("", "0"):
        return use_openmp(None)
    return use_openmp(torch_openmp_library())


def chunks_for(batch: int, macs: int) -> int:
    """Row chunks for a call over `batch` rows and `macs` multiply-adds: one per torch thread
    (kernels/numba/lstm.chunks_for has the rule)."""
    return kernel_chunks_for(batch, macs, torch.get_num_threads())


def row_bounds(batch_sizes, I, H, P):
    """Row chunks of a call over these batch_sizes, for either engine's time loops."""
    total = sum(batch_sizes)
    return chunk_bounds(batch_sizes, chunks_for(batch_sizes[0], total * (I + P) * 4 * H))


def chunk_rows(B: int, bounds) -> int:
    """Rows of a chunk (the most) when B rows are split at bounds: what MKL's products are sized for."""
    return -(-B // (bounds.shape[0] - 1))


def paying_rows(B: int, steps: int, total: int, bounds) -> int:
    """The rows a chunk's step products are asked about when deciding whether MKL pays
    (mkl.use): chunk_rows for padded input; for packed sequences of unequal lengths, whose
    chunks' rows shrink as their sequences end, the mean rows a step (MKL's call on a chunk's last
    few rows costs more than the micro-kernel's small tiles: BENCHMARKS.md, twenty-fourth session)."""
    if total == B * steps:
        return chunk_rows(B, bounds)
    return max(1, total // (steps * (bounds.shape[0] - 1)))


# ---- scratch: the backward's temporaries, kept from call to call -----------------------------------
# The backward's dgates and [x | h_prev] (and the input projection of a forward) are
# megabytes that live only inside one call. Allocated fresh, glibc hands such blocks back to
# the kernel when they are freed (heap trimming) and the next call takes a page fault per 4 KiB
# on its first write: 1,000-2,000 faults per training call at T=200 N=16 H=64 (BENCHMARKS.md,
# ninth session). Here each thread keeps one buffer per name, grown as needed, so the pages
# stay mapped. Nothing made from a scratch buffer may leave the call that asked for it (the
# next call overwrites it). Buffers over SCRATCH_MAX_BYTES are allocated each time, not kept.
SCRATCH_MAX_BYTES = 64 << 20
_scratch_pool = threading.local()


def scratch(name: str, shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of `shape`, on this thread's buffer `name` (see above)."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size > SCRATCH_MAX_BYTES:
        return buffers.empty(shape, dtype)
    pool = _scratch_pool.__dict__
    raw = pool.get(name)
    if raw is None or raw.size < size:
        raw = pool[name] = np.empty(size, np.uint8)
    return raw[:size].view(dtype).reshape(shape)


# ---- weights, laid out once per call, or once while they stand (inference) -------------------------
# Training changes the weights at every optimizer step, so the autograd path packs them in
# each call (forward and backward): a copy of the weights, small next to the time loop.
# Inference with unchanged weights reuses the forward packing, as the module's fast path
# reuses its runtime. "Unchanged" is checked on the weights themselves (WeightWatch): the
# tensors' version counters miss updates through p.data (p.data.clamp_(), p.data.copy_(),
# an EMA's p.data.mul_()) and writes through numpy views, and a stale copy would give wrong
# numbers without an error. One entry per layer-direction (slot: id of its w_ih), replaced when
# its key or its weights change, gone with its w_ih tensor.
_packs: dict = {}


class WeightWatch:
    """A copy of the weights a cache was made from, to tell whether they still hold the same
    bits. `watched` is False when some weight is not C-contiguous (no flat view of its memory
    to compare): such weights are then not cached. A check reads the weights and the copy
    (kernels/numba/lstm.same_words): about a weight pass's time, where the cached product
    reads them once per step."""

    def __init__(self, arrays):
        self.watched = all(a.flags.c_contiguous for a in arrays)
        self._pairs = [(w, w.copy()) for w in map(_words, arrays)] if self.watched else []

    def unchanged(self) -> bool:
        return self.watched and all(same_words(live, copy) for live, copy in self._pairs)


# One-step inference on weights this big reads them as they are (torch's GEMVs and the gate
# kernel: step_forward) instead of a cached packing, whose check (WeightWatch: a read of the
# weights and of their copy) would cost twice the step's own product where the weights are
# past the L2 (BENCHMARKS.md, tenth session).
LIVE_STEP_MIN_WEIGHT_BYTES = 1 << 20


def live_step(I: int, H: int, P: int, itemsize: int) -> bool:
    """Whether a one-step inference of this layer-direction reads its weights as they are."""
    return (I + P) * 4 * H * itemsize >= LIVE_STEP_MIN_WEIGHT_BYTES


def live_step_model(config, itemsize: int) -> bool:
    """Whether some layer-direction of this model takes live_step at one step (the module's fast
    path then leaves one-step calls to the general path, which runs it, except those of a few
    rows that its runtime reads as they are itself: runtime.model.live_lane)."""
    H, P, D = config.hidden_size, config.real_hidden_size, config.num_directions
    inputs = [config.input_size] + [D * P] * (config.num_layers - 1)
    return any(live_step(I, H, P, itemsize) for I in inputs)


def _words(a: np.ndarray) -> np.ndarray:
    """A flat view of C-contiguous float array a's memory as unsigned integers (bits, NaNs
    included): 64-bit words where the size allows (half the loop of 32-bit ones)."""
    return a.reshape(-1).view(np.uint64 if a.nbytes % 8 == 0 else np.uint32)


def _version_key(tensors):
    return tuple((id(t), t._version, t.data_ptr()) if t is not None else None for t in tensors)


def _alive(refs, tensors) -> bool:
    """The cached tensors are these very tensors (an id can be reused once a tensor dies,
    e.g. weight_drop's fresh W_hh every call)."""
    return all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors))


def _pack_forward(p: LayerParams, gemm_pre=None, rows: int = 0, with_input: bool = True, as_a: bool = False):
    """(b, wp, wpr, gemm, wg); gemm_pre None: the micro-kernel's packing (gemm 0, wg None), else
    MKL's of W_hh^T (True: x W_ih^T precomputed) or [W_ih | W_hh]^T (False) for products of
    `rows` rows (MKL lays B out for that many), wp then empty. with_input=False: wp is W_hh^T
    alone, for a loop whose x W_ih^T is precomputed (layer_forward passes it x with no columns).
    as_a: MKL's packing as the A matrix (mkl.packs_as_a)."""
    w_hr = as_numpy(p.w_hr) if p.w_hr is not None else None
    w_ih = as_numpy(p.w_ih)
    wp, wpr = pack_forward(w_ih if with_input else w_ih[:, :0], as_numpy(p.w_hh), w_hr, gemm_pre is None)  # tile: no MKL
    b = as_numpy(p.b_ih) + as_numpy(p.b_hh) if p.b_ih is not None else np.zeros(p.w_hh.shape[0], wp.dtype)
    gemm, wg = 0, None
    if gemm_pre is not None:
        w = as_numpy(p.w_hh) if gemm_pre else np.concatenate((as_numpy(p.w_ih), as_numpy(p.w_hh)), axis=1)
        gemm, wg = mkl.pack(w, True, rows, padded=True, as_a=as_a)  # forward_chunk's products
    return b, wp, wpr, gemm, wg


def forward_weights(p: LayerParams, cache: bool, gemm_pre=None, rows: int = 0, with_input: bool = True,
                    as_a: bool = False):
    """(b = b_ih + b_hh, wp, wpr, gemm, wg): layer-direction p's weights packed for the forward
    kernel, by the micro-kernel's layout or (gemm_pre not None) MKL's (see _pack_forward)."""
    if not cache:
        return _pack_forward(p, gemm_pre, rows, with_input, as_a)
    tensors = tuple(p)
    key = (_version_key(tensors), gemm_pre, rows if gemm_pre is not None else 0, with_input, as_a)
    slot = id(p.w_ih)
    entry = _packs.get(slot)
    if entry is None or entry[0] != key or not _alive(entry[1], tensors) or not entry[2].unchanged():
        watch = WeightWatch([t.detach().numpy() for t in tensors if t is not None])
        packed = _pack_forward(p, gemm_pre, rows, with_input, as_a)
        if not watch.watched:
            return packed
        if entry is None:  # a new w_ih: its entry goes when it dies
            weakref.finalize(p.w_ih, _packs.pop, slot, None)
        refs = tuple(weakref.ref(t) if t is not None else None for t in tensors)
        entry = _packs[slot] = (key, refs, watch, packed)
    return entry[3]


def backward_weights(p: LayerParams, with_input: bool = True, gemm: bool = False, rows: int = 0):
    """(wpb, wprb, gemm address, wgb): layer-direction p's weights packed for the backward kernel
    (W_ih left out when not with_input: dx after the loop), by the micro-kernel's layout or
    (gemm) MKL's for products of `rows` rows, wpb then empty."""
    w_hr = as_numpy(p.w_hr) if p.w_hr is not None else None
    wpb, wprb = pack_backward(as_numpy(p.w_ih), as_numpy(p.w_hh), w_hr, with_input, not gemm)  # tile: no MKL
    if not gemm:
        return wpb, wprb, 0, None
    w = np.concatenate((as_numpy(p.w_ih), as_numpy(p.w_hh)), axis=1) if with_input else as_numpy(p.w_hh)
    return (wpb, wprb, *mkl.pack(w, False, rows, padded=True))  # backward_chunk's products


# The products around the loops on the micro-kernel from this many multiply-adds, where
# mkl.own_gemm says so; from gemm.MIN_SPLIT_MACS they are split over the threads, below it they
# run on one. Small ones gain too: training at 1 / 2 threads vs torch.nn.LSTM, from 2^26 -> from
# 2^16 (weight gradients and dx of 0.3-10 M multiply-adds), A/B with the order rotated:
# 100,1,64,128 1.07x -> 1.11x / 1.08x -> 1.13x, 1000,1,32,64 1.35x -> 1.56x / 1.49x -> 1.56x,
# 200,16,64,64 1.05x -> 1.08x / as fast (BENCHMARKS.md, eighteenth session).
OWN_GEMM_MIN_MACS = 1 << 16


def _own_gemm(M: int, K: int, G: int, dtype) -> bool:
    return (dtype == np.float32 and M * K * G >= OWN_GEMM_MIN_MACS and gemm.fits(G, dtype)
            and mkl.own_gemm())


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, a new tensor: torch's GEMM, or kernels/numba/gemm.py's (mkl.own_gemm) for a
    float32 a with unit stride along one axis (dgates, or its transposed view)."""
    (M, K), G = a.shape, b.shape[1]
    if not (a.dtype == torch.float32 and _own_gemm(M, K, G, np.float32) and 1 in a.stride()):
        return a.mm(b)
    if b.is_contiguous() or not b.t().is_contiguous():
        bn, transposed = as_numpy(b.contiguous()), False
    else:  # a transposed view, e.g. W_ih.t(): packed from the weight as it is
        bn, transposed = as_numpy(b.t()), True
    # a.numpy(), not as_numpy(a): a transposed view is read in place (as_numpy would copy it).
    return torch.from_numpy(_own_product(a.detach().numpy(), bn, transposed))


def _own_product(a: np.ndarray, b: np.ndarray, b_transposed: bool, out=None, bias=None) -> np.ndarray:
    """gemm.matmul_rows on torch's threads, B laid out in this thread's scratch (on a cache line)."""
    if prefetch.pending:  # the child may be compiling these kernels now
        prefetch.wait_for("own gemm")
    shape = gemm.packed_shape(b, b_transposed)
    packed = aligned_view(scratch("gemm_b", (aligned_bytes(shape, b.dtype),), np.uint8), shape, b.dtype)
    return gemm.matmul_rows(a, b, b_transposed, torch.get_num_threads(), out=out, packed=packed, bias=bias)


def input_projection(x: np.ndarray, w_ih: np.ndarray, b: np.ndarray, slot: int = 0) -> np.ndarray:
    """x W_ih^T + b as one torch GEMM on numpy arrays (on torch's threads, the team the time
    loop's chunks run on too): what the kernels' precompute_input asks for. Into this thread's
    scratch buffer number `slot` (the two directions of a layer, running at once, take one
    each): its callers (layer_forward, and the module's runtime, where run_inference plugs it
    in) use it inside their call only."""
    t_ = torch.from_numpy
    out = scratch("xproj" if slot == 0 else f"xproj{slot}", (x.shape[0], w_ih.shape[0]), x.dtype)
    if _own_gemm(x.shape[0], x.shape[1], w_ih.shape[0], x.dtype) and x.flags.c_contiguous:
        _own_product(x, w_ih, True, out=out, bias=b)
    else:
        torch.addmm(t_(b), t_(x), t_(w_ih).t(), out=t_(out))
    return out


# ---- one layer-direction, numpy level ---------------------------------------------------------------
def layer_forward(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool, save: bool):
    """The forward kernel on tensors; returns numpy (y, h_n, c_n, acts, cells), acts and cells
    empty unless save. One or a few time steps, saved for backward (the weights change between
    calls: nothing to cache) go to step_forward / steps_forward (see unpacked_path), and so does
    one step of inference on big weights (live_step)."""
    path = unpacked_path(batch_sizes, _weight_bytes(p)) if save else None
    if path == "one step":
        return one_step_forward(x, h0, c0, p)[:5]
    if not prefetch.started:  # first call, cold cache: see kernels/numba/prefetch.py
        shape_path = path if save else unpacked_path(batch_sizes, _weight_bytes(p))
        prefetch.start(shape_path or "time loop", save, mkl.own_gemm())
    if save:
        if path is not None and prefetch.pending:  # the child may be compiling these kernels now
            prefetch.wait_for(path + " forward")
        if path == "few steps":
            return steps_forward(x, batch_sizes, h0, c0, p, reverse)
    elif len(batch_sizes) == 1 and live_step(x.shape[1], c0.shape[1], h0.shape[1], x.element_size()):
        if prefetch.pending:
            prefetch.wait_for("one step forward")
        return step_forward(x, h0, c0, p)  # inference, one step, big weights: read as they are
    xn, h0n, c0n = as_numpy(x), as_numpy(h0), as_numpy(c0)
    dt = xn.dtype
    total, I = xn.shape
    B, H = c0n.shape
    P = h0n.shape[1]
    if (save and _by_columns(B, len(batch_sizes), I, H, P, xn.itemsize)) or _big_columns(B, H, P, dt, save):
        out = _forward_by_columns(xn, batch_sizes, h0n, c0n, p, reverse, save)
        if out is not None:
            return out
    if _wide_columns(B, I, H, P, dt, save):
        out = _forward_by_columns(xn, batch_sizes, h0n, c0n, p, reverse, save, wide=True)
        if out is not None:
            return out
    bounds = row_bounds(batch_sizes, I, H, P)
    rows = chunk_rows(B, bounds)
    asked_rows = paying_rows(B, len(batch_sizes), total, bounds)  # what mkl.use is asked about
    pre = precompute_input(B, len(batch_sizes), I, H, P, xn.itemsize, bounds.shape[0] - 1,
                           mkl.use(I + P, 4 * H, asked_rows, dt, forward=True, training=save))
    gemm_pre = pre if mkl.use(P if pre else I + P, 4 * H, asked_rows, dt, forward=True, training=save) else None
    # With x W_ih^T + b precomputed the loop reads neither x nor W_ih: W_hh^T alone is packed,
    # and the kernel gets x with no columns (its k offset into W is then 0).
    # Padded input (every step the chunks' rows): MKL's product may take W as its A matrix.
    as_a = gemm_pre is not None and batch_sizes[0] == batch_sizes[-1] and mkl.packs_as_a(
        P if pre else I + P, 4 * H, rows)
    b, wp, wpr, gemm, wg = forward_weights(p, not save, gemm_pre, rows, with_input=not pre, as_a=as_a)
    acts = buffers.empty((total if save else 0, 4 * H), dt)  # where big, pooled mappings (buffers.py)
    cells = buffers.empty((total if save else 0, H), dt)
    y = buffers.empty((total, P), dt)
    h_n = np.empty((B, P), dt)
    c_n = np.empty((B, H), dt)
    bsz = np.asarray(batch_sizes, dtype=np.int64)
    xproj = input_projection(xn, as_numpy(p.w_ih), b) if pre else None
    forward_core(xn[:, :0] if pre else xn, bsz, h0n, c0n, wp, b, wpr, bool(reverse), acts, y, h_n, c_n, cells,
                 bool(save), bounds, xproj, gemm, wg)
    return y, h_n, c_n, acts, cells


# ---- training at batch 1-4 on several threads: the hidden units split (kernels/numba/columns.py) ----
def _by_columns(B: int, steps: int, I: int, H: int, P: int, itemsize: int) -> bool:
    threads = torch.get_num_threads()
    return threads > 1 and columns_pay_training(B, steps, I, H, P, itemsize, threads)


def _big_columns(B: int, H: int, P: int, dt, training: bool) -> bool:
    """Whether a call of B rows on the biggest weights runs split by hidden units on the
    micro-kernel's products: where MKL is not wanted (columns.big_weights_columns_pay)."""
    threads = torch.get_num_threads()
    return big_weights_columns_pay(B, H, P, dt.itemsize, threads, training) and not mkl.wanted()


def _wide_columns(B: int, I: int, H: int, P: int, dt, save: bool = True) -> bool:
    """Whether a forward call of B rows (saving for a backward, or not) runs split by hidden units
    with MKL's step products, the input in them (columns.wide_columns_pay). A training call
    only where the rows split would not take the micro-kernel either (the whole [W_ih | W_hh]
    past a core's L2, mkl.use's training rule): with weights in L2 the rows split on the
    micro-kernel ran faster, past it (each core streaming all of them at every step) up to
    3x slower (BENCHMARKS.md, twenty-fourth session)."""
    threads = torch.get_num_threads()
    whole = (I + H) * 4 * H * dt.itemsize
    return (wide_columns_pay(B, I, H, P, dt.itemsize, threads, inference=not save)
            and mkl.use(I + H, 4 * -(-H // threads), B, dt, forward=True)  # a part's (the whole then too)
            and (not save or whole > mkl.training_tile_max_bytes()))


def _forward_by_columns(xn, batch_sizes, h0n, c0n, p: LayerParams, reverse, save=True, wide=False):
    """layer_forward split by hidden units: numpy (y, h_n, c_n, acts, cells), or None where no
    OpenMP team is at hand. wide: the step products on MKL's packed GEMM (_wide_columns)."""
    dt, (total, _), (B, H) = xn.dtype, xn.shape, c0n.shape
    w_ih, w_hh = as_numpy(p.w_ih), as_numpy(p.w_hh)
    b = as_numpy(p.b_ih) + as_numpy(p.b_hh) if p.b_ih is not None else np.zeros(4 * H, dt)
    threads = torch.get_num_threads()
    wps, bps, units = pack_columns(w_ih, w_hh, b, threads, panels=not wide)
    # Padded input: the parts' products may take W_s as MKL's A matrix (mkl.packs_as_a).
    as_a = wide and batch_sizes[0] == batch_sizes[-1] and mkl.packs_as_a(w_ih.shape[1] + H, 4 * -(-H // threads), B)
    gemm, wgs = mkl.pack_parts(w_ih, w_hh, units, False, B, as_a) if wide else (0, None)
    y, h_n, c_n = buffers.empty((total, H), dt), np.empty((B, H), dt), np.empty((B, H), dt)
    acts, cells = buffers.empty((total if save else 0, 4 * H), dt), buffers.empty((total if save else 0, H), dt)
    if not run_columns(threads, xn, np.asarray(batch_sizes, dtype=np.int64), h0n, c0n, wps, bps, units, reverse,
                       y, h_n, c_n, None, acts if save else None, cells if save else None, gemm=gemm, wgs=wgs):
        return None
    return y, h_n, c_n, acts, cells


def _wide_columns_backward(B: int, I: int, H: int, P: int, dt) -> bool:
    """Whether a backward call of B rows runs split by hidden units with MKL's step products
    (columns.wide_columns_pay_backward)."""
    threads = torch.get_num_threads()
    return (wide_columns_pay_backward(B, I, H, P, dt.itemsize, threads) and mkl.use(4 * H, -(-H // threads), B, dt)
            and mkl.use(4 * H, H, B, dt, training=True))  # W_hh past L2: see _wide_columns


def _backward_by_columns(xn, batch_sizes, h0n, c0n, p: LayerParams, reverse, y, acts, cells, dy, dh_n, dc_n,
                         wide=False):
    """layer_backward's time loop split by hidden units: numpy (dh0, dc0, dgates, h_prev), or
    None where no OpenMP team is at hand. wide: the step products on MKL's packed GEMM."""
    dt, (total, _), (B, H) = xn.dtype, xn.shape, c0n.shape
    threads = torch.get_num_threads()
    w_hh = as_numpy(p.w_hh)
    wbs, units = pack_columns_backward(w_hh, threads, panels=not wide)
    gemm, wgbs = mkl.pack_parts_backward(w_hh, units, B) if wide else (0, None)
    dh = as_numpy(dh_n).copy() if dh_n is not None else np.zeros((B, H), dt)
    dc = as_numpy(dc_n).copy() if dc_n is not None else np.zeros((B, H), dt)
    dgates, h_prev = scratch("dgates", (total, 4 * H), dt), scratch("xh_prev", (total, H), dt)
    if not run_columns_backward(threads, np.asarray(batch_sizes, dtype=np.int64), h0n, c0n, wbs, units, reverse,
                                as_numpy(acts), as_numpy(cells), as_numpy(y), as_numpy_or(dy, (total, H), dt),
                                dh, dc, dgates, h_prev, gemm, wgbs):
        return None
    return dh, dc, dgates, h_prev


def layer_backward(x, batch_sizes, h0, c0, p: LayerParams, reverse, y, acts, cells, dy, dh_n, dc_n, needs=None):
    """BPTT on tensors (dy, dh_n, dc_n may be None: zeros). Returns torch tensors
    (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr or None); the weight gradients are torch GEMMs.
    `needs`: flags in double_backward.INPUT_NAMES order (None: all). dx is left out (None) when
    it does not ask for it, as for an input of data that needs no gradient: the step products
    then leave out W_ih; so are the weight gradients (their GEMMs) when it asks for none of
    them (a frozen LSTM). One or a few time steps (unpacked_path) go to step_backward /
    steps_backward, which leave out every gradient `needs` does not ask for."""
    path = unpacked_path(batch_sizes, _weight_bytes(p))
    if path == "one step":
        return one_step_backward(x, h0, c0, p, acts, cells, dy, dh_n, dc_n, needs)
    if path is not None and prefetch.pending:  # the child may be compiling these kernels now
        prefetch.wait_for(path + " backward")
    if path == "few steps":
        return steps_backward(x, batch_sizes, h0, c0, p, reverse, y, acts, cells, dy, dh_n, dc_n, needs)
    xn, h0n, c0n = as_numpy(x), as_numpy(h0), as_numpy(c0)
    dt = xn.dtype
    total, I = xn.shape
    B, H = c0n.shape
    P = h0n.shape[1]
    has_proj = p.w_hr is not None
    t_ = torch.from_numpy
    want_dx = needs is None or needs[0]
    want_w = needs is None or any(needs[3:8])  # a weight's or bias's gradient
    by_columns = _by_columns(B, len(batch_sizes), I, H, P, xn.itemsize) or _big_columns(B, H, P, dt, True)
    wide = not by_columns and _wide_columns_backward(B, I, H, P, dt)
    if by_columns or wide:
        out = _backward_by_columns(xn, batch_sizes, h0n, c0n, p, reverse, y, acts, cells, dy, dh_n, dc_n, wide)
        if out is not None:
            dh, dc, dgates, h_prev = out
            dg = t_(dgates)
            if not want_w:
                return matmul(dg, p.w_ih.detach()) if want_dx else None, t_(dh), t_(dc), None, None, None, None
            return (matmul(dg, p.w_ih.detach()) if want_dx else None, t_(dh), t_(dc), matmul(dg.t(), t_(xn)),
                    matmul(dg.t(), t_(h_prev)), dg.sum(0), None)
    if prefetch.pending:  # the child may be compiling backward_chunk now
        prefetch.wait_for("time loop backward")
    bounds = row_bounds(batch_sizes, I, H, P)
    # dx after the loop (or not at all): the step products by W_hh alone
    dx_after = not want_dx or dx_after_loop(len(batch_sizes), I, H, P, xn.itemsize)
    rows = chunk_rows(B, bounds)
    wpb, wprb, gemm, wgb = backward_weights(p, not dx_after, mkl.use(4 * H, P if dx_after else I + P, rows, dt, training=True), rows)
    dyn = as_numpy_or(dy, (total, P), dt)
    dh = as_numpy(dh_n).copy() if dh_n is not None else np.zeros((B, P), dt)  # becomes dh0
    dc = as_numpy(dc_n).copy() if dc_n is not None else np.zeros((B, H), dt)  # becomes dc0
    dx = buffers.empty((0 if dx_after else total, I), dt)
    dgates = scratch("dgates", (total, 4 * H), dt)  # scratch: nothing below returns a view of them
    xh_prev = scratch("xh_prev", (total, I + P), dt)
    db_rows = np.zeros((B, 4 * H), dt)
    dh_all = scratch("dh_all", (total if has_proj else 0, P), dt)
    hpre_all = scratch("hpre_all", (total if has_proj else 0, H), dt)
    backward_core(xn, np.asarray(batch_sizes, dtype=np.int64), h0n, c0n, wpb, wprb, bool(reverse),
                  as_numpy(acts), as_numpy(cells), as_numpy(y), dyn, dh, dc, dx, dgates, xh_prev, db_rows,
                  dh_all, hpre_all, bounds, gemm, wgb)
    dg = t_(dgates)
    if dx_after:
        dx = matmul(dg, p.w_ih.detach()) if want_dx else None  # (total, 4H) @ (4H, I)
    else:
        dx = t_(dx)
    if not want_w:
        return dx, t_(dh), t_(dc), None, None, None, None
    dw_ih, dw_hh, db, dw_hr = weight_gradients(I, dg, t_(xh_prev), t_(db_rows), t_(dh_all), t_(hpre_all), matmul)
    # Own storage each, as torch.nn.LSTM's gradients (a custom op may not return aliases).
    return dx, t_(dh), t_(dc), _own_copy(dw_ih), _own_copy(dw_hh), db, dw_hr


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """A C-contiguous copy of t in memory of its own: a pooled mapping where big (buffers.py;
    the weight gradients of hidden 2048 are 64 MiB, a fresh allocation 16,000 page faults)."""
    src = t.numpy()
    out = buffers.empty(src.shape, src.dtype)
    np.copyto(out, src)
    return torch.from_numpy(out)


# ---- one or a few time steps: no weight packing ------------------------------------------------------
# Training at T = 1 (streaming, reinforcement learning) changes the weights between calls, so
# the time-loop kernels would lay them out again at every call, forward and backward: a copy of
# W each, as costly as the one-step products. Here the products run on the weights as they are
# (torch GEMMs, or Numba loops for a few rows) and Numba kernels (kernels/numba/step.py) make the
# per-unit gate passes. A cache of the packed weights keyed on tensor versions would not be safe
# for training: an update through p.data bypasses the version counter.
# Calls of at most this many steps take the one-step path (0: none, for measuring the others).
STEP_PATH_MAX_STEPS = 1
# Up to this many rows the step backward makes its products (dx, dh0, weight gradients) in the
# Numba kernel's call, on loops: no torch call, so no torch parallel region at two threads (each
# one wakes the other thread). At input 50, hidden 100, through the module, loops against torch's
# GEMMs: 2 rows 1.05-1.20x, 3 rows 0.98-1.09x, 4 rows 0.91-0.95x, 8 rows 0.79-0.84x (the
# twenty-second session's 8 was measured before the tiles; BENCHMARKS.md, twenty-third session).
STEP_KERNEL_MAX_ROWS = 3
# ... and up to this many where the products run on the micro-kernel (step_backward_tiles: input
# and output widths of whole column blocks, tile.whole_blocks): 1.05-1.4x the torch GEMMs at 8-48
# rows, hidden 128 and 512, 1 and 2 threads (BENCHMARKS.md).
STEP_TILES_MAX_ROWS = 48
# Up to this many rows the step forward makes q = x W_ih^T + h0 W_hh^T in its Numba kernel too
# (row dot products: each row reads the weights once): faster than the two torch GEMMs to 4 rows
# at hidden 128-1024, slower from 8 (BENCHMARKS.md).
STEP_FORWARD_KERNEL_MAX_ROWS = 4
# The three rules above were measured where torch's GEMMs are not MKL's own (mkl.own_gemm: the
# AMD EPYC). On an Intel CPU torch's GEMMs are MKL's AVX-512 code on every thread, and the
# kernel's one-thread products beat them only at a few rows on weights that stay in L2
# (BENCHMARKS.md, twenty-fourth session): there the products stay in the kernel at up to
# MKL_STEP_KERNEL_MAX_ROWS rows on [W_ih | W_hh] under MKL_STEP_KERNEL_MAX_WEIGHT_BYTES only.
# The backward's products on one thread stay in the kernel whatever the rows and weights (its
# outer products written row by row since the twenty-sixth session, tile.matmul_by_rows): an
# LSTMCell's training step vs torch.nn.LSTMCell, MKL -> the kernel, 1 thread: 16,128,256 0.83x ->
# 0.97x, 24,128,256 0.88x -> 1.05x, 8,128,256 0.88x -> 0.92x, 12,64,128 0.92x -> 0.96x,
# 48,64,128 0.96x -> 0.99x, 8,256,512 1.18x -> 1.22x, 16,128,512 1.18x either way; on 2 threads
# MKL's two against the kernel's one: 16,128,256 0.96x -> 0.83x, so there the rule above stays.
MKL_STEP_KERNEL_MAX_ROWS = 4
MKL_STEP_KERNEL_MAX_WEIGHT_BYTES = 512 << 10
# ... and the forward's on one thread, on those weights, up to this many rows (each row reads W
# from L2; the two GEMMs of a training call find their operands cold): LSTMCell training vs
# torch.nn.LSTMCell, GEMMs -> kernel, input 64, hidden 128: 6 rows 0.94x -> 1.11x, 8 0.93x ->
# 1.06x, 12 0.94x -> 1.05x, 16 0.96x -> 1.05x, 24 0.94x -> 0.99x, 32 0.97x -> 0.96x; 2 threads
# 8 and 16 rows within 1-3 % either way (BENCHMARKS.md, twenty-sixth session).
MKL_ONE_THREAD_FORWARD_KERNEL_MAX_ROWS = 24


def _mkl_keeps_step_products(B: int, p: LayerParams, backward: bool = False) -> bool:
    """Whether a one-step call of B rows leaves its products to torch's GEMMs because they are
    MKL's (an Intel CPU, see above), whatever the rules above say."""
    if mkl.own_gemm() or (backward and torch.get_num_threads() == 1):
        return False
    return B > MKL_STEP_KERNEL_MAX_ROWS or _weight_bytes(p) >= MKL_STEP_KERNEL_MAX_WEIGHT_BYTES


# Calls of several steps over at most this many rows in all (sum of batch_sizes) take the
# few-steps path: the recurrent product as dot products on W_hh as it is, in the Numba loop.
# Below it, laying the weights out for the time-loop kernels (a copy of W, forward and backward)
# costs more than the slower per-step products lose (BENCHMARKS.md has the crossover).
FEW_STEPS_MAX_ROWS = 16
# ... and so do calls of one row a step (one sequence: an episode, a sample's series) of up to
# this many steps, where [W_ih | W_hh] stays in L2 (one thread) or is small (more: the time loop
# splits the hidden units there). The layouts cost the loop path about 100 us a call at input 64,
# hidden 128, a few steps' worth of its per-step gain. Training vs torch.nn.LSTM, loop -> few, 1
# thread: T=20 1.00x -> 1.44x, T=100 1.06x -> 1.16x, 200 1.11x -> 1.10x, 300 1.13x -> 1.07x at
# 64,128; 128,256 T=100 1.23x -> 1.27x, 200 1.27x -> 1.17x; 32,64 T=400 1.19x -> 1.24x, 1000 1.25x
# -> 1.18x; 64,512 (4.7 MiB) T=50 1.57x -> 1.32x; 2 threads 64,128 T=100 1.37x -> 1.56x, 128,256
# 1.46x -> 1.33x (BENCHMARKS.md, twenty-sixth session). With the forward's product on W_hh's rows
# back and forth (twenty-eighth session), loop -> few: 64,128 T=128 1.13x -> 1.24x, T=200 1.19x
# -> 1.17x; 128,256 T=500 1.19x -> 1.15x; 2 threads 64,128 T=300 1.54x -> 1.51x.
ONE_ROW_FEW_STEPS_MAX_STEPS = 128
ONE_ROW_FEW_STEPS_MAX_BYTES_THREADED = 512 << 10


def unpacked_path(batch_sizes, weight_bytes: int = 0) -> str | None:
    """'one step', 'few steps', or None (the time-loop kernels on packed weights) for a call
    that saves for backward, by its batch_sizes and the bytes of its W_ih and W_hh (0: unknown)."""
    if len(batch_sizes) <= STEP_PATH_MAX_STEPS:
        return "one step"
    if sum(batch_sizes) <= FEW_STEPS_MAX_ROWS:
        return "few steps"
    if batch_sizes[0] == 1 and len(batch_sizes) <= ONE_ROW_FEW_STEPS_MAX_STEPS and 0 < weight_bytes <= (
            caches.l2_bytes() if torch.get_num_threads() == 1 else ONE_ROW_FEW_STEPS_MAX_BYTES_THREADED):
        return "few steps"
    return None


def _weight_bytes(p: LayerParams) -> int:
    """The bytes of W_ih and W_hh (unpacked_path's)."""
    w_ih = p.w_ih
    return (w_ih.shape[1] + p.w_hh.shape[1]) * w_ih.shape[0] * w_ih.element_size()


def one_step_forward(x, h0, c0, p: LayerParams):
    """layer_forward(save=True) of one step (batch_sizes [B]); engine._StepFunction calls it
    directly. Numpy (y, h_n, c_n, acts, cells, views): views, the numpy arrays of x, h0, c0,
    w_ih and w_hh the kernel read, for one_step_backward to read again (each costs a torch call
    to ask for anew, and a one-step call's kernels take microseconds); None where torch's GEMMs
    made the products."""
    if not prefetch.started:  # first call, cold cache: see kernels/numba/prefetch.py
        prefetch.start("one step", True, mkl.own_gemm())
    if prefetch.pending:  # the child may be compiling these kernels now
        prefetch.wait_for("one step forward")
    if _step_products_in_kernel_forward(x.shape[0], p):
        return _step_forward_in_kernel(x, h0, c0, p)
    return (*_step_forward_gemms(x, h0, c0, p), None)


def one_step_backward(x, h0, c0, p: LayerParams, acts, cells, dy, dh_n, dc_n, needs, views=None):
    """layer_backward of one step; engine._StepFunction calls it directly, with the forward's
    numpy acts, cells and views (one_step_forward's)."""
    if prefetch.pending:
        prefetch.wait_for("one step backward")
    return step_backward(x, h0, c0, p, acts, cells, dy, dh_n, dc_n, needs, views)


def step_forward(x, h0, c0, p: LayerParams):
    """layer_forward(save=True) for batch_sizes == [B]: numpy (y, h_n, c_n, acts, cells)."""
    if _step_products_in_kernel_forward(x.shape[0], p):
        return _step_forward_in_kernel(x, h0, c0, p)[:5]
    return _step_forward_gemms(x, h0, c0, p)


def _step_products_in_kernel_forward(B: int, p: LayerParams) -> bool:
    """Whether a one-step forward of B rows makes its products in its kernel (step_forward_all)
    rather than as two torch GEMMs (the rules above)."""
    if B <= STEP_FORWARD_KERNEL_MAX_ROWS:
        return not _mkl_keeps_step_products(B, p)
    return (B <= MKL_ONE_THREAD_FORWARD_KERNEL_MAX_ROWS and not mkl.own_gemm() and torch.get_num_threads() == 1
            and _weight_bytes(p) < MKL_STEP_KERNEL_MAX_WEIGHT_BYTES)


def _step_forward_gemms(x, h0, c0, p: LayerParams):
    """step_forward with the products as torch GEMMs, the gate pass in step_forward_kernel."""
    q, b = _input_projection(x, p)
    q.addmm_(h0.detach(), p.w_hh.detach().t())
    qn = q.numpy()
    B, G = qn.shape
    dt = qn.dtype
    acts = np.empty((B, G), dt)
    c_n = np.empty((B, G // 4), dt)
    cells = np.empty((B, G // 4), dt)
    h = np.empty((B, G // 4), dt)  # o * tanh(c_1): y, or the projection's input
    step_forward_kernel(qn, b, as_numpy(c0), acts, c_n, cells, h)
    if p.w_hr is not None:
        h = torch.mm(torch.from_numpy(h), p.w_hr.detach().t()).numpy()
    return h, h.copy(), c_n, acts, cells


def _step_forward_in_kernel(x, h0, c0, p: LayerParams):
    """step_forward for a few rows, the products in the kernel (step_forward_all); one_step_forward's
    six returns."""
    xn, h0n, c0n, w_ih, w_hh = views = as_numpy(x), as_numpy(h0), as_numpy(c0), as_numpy(p.w_ih), as_numpy(p.w_hh)
    B, dt = xn.shape[0], xn.dtype
    G, H = w_ih.shape[0], w_ih.shape[0] // 4
    b_ih, b_hh = (as_numpy(p.b_ih), as_numpy(p.b_hh)) if p.b_ih is not None else (np.zeros(G, dt),) * 2
    w_hr = as_numpy(p.w_hr) if p.w_hr is not None else np.empty((0, H), dt)
    P = w_hr.shape[0] or H
    acts, c_n, cells = np.empty((B, G), dt), np.empty((B, H), dt), np.empty((B, H), dt)
    hpre, h = np.empty((B if p.w_hr is not None else 0, H), dt), np.empty((B, P), dt)
    step_forward_all_kernel(xn, h0n, c0n, w_ih, w_hh, b_ih, b_hh, w_hr, acts, c_n, cells, hpre, h)
    return h, h.copy(), c_n, acts, cells, views


def step_backward(x, h0, c0, p: LayerParams, acts, cells, dy, dh_n, dc_n, needs=None, views=None):
    """layer_backward for batch_sizes == [B] (same returns); gradients `needs` does not ask
    for are None (except dc0, which the kernel makes anyway). acts, cells: tensors, or the
    forward's numpy arrays; views: one_step_forward's (or None), read in place of x, h0, c0,
    w_ih and w_hh's."""
    needs = needs or (True,) * 8
    an = acts if type(acts) is np.ndarray else as_numpy(acts)
    B, G = an.shape
    dt = an.dtype
    dh = dy if dh_n is None else dh_n if dy is None else dy + dh_n  # y_1 is h_1
    if dh is None:
        dh = torch.zeros(h0.shape, dtype=h0.dtype)
    w_hr = p.w_hr.detach() if p.w_hr is not None else None
    dhpre = dh.mm(w_hr) if w_hr is not None else dh  # dL/d(o * tanh(c_1))
    # dc becomes dc0: one copy, C-contiguous (a gradient may come expanded, as sum()'s does)
    dc = np.array(dc_n.numpy(force=True), order="C") if dc_n is not None else np.zeros((B, G // 4), dt)
    dgates = np.empty((B, G), dt)
    hpre = np.empty((B, G // 4 if w_hr is not None else 0), dt)
    cells = cells if type(cells) is np.ndarray else as_numpy(cells)
    gate_args = (an, cells, views[2] if views else as_numpy(c0), as_numpy(dhpre), dc, dgates, hpre, w_hr is not None)
    in_kernel = B <= STEP_KERNEL_MAX_ROWS or (B <= STEP_TILES_MAX_ROWS and _tiles_fit(x.shape[1], h0.shape[1], dt)
                                              and step_tiles_ready())
    if in_kernel and not _mkl_keeps_step_products(B, p, backward=True):
        dx, dh0, dw_ih, dw_hh, db = _step_products_in_kernel(gate_args, x, h0, p, needs, views)
    else:
        step_backward_kernel(*gate_args)
        dx, dh0, dw_ih, dw_hh, db = _step_products_in_torch(torch.from_numpy(dgates), x, h0, p, needs)
    dw_hr = dh.detach().t().mm(torch.from_numpy(hpre)) if w_hr is not None and needs[7] else None
    return dx, dh0, torch.from_numpy(dc), dw_ih, dw_hh, db, dw_hr


def _tiles_fit(I: int, P: int, dtype) -> bool:
    """Whether all four of the step backward's products take the micro-kernel (step_backward_tiles):
    widths of whole column blocks, gemm.fits' condition (tile.whole_blocks' in the kernel)."""
    return gemm.fits(I, dtype) and gemm.fits(P, dtype)


_step_tiles = [False]  # step_tiles_ready's answer, once it is True


def step_tiles_ready() -> bool:
    """Whether the one-step backward's products take the micro-kernel (step_backward_tiles):
    always, except in a cold start while the compiling child (kernels/numba/prefetch.py) has not
    cached it yet: then the loops of step_backward_all, the same bits, rather than seconds of
    compiling in the first training step."""
    if not _step_tiles[0]:
        if prefetch.compiling("step.step_backward_tiles"):
            return False
        _step_tiles[0] = True
    return True


def _step_products_in_kernel(gate_args, x, h0, p: LayerParams, needs, views=None):
    dgates = gate_args[5]
    B, G = dgates.shape
    dt = dgates.dtype
    xn, h0n, _, w_ih, w_hh = views or (as_numpy(x), as_numpy(h0), None, as_numpy(p.w_ih), as_numpy(p.w_hh))
    I, P = xn.shape[1], h0n.shape[1]
    outs = (np.empty((B if needs[0] else 0, I), dt), np.empty((B if needs[1] else 0, P), dt),
            np.empty((G if needs[3] else 0, I), dt), np.empty((G if needs[4] else 0, P), dt),
            np.empty(G if needs[5] or needs[6] else 0, dt))
    kernel = step_backward_tiles_kernel if step_tiles_ready() else step_backward_all_kernel
    kernel(*gate_args, xn, h0n, w_ih, w_hh, *outs)
    wanted = (needs[0], needs[1], needs[3], needs[4], needs[5] or needs[6])
    return tuple(torch.from_numpy(a) if w else None for a, w in zip(outs, wanted))


def _step_products_in_torch(dgates, x, h0, p: LayerParams, needs):
    dg_t = dgates.t()
    x, h0 = x.detach(), h0.detach()
    dx = dgates.mm(p.w_ih.detach()) if needs[0] else None
    dh0 = dgates.mm(p.w_hh.detach()) if needs[1] else None
    dw_ih = dg_t.mm(x) if needs[3] else None
    dw_hh = dg_t.mm(h0) if needs[4] else None
    db = dgates.sum(0) if needs[5] or needs[6] else None
    return dx, dh0, dw_ih, dw_hh, db


def _input_projection(x, p: LayerParams):
    """(x W_ih^T + b_ih as a torch GEMM, b_hh or zeros as numpy): the gates' parts without h."""
    w_ih = p.w_ih.detach()
    if p.b_ih is not None:
        return torch.addmm(p.b_ih.detach(), x.detach(), w_ih.t()), as_numpy(p.b_hh)
    q = torch.mm(x.detach(), w_ih.t())
    return q, np.zeros(q.shape[1], q.numpy().dtype)


def steps_forward(x, batch_sizes, h0, c0, p: LayerParams, reverse):
    """layer_forward(save=True) for a few steps of a few rows: numpy (y, h_n, c_n, acts, cells)."""
    xproj, b = _input_projection(x, p)
    xp = xproj.numpy()
    total, G = xp.shape
    B, P = h0.shape
    dt = xp.dtype
    acts, cells, y = np.empty((total, G), dt), np.empty((total, G // 4), dt), np.empty((total, P), dt)
    h_n, c_n = np.empty((B, P), dt), np.empty((B, G // 4), dt)
    w_hr = as_numpy(p.w_hr) if p.w_hr is not None else np.empty((0, G // 4), dt)
    steps_forward_kernel(xp, np.asarray(batch_sizes, dtype=np.int64), as_numpy(h0), as_numpy(c0), as_numpy(p.w_hh),
                         b, w_hr, bool(reverse), acts, cells, y, h_n, c_n)
    return y, h_n, c_n, acts, cells


def steps_backward(x, batch_sizes, h0, c0, p: LayerParams, reverse, y, acts, cells, dy, dh_n, dc_n, needs=None):
    """layer_backward for a few steps of a few rows (same returns, None where `needs` says)."""
    needs = needs or (True,) * 8
    an = as_numpy(acts)
    total, G = an.shape
    B, P = h0.shape
    dt = an.dtype
    has_proj = p.w_hr is not None
    dh = as_numpy(dh_n).copy() if dh_n is not None else np.zeros((B, P), dt)  # becomes dh0
    dc = as_numpy(dc_n).copy() if dc_n is not None else np.zeros((B, G // 4), dt)  # becomes dc0
    dgates, h_prev = np.empty((total, G), dt), np.empty((total, P), dt)
    dh_all = np.empty((total if has_proj else 0, P), dt)
    hpre_all = np.empty((total if has_proj else 0, G // 4), dt)
    w_hr = as_numpy(p.w_hr) if has_proj else np.empty((0, G // 4), dt)
    steps_backward_kernel(an, as_numpy(cells), np.asarray(batch_sizes, dtype=np.int64), as_numpy(h0), as_numpy(c0),
                          as_numpy(y), as_numpy_or(dy, (total, P), dt), as_numpy(p.w_hh), w_hr, bool(reverse), dh, dc,
                          dgates, h_prev, dh_all, hpre_all)
    t_ = torch.from_numpy
    dg = t_(dgates)
    dx = dg.mm(p.w_ih.detach()) if needs[0] else None
    dw_ih = dg.t().mm(x.detach()) if needs[3] else None
    dw_hh = dg.t().mm(t_(h_prev)) if needs[4] else None
    db = dg.sum(0) if needs[5] or needs[6] else None
    dw_hr = t_(dh_all).t().mm(t_(hpre_all)) if has_proj and needs[7] else None
    return dx, t_(dh), t_(dc), dw_ih, dw_hh, db, dw_hr


# ---- the inference fast path ------------------------------------------------------------------------
def _start_prefetch(shape, batch_first: bool) -> None:
    """A process's first call is an inference of input `shape`: the prefetch child starts."""
    steps, rows = shape[:2] if len(shape) == 3 else (shape[0], 1)
    if batch_first and len(shape) == 3:
        steps, rows = rows, steps
    prefetch.start(unpacked_path([rows] * steps) or "time loop", False, mkl.own_gemm())


def new_runtime(config, weights: dict, shape):
    """The module fast path's Runtime of these weights, for a first input of `shape`. On a
    process's first call the prefetch child starts before the weights are packed: with an
    empty compile cache they are then packed by numpy's copies while it compiles the packing
    (tile.pack2), not by compiling it here too."""
    from ...runtime import Runtime

    if not prefetch.started:
        _start_prefetch(shape, config.batch_first)
    runtime = Runtime(config, weights)
    runtime.live = True  # its layers are the module's parameters: one steps read them as they are
    return runtime


def run_inference(runtime, x: np.ndarray, state):
    """The torch-free runtime (runtime/model.py: the same kernels, the whole stack in one
    call) under the engine's thread policy: what the module's no-grad fast path calls."""
    if not prefetch.started:
        _start_prefetch(x.shape, runtime.batch_first)
    runtime.threads = torch.get_num_threads()
    if runtime.blas is not mkl:  # once per runtime: torch's GEMM (into scratch) and MKL's packed products
        runtime.input_projection = input_projection
        runtime.blas = mkl
    return runtime(x, state)


# ---- LSTMCell's step with nothing to record (nn/modules.LSTMCell._inference_fast) -----------------
# The general path lays the weights out for the time-loop kernels at every call: a streaming
# policy calling its cell once a step (batch 1, hidden 128) spent 51 us a call against
# torch.nn.LSTMCell's 25 (BENCHMARKS.md, twenty-second session). Here a step of a few rows runs
# one_step_live on the parameters as they are, as the LSTM module's streaming lane does.
# Rows by address up to these counts, each row a pass over the weights; more as torch's GEMMs
# on the parameters as they are and the gate kernel (_cell_gemm_step). (Before, more rows ran on
# the runtime's packed copy, which checked its copy at every call, a read of the weights and of
# the copy: 0.32-0.89x torch.nn.LSTMCell at 8-64 rows on 1.5-20 MiB of weights, where the GEMMs
# run 0.94-1.03x at 1 thread and 1.03-1.35x at 2: BENCHMARKS.md, twenty-fifth session.)
# By address, each row reads all the weights: past a core's L2, from L3 at every row. Us a step,
# by address / GEMMs, vs torch.nn.LSTMCell's, 1 | 2 threads: input 128, hidden 512 (2.6 MiB) 1 row
# 227 / 273 vs 255 | 145 / 146 vs 135, 2 rows 415 / 278 vs 258 | 211 / 145 vs 138, 3 rows 598-604
# / 278-282 vs 261-267 | 271-296 / 159-169 vs 148-160; input 256, hidden 1024, 2 rows 1575 / 874
# | 850 / 494; hidden 256 (1.5 MiB, in L2) 2 rows 58 / 68 | 43 / 41, 6 rows 115 / 114 | 72 / 67;
# hidden 128 (384 KiB) 6 rows 34 / 47 | 34 / 43 (BENCHMARKS.md, twenty-fifth session).
CELL_LIVE_ROWS = 6  # weights within one core's L2, on one thread or split over the threads
CELL_LIVE_ROWS_BIG = 1  # weights past it


def cell_live(w, N: int, threads: int) -> int:
    """The team size (0: one thread) a step of N rows by address runs on, or -1: the GEMMs."""
    itemsize = w.arrays[0].itemsize
    split = live_split(threads, w.I, w.H, w.H, itemsize)
    past_l2 = (w.I + w.H) * 4 * w.H * itemsize > caches.l2_bytes()
    return split if N <= (CELL_LIVE_ROWS_BIG if past_l2 else CELL_LIVE_ROWS) else -1


class CellWeights:
    """An LSTMCell's parameters as its step reads them: `key` (the addresses, shapes and
    layout they were taken with; the caller compares it at every call), their addresses
    (cell_step_at), numpy views of them (the split step) and zeros standing in for an absent
    state, per row count."""

    def __init__(self, key, params):
        w_ih, w_hh, b_ih, b_hh = params
        dt = w_ih.dtype
        H, I = w_hh.shape[1], w_ih.shape[1]
        zeros = torch.zeros(4 * H, dtype=dt)
        self.key, self.dtype, self.H, self.I, self.bias = key, dt, H, I, b_ih is not None
        self.tensors = (w_ih, w_hh, b_ih if b_ih is not None else zeros, b_hh if b_hh is not None else zeros)
        self.arrays = [t.detach().numpy() for t in self.tensors]  # views: they hold the memory alive
        self.arrays.append(np.zeros((0, H), self.arrays[0].dtype))  # no projection
        self.addrs = np.array([a.ctypes.data for a in self.arrays] + [0], np.int64)  # + the turn (lstm.live_turn)
        self._zeros = {}

    def zeros(self, N: int):
        """(1, N, H) zeros of the weights' dtype and their address (a state not given)."""
        z = self._zeros.get(N)
        if z is None:
            a = np.zeros((1, N, self.H), self.arrays[0].dtype)
            z = self._zeros[N] = (a, a.ctypes.data)
        return z


def cell_key(params):
    """What CellWeights is valid for: each parameter's address, shape and contiguity (a
    parameter replaced, `p.data = ...`, or made non-contiguous in its place shows here)."""
    return [(p.data_ptr(), p.shape, p.is_contiguous()) for p in params if p is not None]


def cell_weights(params, key) -> CellWeights | None:
    """CellWeights for (w_ih, w_hh, b_ih, b_hh) (biases None without bias) and their cell_key,
    or None where the step cannot read them (not one float32/float64 dtype, not on the CPU, not
    C-contiguous)."""
    dt = params[0].dtype
    if dt not in SUPPORTED_DTYPES or any(
            p is not None and (p.dtype != dt or p.device.type != "cpu" or not p.is_contiguous() or p.is_neg())
            for p in params):
        return None
    return CellWeights(key, params)


def cell_step(w: CellWeights, x: torch.Tensor, hx, batched: bool):
    """(h_1, c_1) of the step of x (N, I), or (I,) unbatched, from hx = (h_0, c_0) of the same
    batching, or None for zeros: all C-contiguous CPU tensors of w's dtype, checked by the
    caller. New tensors. A few rows (cell_live) by address on the parameters as they are;
    more by torch's GEMMs on them (_cell_gemm_step)."""
    N = x.shape[0] if batched else 1
    split = cell_live(w, N, torch.get_num_threads())
    if split < 0:
        return _cell_gemm_step(w, x, hx, N)
    H = w.H
    h = np.empty((N, H) if batched else (H,), w.arrays[0].dtype)
    c = np.empty_like(h)
    if not (split and _cell_split(split, w, x, hx, N, h, c)):
        if hx is None:
            h0 = c0 = w.zeros(N)[1]
        else:
            h0, c0 = hx[0].data_ptr(), hx[1].data_ptr()
        cell_step_at(x.data_ptr(), h0, c0, w.I, w.addrs, h.reshape(N, H), c.reshape(N, H))
    return torch.from_numpy(h), torch.from_numpy(c)


def _cell_gemm_step(w: CellWeights, x, hx, N: int):
    """cell_step for more rows than cell_live takes, on the parameters as they are: q = x W_ih^T
    + b_ih + h_0 W_hh^T as torch's GEMMs, then the gate kernel (kernels/numba/step.py)."""
    H = w.H
    w_ih, w_hh, b_ih, _ = w.tensors
    x2 = x.reshape(N, w.I)
    if hx is None:
        q = torch.addmm(b_ih, x2, w_ih.t())
        c0 = w.zeros(N)[0][0]
    else:
        q = torch.addmm(b_ih, x2, w_ih.t()).addmm_(hx[0].reshape(N, H), w_hh.t())
        c0 = hx[1].numpy().reshape(N, H)
    h, c = np.empty((N, H), w.arrays[0].dtype), np.empty((N, H), w.arrays[0].dtype)
    acts = scratch("cell_acts", (N, 4 * H), h.dtype)  # not kept: inference
    step_forward_kernel(q.numpy(), w.arrays[3], c0, acts, c, c, h)
    return torch.from_numpy(h), torch.from_numpy(c)


def _cell_split(threads: int, w: CellWeights, x, hx, N: int, h, c) -> bool:
    """cell_step's product on `threads` threads, each its share of the hidden units
    (one_step_live_split, where the weights outgrow one core's L2); False if it did not run."""
    H = w.H
    z = w.zeros(N)[0]
    h0, c0 = (z, z) if hx is None else (hx[0].numpy().reshape(1, N, H), hx[1].numpy().reshape(1, N, H))
    y = np.empty((1, N, H), h.dtype)
    turn = int(live_turn.py_func(w.addrs, N))  # the count cell_step_at keeps too
    return one_step_live_split(threads, x.numpy().reshape(1, N, w.I), h0, c0, *w.arrays[:4], y,
                               h.reshape(1, N, H), c.reshape(1, N, H), turn)


share_torch_threads()

__all__ = [
    "SUPPORTED_DTYPES", "WeightWatch", "as_numpy", "as_numpy_or", "backward_weights", "check_input", "chunks_for",
    "forward_weights", "input_projection", "layer_backward", "layer_forward", "live_step", "live_step_model",
    "needs_grad", "new_runtime", "one_step_backward", "one_step_forward", "row_bounds", "run_inference", "scratch",
    "share_torch_threads", "step_backward", "step_forward", "steps_backward", "steps_forward", "unpacked_path",
    "CellWeights", "cell_live", "cell_key", "cell_weights", "cell_step",
]
