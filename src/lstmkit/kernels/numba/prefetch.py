"""Cold start: compile the backward kernels in a second process while this one compiles the forward.

With an empty compile cache (a fresh install, or after cache_guard dropped a stale one) the
first training step compiles the forward time loop (about 4 s here) and then the backward
kernels (about 2 s): one after the other, on one core. Numba compiles under one lock per
process, so a thread cannot overlap them; a second process can. start() launches
`python -m lstmkit.kernels.numba.prefetch`, which compiles the float32 backward kernels with
the very argument types the engine passes and writes them to the shared on-disk cache,
where this process finds them at its first backward instead of compiling them itself.

It runs at most once per process, only when the cache holds no backward kernel yet and the
machine has a second core; LSTMKIT_PREFETCH=0 turns it off. It never raises: if the child
cannot start or fails, this process compiles as before.

The child names the part it is compiling ('few steps backward', ...) in a small file (its
second argument); when this process needs kernels the child is compiling at that moment, it
waits for them (wait_for) rather than compile the same kernels a second time alongside it.
"""
import os
import subprocess
import sys
import time

started = False  # whether start() ran in this process (callers test it before building start's argument)
pending = False  # whether a child may still be compiling (callers test it before calling wait_for)
_child = [None, None, None]  # the compiling child process, the cache folder it writes to, its part's file
_waited = set()  # the parts wait_for was asked for: from the second call on, it returns at once
# Longest wait for the child's part: one compiles in seconds; this only guards against a child
# that hangs.
WAIT_LIMIT_S = 30.0


def _backward_cached(cache) -> bool:
    return all(any(cache.glob(f"{name}-*.nbi"))
               for name in ("lstm.backward_chunk", "step.steps_backward", "step.step_backward_tiles"))


def start(first: str, training: bool = True, own_gemm: bool = False) -> bool:
    """Launch the compiling child if the cache lacks the backward kernels; returns whether it
    did. first: the engine's path for the first call ('time loop', 'few steps' or 'one step',
    see engines/numba/binding.unpacked_path), whose backward the child compiles first: it has
    about the time this process takes to compile the forward loop, enough for one of them.
    training: whether that call records for backward; if not (inference), the child first
    compiles the forward's row function, which that call's kernel then finds in the cache.
    own_gemm: whether the engine makes its products around the loops with gemm.py (the engine's
    mkl.own_gemm); the child then compiles those too, right after the first path's backward."""
    global started, pending
    if started:
        return False
    started = True
    if os.environ.get("LSTMKIT_PREFETCH", "1") == "0" or (os.cpu_count() or 1) < 2:
        return False
    try:
        from pathlib import Path

        from .cache_guard import numba_cache_dir

        cache = numba_cache_dir(Path(__file__).resolve().parent)
        if cache is None or _backward_cached(cache):
            return False
        part_file = cache / f".lstmkit-prefetch-part-{os.getpid()}"
        args = [sys.executable, "-m", __name__, first, str(part_file), "training" if training else "inference",
                "own-gemm" if own_gemm else "-"]
        child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, close_fds=True)
        _child[:] = child, cache, part_file
        pending = True
        return True
    except Exception:  # noqa: BLE001 - an optimisation only
        return False


def wait_for(part: str) -> None:
    """Before this process compiles the kernels of `part` (a path, 'time loop', 'few steps' or
    'one step', then ' forward' or ' backward'): if the child is compiling those now, wait until
    it moves on (they are then in the cache, where this process's first call finds them), it
    exits, or WAIT_LIMIT_S pass."""
    global pending
    child, _, part_file = _child
    if child is None:
        pending = False
        return
    if part in _waited:  # its kernels are in this process since its first call: nothing to wait for
        if child.poll() is not None:
            pending = False
        return
    _waited.add(part)
    deadline = time.monotonic() + WAIT_LIMIT_S
    while child.poll() is None and _part_now(part_file) == part and time.monotonic() < deadline:
        time.sleep(0.005)
    if child.poll() is not None:
        pending = False


def _part_now(part_file):
    try:
        return part_file.read_text()
    except OSError:  # not written yet, or gone: the child is between parts
        return None


