"""Compiled team bodies: an OpenMP team runs a kernel with no Python on its threads.

A ctypes callback into Python on each team thread (threads.run_chunks' fallback) makes every
thread take the GIL (twice) and a Python thread state: about 90 us per call on this project's
machines against 1.6 us for the team itself (BENCHMARKS.md). That is nothing next to a training
step, and everything next to a batch-1 step. Here a kernel's arguments travel as one int64
array (`job`) and each thread runs a Numba cfunc that rebuilds the arrays from it (pointers and
shapes, C-contiguous arrays only) and calls the kernel through its native address:

    job = encode((omp_get_thread_num, omp_get_num_threads, kernel address, *args))
          = [len, then per argument: data pointer, *shape | value]
    body(job) on every team thread: row_chunks (kernel(*args, bounds[k], bounds[k+1]) for its
          chunks k) or whole_team (kernel(*args, thread number, team size))

A body is written once per kernel and dtype (spec: the kinds of its arguments). The OpenMP
entry points and the kernel are called through their addresses in the job, so the compiled
code names no library symbol, does not link the kernel in (compiling a body takes 0.3 s, not
the kernel's seconds again), and loads from Numba's cache anywhere.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from numba.core import cgutils
from numba.core.callconv import excinfo_t

from . import prefetch


@intrinsic
def call_kernel(typingctx, address, args):
    """kernel(*args) for the compiled njit kernel at `address` (kernel_address: the native
    entry of its overload for exactly these argument types). Called through a pointer, so the
    body's module does not link the kernel in: LLVM does not optimise the kernel a second
    time inside each body (2-3 s per body with an empty cache)."""
    argtys = tuple(args)

    def codegen(context, builder, signature, a):
        conv = context.call_conv
        fnty = conv.get_function_type(types.none, argtys)
        fn = builder.inttoptr(a[0], fnty.as_pointer())
        retty = conv.get_return_type(types.none).pointee
        ret = cgutils.alloca_once(builder, retty)
        builder.store(cgutils.get_null_value(retty), ret)
        excinfo = cgutils.alloca_once(builder, ir.PointerType(excinfo_t))
        values = [builder.extract_value(a[1], k) for k in range(len(argtys))]
        builder.call(fn, [ret, excinfo] + list(conv._get_arg_packer(argtys).as_arguments(builder, values)))
        return context.get_dummy_value()

    return types.void(address, args), codegen


_addresses = {}


def kernel_address(kernel, args, dtype) -> int:
    """The native entry of njit `kernel` compiled for args as a body decodes them (arrays
    C-contiguous; bools; ints as int64), compiling it if need be (the same overload a Python
    call with those arrays uses); cached per kernel and float dtype (a kernel's bodies fix
    every other kind: team_bodies has one body per dtype)."""
    key = (kernel, dtype)
    address = _addresses.get(key)
    if address is None:
        from numba import from_dtype

        sig = tuple(types.Array(from_dtype(a.dtype), a.ndim, "C") if isinstance(a, np.ndarray)
                    else types.boolean if type(a) is bool else types.int64 for a in args)
        kernel.compile(sig)
        cres = kernel.overloads[sig]
        address = _addresses[key] = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
    return address


KW = dict(cache=True, nogil=True)


HEADER = 3  # job[0] = len(job), job[1], job[2] = the addresses of omp_get_thread_num, omp_get_num_threads


def spec(dtype, kinds: str):
    """A body's argument kinds, for unpack, from words: "a<ndim>" an array of `dtype`, "i<ndim>"
    an int64 array, "b" a bool, "n" an int (C-contiguous arrays). As a tuple of empty arrays,
    False and 0 it is a compile-time constant in the body."""
    def one(word):
        if word in ("b", "n"):
            return 0 if word == "n" else False
        return np.empty((0,) * int(word[1:]), dtype if word[0] == "a" else np.int64)

    return tuple(one(w) for w in kinds.split())


@intrinsic
def unpack(typingctx, data, kinds):
    """The arguments in the job at data (a void*), as a tuple typed by `kinds` (spec()'s
    constant): C-contiguous array views of the caller's memory, bools and int64s."""
    out = []
    for t in kinds:
        if isinstance(t, types.Array):
            out.append(types.Array(t.dtype, t.ndim, "C"))
        else:
            out.append(types.boolean if isinstance(t, types.Boolean) else types.int64)
    tuple_ty = types.Tuple(out)

    def codegen(context, builder, signature, args):
        from numba.np.arrayobj import populate_array

        i64 = ir.IntType(64)
        job = builder.bitcast(args[0], i64.as_pointer())
        word = lambda k: builder.load(builder.gep(job, [ir.Constant(i64, k)]))  # noqa: E731
        values, pos = [], HEADER
        for t in out:
            if isinstance(t, types.Array):
                elem = context.get_value_type(t.dtype)
                shape = [word(pos + 1 + d) for d in range(t.ndim)]
                size = context.get_abi_sizeof(elem)
                strides, step = [], ir.Constant(i64, size)
                for d in reversed(range(t.ndim)):
                    strides.insert(0, step)
                    step = builder.mul(step, shape[d])
                arr = context.make_array(t)(context, builder)
                populate_array(arr, data=builder.inttoptr(word(pos), elem.as_pointer()), shape=shape,
                               strides=strides, itemsize=size, meminfo=None)
                values.append(arr._getvalue())
                pos += 1 + t.ndim
            else:
                v = word(pos)
                values.append(builder.icmp_signed("!=", v, ir.Constant(i64, 0))
                              if isinstance(t, types.Boolean) else v)
                pos += 1
        return context.make_tuple(builder, tuple_ty, values)

    return tuple_ty(data, kinds), codegen


