"""Numba kernels (numpy arrays in and out; never import torch).

The stable numpy-level API, shared by the torch engine (engines/numba/) and
the torch-free runtime:

    y, h_n, c_n = lstm_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b=None, w_hr=None,
                               reverse=False)
        x (total, I) packed time-major rows, batch_sizes non-increasing ints
        (padded: [N] * T), h0 (B, P), c0 (B, H), w_ih (4H, I), w_hh (4H, P),
        b (4H,) = b_ih + b_hh or None, w_hr (P, H) or None; float32 or float64.
        y (total, P), h_n (B, P), c_n (B, H).

    y, h_n, c_n, saved = lstm_forward(..., save=True)
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = lstm_backward(x, batch_sizes, h0, c0, w_ih, w_hh,
                                                        w_hr, reverse, y, saved, dy, dh_n, dc_n)

forward_core / backward_core run the compiled time loops on preallocated arrays (no
conversions, for hot paths; all arrays C-contiguous, one dtype), on weights laid out once
by pack_forward / pack_backward, the batch rows split into chunk_bounds(batch_sizes, n)
chunks that run on n threads at once:

    forward_core(x, batch_sizes(int64), h0, c0, wp, b, wpr, reverse,
                 acts (total or 0, 4H), y (total, P), h (B, P), c (B, H), cells (total or 0, H), save, bounds)
    backward_core(x, batch_sizes, h0, c0, wpb, wprb, reverse, acts, cells, y, dy, dh, dc,
                  dx, dgates, xh_prev, db_rows, dh_all, hpre_all, bounds)   # then weight_gradients(...)

See kernels/numba/lstm.py (the loops) and tile.py (the per-step product).
"""
from .cache_guard import drop_stale_cache

drop_stale_cache()  # before any kernel module loads its cache (see cache_guard.py)

from .lstm import backward_core, forward_core, lstm_backward, lstm_forward  # noqa: E402

__all__ = ["lstm_forward", "lstm_backward", "forward_core", "backward_core"]
