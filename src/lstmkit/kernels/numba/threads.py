"""Where the row chunks of one call run (kernels/numba/lstm.py splits a call's batch rows into
chunks, each a whole time loop in a compiled nogil function).

    run_chunks(fn, bounds, *args)   fn(*args, bounds[k], bounds[k+1]) for every chunk k, at once
    run_jobs(jobs)                  fn(*args) for every (fn, args) in jobs, at once (different calls)
    run_pair(fn, args0, args1)      fn(*args0) and fn(*args1) at once (the two directions of a
                                    bidirectional layer), through a compiled pair body
    run_compiled(body, threads, *args)  a compiled body (team.py) on each thread of an OpenMP team
    use_openmp(path)                run them on the team of the OpenMP runtime at `path`

Why a host's OpenMP team: a process has one set of cores and, with torch, already a pool of
OpenMP threads (its GEMMs, its elementwise ops). After each parallel region those threads
spin for a while before they sleep, so a second pool of our own started right after a torch
op found a core busy with a spinning thread, and a training step (our time loop, torch's
weight-gradient GEMMs, our time loop, ...) ran at 1-thread speed on 2 threads
(BENCHMARKS.md, "fourth round"). On the host's team the chunks run on the very threads that
spin, so they pick the work up at once. The engine binding passes torch's runtime when
torch's parallel backend is OpenMP (engines/numba/binding.py); the kernels never import torch.

A kernel with a compiled team body (team.py; lstm.py's forward and backward chunks, columns.py)
runs with no Python on the team: run_compiled hands GOMP_parallel a Numba cfunc and one int64
array of arguments. Any other (or while that body is not compiled yet) gets a ctypes callback
into Python on each team thread, which takes the GIL and a thread state (about 90 us a call
against 1.6 us), the compiled chunk releasing the GIL while it runs. Without a host runtime
(the torch-free runtime, or torch on another backend) the chunks run on a small pool of
Python threads that sleep on a queue between calls.
"""
import ctypes
import itertools
import os
import threading

_omp = {}  # "parallel": GOMP_parallel, "thread_num"/"num_threads": omp_get_*, "body": the callback
_jobs = {}  # job key -> (fn, args, bounds, errors); a key travels through OpenMP's data pointer
_keys = itertools.count(1)  # 0 would arrive as None
_pool = [None, 0]  # the fallback executor and its size
_pool_lock = threading.Lock()
_BODY_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def use_openmp(path) -> bool:
    """Run chunks on the OpenMP team of the runtime library at `path` (libgomp, or a runtime
    with its GOMP entry points such as LLVM's libomp), which should be the one the host
    process's other work already uses. Returns whether it took; None: back to Python threads."""
    _omp.clear()
    if path is None:
        return False
    try:
        lib = ctypes.CDLL(path)
        parallel = lib.GOMP_parallel
        thread_num, num_threads = lib.omp_get_thread_num, lib.omp_get_num_threads
    except (OSError, AttributeError):
        return False
    parallel.argtypes = [_BODY_TYPE, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    thread_num.restype = num_threads.restype = ctypes.c_int
    # The same entry point for compiled bodies (run_compiled): a plain function pointer.
    raw = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)(("GOMP_parallel", lib))
    addresses = tuple(ctypes.cast(f, ctypes.c_void_p).value for f in (thread_num, num_threads))
    _omp.update(parallel=parallel, thread_num=thread_num, num_threads=num_threads, body=_BODY_TYPE(_team_body),
                jobs_body=_BODY_TYPE(_jobs_body), raw=raw, addresses=addresses)
    return True


def openmp_in_use() -> bool:
    return bool(_omp)


def _team_body(key):
    """Each team thread runs chunks thread_num, thread_num + team size, ... (a team can be
    smaller than asked for, e.g. inside another parallel region)."""
    fn, args, bounds, errors = _jobs[key]
    try:
        for k in range(_omp["thread_num"](), bounds.shape[0] - 1, _omp["num_threads"]()):
            fn(*args, bounds[k], bounds[k + 1])
    except BaseException as e:  # noqa: BLE001 -- an exception must not die silently in a callback
        errors.append(e)