@intrinsic
def team_place(typingctx, data):
    """(thread number, team size) of the calling thread, through the job's header addresses."""

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        job = builder.bitcast(args[0], i64.as_pointer())
        fnty = ir.FunctionType(ir.IntType(32), [])
        place = []
        for k in (1, 2):
            fn = builder.inttoptr(builder.load(builder.gep(job, [ir.Constant(i64, k)])), fnty.as_pointer())
            place.append(builder.sext(builder.call(fn, []), i64))
        return context.make_tuple(builder, signature.return_type, place)

    return types.UniTuple(types.int64, 2)(data), codegen


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


@njit(**KW)
def row_chunks(data, a):
    """A split call's body: a = unpack(...) = (kernel address, *arguments, bounds); this thread
    runs kernel(*arguments, bounds[k], bounds[k + 1]) for chunks k = its number, + team size, ..."""
    k, threads = team_place(data)
    bounds = a[-1]
    for chunk in range(k, bounds.shape[0] - 1, threads):
        call_kernel(a[0], a[1:-1] + (bounds[chunk], bounds[chunk + 1]))


@njit(**KW)
def whole_team(data, a):
    """A team call's body: a = (kernel address, *arguments); kernel(*arguments, k, team size)."""
    k, threads = team_place(data)
    call_kernel(a[0], a[1:] + (k, threads))


def team_bodies(body32, body64):
    """dtype -> the cfunc of body32 or body64 (plain functions of the job's void*), compiled on
    first use (or loaded from Numba's cache): a process that never splits a call never builds it."""
    from numba import cfunc

    bodies = {}

    def body(dtype):
        """The cfunc, or None while prefetch's child is compiling it (the caller then takes
        the Python path): with an empty cache this process has its own kernels to compile."""
        b = bodies.get(dtype)
        if b is None:
            fn = body32 if dtype == np.float32 else body64
            if prefetch.compiling(f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"):
                return None
            b = bodies[dtype] = cfunc(types.void(types.voidptr), cache=True)(fn)
        return b

    return body


def on_team(bodies, kernel, threads: int, dtype, args) -> bool:
    """kernel(*args, k, team size) on an OpenMP team of up to `threads` threads through its
    compiled body (bodies: team_bodies' dtype -> cfunc; the body runs whole_team); False, having
    run nothing, without a team or while the body is being compiled elsewhere."""
    from .threads import openmp_in_use, run_compiled

    body = bodies(dtype) if openmp_in_use() else None
    if body is None:
        return False
    return run_compiled(body, threads, kernel_address(kernel, args + (0, 0), dtype), *args)
