"""Rows by pointer: the per-row work of a time step with no array views.

    row_ptr(arr, i)        pointer to arr[i] (1-D) or to row i, arr[i, 0] (2-D)
    addr_ptr(addr, like)   an address (an int: data_ptr(), ctypes.data) as a pointer to like's dtype
    ptr_add(p, k)          p + k elements
    copy_p(dst, src, n)    dst[:n] = src[:n]   (no overlap)
    add_p(dst, src, n)     dst[:n] += src[:n]
    mul_p(dst, a, b, n)    dst[:n] = a[:n] * b[:n]
    fma_p(dst, a, b, n)    dst[:n] += a[:n] * b[:n]

Why: a step of the time loop touches each of its rows a few times (the gate pass, the copies
into y, cells, h_prev). Written as calls on row views (acts[o + i], xh[i, I:]), each view is an
array struct with a reference count, taken and dropped with atomic operations, and each call
passes seven words per array. At hidden 64 that cost more than the gate arithmetic of the row
(BENCHMARKS.md, sixth session). A pointer is one word and no reference count. The rows the
kernels pass are rows of C-contiguous arrays, or column ranges of them: unit stride is assumed.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# The kernels' compile options (tile.py takes them from here; lstm.py spells the same set out).
KW = dict(cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"}, error_model="numpy", nogil=True)
# The same without 'reassoc', for loops that store. Where LLVM cannot prove that a loop's stores
# miss its loads, it compares the addresses at run time and runs either a vector copy of the
# loop or a scalar one; with 'reassoc' the two may group an expression of several terms
# differently. The bits of a result then depended on where the allocator had put the buffers:
# the variant kernel's layer-norm backward gave gradients 1 ulp apart from one run to the next
# (seen on AMD Zen 5). Sums keep 'reassoc' (their vector lanes need it) in loops that store nothing.
KW_STORE = dict(KW, fastmath=KW["fastmath"] - {"reassoc"})


def _i64(builder, v):
    return builder.sext(v, ir.IntType(64)) if v.type.width < 64 else v


@intrinsic
def row_ptr(typingctx, arr, i):
    """Pointer to arr[i] (1-D) or arr[i, 0] (2-D and more: the first index only). No bounds check."""
    if not isinstance(arr, types.Array) or not isinstance(i, types.Integer):
        return None
    sig = types.CPointer(arr.dtype)(arr, i)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        stride = cgutils.unpack_tuple(builder, a.strides)[0]  # bytes
        base = builder.bitcast(a.data, ir.IntType(8).as_pointer())
        p = builder.gep(base, [builder.mul(_i64(builder, args[1]), stride)])
        return builder.bitcast(p, a.data.type)

    return sig, codegen


@intrinsic
def addr_ptr(typingctx, addr, like):
    """The address addr (an int) as a pointer to elements of array like's dtype. For memory the
    caller has checked (its shape, dtype and layout) and keeps alive through the call."""
    if not isinstance(addr, types.Integer) or not isinstance(like, types.Array):
        return None
    sig = types.CPointer(like.dtype)(addr, like)

    def codegen(context, builder, signature, args):
        ptr_type = context.get_value_type(signature.return_type)
        return builder.inttoptr(_i64(builder, args[0]), ptr_type)

    return sig, codegen


@intrinsic
def ptr_add(typingctx, p, k):
    """p + k elements."""
    if not isinstance(p, types.CPointer) or not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.gep(args[0], [_i64(builder, args[1])])

    return p(p, k), codegen


@intrinsic
def copy_p(typingctx, dst, src, n):
    """dst[:n] = src[:n] (memcpy: the rows must not overlap)."""
    if not (isinstance(dst, types.CPointer) and dst == src and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        size = context.get_abi_sizeof(context.get_value_type(signature.args[0].dtype))
        cgutils.raw_memcpy(builder, args[0], args[1], _i64(builder, args[2]), size)
        return context.get_dummy_value()

    return types.void(dst, src, n), codegen


@njit(**KW)
def add_p(dst, src, n):
    for k in range(n):
        dst[k] += src[k]


@njit(**KW)
def mul_p(dst, a, b, n):
    for k in range(n):
        dst[k] = a[k] * b[k]


@njit(**KW)
def fma_p(dst, a, b, n):
    for k in range(n):
        dst[k] += a[k] * b[k]
