"""`lstmkit.LSTM` and `lstmkit.LSTMCell`: drop-ins for torch.nn.LSTM / nn.LSTMCell.

The module does the bookkeeping (argument checks, PackedSequence, batch_first,
unbatched input, layers x directions, inter-layer dropout); an engine runs each
layer-direction over packed data (engines/reference.py has the equations).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence

from ..config import LSTMConfig
from .. import engines
from ..engines import LayerParams, check_engine_name, get_layer_fn, get_pair_fn
from ..engines.base import PaddedSizes
from . import autocast, variants
from ..engines.numba import compile_ops as _compile_ops  # noqa: F401  (registers lstmkit::lstm_forward, see there)


_FAST_DTYPES = (torch.float32, torch.float64)


def _run_inference(runtime, x, state):
    """engines/numba/binding.run_inference, imported on the first call (it loads numba)."""
    global _run_inference
    from ..engines.numba.binding import run_inference

    _run_inference = run_inference
    return run_inference(runtime, x, state)


def _is_returned(hx, last) -> bool:
    """Whether hx is the very (h, c) pair of tensors the fast path returned last (`last`: its
    (tensors, arrays), or None), which the runtime then takes without checks."""
    return (last is not None and type(hx) in (tuple, list) and len(hx) == 2
            and hx[0] is last[0][0] and hx[1] is last[0][1])


def _state_arrays(hx):
    """hx = (h_0, c_0) as two numpy arrays (views, no copies) for the no-grad fast path, where it
    is a pair of float32/float64 CPU tensors; else None (the general path checks it and raises
    torch's error)."""
    if type(hx) not in (tuple, list) or len(hx) != 2:
        return None
    h, c = hx
    if (type(h) is not torch.Tensor or type(c) is not torch.Tensor or h.dtype not in _FAST_DTYPES
            or c.dtype not in _FAST_DTYPES or not h.is_cpu or not c.is_cpu or h.is_neg() or c.is_neg()):
        return None
    return (h.detach() if h.requires_grad else h).numpy(), (c.detach() if c.requires_grad else c).numpy()


@functools.lru_cache(maxsize=None)
def _layer_names(layer: int, direction: int) -> tuple[str, ...]:
    """The names of a layer-direction's weight_ih, weight_hh, bias_ih, bias_hh, weight_hr (LayerParams' order)."""
    sfx = f"_l{layer}{LSTMConfig.suffix(direction)}"
    return tuple(n + sfx for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))


def _permute(x: torch.Tensor, perm):
    return x if perm is None else x.index_select(1, perm)


