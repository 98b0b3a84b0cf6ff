"""Intel MKL's packed GEMM, found in torch's own library, for the time loops' per-step products
where the weights outgrow L2, and for the forward's from smaller weights (kernels/numba/blas.py
says why; BENCHMARKS.md, seventh and eleventh sessions, has the measurements behind the thresholds).

    use(K, G, rows, dtype, forward, training)   whether a product of `rows` rows by a K x G weight goes to MKL
    pack(w, transposed, rows)     (address of cblas_sgemm_compute, w (or w^T) packed for it)
    packed_size(K, G, rows)       floats of that packing (pack can write into a caller's array)
    pack_parts(w_ih, w_hh, units, pre, rows)   each hidden-unit part's weights packed (columns.py)
    pack_parts_backward(w_hh, units, rows)      each part's columns of W_hh packed (columns.py)

torch's CPU wheels for x86 Linux link MKL into libtorch_cpu and export its CBLAS entry points;
elsewhere (no such library or symbol, float64) nothing here is used and the kernels keep their
own micro-kernel. Nor on a CPU that is not Intel's (wanted()): MKL runs its AVX2 code there.
"""
from __future__ import annotations

import ctypes
import os
import platform

import numpy as np
import torch

from ...kernels.numba import buffers, caches
from ...kernels.numba.blas import PACKED_A, padded_rows
from ...kernels.numba.columns import pack_part_columns_for_blas, pack_part_rows_for_blas, unit_rows, unit_view
from ...kernels.numba.threads import run_jobs
from ...kernels.numba.tile import aligned_empty

# W (K x G float32) from this many bytes: beyond L2 the micro-kernel streams W at each step and
# falls behind MKL's packed GEMM; below it the micro-kernel is as fast or faster. For the backward
# products and the variant kernel's.
MIN_WEIGHT_BYTES = 512 << 10
# The plain forward's products (x/h times W^T, inference and training) go to MKL from a smaller
# W, for chunks of MIN_FORWARD_ROWS rows or more: from hidden 128 (W of 384 KiB at input 64) its
# packed GEMM ran 7-13 % faster than the micro-kernel with W in L2 too, at 8-256 rows; at 4 rows
# a chunk 3-5 % slower; at hidden 64 (128 KiB) as fast on one thread and 10 % slower on two
# (BENCHMARKS.md, eleventh session; the seventh session's measurements behind MIN_WEIGHT_BYTES
# were of the backward and of big weights). At 5-7 rows the micro-kernel's 4-row tiles compute
# 8 (tile.py): inference at batch 5-7 on one thread ran 0.96-1.04x torch.nn.LSTM there and
# 1.32-1.35x on MKL; the units split of 6-7 rows at two threads 0.83-0.86x and 1.04-1.18x; chunks
# of 7 rows at two threads were 4-10 % slower on MKL (BENCHMARKS.md, thirteenth session).
MIN_FORWARD_WEIGHT_BYTES = 256 << 10
MIN_FORWARD_ROWS = 5
# A chunk of fewer rows than this is a matrix-vector product: MKL's call costs more there.
MIN_ROWS = 4

_ROW_MAJOR, _NO_TRANS, _TRANS, _A_MATRIX, _B_MATRIX = 101, 111, 112, 161, 162
_entry = []  # [(compute address, pack, pack_get_size, pack's address)] or [None], found once
_wanted = []  # [whether the products may go to MKL], decided once
_own_gemm = []  # [whether the big products take the micro-kernel], decided once


def wanted() -> bool:
    """Whether the step products may go to MKL at all: LSTMKIT_MKL=0 never, =1 wherever torch's
    library has it, unset on Intel CPUs only. Elsewhere MKL takes its AVX2 code even where the
    CPU has AVX-512: on an AMD EPYC (Zen 5) its packed GEMM ran 52-86 GFLOP/s a core against the
    micro-kernel's 186-235, and the main job's training step took 1.5x as long with it
    (BENCHMARKS.md, seventeenth session). The thresholds below were measured on Intel's."""
    if not _wanted:
        flag = os.environ.get("LSTMKIT_MKL", "")
        _wanted.append(flag == "1" or (flag != "0" and _intel_cpu()))
    return _wanted[0]