def _announce(part_file, part: str) -> None:
    """The child: name the part it starts (written whole: another process reads it meanwhile)."""
    if part_file is None:
        return
    try:
        os.makedirs(os.path.dirname(part_file), exist_ok=True)
        tmp = f"{part_file}.tmp"
        with open(tmp, "w") as f:
            f.write(part)
        os.replace(tmp, part_file)
    except OSError:
        pass


def compiling(name: str) -> bool:
    """Whether the child is still at work and the cache holds no `name` (module.function, e.g.
    'lstm._forward32') yet: the caller then does without it for now (team.py's bodies)."""
    child, cache, _ = _child
    if child is None or child.poll() is not None:
        return False
    return not any(cache.glob(f"{name}-*.nbi"))


def compile_team_bodies() -> None:
    """The float32 team bodies of a split forward and backward (team.py) and their job
    encoders, for the argument types lstm.forward_core / backward_core pass (the kernels
    themselves are not needed for that: the bodies call them through a pointer); and
    columns.py's body, encoder and kernel."""
    import numpy as np

    from .lstm import _BACKWARD32, _FORWARD32, backward_body, forward_body
    from .team import encode

    f = np.float32
    header = (0, 0)  # the OpenMP entry points; the kinds go on with the kernel's address
    forward_body(np.dtype(f))
    encode(header + _FORWARD32)
    backward_body(np.dtype(f))
    encode(header + _BACKWARD32)
    # Inference at batch 1-4 on several threads (columns.py): its body, encoder and kernel.
    from . import columns

    columns.team_body(np.dtype(f))
    T, B, I, H = 2, 1, 3, 4
    w_ih, w_hh, b = np.zeros((4 * H, I), f), np.zeros((4 * H, H), f), np.zeros(4 * H, f)
    wps, bps, units = columns.pack_columns(w_ih, w_hh, b, 2)
    columns.pack_columns_backward(w_hh, 2)  # and its training backward's packing
    args = (np.zeros((T * B, I), f), np.full(T, B, np.int64), np.zeros((B, H), f), np.zeros((B, H), f), wps, bps,
            units, np.zeros((0, 4 * H), f), 0, np.empty((0, 0), f), False, np.empty((T * B, H), f), np.empty((B, H), f),
            np.empty((B, H), f), np.empty((0, 4 * H), f), np.empty((0, H), f), False, np.empty((2, B, H), f),
            columns.new_sync())
    encode(header + (0,) + args)
    columns.forward_columns(*args, 0, 1)  # thread 0 of 1: runs both parts, no waiting


