"""A register-blocked small-matrix product for the per-step products inside the time loop.

    matmul(a, n, wp, out, flip, k0)   out[:n, :nb*V] = a[:n, k0:] @ W[k0:]   with W packed by pack()

Why not BLAS: the time loop runs on several threads at once (one chunk of batch rows each,
kernels/lstm.py), and OpenBLAS calls made from two threads at once serialise on its buffer
lock, so the step products did not scale; a BLAS call also re-packs W every step. Here W is
packed once per call and the product is a few lines of LLVM IR: Numba's loop vectoriser keeps
neither a tile of accumulators in registers nor a scalar-unrolled one (it spills them
to memory every k), so the inner kernel is written as explicit vector code.

Packed layout: wp[b, k, j] = W[k, b*V + j] for column block b (V columns, zero-padded at the
end), so the V weights of one k are one contiguous vector load. The micro-kernel holds an
R x V tile of `out` in R vector registers across the whole k loop and per k does one vector
load of W, R scalar loads of `a` broadcast, and R fused multiply-adds: every weight loaded
is used R times from a register. V = 32 float32 / 16 float64 (two AVX-512 or four AVX2
registers per row), R = 8 rows on AVX-512 (16 accumulators of its 32 registers: faster than
4-row tiles, BENCHMARKS.md), then 4, and the last 1-3 rows apart, each by several blocks at
once (a single row is a matrix-vector product, bound by reading W; a 4-row tile on 2 rows
would do twice the multiply-adds that reading W needs).

The rows are independent: each output row depends only on its own input row and W, summed
in the same k order, so a result is bitwise the same whichever chunk or tile computed it.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import buffers, prefetch
from .rows import KW, copy_p, ptr_add, row_ptr
from .simd import AVX512



def _lanes_of(dtype) -> int:
    """V, the packed column-block width."""
    return 32 if dtype == types.float32 else 16


def _dtype_constant(width_of, doc: str):
    """An intrinsic f(a) -> width_of(a's dtype), an int64 compile-time constant (loops over it
    unroll and vectorise as over a literal)."""

    @intrinsic
    def constant(typingctx, a):
        width = width_of(a.dtype)

        def codegen(context, builder, signature, args):
            return ir.Constant(ir.IntType(64), width)

        return types.int64(a), codegen

    constant.__doc__ = doc
    return constant


_lanes_array = _dtype_constant(_lanes_of, "V for array a's dtype, as a compile-time constant.")


def _as_i64(builder, v):
    return builder.sext(v, ir.IntType(64)) if v.type.width < 64 else v


def _make_tile(R: int, accumulate: bool = False, C: int = 1):
    """The R-row, C-block micro-kernel: out[r0:r0+R, b*V:(b+C)*V] = a[r0:r0+R] @ W[:, b*V:(b+C)*V]
    (accumulate: += , the sum continuing from what out holds); rows at or past n are read
    clamped to row n-1 and not stored. a's elements are read by both its strides (a transposed
    view works). Each (row, block) is its own chain of fused
    multiply-adds over k in order, so C changes how many chains run at once, not the bits:
    one row of one block is a single chain, bound by the FMA's latency; a single row wants C > 1."""

    @intrinsic
    def tile(typingctx, a, r0, n, wp, b, out):
        sig = types.void(a, r0, n, wp, b, out)
        V = _lanes_of(a.dtype)

        def codegen(context, builder, signature, args):
            a_ty, _, _, wp_ty, _, out_ty = signature.args
            arr_a = context.make_array(a_ty)(context, builder, args[0])
            arr_w = context.make_array(wp_ty)(context, builder, args[3])
            arr_o = context.make_array(out_ty)(context, builder, args[5])
            i64 = ir.IntType(64)
            c = lambda v: ir.Constant(i64, v)  # noqa: E731
            row0, nrows, block = (_as_i64(builder, args[k]) for k in (1, 2, 4))
            ft = context.get_value_type(a_ty.dtype)
            vt = ir.VectorType(ft, V)
            esize = context.get_abi_sizeof(ft)
            K = cgutils.unpack_tuple(builder, arr_a.shape)[1]
            a_strides = cgutils.unpack_tuple(builder, arr_a.strides)
            a_stride = builder.sdiv(a_strides[0], c(esize))
            a_kstride = builder.sdiv(a_strides[1], c(esize))  # 1, or a's rows apart for a transposed view
            o_stride = builder.sdiv(cgutils.unpack_tuple(builder, arr_o.strides)[0], c(esize))
            last = builder.sub(nrows, c(1))
            a_rows, out_rows = [], []
            for r in range(R):
                row = builder.add(row0, c(r))
                row = builder.select(builder.icmp_signed("<", row, nrows), row, last)
                a_rows.append(builder.gep(arr_a.data, [builder.mul(row, a_stride)]))
                out_rows.append(builder.mul(row, o_stride))
            w_strides = cgutils.unpack_tuple(builder, arr_w.strides)  # bytes; a slice wp[:, k0:] keeps them
            w_block = builder.sdiv(w_strides[0], c(esize))
            w_row = builder.sdiv(w_strides[1], c(esize))
            w_base = builder.gep(arr_w.data, [builder.mul(block, w_block)])
            name = f"llvm.fmuladd.v{V}{'f32' if esize == 4 else 'f64'}"
            fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), name)
            zero = ir.Constant(vt, [ir.Constant(ft, 0.0)] * V)
            undef = ir.Constant(vt, ir.Undefined)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), V), [0] * V)
            cols = [builder.mul(builder.add(block, c(j)), c(V)) for j in range(C)]
            # acc[r * C + j]: row r, block b + j
            if accumulate:  # each chain goes on from its stored partial sum: the same bits
                init = [builder.load(builder.bitcast(builder.gep(arr_o.data, [builder.add(out_rows[r], cols[j])]),
                                                     vt.as_pointer()), align=esize)
                        for r in range(R) for j in range(C)]
            else:
                init = [zero] * (R * C)

            entry = builder.block
            loop = builder.append_basic_block("tile.k")
            done = builder.append_basic_block("tile.done")
            builder.cbranch(builder.icmp_signed(">", K, c(0)), loop, done)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(c(0), entry)
            acc = []
            for v in init:
                p = builder.phi(vt)
                p.add_incoming(v, entry)
                acc.append(p)
            w_k = builder.gep(w_base, [builder.mul(k, w_row)])
            w = [builder.load(builder.bitcast(builder.gep(w_k, [builder.mul(c(j), w_block)]), vt.as_pointer()),
                              align=esize) for j in range(C)]
            new = []
            for r in range(R):
                s = builder.load(builder.gep(a_rows[r], [builder.mul(k, a_kstride)]))
                s = builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(ir.IntType(32), 0)), undef, splat)
                new += [builder.call(fmuladd, [s, w[j], acc[r * C + j]]) for j in range(C)]
            k_next = builder.add(k, c(1))
            body_end = builder.block
            k.add_incoming(k_next, body_end)
            for p, v in zip(acc, new):
                p.add_incoming(v, body_end)
            builder.cbranch(builder.icmp_signed("<", k_next, K), loop, done)

            builder.position_at_end(done)
            totals = []
            for v0, v in zip(init, new):  # all phis first: LLVM wants them at the top of the block
                total = builder.phi(vt)
                total.add_incoming(v0, entry)
                total.add_incoming(v, body_end)
                totals.append(total)
            for r in range(R):
                row = builder.add(row0, c(r))
                with builder.if_then(builder.icmp_signed("<", row, nrows)):
                    for j in range(C):
                        dst = builder.gep(arr_o.data, [builder.add(builder.mul(row, o_stride), cols[j])])
                        builder.store(totals[r * C + j], builder.bitcast(dst, vt.as_pointer()), align=esize)
            return context.get_dummy_value()

        return sig, codegen

    return tile