def run_chunks(fn, bounds, *args, body=None):
    """fn(*args, r0, r1) for every chunk [bounds[k], bounds[k+1]), all at once; returns when
    all are done, raising the first exception a chunk raised. body: dtype -> fn's compiled
    team body (team.py), used on an OpenMP team when every array argument is C-contiguous."""
    n = bounds.shape[0] - 1
    if n <= 1:
        fn(*args, bounds[0], bounds[-1])
        return
    compiled = body(args[0].dtype) if _omp and body is not None and _contiguous(args) else None
    if compiled is not None:
        run_compiled(compiled, n, _team().kernel_address(fn, args + (0, 0), args[0].dtype), *args, bounds)
        return
    if _omp:
        key = next(_keys)
        errors = []
        _jobs[key] = (fn, args, bounds, errors)
        try:
            _omp["parallel"](_omp["body"], key, n, 0)
        finally:
            del _jobs[key]
        if errors:
            raise errors[0]
        return
    _run_on_python_threads(fn, bounds, args, n)


def _jobs_body(key):
    """Each team thread runs jobs thread_num, thread_num + team size, ... (see _team_body)."""
    jobs, errors = _jobs[key]
    try:
        for k in range(_omp["thread_num"](), len(jobs), _omp["num_threads"]()):
            fn, args = jobs[k]
            fn(*args)
    except BaseException as e:  # noqa: BLE001 -- an exception must not die silently in a callback
        errors.append(e)


def run_pair(fn, args0, args1, body=None):
    """fn(*args0) and fn(*args1) at once: on an OpenMP team through `body` (a compiled pair body,
    team.py: dtype -> cfunc of (address, *args0, *args1), or None while it is not compiled),
    else as run_jobs does."""
    compiled = (body(args0[0].dtype) if _omp and body is not None and _contiguous(args0) and _contiguous(args1)
                else None)
    if compiled is not None:
        run_compiled(compiled, 2, _team().kernel_address(fn, args0, args0[0].dtype), *args0, *args1)
        return
    run_jobs([(fn, args0), (fn, args1)])


def run_jobs(jobs):
    """fn(*args) for every (fn, args) in jobs, all at once (fn: compiled nogil kernels); returns
    when all are done, raising the first exception one raised. On the host's OpenMP team through
    the Python callback (tens of microseconds a call: for calls of milliseconds), else on the
    pool of Python threads."""
    if len(jobs) <= 1:
        for fn, args in jobs:
            fn(*args)
        return
    if _omp:
        key = next(_keys)
        errors = []
        _jobs[key] = (jobs, errors)
        try:
            _omp["parallel"](_omp["jobs_body"], key, len(jobs), 0)
        finally:
            del _jobs[key]
        if errors:
            raise errors[0]
        return
    pool = _python_pool(len(jobs))
    futures = [pool.submit(fn, *args) for fn, args in jobs[1:]]
    fn, args = jobs[0]
    fn(*args)
    for f in futures:
        f.result()


def _contiguous(args) -> bool:
    for a in args:
        if hasattr(a, "flags") and not a.flags.c_contiguous:
            return False
    return True


def run_compiled(body, threads: int, *args) -> bool:
    """Run the compiled team body `body` (team.py: a cfunc that decodes args and calls its
    kernel with the thread's number and the team's size) on an OpenMP team of up to `threads`
    threads, all at once (so the kernel may wait on its teammates: columns.py's barrier), with
    no Python on the team's threads. Returns False, running nothing, where there is no
    OpenMP team: Python threads from a shared pool are not sure to run one call's parts at once."""
    if not _omp:
        return False
    job = _team().encode(_omp["addresses"] + args)
    _omp["raw"](body.address, job.ctypes.data, threads, 0)
    return True


def _team():
    """kernels/numba/team.py (numba's compiler machinery), imported at the first split call, not
    with this module: a per-call import statement costs microseconds against a step of a few."""
    global _team_module
    if _team_module is None:
        from . import team

        _team_module = team
    return _team_module


_team_module = None


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: neither the OpenMP team (GNU libgomp
    waits forever for the parent's workers if asked for it) nor our pool's threads (submitted
    chunks would never run). The child splits its calls over fresh Python threads instead."""
    global _pool_lock
    _omp.clear()
    _pool[0], _pool[1] = None, 0
    _pool_lock = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _python_pool(n):
    """The pool of Python threads, with at least n - 1 threads (the caller is the n-th)."""
    with _pool_lock:
        if _pool[1] < n - 1:
            from concurrent.futures import ThreadPoolExecutor

            if _pool[0] is not None:
                _pool[0].shutdown(wait=False)
            _pool[0], _pool[1] = ThreadPoolExecutor(n - 1, thread_name_prefix="lstmkit"), n - 1
        return _pool[0]


def _run_on_python_threads(fn, bounds, args, n):
    pool = _python_pool(n)
    futures = [pool.submit(fn, *args, bounds[k], bounds[k + 1]) for k in range(1, n)]
    fn(*args, bounds[0], bounds[1])
    for f in futures:
        f.result()
