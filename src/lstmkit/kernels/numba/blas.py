"""A per-step product through a BLAS's packed GEMM, when the caller hands one in.

    gemm_packed(fn, m, n, k, a, lda, b, c, ldc)     c[:m, :n] = a[:m, :k] @ B   (row-major)
    pack_b(fn, trans, m, n, k, src, ld, dst)         B laid out for it (by `cblas_sgemm_pack`)
    gemm_packed_a(fn, m, n, k, a, lda, w, ct, ldct)  ct[:n, :m] = W @ a[:m, :k]^T, W packed as A
    pack_a(fn, g, rows, k, src, ld, dst)             W laid out as that A matrix

fn is the address of a `cblas_sgemm_compute` (Intel MKL's packed GEMM: B laid out once by
`cblas_sgemm_pack`, then multiplied as often as wanted), b the data of that packed B; a and c
are row pointers (rows.py) with leading dimensions lda, ldc. 0 for fn means: none, and the
kernels use tile.matmul. The kernels never look for a BLAS themselves (they import no torch and
link no library): the torch engine finds MKL in torch's own library and passes its address,
the way team.py's bodies get the OpenMP entry points.

Why: the micro-kernel of tile.py runs at about MKL's speed while W stays in L2, but when W is
larger than L2 (hidden 1024 and more: tens of MB) each step streams it from L3 and the
micro-kernel falls to about 70 % of MKL's packed GEMM (BENCHMARKS.md, seventh session).
Called from a chunk's thread inside an OpenMP team, MKL runs the product on that thread.
Float32 only (MKL's packed GEMM is single and double, torch exports the single one); for
float64 the call compiles to nothing and fn is 0.
"""
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .rows import KW, copy_p, row_ptr

ROW_MAJOR, NO_TRANS, TRANS, PACKED = 101, 111, 112, 151  # CBLAS_LAYOUT, CBLAS_TRANSPOSE, MKL's CblasPacked
A_MATRIX, B_MATRIX = 161, 162  # MKL's CBLAS_IDENTIFIER


def _compute_codegen(ok: bool, w_as_a: bool):
    """The codegen of a call of the packed compute at address args[0] with (fn, m, n, k, a, lda,
    w, c, ldc): c (m x n) = a @ W, W packed as the B matrix, or (w_as_a) c (n x m) = W @ a^T, W
    packed as the A matrix and a read as B^T; row-major, beta 0. Nothing where not ok (float64)."""
    def codegen(context, builder, signature, args):
        if not ok:
            return context.get_dummy_value()
        i32, f32 = ir.IntType(32), ir.FloatType()
        fp = f32.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32] * 6 + [fp, i32, fp, i32, f32, fp, i32])
        callee = builder.inttoptr(args[0], fnty.as_pointer())
        int32 = lambda v: builder.trunc(v, i32) if v.type.width > 32 else v  # noqa: E731  (MKL_INT: 32 bits)
        const = lambda v: ir.Constant(i32, v)  # noqa: E731
        mm, nn, kk, lda_, ldc_ = (int32(args[i]) for i in (1, 2, 3, 5, 8))
        a, w, c, zero = args[4], args[6], args[7], ir.Constant(f32, 0.0)
        if w_as_a:
            operands = [const(PACKED), const(TRANS), nn, mm, kk, w, kk, a, lda_, zero, c, ldc_]
        else:
            operands = [const(NO_TRANS), const(PACKED), mm, nn, kk, a, lda_, w, nn, zero, c, ldc_]
        builder.call(callee, [const(ROW_MAJOR)] + operands)
        return context.get_dummy_value()

    return codegen


def _f32_pointers(*ts) -> bool:
    return all(isinstance(t, types.CPointer) and t.dtype == types.float32 for t in ts)


@intrinsic
def gemm_packed(typingctx, fn, m, n, k, a, lda, b, c, ldc):
    return types.void(fn, m, n, k, a, lda, b, c, ldc), _compute_codegen(_f32_pointers(a, b, c), False)


# The other way round: W (g x k, torch's layout) packed as MKL's A matrix (pack_a), the product
# made transposed, ct = W @ a^T (g x m), the rows of a read as B^T in place. At 32 rows a chunk
# on weights past L2 MKL's kernel for that shape ran 2-9 % faster than the packed-B one, its
# transposed output copied back included (transpose_rows), and gave the same bits; at 8-24, 48
# and 64 rows it did not (BENCHMARKS.md, twenty-seventh session). The packing marks the compute's
# address with the flag PACKED_A (engines/numba/mkl.pack(as_a=True)); a kernel reads it with
# packed_a.
PACKED_A = 1 << 62