def compile_backward_kernels(first: str = "time loop", part_file=None, forward_rows: bool = False,
                             own_gemm: bool = False) -> None:
    """Call each float32 backward kernel once on tiny arrays typed as the engine's binding
    types them (all C-contiguous; batch_sizes int64; flags bool): the time-loop backward, the
    few-steps kernels and the one-step kernels, the path `first` names first (see start),
    naming each part in `part_file` (a path, or None) while it compiles (see wait_for).
    forward_rows: the forward's row function before all (see start's `training`). own_gemm: then
    gemm.py's products as the engine calls them (see start), after the first path and team bodies."""
    import numpy as np

    from .lstm import backward_core, chunk_bounds, gate_row, pack_backward
    from .step import (step_backward, step_backward_all, step_backward_tiles, step_forward, step_forward_all,
                       steps_backward, steps_forward)

    f = np.float32
    T, B, I, H = 3, 2, 3, 4
    G = 4 * H
    rng = np.random.default_rng(0)
    r = lambda *shape: rng.standard_normal(shape).astype(f)  # noqa: E731
    x, h0, c0, w_ih, w_hh = r(T * B, I), r(B, H), r(B, H), r(G, I), r(G, H)
    bsz = np.full(T, B, np.int64)
    y, acts, cells = r(T * B, H), r(T * B, G), r(T * B, H)  # values need not be a forward's: types are what count
    no_proj = np.empty((0, H), f)

    def loop():
        announce("time loop backward")
        for with_input in (True, False):  # dx in the loop, or after it (dx_after_loop)
            wpb, wprb = pack_backward(w_ih, w_hh, None, with_input)
            backward_core(x, bsz, h0, c0, wpb, wprb, False, acts, cells, y, r(T * B, H), r(B, H), r(B, H),
                          np.empty((T * B if with_input else 0, I), f), np.empty((T * B, G), f),
                          np.empty((T * B, I + H), f), np.zeros((B, G), f), no_proj, no_proj, chunk_bounds(bsz, 1))

    # The backward first: where this process's first call is a training step it compiles the
    # forward itself meanwhile (and would only wait for the child's); where an inference call
    # came first, it reaches the training forward as the child reaches the forward.
    def steps():  # binding.steps_forward / steps_backward
        announce("few steps backward")
        steps_backward(acts, cells, bsz, h0, c0, y, r(T * B, H), w_hh, no_proj, False, r(B, H), r(B, H),
                       np.empty((T * B, G), f), np.empty((T * B, H), f), no_proj, no_proj)
        announce("few steps forward")
        steps_forward(r(T * B, G), bsz, h0, c0, w_hh, r(G), no_proj, False, np.empty((T * B, G), f),
                      np.empty((T * B, H), f), np.empty((T * B, H), f), np.empty((B, H), f), np.empty((B, H), f))

    def step():  # binding.step_forward / step_backward
        announce("one step backward")
        args = (r(B, G), r(B, H), c0, r(B, H), r(B, H), np.empty((B, G), f), np.empty((B, 0), f), False)
        step_backward(*args)
        step_backward_all(*args, r(B, I), h0, w_ih, w_hh, np.empty((B, I), f), np.empty((B, H), f),
                          np.empty((G, I), f), np.empty((G, H), f), np.empty(G, f))
        announce("one step forward")
        step_forward(r(B, G), r(G), c0, np.empty((B, G), f), np.empty((B, H), f), np.empty((B, H), f),
                     np.empty((B, H), f))
        step_forward_all(r(B, I), h0, c0, w_ih, w_hh, r(G), r(G), no_proj, np.empty((B, G), f), np.empty((B, H), f),
                         np.empty((B, H), f), np.empty((0, H), f), np.empty((B, H), f))
        announce("one step tiles")  # the parent does without them meanwhile (binding.step_tiles_ready)
        step_backward_tiles(*args, r(B, I), h0, w_ih, w_hh, np.empty((B, I), f), np.empty((B, H), f),
                            np.empty((G, I), f), np.empty((G, H), f), np.empty(G, f))

    def gemm_products():  # binding.matmul and input_projection on kernels/numba/gemm.py
        from .gemm import matmul_rows

        announce("own gemm")
        matmul_rows(r(B, G), w_ih, False, 1)  # dx = dgates W_ih
        matmul_rows(r(G, B).T, r(G, I + H), False, 1)  # the weight gradients: dgates^T read in place
        matmul_rows(x, w_ih, True, 1, bias=w_ih[:, 0].copy())  # the input projection x W_ih^T + b

    announce = lambda part: _announce(part_file, part)  # noqa: E731
    jobs = {"time loop": loop, "few steps": steps, "one step": step}
    try:
        if forward_rows:  # the parent's first forward, compiling meanwhile, finds it in the cache
            announce("forward rows")
            gate_row(r(G), r(G), np.empty(G, f), r(H), np.empty(H, f))
        for name in [first] + [n for n in jobs if n != first]:
            jobs[name]()
            if name == first:
                announce("team bodies")
                compile_team_bodies()
                if own_gemm:
                    gemm_products()
    finally:
        if part_file is not None:
            try:
                os.remove(part_file)
            except OSError:
                pass


if __name__ == "__main__":
    from pathlib import Path

    # Below the parent in the scheduler's order: where the parent trains on every core, the
    # child compiles in what they leave (the parts the parent waits for, it waits idle: the
    # child then has a core). Without it a fresh clone's demo ran steps 50-250 at 18,000 chars/s
    # instead of 22,000 and fitted its learning-rate decay to 3,159 steps where 5,722 then ran.
    try:
        os.nice(10)
    except OSError:
        pass

    compile_backward_kernels(sys.argv[1] if len(sys.argv) > 1 else "time loop",
                             Path(sys.argv[2]) if len(sys.argv) > 2 else None,
                             len(sys.argv) > 3 and sys.argv[3] == "inference",
                             len(sys.argv) > 4 and sys.argv[4] == "own-gemm")
