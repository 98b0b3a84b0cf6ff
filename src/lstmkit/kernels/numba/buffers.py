"""Big arrays that live for one call (or from a forward to its backward), on pages kept mapped.

A training step allocates the same big arrays at every call: the saved activations, the
output, dx, the weight gradients, packed weights. From numpy, each is fresh memory whose
first writes fault page after page, and numpy asks for transparent huge pages on every
allocation of 4 MiB or more (madvise MADV_HUGEPAGE), faults that on the machine the
benchmarks run on (a small VM) sometimes stall: a forward at T=20, N=128, hidden 2048 spent
0.02-1.8 s of system time on its 84 MiB of saved activations, call after call. Here such an
array is a view of an anonymous private mapping with no advice, and when the array and
everything viewing it (a torch tensor made by torch.from_numpy included) is gone, the mapping
goes back to a small pool, from which the next request of the same size takes it with its
pages still mapped: no faults at all from the second step on (BENCHMARKS.md, twenty-first
session). The pool keeps at most POOL_MAX_BYTES, oldest out first. numpy's own setting for
the rest of the process stays as it is.

Weight layouts are the exception (empty(huge=True)): read at every step of every call, and
where they outgrow L2 streamed from L3 at each step, their pages' translations miss the TLB
(16 MiB of packed W_hh at hidden 1024 is 4096 pages of 4 KiB); on pages of 4 KiB the same
inference ran 0.91-0.92x torch.nn.LSTM in a process after a bigger case against 0.99x on huge
pages (BENCHMARKS.md, twenty-seventh session). A layout's mapping is faulted once and then
kept (a module's inference cache) or taken again from the pool (training's layout at every
call), so the huge-page faults that stalled the activations are paid once, not call after call.
"""
import math
import mmap
import threading
import weakref
from collections import OrderedDict

import numpy as np

# numpy's threshold for its huge-page advice; smaller arrays come from np.empty as usual.
PLAIN_PAGES_FROM_BYTES = 4 << 20
# Mappings kept for reuse, in all (a training step of hidden 2048 at batch 128 uses about 300 MiB).
POOL_MAX_BYTES = 512 << 20
# Private anonymous memory (POSIX); elsewhere (Windows) np.empty as it is.
_MAP_FLAGS = (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if hasattr(mmap, "MAP_PRIVATE") else 0

_lock = threading.Lock()
_pool: "OrderedDict[int, list]" = OrderedDict()  # bytes -> free mappings of that size, oldest size first


def _take(nbytes: int):
    with _lock:
        free = _pool.get(nbytes)
        if not free:
            return None
        block = free.pop()
        if not free:
            del _pool[nbytes]
        return block


def _give_back(block, nbytes: int) -> None:
    """The finaliser of a request's array: its mapping back to the pool (or unmapped, by
    dropping it, when the pool is full even after its oldest sizes went out)."""
    if nbytes > POOL_MAX_BYTES:
        return
    with _lock:
        while _bytes() + nbytes > POOL_MAX_BYTES and _pool:
            size, free = next(iter(_pool.items()))
            free.pop()
            if not free:
                del _pool[size]
        _pool.setdefault(nbytes, []).append(block)
        _pool.move_to_end(nbytes)


def empty(shape, dtype, huge: bool = False) -> np.ndarray:
    """np.empty(shape, dtype), C-contiguous; from PLAIN_PAGES_FROM_BYTES a page-aligned view of
    a pooled mapping (see above), uninitialised (it may hold an earlier call's values). huge:
    a new mapping asks for transparent huge pages (weight layouts, see above)."""
    dtype = np.dtype(dtype)
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes < PLAIN_PAGES_FROM_BYTES or not _MAP_FLAGS:
        return np.empty(shape, dtype)
    block = _take(nbytes)
    if block is None:
        block = mmap.mmap(-1, nbytes, flags=_MAP_FLAGS)
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; elsewhere pages as they come
            block.madvise(mmap.MADV_HUGEPAGE)
    # `owner` holds the mapping; every view of it (reshape, slices, torch.from_numpy's tensor)
    # holds `owner`, as numpy bases a view on the first array up the chain whose own base is
    # not an array. The mapping returns to the pool only once nothing views it.
    owner = np.frombuffer(block, np.uint8, count=nbytes)
    weakref.finalize(owner, _give_back, block, nbytes)
    return owner.view(dtype).reshape(shape)


def _bytes() -> int:
    return sum(size * len(free) for size, free in _pool.items())


def pooled_bytes() -> int:
    """Bytes held in the pool now (for tests and the curious)."""
    with _lock:
        return _bytes()