class LSTM(nn.Module):
    """Multi-layer LSTM, same constructor, parameters and call as torch.nn.LSTM.

    output, (h_n, c_n) = lstm(input, (h_0, c_0))

      input   (L, N, H_in), (N, L, H_in) with batch_first, (L, H_in) unbatched,
              or a PackedSequence
      h_0     (D*num_layers, N, P)   P = proj_size or hidden_size, D = 2 if bidirectional
      c_0     (D*num_layers, N, H)
      output  (L, N, D*P)  (batch_first: (N, L, D*P))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        engine: str = "auto",
        layer_norm: bool = False,
        peephole: bool = False,
        zoneout=0.0,
        recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0,
        forget_bias: float = 0.0,
    ) -> None:
        super().__init__()
        # Variant options (nn/variants.py); all off = exactly nn.LSTM.
        cfg = LSTMConfig(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            layer_norm=layer_norm, peephole=peephole, zoneout=zoneout,
            recurrent_dropout=recurrent_dropout, weight_drop=weight_drop, forget_bias=forget_bias,
        )
        cfg.warn_if_useless_dropout(stacklevel=3)
        self.config = cfg
        self._variant = cfg.has_variant  # cached: the plain path pays one attribute read
        self.engine = check_engine_name(engine)
        # The same public attributes as torch.nn.LSTM.
        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = cfg.dropout
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names = []
        for name, shape in cfg.param_shapes():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
            self._flat_weights_names.append(name)
        self.reset_parameters()

    # ---- parameters --------------------------------------------------------------------
    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -stdv, stdv)
        if self.config.has_variant:  # LN weights 1 / biases 0, forget_bias
            variants.init_parameters(self)

    @property
    def _flat_weights(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        cfg = self.config
        return [
            [getattr(self, name) for name, _ in cfg.layer_param_shapes(k, d)]
            for k in range(cfg.num_layers)
            for d in range(cfg.num_directions)
        ]

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for cuDNN's flat weight buffer still runs."""

    def layer_params(self, layer: int, direction: int) -> LayerParams:
        # Parameters by plain dict lookup: nn.Module.__getattr__ is slow enough to matter in
        # one-step calls; anything else (e.g. a plain tensor attribute, as torch.func's
        # functional_call puts there) via getattr.
        params = self._parameters
        return LayerParams(*[params[n] if n in params else getattr(self, n, None) for n in _layer_names(layer, direction)])

    # ---- interop -----------------------------------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.LSTM, **kwargs) -> "LSTM":
        """A lstmkit.LSTM with the same configuration and a copy of the weights."""
        w = module.weight_ih_l0
        cfg = LSTMConfig.from_module(module, "LSTM.from_torch")
        new = cls(*cfg.torch_args(), device=w.device, dtype=w.dtype, **kwargs)
        new.load_state_dict(module.state_dict(), strict=True)
        new.train(module.training)
        return new

    def to_torch(self) -> nn.LSTM:
        """The equivalent torch.nn.LSTM with a copy of the weights."""
        if self.config.changes_forward:
            raise ValueError("to_torch: nn.LSTM has no layer_norm/peephole/zoneout/recurrent_dropout/weight_drop")
        w = self.weight_ih_l0
        m = nn.LSTM(**self.config.torch_kwargs(), device=w.device, dtype=w.dtype)
        m.load_state_dict(self.state_dict(), strict=True)
        m.train(self.training)
        return m

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.engine != "auto":
            s += ", engine={engine!r}"
        s = s.format(**self.__dict__)
        c = self.config  # variant options, only when set, so a plain LSTM prints like nn.LSTM
        for name, default in (("layer_norm", False), ("peephole", False), ("zoneout", 0.0),
                              ("recurrent_dropout", 0.0), ("weight_drop", 0.0), ("forget_bias", 0.0)):
            if getattr(c, name) != default:
                s += f", {name}={getattr(c, name)!r}"
        return s

    # ---- input checks (torch's exception types and messages) ---------------------------------
    def _check_input(self, x: torch.Tensor, packed: bool) -> None:
        w = self._parameters.get("weight_ih_l0")
        if w is None:
            w = self.weight_ih_l0
        wdtype = w.dtype
        if x.dtype != wdtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({wdtype}). "
                f"Convert input: input.to({wdtype}), or convert model: model.to({x.dtype})"
            )
        expected = 2 if packed else 3
        if x.dim() != expected:
            raise RuntimeError(f"input must have {expected} dimensions, got {x.dim()}")
        if x.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.size(-1)}"
            )
        if x.device != w.device:
            raise RuntimeError(
                f"Input and parameter tensors are not on the same device, found input on "
                f"{x.device} and parameters on {w.device}"
            )

    def _check_hidden(self, hx, batch: int, x: torch.Tensor) -> None:
        h_shape, c_shape = self.config.state_shapes(batch)
        for k, (t, shape) in enumerate(zip(hx, (h_shape, c_shape))):
            if tuple(t.shape) != shape:
                raise RuntimeError(f"Expected hidden[{k}] size {shape}, got {list(t.shape)}")
            if t.dtype != x.dtype:
                raise RuntimeError(
                    f"hidden[{k}] dtype ({t.dtype}) does not match input dtype ({x.dtype})"
                )
            if t.device != x.device:
                raise RuntimeError(
                    f"hidden[{k}] is on {t.device} but the input is on {x.device}"
                )

    @staticmethod
    def _unpack_hx(hx, cell: bool = False):
        """(h_0, c_0) from hx, with torch's error types: a pair of fewer tensors fails where
        torch.nn.LSTM indexes it (IndexError), more where its kernel counts them (RuntimeError;
        LSTMCell's kernel counts both ways)."""
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"{'LSTMCell' if cell else 'LSTM'} expects hx to be a tuple (h_0, c_0) of two tensors, "
                            f"got {type(hx).__name__}")
        if len(hx) != 2:
            if cell or len(hx) > 2:
                raise RuntimeError(f"{'lstm_cell' if cell else 'lstm'} expects two hidden states, got {len(hx)}")
            raise IndexError(f"LSTM expects hx to be a tuple (h_0, c_0) of two tensors, got {len(hx)}")
        return hx[0], hx[1]

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, input, hx=None):
        cfg = self.config
        if autocast.any_enabled():
            data = input.data if isinstance(input, PackedSequence) else input
            if isinstance(data, torch.Tensor) and autocast.active(data.device.type):
                return self._forward_autocast(input, hx, data.device.type)
        if (type(input) is torch.Tensor and not torch.compiler.is_compiling()  # (the compiler traces none of it)
                and forward_ad._current_level < 0  # no forward-mode AD tangents to carry (engines/__init__.py)
                and not torch._C._is_tracing() and not torch._C._are_functorch_transforms_active()):
            if not torch.is_grad_enabled() or _records_nothing(self, input, hx):
                out = self._inference_fast(input, hx)
            else:
                out = self._train_fast(input, hx)
            if out is not None:
                return out
        if (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export():
            # torch.onnx.export (either exporter) records standard ONNX ops, not an engine call.
            from ..interop.onnx_graph import export_forward

            return export_forward(self, input, hx)
        if isinstance(input, PackedSequence):
            if torch.jit.is_tracing():
                raise RuntimeError("lstmkit.LSTM: torch.jit.trace cannot record a PackedSequence input (its batch "
                                   "sizes would be held as constants); trace with padded input, or use torch.compile")
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            self._check_input(data, packed=True)
            batch_sizes = batch_sizes_t.tolist()
            batch = batch_sizes[0]
            if hx is not None:
                h0, c0 = self._unpack_hx(hx)
                self._check_hidden((h0, c0), batch, data)
                h0, c0 = _permute(h0, sorted_indices), _permute(c0, sorted_indices)
            y, (h_n, c_n) = self._run(data, batch_sizes, hx is not None and (h0, c0))
            out = PackedSequence(y, batch_sizes_t, sorted_indices, unsorted_indices)
            return out, (_permute(h_n, unsorted_indices), _permute(c_n, unsorted_indices))

        if not isinstance(input, torch.Tensor):
            raise TypeError(
                f"LSTM: expected input to be a Tensor or PackedSequence, got {type(input).__name__}"
            )
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is not None:
            h0, c0 = self._unpack_hx(hx)
            want = 3 if batched else 2
            if h0.dim() != want or c0.dim() != want:
                kind = "batched 3-D" if batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                )
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        self._check_input(input, packed=False)
        if self.batch_first:
            input = input.transpose(0, 1)
        L, N, _ = input.shape
        if L == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if hx is not None:
            self._check_hidden((h0, c0), N, input)

        if torch.jit.is_tracing():
            input, hx_shaped, L, N = self._traced_shapes(input, hx is not None and (h0, c0))
            if hx is not None:
                h0, c0 = hx_shaped
        # padded = packed with batch_sizes [N]*L (_run hands the engine the rows as it takes them)
        batch_sizes = PaddedSizes(L, N) if torch.compiler.is_compiling() else [N] * L  # (base.PaddedSizes)
        y, (h_n, c_n) = self._run(input, batch_sizes, hx is not None and (h0, c0))
        if y.dim() == 2:
            y = y.view(L, N, cfg.output_size)
        if self.batch_first:
            y = y.transpose(0, 1)
        if not batched:
            y = y.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return y, (h_n, c_n)

    # ---- torch.jit.trace ------------------------------------------------------------------------
    def _traced_shapes(self, input, hx):
        """(input, hx, L, N) for a call torch.jit.trace records. The trace holds the example's sequence
        length and batch as constants (the sizes are traced tensors here; the engines take ints),
        so the input and state are first expanded to exactly those sizes: replayed on any other
        shape, the trace raises there (expand refuses a size that differs unless it is 1, and the
        reshape after it refuses another count of elements) instead of computing on misread rows."""
        L, N = int(input.shape[0]), int(input.shape[1])
        input = input.expand(L, N, input.shape[2])
        if hx:
            hx = tuple(t.expand(int(t.shape[0]), N, int(t.shape[2])) for t in hx)
        return input, hx, L, N

    # ---- torch.autocast (nn/autocast.py has the rules) ------------------------------------------
    def _forward_autocast(self, input, hx, device_type):
        packed = isinstance(input, PackedSequence)
        plan = autocast.lstm_plan(device_type, autocast.current_dtype(device_type), packed=packed,
                                  proj_size=self.proj_size)
        with torch.autocast(device_type, enabled=False):  # the engines compute in the plan's dtype only
            if plan.compute is None:
                return self.forward(input, hx)
            if packed:
                input = input._replace(data=autocast.cast(input.data, plan.compute))
            else:
                input = autocast.cast(input, plan.compute)
            params = autocast.cast_parameters(self, plan.compute)
            y, (h_n, c_n) = torch.func.functional_call(self, params, (input, autocast.cast(hx, plan.compute)))
        if plan.c_n is not None:
            c_n = c_n.to(plan.c_n)
        return y, (h_n, c_n)

    # ---- inference fast path --------------------------------------------------------------
    # A one-step call at batch 1 costs a few microseconds of arithmetic and tens of
    # microseconds of Python in the general path (checks, layers x directions, tensor <->
    # numpy per layer). With no gradient to record, a CPU tensor of float32/float64 goes
    # instead through the torch-free runtime (runtime/model.py: the same fused kernels,
    # the whole stack in one call), built from this module's weights and rebuilt when any
    # parameter changes: in-place updates bump `_version`, `p.data = ...` moves data_ptr, and
    # what neither shows (p.data.clamp_(), a write through a numpy view) makes the weights'
    # bits differ from the copy taken at build (engines/numba/binding.WeightWatch).
    def _inference_fast(self, input, hx):
        if (input.dtype not in _FAST_DTYPES or not input.is_cpu or input.is_neg() or self.engine not in ("auto", "numba")
                or (self.training and ((self.dropout > 0 and self.config.num_layers > 1) or self._variant))):
            return None
        lane = self.__dict__.get("_lane")
        if lane is not None and input.shape == lane[0]:
            out = self._on_lane(lane, input, hx)
            if out is not None:
                return out
        if input.dim() not in (2, 3):
            return None  # the general path raises torch's error
        if list(self._parameters) != self._flat_weights_names:
            # A weight made by a parametrization, pruning or weight norm (no longer a parameter of
            # its own, computed at each call): the general path reads it as the call finds it.
            return None
        steps = input.shape[1] if self.batch_first and input.dim() == 3 else input.shape[0]
        if steps == 1 and self._live_step(input.dtype, input.shape):
            return None  # the general path reads big weights as they are at one step (binding.live_step)
        key = [(p._version, p.data_ptr()) for p in self._parameters.values()]  # order = _flat_weights_names
        rt = self.__dict__.get("_runtime")
        if rt is None or rt[0] != key or rt[1]._batch_first != self.batch_first or (
                # a one-step call reads the parameters as they are (Runtime.live_step): no copy to check
                not (steps == 1 and input.is_contiguous() and rt[1].live_step(input.shape))
                and not rt[3].unchanged()):
            rt = self._build_runtime(key, list(self._parameters.values()), input.shape)
            if rt is None:
                return None
        _, runtime, last, _ = rt
        if input.dtype != runtime.torch_dtype:
            return None  # the general path raises the error
        if hx is None:
            state = None
        elif _is_returned(hx, last):
            state = last[1]  # the state this path returned last time: the runtime skips its checks
        else:
            state = _state_arrays(hx)
            if state is None:
                return None
        x = input.detach().numpy() if input.requires_grad else input.numpy()
        try:
            y, returned = _run_inference(runtime, x, state)
        except (ValueError, RuntimeError, TypeError):
            return None  # bad input: the general path raises torch's error for it
        out = (torch.from_numpy(returned[0]), torch.from_numpy(returned[1]))
        # The runtime's own state tuple: fed back as is, the runtime knows it and skips its checks.
        self.__dict__["_runtime"] = (rt[0], runtime, (out, returned), rt[3])
        if steps == 1 and input.dim() == 3 and input.is_contiguous():
            plan = runtime.step_lane(input.shape)
            if plan is not None:  # the next calls of this shape take _on_lane
                ptrs = [p for _, p in rt[0]]
                self.__dict__["_lane"] = (input.shape, input.dtype, runtime.threads, self.batch_first, rt[0], ptrs,
                                          plan, frozenset(self._parameters), runtime.at_lane(plan))
        return torch.from_numpy(y), out

    # ---- training fast path ---------------------------------------------------------------
    # A call autograd records on a plain one-layer, one-direction model (a training step, a
    # streaming model's step under grad) needs none of the general path's layers x directions,
    # and its checks cost more than a one-step call's kernels (BENCHMARKS.md, twenty-sixth
    # session): where the input and state are what the engine takes as they are, the call goes
    # straight to the Numba engine's layer. Anything else, and anything to raise an error about,
    # goes to the general path.
    def _train_fast(self, input, hx):
        cfg = self.config
        if (cfg.num_layers != 1 or cfg.num_directions != 1 or self._variant or self.engine not in ("auto", "numba")
                or input.dim() != 3 or input.dtype not in _FAST_DTYPES or not input.is_cpu or input.is_neg()):
            return None
        params = self._parameters
        if list(params) != self._flat_weights_names:
            return None  # a weight made at each call (see _inference_fast)
        layer_fn = engines.numba_layer_fn(self.engine, input)
        if layer_fn is None:
            return None
        p = self.layer_params(0, 0)
        if p.w_ih.dtype != input.dtype or not p.w_ih.is_cpu or input.shape[2] != self.input_size:
            return None
        # batch_first's (N, 1, I) is (1, N, I) in memory; longer batch_first input is copied in the general path
        x = input.transpose(0, 1) if self.batch_first else input
        L, N = x.shape[0], x.shape[1]
        if L == 0 or N == 0 or not x.is_contiguous():
            return None
        if hx is None:
            h0, c0 = x.new_zeros(N, cfg.real_hidden_size), x.new_zeros(N, cfg.hidden_size)
        else:
            if type(hx) not in (tuple, list) or len(hx) != 2:
                return None
            for t, shape in zip(hx, cfg.state_shapes(N)):
                if type(t) is not torch.Tensor or t.shape != shape or t.dtype != x.dtype or not t.is_cpu:
                    return None
            h0, c0 = hx[0][0], hx[1][0]
        y, h_n, c_n = layer_fn(x, [N] * L, h0, c0, p, reverse=False)
        return (y.transpose(0, 1) if self.batch_first else y), (h_n, c_n)

    # The streaming lane: one step of a model without a variant on its parameters as they are
    # (Runtime.step_lane), called again and again with an input of one shape, from zeros or
    # from the state the last call returned. Such a call's kernels take a few microseconds:
    # everything _inference_fast decides for a shape is decided once, when the lane is made,
    # and a call checks only what can change between calls (the parameters' addresses, the
    # thread count, batch_first, the input's dtype and layout, the state given).
    def _on_lane(self, lane, input, hx):
        shape, dtype, threads, batch_first, key, ptrs, plan, names, at = lane
        rt = self.__dict__.get("_runtime")
        if (input.dtype is not dtype or torch.get_num_threads() != threads or not input.is_contiguous()
                or self.batch_first != batch_first or rt is None or rt[0] is not key
                # The runtime reads the parameters' memory: any update in place shows, and only a
                # parameter moved elsewhere (p.data = ..., .to(), a new Parameter) needs a new one;
                # a parameter renamed (pruning's weight_orig: the weight then made at each call) too.
                or ptrs != [p.data_ptr() for p in self._parameters.values()] or self._parameters.keys() != names):
            return None
        runtime, last = rt[1], rt[2]
        if hx is None:
            state = plan[3]  # zeros, read only by the kernel
        else:
            returned = runtime._returned  # read once: another thread may replace it meanwhile
            if _is_returned(hx, last) and last[1] is returned[0] and returned[1] == shape:
                state = last[1]
            else:  # a state of the program's own: used as it is where it has the lane's layout
                state = _state_arrays(hx)
                if state is None or not all(a.dtype == runtime.dtype and a.shape == want and a.flags.c_contiguous
                                            for a, want in zip(state, plan[1:3])):
                    return None  # any other state: _inference_fast checks it (and raises torch's errors)
        runtime.threads = threads  # as run_inference sets it (a deeper model's split reads it)
        if at:  # x by address, no numpy view made (Runtime.step_at); never a negative view (_inference_fast)
            y, state = runtime.step_at(plan, input.data_ptr(), shape, state)
        else:
            x = input.detach().numpy() if input.requires_grad else input.numpy()
            y, state = runtime.step_on(plan, x, state)
        out = (torch.from_numpy(state[0]), torch.from_numpy(state[1]))
        self.__dict__["_runtime"] = (key, runtime, (out, state), rt[3])
        return torch.from_numpy(y), out

    def _live_step(self, dtype, shape) -> bool:
        """Whether a one-step call on input `shape` goes to the general path, which reads big
        weights as they are (engines/numba/binding.live_step_model, kept in __dict__ per dtype):
        not where the fast path's runtime reads them as they are itself (runtime.model.live_lane)."""
        live = self.__dict__.get("_live_step_of")
        if live is None or live[0] != dtype:
            try:
                from ..engines.numba.binding import live_step_model
                from ..runtime.model import live_lane
            except ModuleNotFoundError as e:  # numba not installed: the fast path does not run anyway
                if e.name is None or e.name.split(".")[0] != "numba":
                    raise
                return False
            live = self.__dict__["_live_step_of"] = (dtype, live_step_model(self.config, dtype.itemsize), live_lane)
        return live[1] and not live[2](self.config, shape)

    def _build_runtime(self, key, params, shape):
        """(key, Runtime of this module's weights, None, its WeightWatch), kept in __dict__; None
        where the fast path cannot run (numba missing, weights not float32/64 on the CPU or not
        C-contiguous). shape: the input's, for the engine's cold-start plan (binding.new_runtime)."""
        try:
            from ..engines.numba.binding import WeightWatch, new_runtime
        except ModuleNotFoundError as e:  # numba not installed: the general path runs
            if e.name is None or e.name.split(".")[0] != "numba":
                raise  # a bug in lstmkit: loud, never a silent slow path
            return None
        if params[0].dtype not in _FAST_DTYPES or params[0].device.type != "cpu":
            return None
        weights = {n: p.detach().numpy() for n, p in zip(self._flat_weights_names, params)}
        watch = WeightWatch(list(weights.values()))  # snapshots taken before packing: a change meanwhile shows up next call
        if not watch.watched:  # a weight not C-contiguous: the general path (and no stale runtime kept)
            self.__dict__.pop("_runtime", None)
            return None
        runtime = new_runtime(dataclasses.replace(self.config, batch_first=self.batch_first), weights, shape)
        runtime.torch_dtype = params[0].dtype
        rt = self.__dict__["_runtime"] = (key, runtime, None, watch)
        return rt

    def __getstate__(self):
        # The inference runtime is a cache of the weights: never pickled or deep-copied.
        # The config goes in as a plain dict, so torch.load(weights_only=True) needs no
        # lstmkit class but this one (registered as a safe global at the end of this file).
        state = self.__dict__.copy()
        state.pop("_runtime", None)
        state.pop("_live_step_of", None)
        state.pop("_lane", None)
        state["config"] = self.config.to_dict()
        return state

    def __setstate__(self, state):
        # A pickle's state is untrusted input: the config is validated again here, and the
        # engine name too. Pickles that hold an LSTMConfig object (before plain dicts) still load.
        state = dict(state)
        cfg = state.get("config")
        if isinstance(cfg, LSTMConfig):
            cfg = cfg.to_dict()
        if not isinstance(cfg, dict):
            raise TypeError(f"lstmkit.LSTM pickle: config should be a dict, got {type(cfg).__name__}")
        state["config"] = cfg = LSTMConfig.from_dict(cfg)
        state["_variant"] = cfg.has_variant
        state["engine"] = check_engine_name(state.get("engine", "auto"))
        super().__setstate__(state)

    def _direction_params(self, layer: int, direction: int) -> LayerParams:
        """layer_params, with weight_drop's mask applied to W_hh (drawn here, in training)."""
        p = self.layer_params(layer, direction)
        if self._variant and self.config.weight_drop > 0:
            p = p._replace(w_hh=variants.drop_weights(p.w_hh, self.config.weight_drop, self.training))
        return p

    def _run(self, data, batch_sizes, hx):
        """All layers and directions over packed data (total, I), or padded (L, N, I): y then
        (L, N, P) or (total, D*P). hx: (h0, c0) or False for zeros."""
        cfg = self.config
        if type(batch_sizes) is list and len(batch_sizes) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        batch = batch_sizes[0]
        if hx:
            h0, c0 = hx
            given = (h0, c0)
        else:
            # One (B, P) and one (B, H) of zeros, every layer-direction's: the engines only read
            # them (indexing a (layers x directions, B, H) tensor of zeros cost a call each).
            z_h, z_c = data.new_zeros(batch, cfg.real_hidden_size), data.new_zeros(batch, cfg.hidden_size)
            h0 = c0 = None
            given = ()
        use_variant = self._variant and cfg.needs_variant_kernel(self.training)
        # Forward-mode AD may carry tangents on these too (engines/__init__._under_forward_ad).
        others = (*given, *self._flat_weights) if forward_ad._current_level >= 0 else ()
        layer_fn = get_layer_fn(self.engine, data, variant=use_variant, tensors=others)
        # Both directions at once where the engine can (Triton: one launch per step for the two).
        pair_fn = get_pair_fn(self.engine, data, variant=use_variant, tensors=others) if cfg.num_directions == 2 else None
        if isinstance(batch_sizes, PaddedSizes) and not getattr(layer_fn, "takes_padded_sizes", False):
            batch_sizes = batch_sizes.as_list()  # the reference engine's loop over steps wants them all
        if data.dim() == 3:  # padded
            if (cfg.num_layers == 1 and cfg.num_directions == 1 and not use_variant and data.is_contiguous()
                    and getattr(layer_fn, "takes_padded_input", False)):
                # nn.LSTM's shapes from the engine itself (engines/numba/engine.py): no view, no
                # stack. (batch_first's transposed input is copied once, here, as before: the engine
                # would copy it again in the backward.)
                h, c = (h0[0], c0[0]) if hx else (z_h, z_c)
                y, h, c = layer_fn(data, batch_sizes, h, c, self._direction_params(0, 0), reverse=False)
                return y, (h, c)
            data = data.reshape(-1, data.shape[2])

        x = data
        h_n, c_n = [], []
        for k in range(cfg.num_layers):
            outs = []
            idx = k * cfg.num_directions
            if pair_fn is not None:
                params = tuple(self._direction_params(k, d) for d in range(2))
                hs, cs = ((h0[idx], h0[idx + 1]), (c0[idx], c0[idx + 1])) if hx else ((z_h, z_h), (z_c, z_c))
                results = pair_fn(x, batch_sizes, hs, cs, params)
            else:
                results = []
                for d in range(cfg.num_directions):
                    p = self._direction_params(k, d)
                    extra = {}
                    if use_variant:  # masks drawn here, so every engine sees the same ones
                        extra["variant"] = variants.layer_variant(self, k, d, batch_sizes, data)
                    h, c = (h0[idx + d], c0[idx + d]) if hx else (z_h, z_c)
                    results.append(layer_fn(x, batch_sizes, h, c, p, reverse=d == 1, **extra))
            for y, h, c in results:
                outs.append(y)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
            if self.training and self.dropout > 0 and k < cfg.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        return x, (torch.stack(h_n), torch.stack(c_n))