def own_gemm() -> bool:
    """Whether the engine makes its big products (the input projection, dx, the weight gradients)
    with kernels/numba/gemm.py instead of torch's GEMM, which is MKL: on a CPU that is not
    Intel's (see wanted; torch.mm ran 90 GFLOP/s a core on the AMD EPYC, the micro-kernel 200)."""
    if not _own_gemm:
        _own_gemm.append(not _intel_cpu())
    return _own_gemm[0]


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            text = f.read(4096)
    except OSError:
        text = platform.processor()  # Windows: "... GenuineIntel"; elsewhere often empty
    return "GenuineIntel" in text


def _find():
    if _entry:
        return _entry[0]
    found = None
    names = ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll")
    if os.environ.get("LSTMKIT_MKL", "1") == "0":
        names = ()  # turned off: not even looked for
    for name in names:
        path = os.path.join(os.path.dirname(torch.__file__), "lib", name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
            compute, pack_fn, size_fn = lib.cblas_sgemm_compute, lib.cblas_sgemm_pack, lib.cblas_sgemm_pack_get_size
        except (OSError, AttributeError):
            continue
        i = ctypes.c_int
        size_fn.restype, size_fn.argtypes = ctypes.c_size_t, [i, i, i, i]
        pack_fn.restype = None
        pack_fn.argtypes = [i, i, i, i, i, i, ctypes.c_float, ctypes.c_void_p, i, ctypes.c_void_p]
        address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
        found = (address(compute), pack_fn, size_fn, address(pack_fn))
        break
    _entry.append(found)
    return found


def _after_fork_in_child() -> None:
    """A forked child (a multiprocessing worker) has none of its parent's OpenMP threads, and an
    MKL call can open a parallel region on that runtime and wait for them forever, as torch's own
    threaded ops do there: the child's products take the micro-kernel."""
    _entry[:] = [None]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# A training call lays its weights out at every call (binding.py), for MKL's packed GEMM too (its
# own packing, after a concatenation in the forward): two copies of the weights where the
# micro-kernel makes one. So a training call keeps the micro-kernel while the weights fit in a
# core's L2 (training_tile_max_bytes, exactly L2's size included), where it streams them from L2
# as fast as MKL does; past L2 MKL's blocking wins. Inference lays its weights out once and keeps
# the thresholds above. Measured on an Intel Xeon with 2 MiB of L2: BENCHMARKS.md, twenty-fourth
# session. Except a training forward's products on chunks of TRAINING_FORWARD_MIN_ROWS rows and
# more, on weights of more than half the L2: there MKL's packed GEMM won all the same (the
# backward's stay on the micro-kernel). Training vs torch.nn.LSTM, micro-kernel -> MKL in the
# forward, the order rotated, two runs each: 1 thread, 8 rows of input 128, hidden 256 (1.5 MiB)
# 1.01x -> 1.06x, 12 rows 1.01-1.03x -> 1.03-1.05x, 16 rows 1.02x -> 1.03x; 2 threads, chunks of
# 8 rows 0.99x -> 1.05x, of 16 rows 1.27x -> 1.28-1.31x; the main job's LSTM (64 x 32, input 64,
# hidden 256, 2 layers) 0.97-0.98x -> 0.99x, 1 thread 0.99-1.00x -> 1.00x. Hidden 128 (768 KiB)
# at 8 rows lost (1.18-1.19x -> 1.16-1.17x), and so did 100,12,128,256 at 2 threads (1.03-1.05x ->
# 0.99-1.00x), where that variant also took the units split (BENCHMARKS.md, twenty-fifth session).
TRAINING_FORWARD_MIN_ROWS = 8


def training_tile_max_bytes() -> int:
    """A training call's per-step products stay on the micro-kernel on weights up to this many
    bytes: a core's L2 (kernels/numba/caches.py)."""
    return caches.l2_bytes()


def use(K: int, G: int, rows: int, dtype, forward: bool = False, training: bool = False) -> bool:
    """Whether the per-step product of `rows` rows (a chunk's) by a K x G weight goes to MKL
    (forward: a product of the plain forward kernel; training: of a call that saves for a
    backward, or of the backward)."""
    size = K * G * 4
    if training:
        l2 = training_tile_max_bytes()
        if size <= l2 and not (forward and rows >= TRAINING_FORWARD_MIN_ROWS and size > l2 // 2):
            return False
    if forward and size < MIN_WEIGHT_BYTES:
        ok = size >= MIN_FORWARD_WEIGHT_BYTES and rows >= MIN_FORWARD_ROWS
    else:
        ok = size >= MIN_WEIGHT_BYTES and rows >= MIN_ROWS
    return dtype == np.float32 and ok and wanted() and _find() is not None


def pack(w: np.ndarray, transposed: bool, rows: int, out=None, padded: bool = False, as_a: bool = False):
    """(compute address, B packed): B = w^T (transposed: w (G, K), torch's weight layout) or
    w (K, G), float32 C-contiguous; into `out` (float32, at least packed_size floats, starting
    on a cache line) when given. The packed array must stay where it is (MKL's rule). w may be
    a view of rows with a gap between them (a block of columns): MKL reads it by its row stride.
    padded: for a kernel that computes its products on blas.padded_rows(rows) rows. as_a: B^T
    packed as the A matrix instead, for the kernel's transposed product (blas.gemm_packed_a; the
    address then carries blas.PACKED_A; see packs_as_a)."""
    address, pack_fn = _find()[:2]
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.strides[1] != 4 or w.strides[0] % 4 or w.strides[0] < 4 * w.shape[1]:
        w = np.ascontiguousarray(w)
    ld = max(w.strides[0] // 4, w.shape[1], 1)
    (G, K), trans = (w.shape, _TRANS) if transposed else (w.shape[::-1], _NO_TRANS)
    if padded and not as_a:
        rows = padded_rows.py_func(rows, K, G)
    size = packed_size(K, G, rows, as_a)
    buf = aligned_empty((size,), np.float32) if out is None else out  # MKL wants a cache line
    if buf.dtype != np.float32 or buf.size < size or not buf.flags.c_contiguous or buf.ctypes.data % 64:
        raise ValueError("mkl.pack: out must be float32, C-contiguous, on a cache line and big enough")
    if as_a:  # A (G x K) = w as it is (transposed), else w^T: the opposite of B's flag
        pack_fn(_ROW_MAJOR, _A_MATRIX, _NO_TRANS if transposed else _TRANS, G, rows, K, 1.0, w.ctypes.data, ld,
                buf.ctypes.data)
        return address | PACKED_A, buf
    pack_fn(_ROW_MAJOR, _B_MATRIX, trans, rows, G, K, 1.0, w.ctypes.data, ld, buf.ctypes.data)
    return address, buf


def packed_size(K: int, G: int, rows: int, as_a: bool = False) -> int:
    """Floats of a K x G weight packed for products of `rows` rows (pack)."""
    if as_a:
        return -(-_find()[2](_A_MATRIX, G, rows, K) // 4)
    return -(-_find()[2](_B_MATRIX, rows, G, K) // 4)


# A chunk of exactly this many rows on at least this many weight bytes: W packed as MKL's A
# matrix and the product made transposed (blas.gemm_packed_a). MKL's kernel for 32 columns of
# output ran 2-9 % faster there, the copy of its transposed output back included: K x G =
# 384-1152 x 1024-4096 from 2.25 MiB (a units split's part of input 128, hidden 512: 2.5 MiB);
# at 384 x 1024 (1.5 MiB) 6 % slower, at 8-24, 48 and 64 rows 0-50 % slower (its vectors run
# along the rows: 32 is two whole ones of 16 floats). BENCHMARKS.md, twenty-seventh session.
PACKED_A_ROWS = 32
PACKED_A_MIN_WEIGHT_BYTES = 2 << 20


def packs_as_a(K: int, G: int, rows: int) -> bool:
    """Whether the step products of a chunk of `rows` rows (the same at every step: padded
    input) by a K x G weight (a units split's part's) take W packed as the A matrix
    (pack(as_a=True))."""
    return rows == PACKED_A_ROWS and K * G * 4 >= PACKED_A_MIN_WEIGHT_BYTES


def pack_parts(w_ih: np.ndarray, w_hh: np.ndarray, units, pre: bool, rows: int, as_a: bool = False):
    """(compute address, wgs (S, L)) for kernels/numba/columns.forward_columns' gemm: part s's
    rows of W_hh (pre: the input projection made before the loop) or of [W_ih | W_hh]
    (columns.part_rows), transposed and packed for products of `rows` rows (as_a: as the A
    matrix, pack's; the address then carries blas.PACKED_A). Without pre (a training call's, at
    every call), each part copied out and packed on a thread of its own
    (columns.pack_part_rows_for_blas)."""
    if pre:
        parts = [_part(w_ih, w_hh, units[s], units[s + 1], pre) for s in range(units.shape[0] - 1)]
        return _pack_each(parts, True, rows, padded=True, as_a=as_a)  # columns.forward_columns' products
    w_ih, w_hh = np.ascontiguousarray(w_ih, np.float32), np.ascontiguousarray(w_hh, np.float32)
    H, K = w_hh.shape[1], w_ih.shape[1] + w_hh.shape[1]
    widths = [4 * int(units[s + 1] - units[s]) for s in range(units.shape[0] - 1)]
    padded = [rows if as_a else padded_rows.py_func(rows, K, G) for G in widths]  # forward_columns' products
    out = _packed_rows(K, widths, padded, as_a)
    scratch = buffers.empty((len(widths), max(widths), K), np.float32)
    run_jobs([(pack_part_rows_for_blas, (w_ih, w_hh, H, units[s], units[s + 1], scratch[s], _find()[3], padded[s],
                                         out[s], as_a)) for s in range(len(widths))])
    return _find()[0] | (PACKED_A if as_a else 0), out


def _part(w_ih: np.ndarray, w_hh: np.ndarray, u0: int, u1: int, pre: bool) -> np.ndarray:
    """Rows i, f, g, o of units u0:u1 (columns.part_rows) of W_hh (pre) or of [W_ih | W_hh], as
    one C-contiguous (4 (u1 - u0), K) array made by one copy (a training call packs its weights
    every call: fancy indexing and a concatenation took three copies, 0.5 ms of 1 at hidden 256)."""
    H, I = w_hh.shape[1], w_ih.shape[1]
    if pre:
        return unit_rows(w_hh, H, u0, u1)
    out = np.empty((4, u1 - u0, I + H), np.float32)
    out[:, :, :I] = unit_view(w_ih, H, u0, u1)
    out[:, :, I:] = unit_view(w_hh, H, u0, u1)
    return out.reshape(4 * (u1 - u0), I + H)


def pack_parts_backward(w_hh: np.ndarray, units, rows: int):
    """(compute address, wgbs (S, L)) for kernels/numba/columns.backward_columns' gemm: part s's
    columns of W_hh (4H, H_s), packed for products of `rows` rows, each on a thread of its own
    (columns.pack_part_columns_for_blas)."""
    w_hh = np.ascontiguousarray(w_hh, np.float32)
    widths = [int(units[s + 1] - units[s]) for s in range(units.shape[0] - 1)]
    out = _packed_rows(w_hh.shape[0], widths, [rows] * len(widths))
    run_jobs([(pack_part_columns_for_blas, (w_hh, units[s], units[s + 1], _find()[3], rows, out[s]))
              for s in range(len(widths))])
    return _find()[0], out


def _packed_rows(K: int, widths, rows, as_a: bool = False) -> np.ndarray:
    """(S, L) float32, every row on a cache line: room for part s's K x widths[s] weight packed
    for products of rows[s] rows (as _pack_each lays them out)."""
    sizes = [packed_size(K, G, r, as_a) for G, r in zip(widths, rows)]
    return aligned_empty((len(widths), -(-max(sizes) // 16) * 16), np.float32)


def _pack_each(ws, transposed: bool, rows: int, padded: bool = False, as_a: bool = False):
    """(compute address, (S, L) array): each of the S weights packed (pack) into a row of its
    own, every row on a cache line."""
    kg = [(w.shape[1], w.shape[0]) if transposed else w.shape for w in ws]
    sizes = [packed_size(K, G, padded_rows.py_func(rows, K, G) if padded and not as_a else rows, as_a)
             for K, G in kg]
    out = aligned_empty((len(ws), -(-max(sizes) // 16) * 16), np.float32)
    address = 0
    for s, w in enumerate(ws):
        address, _ = pack(w, transposed, rows, out=out[s], padded=padded, as_a=as_a)
    return address, out
