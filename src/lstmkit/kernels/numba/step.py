"""The gate passes of a one-step layer-direction call (T = 1), on gates the caller computed.

The streaming / reinforcement-learning case: one time step, forward and backward, the
weights different at every call (an optimizer step in between). The time-loop kernels of
lstm.py lay the weights out for their micro-kernel in every call (a full copy of W, forward
and backward), which for one step costs as much as the products themselves. Here the caller
makes the products as plain GEMMs on the weights as they are (the torch engine: torch's),
and these kernels do only the per-unit work between them:

    step_forward(q, b, c0, acts, c, cells, h)
        q (B, 4H) = x W_ih^T + h0 W_hh^T (without b); b (4H,); c0 (B, H).
        Out: acts (B, 4H) the gate activations, c and cells (B, H) both c_1 (two arrays: one is
        returned to the caller, the other saved for backward), h (B, H) o * tanh(c_1).

    step_backward(acts, cells, c0, dh, dc, dgates, hpre, want_hpre)
        dh (B, H) dL/dh_1 before the projection; dc (B, H) in dL/dc_1, out dL/dc_0.
        Out: dgates (B, 4H) dL/d pre-activations; hpre (B, H) o * tanh(c_1) when want_hpre.

Both reuse lstm.py's row functions (gate_row, gate_backward_row), so a row's numbers are the
time-loop kernel's. Numba's cache keys a compiled function by its own file: after editing
gate_row or gate_backward_row (lstm.py, simd.py, activations.py), touch this file too, or its
cached code keeps the old rows.
"""
from numba import njit

from .lstm import KW, copy_into, gate_backward_row, gate_row


@njit(**KW)
def step_forward(q, b, c0, acts, c, cells, h):
    for i in range(q.shape[0]):
        copy_into(c[i], c0[i])
        gate_row(q[i], b, acts[i], c[i], h[i])
        copy_into(cells[i], c[i])


@njit(**KW)
def step_backward(acts, cells, c0, dh, dc, dgates, hpre, want_hpre):
    for i in range(acts.shape[0]):
        gate_backward_row(acts[i], cells[i], c0[i], dh[i], dc[i], dgates[i], hpre[i], want_hpre)
