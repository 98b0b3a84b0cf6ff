"""The torch-free LSTM: weights as numpy arrays, called like lstmkit.LSTM in eval mode.

    rt = lstmkit.runtime.load("model.safetensors")
    out, (h, c) = rt(x)                 # x (T, N, I), (N, T, I) with batch_first, or (T, I)
    out, (h, c) = rt(x_t, (h, c))       # streaming: feed the returned state back in

Shapes are the module's: h (D*num_layers, N, P), c (D*num_layers, N, H), or without the N
axis for unbatched 2-D input. Inference only: dropout, recurrent dropout and weight drop
are training-time noise and do nothing here, exactly as in module.eval().

Each layer-direction runs the fused CPU kernel kernels/numba/lstm.forward_core (the one the
torch engine uses) over the whole sequence, on weights packed for it once at load, the
batch rows split over `threads` threads (attribute, default 1). Models with layer_norm,
peephole or zoneout run kernels/numba/variants.forward_core instead.
"""
from __future__ import annotations

import numpy as np

from ..config import LSTMConfig
from ..kernels.numba.lstm import (
    LIVE_TURN, MIN_SPLIT_MACS, chunk_bounds, chunks_for, forward_chunk, forward_core, forward_pair_body, input_projection,
    live_turn, one_step, one_step_live, one_step_live_at, one_step_live_split, pack_forward, precompute_input,
)
from ..kernels.numba.buffers import empty as pooled_empty
from ..kernels.numba.columns import (big_weights_columns_pay, columns_pay, columns_precompute, pack_columns, run_columns,
                                     wide_columns_pay)
from ..kernels.numba.threads import run_pair
from ..kernels.numba.variants import forward_core as _variant_forward
from ..kernels.numba.variants import pack_forward as _variant_pack


# One-step calls of at most this many rows read the weights as they are where the module's
# fast path runs them (Runtime.live): one_step_live's row dot products, each input row reading
# all of W again. With more rows the packed kernel (W read once per eight rows) and the check of
# the weights' copy it needs cost less (BENCHMARKS.md, eleventh session).
LIVE_STEP_MAX_ROWS = 2


# A live step splits its hidden units over the threads (one_step_live_split) from this many
# bytes of W_ih and W_hh: where they outgrow one core's L2, two cores stream them faster. The
# team costs about 8 us: below L2's size a split step lost (input 64, hidden 128: 9 -> 18 us;
# 100/200, 0.9 MiB: 22 -> 24), above it won (64/256, 1.25 MiB: 1.09x; 128/256: 1.5x; 128/512:
# 1.5x; 256/1024: 2.1x), kernel level at 2 threads (BENCHMARKS.md, twelfth session).
LIVE_SPLIT_MIN_WEIGHT_BYTES = 5 << 18


def live_split(threads: int, in_features: int, H: int, P: int, itemsize: int) -> int:
    """The team size a live step of one layer-direction runs on: `threads` where splitting its
    hidden units pays, else 0 (one thread). Models with a projection run unsplit."""
    split = threads > 1 and P == H and (in_features + H) * 4 * H * itemsize >= LIVE_SPLIT_MIN_WEIGHT_BYTES
    return threads if split else 0


def one_live_step(shape, batch_first: bool, input_size: int) -> bool:
    """Whether input `shape` (batched 3-D or unbatched 2-D) is one step of at most
    LIVE_STEP_MAX_ROWS rows of `input_size` features."""
    if len(shape) == 3:
        N, T = (shape[0], shape[1]) if batch_first else (shape[1], shape[0])
    elif len(shape) == 2:
        N, T = 1, shape[0]
    else:
        return False
    return T == 1 and N <= LIVE_STEP_MAX_ROWS and shape[-1] == input_size


def live_lane(config: LSTMConfig, shape) -> bool:
    """Whether a live Runtime of this model (the module's fast path) runs a call on input `shape`
    on its layers as they are, with no packed copy to check (Runtime.live_step)."""
    return not config.needs_variant_kernel(training=False) and one_live_step(shape, config.batch_first,
                                                                             config.input_size)


