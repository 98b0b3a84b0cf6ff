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
"""
import os
import subprocess
import sys

started = False  # whether start() ran in this process (callers test it before building start's argument)
_child = [None, None]  # the compiling child process and the cache folder it writes to


def _backward_cached(cache) -> bool:
    return any(cache.glob("lstm.backward_chunk-*.nbi")) and any(cache.glob("step.steps_backward-*.nbi"))


def start(first: str) -> bool:
    """Launch the compiling child if the cache lacks the backward kernels; returns whether it
    did. first: the engine's path for the first call ('time loop', 'few steps' or 'one step',
    see engines/numba/binding.unpacked_path), whose backward the child compiles first: it has
    about the time this process takes to compile the forward loop, enough for one of them."""
    global started
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
        _child[:] = subprocess.Popen([sys.executable, "-m", __name__, first], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True), cache
        return True
    except Exception:  # noqa: BLE001 - an optimisation only
        return False


def compiling(name: str) -> bool:
    """Whether the child is still at work and the cache holds no `name` (module.function, e.g.
    'lstm._forward32') yet: the caller then does without it for now (team.py's bodies)."""
    child, cache = _child
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
    args = (np.zeros((T * B, I), f), np.full(T, B, np.int64), np.zeros((B, H), f), np.zeros((B, H), f), wps, bps,
            units, np.zeros((0, 4 * H), f), False, np.empty((T * B, H), f), np.empty((B, H), f),
            np.empty((B, H), f), np.empty((0, 4 * H), f), np.empty((0, H), f), False, np.empty((2, B, H), f),
            columns.new_sync())
    encode(header + (0,) + args)
    columns.forward_columns(*args, 0, 1)  # thread 0 of 1: runs both parts, no waiting


def compile_backward_kernels(first: str = "time loop") -> None:
    """Call each float32 backward kernel once on tiny arrays typed as the engine's binding
    types them (all C-contiguous; batch_sizes int64; flags bool): the time-loop backward, the
    few-steps kernels and the one-step kernels, the path `first` names first (see start)."""
    import numpy as np

    from .lstm import backward_core, chunk_bounds, pack_backward
    from .step import step_backward, step_backward_all, step_forward, steps_backward, steps_forward

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
        for with_input in (True, False):  # dx in the loop, or after it (dx_after_loop)
            wpb, wprb = pack_backward(w_ih, w_hh, None, with_input)
            backward_core(x, bsz, h0, c0, wpb, wprb, False, acts, cells, y, r(T * B, H), r(B, H), r(B, H),
                          np.empty((T * B if with_input else 0, I), f), np.empty((T * B, G), f),
                          np.empty((T * B, I + H), f), np.zeros((B, G), f), no_proj, no_proj, chunk_bounds(bsz, 1))

    def steps():  # binding.steps_forward / steps_backward
        a, cl, yy = np.empty((T * B, G), f), np.empty((T * B, H), f), np.empty((T * B, H), f)
        steps_forward(r(T * B, G), bsz, h0, c0, w_hh, r(G), no_proj, False, a, cl, yy, np.empty((B, H), f),
                      np.empty((B, H), f))
        steps_backward(a, cl, bsz, h0, c0, yy, r(T * B, H), w_hh, no_proj, False, r(B, H), r(B, H),
                       np.empty((T * B, G), f), np.empty((T * B, H), f), no_proj, no_proj)

    def step():  # binding.step_forward / step_backward
        a1, c1, cells1, h1 = np.empty((B, G), f), np.empty((B, H), f), np.empty((B, H), f), np.empty((B, H), f)
        step_forward(r(B, G), r(G), c0, a1, c1, cells1, h1)
        args = (a1, cells1, c0, r(B, H), r(B, H), np.empty((B, G), f), np.empty((B, 0), f), False)
        step_backward(*args)
        step_backward_all(*args, r(B, I), h0, w_ih, w_hh, np.empty((B, I), f), np.empty((B, H), f),
                          np.empty((G, I), f), np.empty((G, H), f), np.empty(G, f))

    jobs = {"time loop": loop, "few steps": steps, "one step": step}
    for name in [first] + [n for n in jobs if n != first]:
        jobs[name]()
        if name == first:
            compile_team_bodies()


if __name__ == "__main__":
    compile_backward_kernels(*sys.argv[1:2])