class LSTMCell(nn.Module):
    """One LSTM step, same parameters and call as torch.nn.LSTMCell.

    h_1, c_1 = cell(input, (h_0, c_0));  input (N, I) or (I,), h/c (N, H) or (H,)
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, engine: str = "auto"):
        super().__init__()
        LSTMConfig(input_size, hidden_size, bias=bias)  # same validation as LSTM
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.engine = check_engine_name(engine)
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty((4 * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((4 * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -stdv, stdv)

    def _forward_autocast(self, input, hx, device_type):
        plan = autocast.cell_plan(device_type, autocast.current_dtype(device_type))
        with torch.autocast(device_type, enabled=False):  # see LSTM._forward_autocast
            if plan.compute is None:
                return self.forward(input, hx)
            params = autocast.cast_parameters(self, plan.compute)
            return torch.func.functional_call(
                self, params, (autocast.cast(input, plan.compute), autocast.cast(hx, plan.compute)))

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.engine != "auto":
            s += ", engine={engine!r}"
        return s.format(**self.__dict__)

    def forward(self, input: torch.Tensor, hx=None):
        if autocast.any_enabled() and isinstance(input, torch.Tensor) and autocast.active(input.device.type):
            return self._forward_autocast(input, hx, input.device.type)
        if (type(input) is torch.Tensor and not torch.compiler.is_compiling() and forward_ad._current_level < 0
                and not torch._C._is_tracing() and not torch._C._are_functorch_transforms_active()):
            if not torch.is_grad_enabled() or _records_nothing(self, input, hx):
                out = self._inference_fast(input, hx)
            else:
                out = self._train_fast(input, hx)
            if out is not None:
                return out
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            hx = LSTM._unpack_hx(hx, cell=True)
            for k, v in enumerate(hx):
                if v.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{k}] to be 1D or 2D, got {v.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        N = input.size(0)
        if hx is None:
            h0 = c0 = input.new_zeros(N, self.hidden_size)
        else:
            h0, c0 = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if not batched else hx
            for k, v in enumerate((h0, c0)):
                if v.size(0) != N:
                    raise RuntimeError(f"Input batch size {N} doesn't match hidden{k} batch size {v.size(0)}")
                if v.size(1) != self.hidden_size:
                    raise RuntimeError(
                        f"hidden{k} has inconsistent hidden_size: got {v.size(1)}, expected {self.hidden_size}"
                    )
                if v.dtype != input.dtype:
                    raise RuntimeError(f"hidden{k} dtype ({v.dtype}) does not match input dtype ({input.dtype})")
        if input.dtype != self.weight_ih.dtype:  # after the size checks, in torch's order and type
            raise RuntimeError(
                f"LSTMCell input dtype ({input.dtype}) does not match weight dtype ({self.weight_ih.dtype})"
            )
        if (torch.jit.is_tracing() or torch.compiler.is_compiling()) and torch.onnx.is_in_onnx_export():
            from ..interop.onnx_graph import cell_export_forward  # plain ONNX ops, no engine call

            return cell_export_forward(self, input if batched else input.squeeze(0), hx)
        p = LayerParams(self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None)
        _, h, c = get_layer_fn(self.engine, input, tensors=(h0, c0, *p))(input, [N], h0, c0, p, reverse=False)
        if not batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    # A step with nothing to record, float32/float64 on the CPU, runs as the LSTM module's
    # fast path does (engines/numba/binding.cell_step): a few rows on the parameters as they
    # are, by address (a streaming policy's cell, called once a step), more on a packed copy
    # kept while the parameters stay the same. Anything else, and anything to raise an error
    # about, goes to the general path in forward.
    def _inference_fast(self, input, hx):
        if (self.engine not in ("auto", "numba") or input.dtype not in _FAST_DTYPES or not input.is_cpu
                or input.is_neg() or not input.is_contiguous()):
            return None
        batched = input.dim() == 2
        if not (batched or input.dim() == 1) or input.shape[-1] != self.input_size:
            return None
        binding = _cell_binding()
        if binding is None:
            return None
        if list(self._parameters) != _CELL_NAMES:
            return None  # a weight made at each call (parametrization, pruning): the general path
        params = tuple(self._parameters.values())  # in _CELL_NAMES' order (biases None without bias)
        w = self.__dict__.get("_cell_weights")
        key = binding.cell_key(params)
        if w is None or w.key != key:
            w = self.__dict__["_cell_weights"] = binding.cell_weights(params, key)
            if w is None:
                self.__dict__.pop("_cell_weights", None)
                return None
        if input.dtype != w.dtype:
            return None
        if hx is not None:
            if type(hx) not in (tuple, list) or len(hx) != 2:
                return None
            want = (input.shape[0], self.hidden_size) if batched else (self.hidden_size,)
            for t in hx:
                if (type(t) is not torch.Tensor or t.dtype != w.dtype or not t.is_cpu or t.shape != want
                        or not t.is_contiguous() or t.is_neg()):
                    return None
        return binding.cell_step(w, input, hx, batched)

    # A step autograd records (LSTM._train_fast says why): where the input, the state and the
    # parameters are what the Numba engine takes, straight to its layer; else the general path.
    def _train_fast(self, input, hx):
        batched = input.dim() == 2
        if (self.engine not in ("auto", "numba") or not (batched or input.dim() == 1) or input.dtype not in _FAST_DTYPES
                or not input.is_cpu or input.is_neg() or input.shape[-1] != self.input_size):
            return None
        params = self._parameters
        if list(params) != _CELL_NAMES:
            return None
        layer_fn = engines.numba_layer_fn(self.engine, input)
        if layer_fn is None:
            return None
        p = LayerParams(*params.values(), None)  # _CELL_NAMES' order; biases None without bias
        if p.w_ih.dtype != input.dtype or not p.w_ih.is_cpu:
            return None
        x = input if batched else input.unsqueeze(0)
        N, H = x.shape[0], self.hidden_size
        if N == 0:
            return None
        if hx is None:
            h0 = c0 = x.new_zeros(N, H)
        else:
            if type(hx) not in (tuple, list) or len(hx) != 2:
                return None
            want = (N, H) if batched else (H,)
            for t in hx:
                if type(t) is not torch.Tensor or t.shape != want or t.dtype != x.dtype or not t.is_cpu:
                    return None
            h0, c0 = hx if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        _, h, c = layer_fn(x, [N], h0, c0, p, reverse=False)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_cell_weights", None)  # a cache of the parameters' addresses: never pickled
        return state


_CELL_NAMES = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]  # bias=False registers the biases as None


def _records_nothing(module, input, hx) -> bool:
    """Whether autograd records nothing for this call of an LSTM or LSTMCell with grad mode on:
    neither the input, nor a parameter, nor the state given requires grad (a frozen model run on
    data without no_grad). The outputs then require no grad on any path, so the fast path may run."""
    if input.requires_grad or any(p is not None and p.requires_grad for p in module._parameters.values()):
        return False
    return hx is None or (type(hx) in (tuple, list) and len(hx) == 2
                          and all(type(t) is torch.Tensor and not t.requires_grad for t in hx))


def _cell_binding():
    """engines/numba/binding, imported at the first cell step (it loads numba); None without numba."""
    global _cell_binding
    try:
        from ..engines.numba import binding
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != "numba":
            raise
        binding = None
    _cell_binding = lambda: binding  # noqa: E731
    return binding


# torch.load(weights_only=True) of a whole model that contains these modules: allowlisted
# like torch's own layers. Only these two plain classes (their pickled state is tensors,
# numbers, strings, dicts; __setstate__ validates it), no function: see interop/safe_globals.py.
if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4; before it, weights_only was off by default
    torch.serialization.add_safe_globals([LSTM, LSTMCell])
    from ..interop.safe_globals import register_old_paths

    register_old_paths(LSTM, LSTMCell)