class Runtime:
    """An LSTM forward pass on numpy arrays (float32 or float64, the dtype of the weights).

    Variants run in their inference form, as in module.eval(): layer_norm and peephole as
    trained, zoneout with its expectation (each unit keeps p of its previous value), and
    the training-only noise (dropout, recurrent_dropout, weight_drop) not at all.
    """

    def __init__(self, config: LSTMConfig, weights: dict[str, np.ndarray]):
        self.config = config
        dtypes = {np.asarray(w).dtype for w in weights.values()}
        if len(dtypes) != 1 or not dtypes <= {np.dtype(np.float32), np.dtype(np.float64)}:
            raise TypeError(f"weights must all be float32 or all float64, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self._D, self._LD = config.num_directions, config.num_directions * config.num_layers
        self._P = config.real_hidden_size
        self._I, self._H, self._L = config.input_size, config.hidden_size, config.num_layers
        self._batch_first = config.batch_first
        self._sizes = (self.dtype, self._I, self._H, self._P, self._D, self._LD)
        # ((h_n, c_n), input shape, T, N) of the last batched call: what a streaming caller
        # feeds back next. One attribute, so a reader never sees half of another thread's update.
        self._returned = (None, None, 0, 0)
        # Per layer-direction, in h0/c0 order (layer-major): (w_ih (4H, I), w_hh (4H, P), b_ih,
        # b_hh (4H,) (zeros without bias), w_hr (P, H) or (0, H)) for the variant kernel, and
        # the plain kernel's (wp, b = b_ih + b_hh, wpr), laid out once here.
        H, dt = config.hidden_size, self.dtype
        self.layers = []
        self._variant = config.needs_variant_kernel(training=False)
        self._variant_args = []
        self._packed = []
        self.threads = 1  # row chunks run at once (the torch engine's fast path sets torch's count)
        self._single = config.num_layers == 1 and not config.bidirectional and not self._variant
        self._one_step_lane = {}  # (input shape, threads) -> _one_step's plan for it (_one_step_plan)
        for k in range(config.num_layers):
            for d in range(config.num_directions):
                sfx = f"_l{k}{LSTMConfig.suffix(d)}"
                w = {n: np.ascontiguousarray(v, dtype=dt) for n, v in weights.items() if n.endswith(sfx)}
                zeros = np.zeros(4 * H, dt)
                b_ih, b_hh = (w["bias_ih" + sfx], w["bias_hh" + sfx]) if config.bias else (zeros, zeros)
                w_hr = w.get("weight_hr" + sfx, np.zeros((0, H), dt))
                self.layers.append((w["weight_ih" + sfx], w["weight_hh" + sfx], b_ih, b_hh, w_hr))
                wp, wpr = pack_forward(w["weight_ih" + sfx], w["weight_hh" + sfx], w_hr if w_hr.shape[0] else None)
                self._packed.append((wp, b_ih + b_hh, wpr))
                if self._variant:  # the variant kernel's extra arguments; an empty array = "off"
                    ln = [w.get(f"layer_norm_{part}_{kind}{sfx}", np.zeros(0, dt))
                          for part in ("ih", "hh", "cell") for kind in ("weight", "bias")]
                    peep = w.get("weight_peephole" + sfx, np.zeros((3, H), dt))  # zeros: no peepholes
                    self._variant_args.append((b_ih + b_hh, *ln, peep, _variant_pack(w["weight_hh" + sfx], w_hr, w["weight_ih" + sfx])))
        # The first layer-direction's weights by address (one_step_live_at, step_at): self.layers
        # holds the arrays, so the addresses stay valid while this runtime lives. Then the count
        # of rows read on them (lstm.live_turn), which every live step of this runtime shares.
        self._live_addrs = np.array([a.ctypes.data for a in self.layers[0]] + [0], np.int64)
        self._live_turns = np.zeros((len(self.layers), LIVE_TURN + 1), np.int64)  # the others' counts (_turn)
        self._no_cells = np.zeros((0, H), dt)  # the kernel saves c_t and the activations for training only
        self._no_acts = np.zeros((0, 4 * H), dt)
        self._no_xproj = self._no_acts
        self._no_wg = np.zeros(0, dt)  # no BLAS-packed weights (kernels/numba/blas.py)
        self.blas = None  # a packed-GEMM provider (engines/numba/mkl.py's use, pack, pack_parts), set by the torch engine
        # True (the torch engine's fast path, whose weights are its module's parameters): one-step
        # calls read self.layers as they are (kernels/numba/lstm.one_step_live), not the packed copy,
        # so they see any change to them with no check (see live_step).
        self.live = False
        self._gemm = {}  # (layer-direction, x W_ih^T precomputed, packed as A) -> its (address, packed W)
        self._one_chunk = {}  # N -> the bounds of one chunk of N rows
        self._columns = {}  # (layer-direction, threads) -> its weights split by hidden units
        self._batch_sizes = {}  # (T, N) -> int64 array [N] * T
        self._zero_bias = np.zeros(4 * H, dt)  # the variant kernel adds the bias itself (after layer norm)
        self._zoneout_eval = {}  # total rows -> zoneout's d at inference (p everywhere), made once

    # ---- the module's attributes, for code that reads them ----------------------------------
    def __getattr__(self, name):
        if name != "config" and "config" in self.__dict__ and hasattr(self.config, name):
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"lstmkit.runtime.Runtime({self.config}, dtype={self.dtype})"

    def initial_state(self, batch: int | None = None):
        """Zero (h, c): batched (D*L, batch, P)/(D*L, batch, H), or unbatched when batch is None."""
        h_shape, c_shape = self.config.state_shapes(1 if batch is None else batch)
        h, c = np.zeros(h_shape, self.dtype), np.zeros(c_shape, self.dtype)
        return (h[:, 0], c[:, 0]) if batch is None else (h, c)

    # ---- forward -------------------------------------------------------------------------------
    # Written for the one-step, batch-1 streaming call, where the kernel itself takes a few
    # microseconds: feeding back the state the previous call returned, with an input shaped like
    # the previous one, skips every check (they passed when those arrays were made).
    def __call__(self, x, state=None):
        if self._single:
            out = self._one_step(x, state)
            if out is not None:
                return out
        dt, I, H, P, D, LD = self._sizes
        returned_state, returned_shape, T, N = self._returned
        if (state is not None and state is returned_state and type(x) is np.ndarray
                and x.shape == returned_shape and x.dtype is dt):
            batched, (h0, c0) = True, state
        else:
            x, batched, T, N, h0, c0 = self._checked(x, state)

        # Padded data is packed data with batch_sizes [N] * T: rows (T*N, I), time-major.
        bsz = self._batch_sizes.get(T * 1000003 + N)
        if bsz is None:
            if len(self._batch_sizes) > 256:  # many distinct lengths: keep the cache small
                self._batch_sizes.clear()
            bsz = self._batch_sizes[T * 1000003 + N] = np.full(T, N, np.int64)
        x_in = x
        if batched and self._batch_first:
            x = x.transpose(1, 0, 2)  # (T, N, I)
        x = x.reshape(T * N, I)  # copies only when it must
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        h_n = np.empty((LD, N, P), dt)  # (D*L, N, P)
        c_n = np.empty((LD, N, H), dt)  # (D*L, N, H)
        live = T == 1 and N <= LIVE_STEP_MAX_ROWS and self.live and not self._variant
        if live:  # the parameters as they are (see live_step)
            x = self._live_step_layers(x, h0, c0, h_n, c_n, N)  # (N, D*P)
        elif self._single:  # one layer, one direction, no variant: the common streaming model
            y = pooled_empty((T * N, P), dt)  # where big, a pooled mapping (kernels/numba/buffers.py)
            self._plain_layer(0, x, bsz, h0[0], c0[0], False, y, h_n[0], c_n[0], T, N)
            x = y
        for k in range(0 if self._single or live else self._L):
            y = pooled_empty((T * N, P) if D == 1 else (D, T * N, P), dt)
            if D == 2 and self._directions_at_once():
                self._both_directions(k, x, bsz, h0, c0, y, h_n, c_n, T, N)
            else:
                for d in range(D):
                    idx = k * D + d
                    if self._variant:
                        self._variant_layer(idx, x, bsz, h0, c0, d == 1, y if D == 1 else y[d], h_n, c_n)
                        continue
                    self._plain_layer(idx, x, bsz, h0[idx], c0[idx], d == 1, y if D == 1 else y[d], h_n[idx],
                                      c_n[idx], T, N)
            # (T*N, D*P): both directions side by side, as the next layer reads them
            x = y if D == 1 else np.concatenate((y[0], y[1]), axis=1)

        if not batched:
            return x, (h_n.reshape(LD, P), c_n.reshape(LD, H))  # (T, D*P), (D*L, P), (D*L, H)
        x = x.reshape(T, N, D * P)
        if self._batch_first:
            x = x.transpose(1, 0, 2)  # (N, T, D*P)
        state = (h_n, c_n)
        self._returned = (state, x_in.shape, T, N)
        return x, state

    def _one_step(self, x, state):
        """The streaming call of a one-layer, one-direction model: one time step, batched,
        C-contiguous, small enough for one thread (else None: the general path runs). The same
        kernel as the general path, with only the checks this case needs."""
        if type(x) is not np.ndarray or x.dtype is not self.dtype:
            return None
        lane = self._one_step_lane.get((x.shape, self.threads))
        if lane is None:
            lane = self._one_step_plan(x.shape)
        if not lane or not x.flags.c_contiguous:
            return None
        returned = self._returned  # read once: another thread may replace it meanwhile
        if state is None:
            state = lane[3]  # zeros, read only by the kernel, never handed out
        elif not (state is returned[0] and x.shape == returned[1]):
            state = self._check_state(state, lane[1][1], True)
        return self.step_on(lane, x, state)

    def step_lane(self, shape):
        """The plan a one-step call on a C-contiguous batched array of `shape` runs on at the
        current thread count, where it reads the parameters as they are (live_step): a one-layer,
        one-direction model's _one_step_plan, or every layer-direction's live step (y, h, c
        shapes, zero state, True, 0); else None. The module's streaming lane keeps it, and calls
        step_on with it directly while its shape, threads and parameters stay the same."""
        if self._single:
            lane = self._one_step_lane.get((shape, self.threads))
            return lane if lane and lane[4] else None
        if len(shape) != 3 or not self.live_step(shape):
            return None
        lane = self._one_step_lane.get((shape, self.threads))  # _one_step never reads it here
        if lane is None:  # every layer-direction live (_live_step_layers): the same fields
            N, dt, P, H, LD = shape[0] if self._batch_first else shape[1], self.dtype, self._P, self._H, self._LD
            zeros = (np.zeros((LD, N, P), dt), np.zeros((LD, N, H), dt))
            lane = (shape[:2] + (self._D * P,), (LD, N, P), (LD, N, H), zeros, True, 0)
            if len(self._one_step_lane) > 64:
                self._one_step_lane.clear()
            self._one_step_lane[(shape, self.threads)] = lane
        return lane

    def step_on(self, lane, x, state):
        """One step of x on `lane` (_one_step_plan's or step_lane's) from `state` (h0, c0),
        checked by the caller: y, (h_n, c_n), new arrays."""
        y_shape, h_shape, c_shape, _, live, split = lane
        dt = self.dtype
        h0, c0 = state
        if not self._single:  # every layer and direction, live
            N = h_shape[1]
            h_n, c_n = np.empty(h_shape, dt), np.empty(c_shape, dt)
            y = self._live_step_layers(x.reshape(N, x.shape[2]), h0, c0, h_n, c_n, N).reshape(y_shape)
            state = (h_n, c_n)
            self._returned = (state, x.shape, 1, N)
            return y, state
        y, h_n, c_n = np.empty(y_shape, dt), np.empty(h_shape, dt), np.empty(c_shape, dt)
        if live:
            w_ih, w_hh, b_ih, b_hh, w_hr = self.layers[0]
            turn = self._turn(0, x.shape[0] * x.shape[1])
            if not (split and one_step_live_split(split, x, h0, c0, w_ih, w_hh, b_ih, b_hh, y, h_n, c_n, turn)):
                one_step_live(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, h_n, c_n, turn)
        else:
            wp, b, wpr = self._packed[0]
            one_step(x, h0, c0, wp, b, wpr, y, h_n, c_n)
        state = (h_n, c_n)
        self._returned = (state, x.shape, 1, h_shape[1])
        return y, state

    def _turn(self, i: int, rows: int) -> int:
        """lstm.live_turn for layer-direction i's one_step_live of `rows` rows (layer 0's count is
        the one step_at's kernel counts in self._live_addrs)."""
        return int(live_turn.py_func(self._live_addrs if i == 0 else self._live_turns[i], rows))

    def step_at(self, lane, x_addr: int, shape, state):
        """step_on for a lane of a one-layer, one-direction model that runs one_step_live on one
        thread (lane[4] and not lane[5]: step_lane's, see at_lane), with x given by its address
        (x_addr: C-contiguous memory of `shape`, the lane's, and this runtime's dtype, kept alive
        by the caller through the call)."""
        y_shape, h_shape, c_shape = lane[0], lane[1], lane[2]
        dt = self.dtype
        y, h_n, c_n = np.empty(y_shape, dt), np.empty(h_shape, dt), np.empty(c_shape, dt)
        one_step_live_at(x_addr, self._I, state[0], state[1], self._live_addrs, y, h_n, c_n)
        state = (h_n, c_n)
        self._returned = (state, shape, 1, h_shape[1])
        return y, state

    def at_lane(self, lane) -> bool:
        """Whether step_at runs `lane` (step_lane's): one layer-direction, live, unsplit."""
        return self._single and bool(lane[4]) and not lane[5]

    def live_step(self, shape) -> bool:
        """Whether a call on a C-contiguous array of `shape` runs one_step_live on every
        layer-direction (self.live: the module's fast path): it then reads self.layers, the
        module's parameters, not a packed copy of them. One step of at most LIVE_STEP_MAX_ROWS
        rows, any model without a variant kernel, whatever the thread count."""
        return self.live and not self._variant and one_live_step(shape, self._batch_first, self._I)

    def _live_step_layers(self, x, h0, c0, h_n, c_n, N: int):
        """One step of N rows through every layer-direction on self.layers as they are
        (one_step_live; one step runs the same in either direction). x (N, I); h0, c0 (D*L, N, P),
        (D*L, N, H) in; h_n, c_n likewise, out. Returns the last layer's output (N, D*P)."""
        dt, P, D = self.dtype, self._P, self._D
        for k in range(self._L):
            y = np.empty((D, N, P), dt)
            for d in range(D):
                i = k * D + d
                w_ih, w_hh, b_ih, b_hh, w_hr = self.layers[i]
                args = (x.reshape(1, N, x.shape[1]), h0[i:i + 1], c0[i:i + 1], w_ih, w_hh, b_ih, b_hh)
                outs = (y[d:d + 1], h_n[i:i + 1], c_n[i:i + 1])
                split = live_split(self.threads, x.shape[1], self._H, P, dt.itemsize)
                turn = self._turn(i, N)
                if not (split and one_step_live_split(split, *args, *outs, turn)):
                    one_step_live(*args, w_hr, *outs, turn)
            x = y[0] if D == 1 else np.concatenate((y[0], y[1]), axis=1)
        return x

    def _one_step_plan(self, shape):
        """For _one_step, per (input shape, threads): (y, h, c shapes, zero state, whether it runs
        live: see live_step) where a call of that shape is one step on one thread, else False
        (the general path: other shapes, or a step worth splitting over the threads)."""
        lane = False
        if len(shape) == 3 and shape[2] == self._I:
            N, T = (shape[0], shape[1]) if self._batch_first else (shape[1], shape[0])
            live = self.live_step(shape)  # the parameters as they are, unsplit
            if T == 1 and (live or self.threads == 1 or not (
                    N * (self._I + self._P) * 4 * self._H >= MIN_SPLIT_MACS
                    or columns_pay(N, 1, self._I, self._H, self._P, self.dtype.itemsize, self.threads))):
                dt, H, P = self.dtype, self._H, self._P
                zeros = (np.zeros((1, N, P), dt), np.zeros((1, N, H), dt))
                split = live_split(self.threads, self._I, H, P, dt.itemsize) if live else 0
                lane = (shape[:2] + (P,), (1, N, P), (1, N, H), zeros, live, split)
        if len(self._one_step_lane) > 64:  # many distinct shapes: keep the cache small
            self._one_step_lane.clear()
        self._one_step_lane[(shape, self.threads)] = lane
        return lane

    def _plain_layer(self, idx, x, bsz, h0, c0, reverse, y, h_n, c_n, T: int, N: int):
        """Layer-direction idx on the plain kernel, into y, h_n, c_n; x W_ih^T + b as one GEMM
        first where the kernels' rule says it pays (precompute_input)."""
        wp, b, wpr = self._packed[idx]
        if self.threads > 1 and self._by_columns(idx, x, bsz, h0, c0, reverse, y, h_n, c_n, T, N):
            return
        if self._one_small_step(T, N):
            # One step, one chunk: straight into the compiled loop (the Python around it is most
            # of such a call's time).
            forward_chunk(x, bsz, h0, c0, wp, b, wpr, self._no_xproj, 0, self._no_wg, reverse, self._no_acts, y,
                          h_n, c_n, self._no_cells, False, 0, N)
            return
        bounds = self._bounds(bsz, N, T)
        chunks = bounds.shape[0] - 1
        w_ih = self.layers[idx][0]
        rows = -(-N // chunks)
        pre = T > 1 and precompute_input(N, T, w_ih.shape[1], self._H, self._P, x.itemsize, chunks,
                                         self._fused_on_blas(w_ih.shape[1], rows))
        xproj = self.input_projection(x, w_ih, b) if pre else None
        gemm, wg = self._gemm_weights(idx, pre, rows, bool(bsz[0] == bsz[-1]))
        forward_core(x, bsz, h0, c0, wp, b, wpr, reverse, self._no_acts, y, h_n, c_n, self._no_cells, False,
                     bounds, xproj, gemm, wg)

    def _one_small_step(self, T: int, N: int) -> bool:
        """A call of one step with too little work to split or to hand to a BLAS."""
        return T == 1 and N * (self._I + self._P) * 4 * self._H < MIN_SPLIT_MACS

    def _directions_at_once(self) -> bool:
        """Whether a bidirectional layer runs its two directions at once, one thread each (no
        variant kernel; 2-3 threads, where that uses the threads as fully as splitting the rows
        of each direction, needs no rows to split, and reads each direction's weights once per
        step for all N rows; BENCHMARKS.md, eleventh session)."""
        return not self._variant and 2 <= self.threads <= 3

    def _both_directions(self, k, x, bsz, h0, c0, y, h_n, c_n, T: int, N: int):
        """Layer k's two directions at once (threads.run_pair), each one chunk of all N rows on
        its weights packed as _plain_layer's; x W_ih^T + b made first for each, where the rule
        says (precompute_input for one chunk), on all threads."""
        calls = []
        for d in range(2):
            idx = 2 * k + d
            wp, b, wpr = self._packed[idx]
            w_ih = self.layers[idx][0]
            pre = T > 1 and precompute_input(N, T, w_ih.shape[1], self._H, self._P, x.itemsize, 1,
                                             self._fused_on_blas(w_ih.shape[1], N))
            xproj = self.input_projection(x, w_ih, b, d) if pre else self._no_xproj
            # One small step on the micro-kernel, as _plain_layer's: the same bits as one thread
            # (a BLAS may sum a row in another order; MKL does on AMD Zen at 5-11 rows).
            gemm, wg = (0, self._no_wg) if self._one_small_step(T, N) else self._gemm_weights(idx, pre, N)
            calls.append((x, bsz, h0[idx], c0[idx], wp, b, wpr, xproj, gemm, wg, d == 1, self._no_acts, y[d],
                          h_n[idx], c_n[idx], self._no_cells, False, 0, N))
        run_pair(forward_chunk, *calls, body=forward_pair_body)

    def _fused_on_blas(self, I: int, rows: int) -> bool:
        """Whether a step product of `rows` rows by [W_ih | W_hh]^T (input I) goes to the BLAS."""
        return self.blas is not None and self.blas.use(I + self._P, 4 * self._H, rows, self.dtype, forward=True)

    def _gemm_weights(self, idx, pre: bool, rows: int, padded: bool = False):
        """(address, packed W) of a BLAS's packed GEMM for the step products (kernels/numba/blas.py)
        where one is plugged in (`blas`: the torch engine's fast path sets MKL's) and pays for
        chunks of `rows` rows; else (0, empty): the micro-kernel. Packed once per layer-direction
        (and way: padded input of chunks of the same rows at every step may take W packed as the
        A matrix, blas.packs_as_a)."""
        w_ih, w_hh = self.layers[idx][:2]
        K = w_hh.shape[1] if pre else w_ih.shape[1] + w_hh.shape[1]
        if self.blas is None or not self.blas.use(K, w_hh.shape[0], rows, self.dtype, forward=True):
            return 0, self._no_wg
        as_a = padded and self.blas.packs_as_a(K, w_hh.shape[0], rows)
        got = self._gemm.get((idx, pre, as_a))
        if got is None:
            w = w_hh if pre else np.concatenate((w_ih, w_hh), axis=1)
            got = self._gemm[(idx, pre, as_a)] = self.blas.pack(w, True, rows, padded=True, as_a=as_a)  # forward_chunk's
        return got

    def _by_columns(self, idx, x, bsz, h0, c0, reverse, y, h_n, c_n, T: int, N: int) -> bool:
        """Layer-direction idx with its hidden units split over the threads (kernels/numba/
        columns.py) where that pays: a few rows (columns_pay), or wide weights at a batch with a
        BLAS for the products (wide_columns_pay), or with the micro-kernel's where the BLAS is
        there but not wanted on this CPU, as are more rows on the biggest weights
        (big_weights_columns_pay); False, having run nothing, where it does not or where no
        OpenMP team is at hand."""
        H, P, itemsize = self._H, self._P, x.itemsize
        few = columns_pay(N, T, self._I, H, P, itemsize, self.threads)
        wide = not few and wide_columns_pay(N, self._I, H, P, itemsize, self.threads, inference=True)
        big = not (few or wide) and big_weights_columns_pay(N, H, P, itemsize, self.threads)
        if not (few or wide or big):
            return False
        on_blas = False
        if wide:  # the input rides in the step products (columns.py, wide_columns_pay)
            K = self.layers[idx][0].shape[1] + H
            on_blas = self.blas is not None and self.blas.use(K, 4 * -(-H // self.threads), N, self.dtype,
                                                              forward=True)
        # Or on the micro-kernel's products, where the BLAS is there but not wanted (MKL off
        # Intel CPUs); more rows on the biggest weights take that route only. AMD EPYC, 2 threads,
        # vs torch.nn.LSTM, rows split -> this: 200,8,128,384 0.71-0.81x -> 1.01-1.04x,
        # 200,12,128,256 0.84-0.88x -> 1.04-1.11x, 100,24-32,128,512 0.84-0.95x -> 0.92-1.00x
        # (BENCHMARKS.md, seventeenth session). Training lost with it at those sizes (0.73-0.96x
        # against 0.92-1.03x): the engine's training takes it on the biggest weights only.
        if (wide or big) and not on_blas and (self.blas is None or self.blas.wanted()):
            return False
        wide = wide or big
        pre = not wide and columns_precompute(T, self._I, H, itemsize, self.threads)
        # Padded input: the parts' products may take W_s as MKL's A matrix (blas.packs_as_a).
        as_a = on_blas and bsz[0] == bsz[-1] and self.blas.packs_as_a(self._I + H, 4 * -(-H // self.threads), N)
        key = (idx, self.threads, wide, on_blas, as_a)
        packed = self._columns.get(key)
        if packed is None:
            w_ih, w_hh, b_ih, b_hh, _ = self.layers[idx]
            wps, bps, units = pack_columns(w_ih, w_hh, b_ih + b_hh, self.threads, panels=not on_blas)
            gemm, wgs = self.blas.pack_parts(w_ih, w_hh, units, False, N, as_a) if on_blas else (0, None)
            packed = self._columns[key] = (wps, bps, units, gemm, wgs)
        wps, bps, units, gemm, wgs = packed
        xproj = self.input_projection(x, self.layers[idx][0], self._packed[idx][1]) if pre else None
        return run_columns(self.threads, x, bsz, h0, c0, wps, bps, units, reverse, y, h_n, c_n, xproj,
                           gemm=gemm, wgs=wgs)

    # x W_ih^T + b before the loop: numpy's BLAS here; the torch engine's fast path sets torch's GEMM
    input_projection = staticmethod(input_projection)

    def _bounds(self, bsz, N: int, T: int):
        """Row chunks for `threads` threads (one when the call is too small to share)."""
        chunks = chunks_for(N, T * N * (self._I + self._P) * 4 * self._H, self.threads)
        if chunks > 1:
            return chunk_bounds(bsz, chunks)
        one = self._one_chunk.get(N)
        if one is None:
            one = self._one_chunk[N] = np.array([0, N], np.int64)
        return one

    def _checked(self, x, state):
        """The module's checks on input and state: (x, batched, T, N, h0 (LD, N, P), c0 (LD, N, H))."""
        dt, I, H, P, D, LD = self._sizes
        if type(x) is not np.ndarray:
            x = np.asarray(x)
        if x.ndim not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {x.ndim}D instead")
        if x.dtype != dt:
            raise ValueError(
                f"input dtype ({x.dtype}) does not match weight dtype ({dt}); convert it with x.astype(np.{dt})"
            )
        if x.shape[-1] != I:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {I}, got {x.shape[-1]}")
        batched = x.ndim == 3
        if not batched:
            T, N = x.shape[0], 1
        elif self._batch_first:
            N, T = x.shape[0], x.shape[1]
        else:
            T, N = x.shape[0], x.shape[1]
        if T == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if state is None:
            return x, batched, T, N, np.zeros((LD, N, P), dt), np.zeros((LD, N, H), dt)
        return (x, batched, T, N, *self._check_state(state, N, batched))

    def _variant_layer(self, idx, x, bsz, h0, c0, reverse, y, h_n, c_n):
        """Layer-direction idx through the variant kernel (kernels/variants.py), inference form, on
        weights packed once at build: x W_ih^T as one GEMM first where the plain kernel's rule
        says it pays (precompute_input), else per step in the loop."""
        dt, H, P = self.dtype, self._H, self._P
        total, N, T = x.shape[0], int(bsz[0]), bsz.shape[0]
        w_ih, w_hh, _, _, w_hr = self.layers[idx]
        b, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, peep, packed = self._variant_args[idx]
        zc, zh = self._zoneout_masks(total)
        empty = lambda *shape: np.empty(shape, dt)  # noqa: E731
        bounds = self._bounds(bsz, N, T)
        projected = precompute_input(N, T, w_ih.shape[1], H, P, x.itemsize,
                                     bounds.shape[0] - 1, few_rows=False)
        acts = self.input_projection(x, w_ih, self._zero_bias) if projected else self._no_acts  # (total, 4H)
        gemm, wg = self._variant_gemm_weights(idx, -(-N // (bounds.shape[0] - 1)))
        _variant_forward(
            x, bsz, h0[idx], c0[idx], w_ih, w_hh, b, w_hr, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
            peep, zc, zh, empty(0, P), reverse, acts, y, h_n[idx], c_n[idx],
            empty(0, H), empty(0, H), empty(0, 4 * H), empty(0, 4 * H), empty(0, H), empty(0, 3), False,
            bounds, projected=projected, packed=packed, gemm=gemm, wg=wg,
        )

    def _variant_gemm_weights(self, idx, rows: int):
        """(address, packed W_hh^T) of a BLAS's packed GEMM for the variant kernel's recurrent
        products, as the torch engine's variant path takes them (engines/numba/variants._gemm),
        where one is plugged in and pays for chunks of `rows` rows; else (0, None): the
        micro-kernel. Packed once per layer-direction."""
        w_hh = self.layers[idx][1]
        if self.blas is None or not self.blas.use(w_hh.shape[1], w_hh.shape[0], rows, self.dtype):
            return 0, None
        got = self._gemm.get((idx, "variant"))
        if got is None:
            got = self._gemm[(idx, "variant")] = self.blas.pack(w_hh, True, rows, padded=True)
        return got

    def _zoneout_masks(self, total: int):
        """zoneout at inference: d = p for every row and unit (0 rows: off), kept per row count."""
        masks = self._zoneout_eval.get(total)
        if masks is None:
            dt, H, P = self.dtype, self._H, self._P
            p_c, p_h = self.config.zoneout_probs
            if len(self._zoneout_eval) > 16:
                self._zoneout_eval.clear()
            masks = self._zoneout_eval[total] = (
                np.full((total, H), p_c, dt) if p_c > 0 else np.zeros((0, H), dt),
                np.full((total, P), p_h, dt) if p_h > 0 else np.zeros((0, P), dt),
            )
        return masks

    def _check_state(self, state, N: int, batched: bool):
        """(h0, c0) as C-contiguous (D*L, N, P) / (D*L, N, H) arrays, checked like the module does."""
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError("state should be a tuple (h_0, c_0) of two arrays, or None")
        h0, c0 = state
        if type(h0) is not np.ndarray or type(c0) is not np.ndarray:
            h0, c0 = np.asarray(h0), np.asarray(c0)
        want = 3 if batched else 2
        if h0.ndim != want or c0.ndim != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {want}-D but got ({h0.ndim}-D, {c0.ndim}-D) arrays"
            )
        LD, P, H = self._LD, self._P, self._H
        shapes = ((LD, N, P), (LD, N, H)) if batched else ((LD, P), (LD, H))
        for k, (t, shape) in enumerate(((h0, shapes[0]), (c0, shapes[1]))):
            if t.shape != shape:
                raise RuntimeError(f"Expected hidden[{k}] size {shape}, got {list(t.shape)}")
            if t.dtype != self.dtype:
                raise ValueError(f"hidden[{k}] dtype ({t.dtype}) does not match weight dtype ({self.dtype})")
        if not batched:
            h0, c0 = h0.reshape(LD, 1, P), c0.reshape(LD, 1, H)
        if not h0.flags.c_contiguous:
            h0 = np.ascontiguousarray(h0)
        if not c0.flags.c_contiguous:
            c0 = np.ascontiguousarray(c0)
        return h0, c0