tile8 = _make_tile(8)
tile4 = _make_tile(4)
tile1 = _make_tile(1)
tile8_acc = _make_tile(8, accumulate=True)
tile4_acc = _make_tile(4, accumulate=True)
tile1_acc = _make_tile(1, accumulate=True)
tile1x4 = _make_tile(1, C=4)
tile2x4 = _make_tile(2, C=4)
tile3x2 = _make_tile(3, C=2)
# 8-row tiles hold 16 accumulator registers: AVX-512 has 32 vector registers, AVX2 only 16
# (there, 4 rows of 4 ymm already fill them).
EIGHT_ROWS = AVX512
# 2 or 3 rows by several blocks (_few_rows) hold 16 or 12 accumulators: AVX-512 only (AVX2's 16
# registers: these rows keep the 4-row tile there). FEW_ROWS implies EIGHT_ROWS.
FEW_ROWS = AVX512


# The packed weights start on a cache line: a 512-bit load of W that straddles two lines cost
# a third more time (numpy and Numba align to 16 bytes only; BENCHMARKS.md, seventh session).
ALIGN = 64


def aligned_zeros(shape, dtype):
    """np.zeros(shape, dtype), its first element on an ALIGN-byte boundary (for Python callers)."""
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


def aligned_empty(shape, dtype):
    """np.empty(shape, dtype), its first element on an ALIGN-byte boundary: weight layouts
    (the packings here, MKL's, the units split's), on huge pages where big (buffers.empty)."""
    return aligned_view(buffers.empty(aligned_bytes(shape, dtype), np.uint8, huge=True), shape, dtype)