@intrinsic
def pack_a(typingctx, fn, g, rows, k, src, ld, dst):
    """dst = W (g x k: src's g rows of k, ld apart) laid out by the pack at address fn (MKL's
    `cblas_sgemm_pack`) as the A matrix of gemm_packed_a's products of `rows` rows; float32
    pointers (float64: compiles to nothing, never called)."""
    ok = all(isinstance(t, types.CPointer) and t.dtype == types.float32 for t in (src, dst))
    sig = types.void(fn, g, rows, k, src, ld, dst)

    def codegen(context, builder, signature, args):
        if not ok:
            return context.get_dummy_value()
        i32, f32 = ir.IntType(32), ir.FloatType()
        fp = f32.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32] * 6 + [f32, fp, i32, fp])
        callee = builder.inttoptr(args[0], fnty.as_pointer())
        int32 = lambda v: builder.trunc(v, i32) if v.type.width > 32 else v  # noqa: E731  (MKL_INT: 32 bits)
        const = lambda v: ir.Constant(i32, v)  # noqa: E731
        builder.call(callee, [const(ROW_MAJOR), const(A_MATRIX), const(NO_TRANS), int32(args[1]), int32(args[2]),
                              int32(args[3]), ir.Constant(f32, 1.0), args[4], int32(args[5]), args[6]])
        return context.get_dummy_value()

    return sig, codegen


@njit(**KW)
def packed_a(gemm):
    """(whether gemm's weights are packed as the A matrix, the compute's own address)."""
    return gemm & PACKED_A != 0, gemm & ~PACKED_A


@intrinsic
def gemm_packed_a(typingctx, fn, m, n, k, a, lda, w, ct, ldct):
    """ct[:n, :m] = W (n x k, packed as the A matrix) @ a[:m, :k]^T, row-major: a's m rows
    lda apart, ct's n rows ldct apart (MKL's packed compute, B = a transposed)."""
    return types.void(fn, m, n, k, a, lda, w, ct, ldct), _compute_codegen(_f32_pointers(a, w, ct), True)


@njit(**KW)
def transpose_rows(ct, n, q):
    """q[i, :g] = ct[:g, i] for i < n (ct (g, >= n)): eight rows of q at a time, each column of
    ct read as eight neighbours."""
    G = ct.shape[0]
    n8 = n - n % 8
    for i0 in range(0, n8, 8):
        for g in range(G):
            for b in range(8):
                q[i0 + b, g] = ct[g, i0 + b]
    for i in range(n8, n):
        for g in range(G):
            q[i, g] = ct[g, i]


@intrinsic
def pack_b(typingctx, fn, trans, m, n, k, src, ld, dst):
    """dst = B laid out by the BLAS's pack at address fn (MKL's `cblas_sgemm_pack`) for products
    of m rows: B (k x n) = src (trans false: k rows of n, ld apart) or src^T (trans: n rows of k,
    ld apart), row-major; float32 pointers (float64: compiles to nothing, never called)."""
    ok = all(isinstance(t, types.CPointer) and t.dtype == types.float32 for t in (src, dst))
    sig = types.void(fn, trans, m, n, k, src, ld, dst)

    def codegen(context, builder, signature, args):
        if not ok:
            return context.get_dummy_value()
        i32, f32 = ir.IntType(32), ir.FloatType()
        fp = f32.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32] * 6 + [f32, fp, i32, fp])
        callee = builder.inttoptr(args[0], fnty.as_pointer())
        int32 = lambda v: builder.trunc(v, i32) if v.type.width > 32 else v  # noqa: E731  (MKL_INT: 32 bits)
        const = lambda v: ir.Constant(i32, v)  # noqa: E731
        how = builder.select(builder.icmp_signed("!=", args[1], ir.Constant(args[1].type, 0)), const(TRANS),
                             const(NO_TRANS))
        builder.call(callee, [const(ROW_MAJOR), const(B_MATRIX), how, int32(args[2]), int32(args[3]), int32(args[4]),
                              ir.Constant(f32, 1.0), args[5], int32(args[6]), args[7]])
        return context.get_dummy_value()

    return sig, codegen


# MKL's packed GEMM makes 8 rows at a time: on weights past L2, a product of 5-7 rows took
# 6-30 % longer than one of 8 (K x G = 512 x 1536: 187-196 us against 179; 640 x 2048: 281-304
# against 248-255; 1024 x 4096: 2855-3343 against 2362), and below 3 MiB it was as fast. So a
# kernel computes such a product on 8 rows, the rows past its own being spare ones of its
# buffers (GEMM rows are independent: its own rows' numbers do not depend on them), and the
# weights are packed for 8 rows (BENCHMARKS.md, fifteenth session).
PAD_MIN_WEIGHT_BYTES = 3 << 20
PAD_ROWS = 8


@njit(**KW)
def padded_rows(n, K, G):
    """The rows a packed product of n rows by a K x G float32 weight is computed on (n or PAD_ROWS).
    Python callers (the packing) use padded_rows.py_func: no compile for them."""
    if PAD_ROWS // 2 < n < PAD_ROWS and K * G * 4 >= PAD_MIN_WEIGHT_BYTES:
        return PAD_ROWS
    return n


@njit(**KW)
def padded_input(a, o, n, rows, pad):
    """The first row (a pointer) of a product's input, rows o:o + n of a (.., K), computed on
    `rows` rows (padded_rows): a's own rows where rows == n, else a copy of them in pad
    (PAD_ROWS, K), whose spare rows the product reads (a's rows after o + n may lie past its end)."""
    if rows == n:
        return row_ptr(a, o)
    for i in range(n):
        copy_p(row_ptr(pad, i), row_ptr(a, o + i), a.shape[1])
    return row_ptr(pad, 0)
