"""Compiled team bodies: an OpenMP team runs a kernel with no Python on its threads.

threads.run_chunks hands each team thread a ctypes callback into Python, which then calls the
compiled kernel: every thread takes the GIL (twice) and a Python thread state, about 90 us per
call on this project's machines against 1.6 us for the team itself (BENCHMARKS.md). That is
nothing next to a training step, and everything next to a one-step call. Here a kernel's
arguments travel as one int64 array (`job`) and each thread runs a Numba cfunc that rebuilds
the arrays from it (pointers and shapes, C-contiguous arrays only) and calls the kernel:

    job = encode(args)                 [len, then per argument: ptr, *shape | value]
    body(job) on every team thread     -> kernel(*decoded, thread_num, team_size)

A body is written once per kernel and dtype (the decoding must know each argument's kind).
The job's first two arguments are the addresses of the OpenMP runtime's omp_get_thread_num
and omp_get_num_threads (threads.run_compiled puts them there): the compiled code calls them
through those pointers, so it names no library symbol and loads from Numba's cache anywhere.
"""
import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic
from numba.core import cgutils


@intrinsic
def job_of(typingctx, data):
    """The job array at `data` (a void*): carray of its len (first element) int64 values."""
    ptr_ty = types.CPointer(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(ptr_ty))

    return ptr_ty(data), codegen


@intrinsic
def _pointer(typingctx, address, like):
    """An int64 address as a pointer to elements of like's type."""
    ptr_ty = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_ty))

    return ptr_ty(address, like), codegen


@intrinsic
def call_int(typingctx, address):
    """Call the C function `int f(void)` at address (omp_get_thread_num and omp_get_num_threads:
    their addresses travel in the job, so the compiled code names no library symbol)."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.sext(builder.call(fn, []), ir.IntType(64))

    return types.int64(address), codegen


KW = dict(cache=True, nogil=True)


# Decoders: each returns (the argument, the position of the next one).

@njit(**KW)
def array1(job, p, like):
    return carray(_pointer(job[p], like), (job[p + 1],)), p + 2


@njit(**KW)
def array2(job, p, like):
    return carray(_pointer(job[p], like), (job[p + 1], job[p + 2])), p + 3


@njit(**KW)
def array3(job, p, like):
    return carray(_pointer(job[p], like), (job[p + 1], job[p + 2], job[p + 3])), p + 4


@njit(**KW)
def array4(job, p, like):
    return carray(_pointer(job[p], like), (job[p + 1], job[p + 2], job[p + 3], job[p + 4])), p + 5

@njit(**KW)
def scalar(job, p):
    return job[p], p + 1


@njit(**KW)
def open_job(data):
    """(job, position of the first kernel argument, thread number, team size) in a body."""
    job = carray(job_of(data), (1,))
    job = carray(job_of(data), (job[0],))
    return job, 3, call_int(job[1]), call_int(job[2])


@intrinsic
def _job_length(typingctx, args):
    """len(job) for a tuple of arguments, a compile-time constant."""
    n = 1 + sum(1 + t.ndim if isinstance(t, types.Array) else 1 for t in args)

    def codegen(context, builder, signature, a):
        return ir.Constant(ir.IntType(64), n)

    return types.int64(args), codegen


@intrinsic
def _fill(typingctx, job, args):
    """job[:] = [len, then per argument: data pointer, *shape | value] (arrays C-contiguous)."""
    for t in args:
        if isinstance(t, types.Array) and t.layout != "C":
            raise TypeError(f"team jobs take C-contiguous arrays, got {t}")
        if not isinstance(t, (types.Array, types.Integer, types.Boolean)):
            raise TypeError(f"team jobs take arrays, ints and bools, got {t}")

    def codegen(context, builder, signature, a):
        job_ty, args_ty = signature.args
        job_arr = context.make_array(job_ty)(context, builder, a[0])
        i64 = ir.IntType(64)
        values = []
        for k, t in enumerate(args_ty):
            v = builder.extract_value(a[1], k)
            if isinstance(t, types.Array):
                arr = context.make_array(t)(context, builder, v)
                values.append(builder.ptrtoint(arr.data, i64))
                values.extend(cgutils.unpack_tuple(builder, arr.shape))
            elif isinstance(t, types.Boolean):
                values.append(builder.zext(v, i64))
            else:
                values.append(builder.sext(v, i64) if v.type.width < 64 else v)
        values.insert(0, ir.Constant(i64, len(values) + 1))
        for k, v in enumerate(values):
            builder.store(v, builder.gep(job_arr.data, [ir.Constant(i64, k)]))
        return context.get_dummy_value()

    return types.void(job, args), codegen


@njit(**KW)
def encode(args):
    """The job array of a tuple of arguments (C-contiguous arrays, ints, bools). The arrays
    must outlive the call that runs it."""
    job = np.empty(_job_length(args), np.int64)
    _fill(job, args)
    return job