def aligned_bytes(shape, dtype) -> int:
    """The bytes a buffer needs for aligned_view to cut an array of shape, dtype out of it."""
    return math.prod(shape) * np.dtype(dtype).itemsize + ALIGN


def aligned_view(raw, shape, dtype):
    """An array of shape, dtype in the bytes of raw (uint8, at least aligned_bytes long), its first
    element on an ALIGN-byte boundary."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    off = -raw.__array_interface__["data"][0] % ALIGN
    return raw[off : off + size].view(dtype).reshape(shape)


def block_width(dtype) -> int:
    """V, the columns of a packed block (pack's last axis): _lanes_of's, for a numpy dtype."""
    return 32 if np.dtype(dtype) == np.float32 else 16


def pack(w, transposed, out=None):
    """W laid out for matmul: (nb, K, V) with wp[b, k, j] = W[k, b*V + j], zero-padded.
    W is w (K, G) as given, or w.T when transposed (w (G, K), e.g. torch's (4H, I) weights).
    out: where to write it (packed_shape, C-contiguous), else a new aligned array."""
    w = np.ascontiguousarray(w)
    return pack2(w, w[:, :0], transposed, out=out)


def packed_shape(G: int, K: int, dtype):
    """The shape of a K x G matrix laid out for matmul: (blocks of V columns, K, V)."""
    V = block_width(dtype)
    return (G + V - 1) // V, K, V


def pack2(w1, w2, transposed, out=None):
    """pack() of two matrices side by side, with no concatenated copy in between:
    transposed: W = [w1 | w2]^T, w1 (G, K1), w2 (G, K2), K = K1 + K2 (the forward weights);
    else:       W = [w1 | w2],   w1 (K, G1), w2 (K, G2), G = G1 + G2 (the backward weights).
    w1, w2 C-contiguous (the copies go by row pointer; pack() and lstm.pack_forward/backward
    make them so; a check raising in the compiled copy would double its compile time).
    The zeroed, aligned output is made here, in Python: made in the compiled function, its
    allocation took half a second of the cold compile. out: where to write it instead (the
    C-contiguous (nb, K, V) of that allocation, e.g. one part of a caller's bigger array)."""
    if transposed:
        G, K = w1.shape[0], w1.shape[1] + w2.shape[1]
    else:
        G, K = w1.shape[1] + w2.shape[1], w1.shape[0]
    shape = packed_shape(G, K, w1.dtype)
    if out is not None and (out.shape != shape or out.dtype != w1.dtype or not out.flags.c_contiguous):
        raise ValueError(f"pack2: out must be C-contiguous {shape} {w1.dtype}")
    wp = aligned_empty(shape, w1.dtype) if out is None else out
    if prefetch.compiling("tile._pack2_into"):  # a cold start: numpy's copies, not 0.5-1 s of compiling
        _pack2_numpy(w1, w2, transposed, wp)
    else:
        _pack2_into(w1, w2, transposed, wp)
    return wp


def _pack2_numpy(w1, w2, transposed, wp):
    """_pack2_into with numpy's copies: the same bits, 2-3x slower (BENCHMARKS.md, tenth session).
    What pack2 does while the cold start's prefetch child compiles _pack2_into (it is in the
    child's list) rather than compile it here as well, on the first call's critical path."""
    nb, K, V = wp.shape
    if transposed:  # W^T = [w1 | w2] (G, K), rows past G zero
        wt = np.zeros((nb * V, K), wp.dtype)
        wt[: w1.shape[0], : w1.shape[1]] = w1
        wt[: w1.shape[0], w1.shape[1] :] = w2
        wp[...] = wt.reshape(nb, V, K).transpose(0, 2, 1)
    else:  # W = [w1 | w2] (K, G), columns past G zero
        G1 = w1.shape[1]
        w = np.zeros((K, nb * V), wp.dtype)
        w[:, :G1] = w1
        w[:, G1 : G1 + w2.shape[1]] = w2
        wp[...] = w.reshape(K, nb, V).transpose(1, 0, 2)


@njit(**KW)
def _pack2_into(w1, w2, transposed, wp):
    """pack2's copies into wp (nb, K, V), uninitialised: every element is written, the
    columns past G with zeros."""
    V = _lanes_array(w1)  # a compile-time constant, as the loops below want it
    nb, K = wp.shape[0], wp.shape[1]
    if transposed:
        G, K1 = w1.shape[0], w1.shape[1]
    else:
        G, K1 = w1.shape[1] + w2.shape[1], w1.shape[1]
    pad = nb * V - G  # the last block's columns past G
    if pad:
        last = row_ptr(wp, nb - 1)
        for k in range(K):
            for j in range(V - pad, V):
                last[k * V + j] = 0
    # By row pointers, branch-free: 3-D indexing wraps negative indices per element and a
    # branch per element between w1 and w2 kept these loops scalar (4x slower).
    for part in range(2):
        w = w1 if part == 0 else w2
        first = 0 if part == 0 else K1  # W's row (transposed) or column where this part starts
        if transposed:  # wp[b, first + k, j] = w[bV + j, k]: a transpose, block by block
            Kw = w.shape[1]
            for b in range(nb):
                jn = min(V, G - b * V)
                if jn <= 0 or Kw == 0:
                    continue
                dst = ptr_add(row_ptr(wp, b), first * V)
                src = row_ptr(w, b * V)  # the block's jn rows of w, Kw apart
                for k in range(Kw):  # contiguous stores of a k's V columns, loads down the rows
                    for j in range(jn):
                        dst[k * V + j] = src[j * Kw + k]
        else:  # wp[g // V, k, g % V] = w[k, g - first]: each row's runs into the blocks it reaches,
            Gw = w.shape[1]  # 16 rows at a time (row by row over all blocks jumped K*V per run)
            for k0 in range(0, K, 16):
                k1 = min(K, k0 + 16)
                c = 0
                while c < Gw:
                    b, j = (first + c) // V, (first + c) % V
                    n = min(V - j, Gw - c)
                    for k in range(k0, k1):
                        copy_p(ptr_add(row_ptr(wp, b), k * V + j), ptr_add(row_ptr(w, k), c), n)
                    c += n


@njit(**KW)
def whole_blocks(w):
    """Whether W (K, G) has a whole number of V-column blocks (packed_view's condition)."""
    return w.shape[1] % _lanes_array(w) == 0


@njit(**KW)
def packed_view(w):
    """W (K, G) C-contiguous, G a multiple of V, as matmul's packed W without a copy: the view
    (G // V, K, V) with wp[b, k, j] = W[k, b*V + j], the rows of a block G elements apart instead
    of V (matmul reads W by its strides). For a product whose W changes at every call (the one-step
    backward's): packing it would cost as much as the product."""
    V = _lanes_array(w)
    return w.reshape(w.shape[0], w.shape[1] // V, V).transpose(1, 0, 2)


@njit(**KW)
def padded_width(wp):
    """Columns of matmul's output for this packed W (G rounded up to V)."""
    return wp.shape[0] * wp.shape[2]


# Rows of W per pass: a K_BLOCK x V panel of W (32 KiB) and the tile's rows of `a` stay in the
# 48 KiB L1 while every row tile runs over them; a longer K evicted the panel between tiles.
K_BLOCK = 256


@njit(**KW)
def _row(a, r, wp, out, flip):
    """out[r, :padded_width(wp)] = a[r] @ W over the whole K: four column blocks at a time,
    eight independent chains of multiply-adds where one block alone is one chain waiting on
    each multiply-add's latency, then the blocks left one at a time. flip: all of that in the
    opposite order (see matmul); one call site of each tile, as its code is inlined (compile time)."""
    nb = wp.shape[0]
    fours = nb // 4
    jobs = fours + nb % 4  # the four-block groups, then the single blocks
    for u in range(jobs):
        job = jobs - 1 - u if flip else u
        if job < fours:
            tile1x4(a, r, r + 1, wp, 4 * job, out)
        else:
            tile1(a, r, r + 1, wp, 3 * fours + job, out)  # block 4 * fours + (job - fours)


@njit(**KW)
def _few_rows(a, r0, n, wp, out, flip):
    """out[r0:n, :padded_width(wp)] = a[r0:n] @ W over the whole K for n - r0 = 2 or 3 rows
    (AVX-512): 2 rows by 4 column blocks, or 3 rows by 2, at a time (16 or 12 chains), then
    the blocks left by the 4-row tile (rows past n clamped). A 4-row tile on one block at a
    time computes 4 rows for these 2 or 3, twice the multiply-adds the weights' reads need;
    one row tile reuses no panel of W, so no K passes either. flip: as in _row."""
    nb = wp.shape[0]
    C = 4 if n - r0 == 2 else 2
    groups = nb // C
    jobs = groups + nb % C  # the C-block groups, then the single blocks
    for u in range(jobs):
        job = jobs - 1 - u if flip else u
        if job >= groups:
            tile4(a, r0, n, wp, C * groups + job - groups, out)
        elif n - r0 == 2:
            tile2x4(a, r0, n, wp, C * job, out)
        else:
            tile3x2(a, r0, n, wp, C * job, out)


@njit(**KW)
def _block_tiles(a, n, wp, out, accumulate, b):
    """Column block b of out[:n] (+)= a[:n] @ W, K = a.shape[1]: every row tile."""
    n8 = n - n % 8 if EIGHT_ROWS else 0
    for r0 in range(0, n8, 8):
        if accumulate:
            tile8_acc(a, r0, n, wp, b, out)
        else:
            tile8(a, r0, n, wp, b, out)
    for r0 in range(n8, n, 4):
        if n - r0 == 1:
            if accumulate:
                tile1_acc(a, r0, n, wp, b, out)
            else:
                tile1(a, r0, n, wp, b, out)
        elif accumulate:
            tile4_acc(a, r0, n, wp, b, out)
        else:
            tile4(a, r0, n, wp, b, out)


@njit(**KW)
def tiles_pass(a, n, wp, out, accumulate):
    """One pass over rows 0:n and every column block, K = a.shape[1]: gemm.py's order for a
    long transposed view, whose pass over K_BLOCK k's stays in L2 while every block reads it."""
    for b in range(wp.shape[0]):
        _block_tiles(a, n, wp, out, accumulate, b)


@njit(**KW)
def matmul_by_rows(a, n, wp, out):
    """out[:n, :padded_width(wp)] = a[:n] @ W for a W short enough to stay in L1 whole (K up
    to a few dozen: an outer product's few rows) and K <= K_BLOCK: row tile after row tile, each
    over every column block, so out is written in order. matmul's blocks outside wrote a tall
    out one block of each row at a time, rows a whole row apart: 2-4x slower at 512-2048 rows
    of 128-512 (BENCHMARKS.md, twenty-sixth session). The same tiles as matmul's _block_tiles,
    so the same bits (an element is one chain of multiply-adds over k either way)."""
    nb = wp.shape[0]
    n8 = n - n % 8 if EIGHT_ROWS else 0
    for r0 in range(0, n8, 8):
        for b in range(nb):
            tile8(a, r0, n, wp, b, out)
    for r0 in range(n8, n, 4):
        for b in range(nb):
            if n - r0 == 1:
                tile1(a, r0, n, wp, b, out)
            else:
                tile4(a, r0, n, wp, b, out)


# matmul's k0 for the product over all of W: an int64, not a literal 0. Numba compiles a
# function once per set of argument types, and a literal 0 is a type of its own: one call site
# passing it cost another compile of matmul and its tiles (about 1 s of a cold start).
WHOLE_K = np.int64(0)


@njit(**KW)
def matmul(a, n, wp, out, flip, k0):
    """out[:n, :padded_width(wp)] = a[:n, k0:] @ W[k0:] (rows k0: of W), k0 an int64 (WHOLE_K
    for all of W). a (>= n, K): rows with unit inner stride, or any strides (a transposed view:
    gemm.py's dgates.T, read in place); out (>= n, >= padded_width) with unit inner stride; wp
    packed. The time loops pass whole C-contiguous arrays and k0, never slices: then each kernel
    file compiles one matmul (slices are arrays of another type; gemm.py compiles its own).
    Column block after column block; within a block, K in passes of K_BLOCK rows of W, all
    row tiles in each while its panel of W stays in L1, each pass's sums going on from the
    last's (a row's sum runs over k in order whatever the blocking: the same bits). A block's
    output stays in L1 across its passes and W streams once, in order. Passes outside the
    blocks (each pass over every block) measured 1.1-1.5x slower where K > K_BLOCK and G is
    wide: 16 rows of [x | h] by hidden 1024 weights, 64 rows by hidden 2048 (BENCHMARKS.md,
    eighteenth session); with one pass the two orders are the same.
    flip: the column blocks in the opposite order, the same bits (each block's sums are their
    own). A time loop flips every other step, so that a step starts on the blocks the last
    one ended on, still in L1, where W is somewhat bigger than L1 (batch 1-8, hidden 64-128)."""
    K = a.shape[1]
    # Past the 8-row tiles (FEW_ROWS), 4 or 7 rows take a 4-row tile in the block loop, and the
    # rest (1-3, or 5-6 as 3 + 2 or 3 + 3) passes of their own over several blocks at once: not
    # a 4-row tile on 1-3 rows (or a 1-row one, a single chain) on each block, doing up to twice
    # the multiply-adds. 4 + 1, 4 + 2: 5.7, 5.8 us; 3 + 2, 3 + 3: 4.4, 5.0 (8 rows: 6.7) at K
    # 192, 4H 512 (BENCHMARKS.md, twenty-first session).
    if FEW_ROWS:
        rest = n % 8
        tiled = n - rest + (4 if rest == 4 or rest == 7 else 0)
    else:  # AVX2: a single row apart only (a 4-row tile holds all 16 registers there)
        tiled = 0 if n == 1 else n
    nb = wp.shape[0]
    if tiled > 0:
        for i in range(nb):
            b = nb - 1 - i if flip else i
            for kb in range(k0, max(K, k0 + 1), K_BLOCK):
                k1 = min(K, kb + K_BLOCK)
                _block_tiles(a[:, kb:k1], tiled, wp[:, kb:k1], out, kb > k0, b)
    r0 = tiled
    if FEW_ROWS and n - r0 > 3:  # 5 or 6 rows: 3 of them first
        _few_rows(a[:, k0:], r0, r0 + 3, wp[:, k0:], out, flip)
        r0 += 3
    if n - r0 == 1:  # a matrix-vector product: no row tile reuses W, so no K passes either
        _row(a[:, k0:], r0, wp[:, k0:], out, flip)
    elif FEW_ROWS and n > r0:
        _few_rows(a[:, k0:], r0, n, wp[:, k0:], out, flip)


# ---- row dot products on W as it is (the one-step kernels that read torch's own layout) ----------
# out[g] += W1[g] . v1 + W2[g] . v2 for R rows g at a time, W1, W2 (G, K) in torch's layout (never
# packed). Each row sums into one vector of accumulators over the vector part of both K (lane l
# takes k = l mod L), and only then folds its L lanes into one number: a product as two row loops
# left to LLVM ended each row of each matrix on its own fold, at 256-bit vectors (BENCHMARKS.md,
# sixteenth session). The fold pairs lane t with lane t + L/2, then t + L/4, ... whatever rows
# share the call, so a row's sum does not depend on the group it ran in: the same bits for every R.
def _dot_lanes(dtype) -> int:
    """L, the lanes of one accumulator: one 512-bit (AVX2: 256-bit) register."""
    full = 64 if AVX512 else 32
    return full // (4 if dtype == types.float32 else 8)


dot_lanes = _dtype_constant(_dot_lanes, "L for array a's dtype, as a compile-time constant: rows_dot covers "
                                        "K - K % L of each row.")


# Numba's fastmath pass flags every float operation that has no flag of its own with
# `reassoc` among others, and LLVM then rewrote the folds of a one-row call into another order
# than a four-row call's. One flag that allows no reordering keeps them as written.
_ORDERED = ("contract",)


def _fold(builder, accs, L):
    """<n x float> of the sums of n accumulators of L lanes (n <= L, both powers of 2): pairs
    of vectors first (each result holds twice the rows, half the partial sums each), then
    halves within the last one."""
    i32 = ir.IntType(32)

    def add_halves(a, b, rows, p):
        src_b = rows * p if b is not a else 0
        lo = [s + j * p + t for s in (0, src_b) for j in range(rows) for t in range(p // 2)]
        hi = [x + p // 2 for x in lo]
        if b is a:
            lo, hi = lo[: len(lo) // 2], hi[: len(hi) // 2]
        take = lambda idx: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, len(idx)), idx))  # noqa: E731
        return builder.fadd(take(lo), take(hi), flags=_ORDERED)

    rows, p = 1, L  # rows per vector, partial sums per row
    while len(accs) > 1:
        accs = [add_halves(a, b, rows, p) for a, b in zip(accs[0::2], accs[1::2])]
        rows, p = 2 * rows, p // 2
    v = accs[0]
    while p > 1:
        v = add_halves(v, v, rows, p)
        p //= 2
    return v


def _make_rows_dot(R: int):
    @intrinsic
    def rows_dot(typingctx, w1, v1, w2, v2, g, out):
        """out[g:g+R] += (W1[g:g+R, :K1v] @ v1[:K1v] + W2[g:g+R, :K2v] @ v2[:K2v]), Kv = K - K % L
        (the rows' tails are the caller's). Rows with unit inner stride, v1, v2, out contiguous."""
        sig = types.void(w1, v1, w2, v2, g, out)
        L = _dot_lanes(w1.dtype)
        n = min(R, L)  # rows per fold

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            c = lambda v: ir.Constant(i64, v)  # noqa: E731
            ft = context.get_value_type(signature.args[0].dtype)
            vt = ir.VectorType(ft, L)
            esize = context.get_abi_sizeof(ft)
            name = f"llvm.fmuladd.v{L}{'f32' if esize == 4 else 'f64'}"
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]), name)
            g0 = _as_i64(builder, args[4])
            accs = [ir.Constant(vt, [ir.Constant(ft, 0.0)] * L)] * R
            for wi in (0, 2):
                arr_w = context.make_array(signature.args[wi])(context, builder, args[wi])
                arr_v = context.make_array(signature.args[wi + 1])(context, builder, args[wi + 1])
                K = cgutils.unpack_tuple(builder, arr_w.shape)[1]
                stride = builder.sdiv(cgutils.unpack_tuple(builder, arr_w.strides)[0], c(esize))
                rows = [builder.gep(arr_w.data, [builder.mul(builder.add(g0, c(r)), stride)]) for r in range(R)]
                Kv = builder.mul(builder.sdiv(K, c(L)), c(L))
                entry = builder.block
                loop = builder.append_basic_block("rows_dot.k")
                done = builder.append_basic_block("rows_dot.done")
                builder.cbranch(builder.icmp_signed(">", Kv, c(0)), loop, done)
                builder.position_at_end(loop)
                k = builder.phi(i64)
                k.add_incoming(c(0), entry)
                phis = []
                for a in accs:
                    phis.append(builder.phi(vt))
                    phis[-1].add_incoming(a, entry)
                load = lambda p: builder.load(builder.bitcast(builder.gep(p, [k]), vt.as_pointer()), align=esize)  # noqa: E731
                v = load(arr_v.data)
                new = [builder.call(fma, [load(rows[r]), v, phis[r]]) for r in range(R)]
                k_next = builder.add(k, c(L))
                end = builder.block
                k.add_incoming(k_next, end)
                for p, x in zip(phis, new):
                    p.add_incoming(x, end)
                builder.cbranch(builder.icmp_signed("<", k_next, Kv), loop, done)
                builder.position_at_end(done)
                merged = []
                for a, x in zip(accs, new):  # all phis first: LLVM wants them at the top of the block
                    merged.append(builder.phi(vt))
                    merged[-1].add_incoming(a, entry)
                    merged[-1].add_incoming(x, end)
                accs = merged
            arr_o = context.make_array(signature.args[5])(context, builder, args[5])
            st = ir.VectorType(ft, n)
            for r0 in range(0, R, n):
                sums = _fold(builder, accs[r0 : r0 + n], L)
                if n == 1:
                    dst = builder.gep(arr_o.data, [builder.add(g0, c(r0))])
                    sum0 = builder.extract_element(sums, ir.Constant(ir.IntType(32), 0))
                    builder.store(builder.fadd(builder.load(dst), sum0, flags=_ORDERED), dst)
                    continue
                dst = builder.bitcast(builder.gep(arr_o.data, [builder.add(g0, c(r0))]), st.as_pointer())
                builder.store(builder.fadd(builder.load(dst, align=esize), sums, flags=_ORDERED), dst, align=esize)
            return context.get_dummy_value()

        return sig, codegen

    return rows_dot


rows_dot8 = _make_rows_dot(8)
rows_dot4 = _make_rows_dot(4)
rows_dot1 = _make_rows_dot(1)
