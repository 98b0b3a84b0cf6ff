"""One validated description of an LSTM: sizes and options.

Parameter names, shapes and counts all derive from here, so the module, the parameter
explainer, the checkpoint tools and the torch-free runtime agree by construction.
This file must not import torch (the runtime uses it without torch).

Gate order, shared by every engine and every weight layout in this project (and by
torch.nn.LSTM): the 4H rows of weight_ih / weight_hh / biases are [i | f | g | o] (GATES).
Orders other formats use (ONNX) are derived from it here, never typed again elsewhere.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, fields

GATES = ("i", "f", "g", "o")  # input, forget, cell candidate, output
# Peephole weights (3, H): one row per gate that reads the cell (the candidate g does not).
PEEPHOLE_GATES = ("i", "f", "o")
# ONNX's LSTM operator: W/R/B rows [i | o | f | c] (its "c" is our cell candidate g), P rows [i | o | f].
ONNX_GATES = ("i", "o", "f", "g")
ONNX_PEEPHOLE_GATES = ("i", "o", "f")
# ONNX block k holds our block ONNX_GATE_PERMUTATION[k] (and likewise for the peephole rows).
ONNX_GATE_PERMUTATION = tuple(GATES.index(g) for g in ONNX_GATES)
ONNX_PEEPHOLE_PERMUTATION = tuple(PEEPHOLE_GATES.index(g) for g in ONNX_PEEPHOLE_GATES)

# Engine names accepted by LSTM(engine=...) and by every command line's --engine.
ENGINE_NAMES = ("auto", "reference", "numba", "triton")

# torch.nn.LSTM's constructor arguments, in its positional order; every other LSTMConfig
# field is a variant option (keyword-only on lstmkit.LSTM, unknown to nn.LSTM).
TORCH_FIELDS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size")


def onnx_gate_rows(hidden_size: int) -> list[int]:
    """Row indices that reorder a (4H, ...) or (4H,) array from GATES to ONNX_GATES order:
    `w[onnx_gate_rows(H)]` (numpy or torch)."""
    H = hidden_size
    return [g * H + j for g in ONNX_GATE_PERMUTATION for j in range(H)]


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")


def _check_prob(name: str, value, high_inclusive: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = 0 <= value <= 1 if high_inclusive else 0 <= value < 1
    if not ok:
        rng = "[0, 1]" if high_inclusive else "[0, 1)"
        raise ValueError(f"{name} should be a number in range {rng}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LSTMConfig:
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0
    # Variants nn.LSTM lacks (see nn/variants.py). All off by default, in which
    # case the parameters are exactly nn.LSTM's.
    layer_norm: bool = False
    peephole: bool = False
    zoneout: float | tuple[float, float] = 0.0  # p, or (p_cell, p_hidden)
    recurrent_dropout: float = 0.0
    weight_drop: float = 0.0
    forget_bias: float = 0.0

    def __post_init__(self):
        # Same checks, order, exception types and messages as torch.nn.LSTM, so a
        # drop-in fails the way users already know.
        d = self.dropout
        if not isinstance(d, numbers.Number) or isinstance(d, bool) or not 0 <= d <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the "
                "probability of an element being zeroed"
            )
        _check_bool("bias", self.bias)
        _check_bool("batch_first", self.batch_first)
        _check_int("input_size", self.input_size)
        if self.input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        _check_int("hidden_size", self.hidden_size)
        if self.hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        _check_int("num_layers", self.num_layers)
        if self.num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if isinstance(self.bidirectional, bool) is False and not isinstance(
            self.bidirectional, numbers.Integral
        ):
            raise TypeError(
                f"bidirectional should be of type bool, got: {type(self.bidirectional).__name__}"
            )
        _check_int("proj_size", self.proj_size)
        if self.proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if self.proj_size >= self.hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        object.__setattr__(self, "dropout", float(d))
        self._check_variants()

    def _check_variants(self) -> None:
        _check_bool("layer_norm", self.layer_norm)
        _check_bool("peephole", self.peephole)
        z = self.zoneout
        if isinstance(z, (tuple, list)):
            if len(z) != 2:
                raise ValueError(f"zoneout should be a number or a pair (p_cell, p_hidden), got {z!r}")
            z = (_check_prob("zoneout", z[0], True), _check_prob("zoneout", z[1], True))
        else:
            z = _check_prob("zoneout", z, True)
        object.__setattr__(self, "zoneout", z)
        for name in ("recurrent_dropout", "weight_drop"):
            object.__setattr__(self, name, _check_prob(name, getattr(self, name)))
        fb = self.forget_bias
        if isinstance(fb, bool) or not isinstance(fb, numbers.Real):
            raise TypeError(f"forget_bias should be a real number, got: {type(fb).__name__}")
        if fb != 0 and not self.bias:
            raise ValueError("forget_bias needs bias=True (it is added to bias_ih's forget-gate slice)")
        object.__setattr__(self, "forget_bias", float(fb))

    @property
    def zoneout_probs(self) -> tuple[float, float]:
        """(p_cell, p_hidden)."""
        z = self.zoneout
        return (z[0], z[1]) if isinstance(z, tuple) else (z, z)

    # ---- which options are on: the predicates everyone asks ---------------------------------
    @property
    def has_variant(self) -> bool:
        """True when any option beyond nn.LSTM's is on."""
        return self.changes_forward or self.forget_bias != 0

    def needs_variant_kernel(self, training: bool) -> bool:
        """Whether one layer's equations differ from nn.LSTM's, so a variant engine/kernel must run.
        forget_bias only changes the init and weight_drop only changes W_hh before the call, so
        neither does; recurrent dropout is a no-op outside training."""
        return bool(
            self.layer_norm or self.peephole or self.zoneout_probs != (0.0, 0.0)
            or (training and self.recurrent_dropout > 0)
        )

    @property
    def changes_forward(self) -> bool:
        """Whether the module computes something nn.LSTM with the same weights cannot."""
        return self.needs_variant_kernel(training=True) or self.weight_drop > 0

    # ---- the nn.LSTM / variant split ---------------------------------------------------------
    def torch_args(self) -> list:
        """nn.LSTM's eight constructor arguments, in its positional order."""
        return [getattr(self, name) for name in TORCH_FIELDS]

    def torch_kwargs(self) -> dict:
        """nn.LSTM's constructor arguments by name: `torch.nn.LSTM(**cfg.torch_kwargs())`."""
        return {name: getattr(self, name) for name in TORCH_FIELDS}

    def variant_kwargs(self, changed_only: bool = True) -> dict:
        """The variant options (keyword-only on lstmkit.LSTM); by default only those not at
        their default, so `lstmkit.LSTM(*cfg.torch_args(), **cfg.variant_kwargs())` rebuilds it."""
        return {
            f.name: getattr(self, f.name) for f in fields(self)
            if f.name not in TORCH_FIELDS and not (changed_only and getattr(self, f.name) == f.default)
        }

    @classmethod
    def from_module(cls, module, who: str = "LSTMConfig.from_module",
                    accepts: str = "an lstmkit.LSTM or torch.nn.LSTM") -> "LSTMConfig":
        """The config of an lstmkit.LSTM (its `.config`) or of a torch.nn.LSTM (read from its
        public attributes, so this file needs no torch). Anything else: TypeError saying
        "{who} expects {accepts}, got <type>"."""
        cfg = getattr(module, "config", None)
        if isinstance(cfg, cls):
            return cfg
        if getattr(module, "mode", None) == "LSTM" and all(hasattr(module, n) for n in TORCH_FIELDS):
            return cls(*(getattr(module, n) for n in TORCH_FIELDS))
        raise TypeError(f"{who} expects {accepts}, got {type(module).__name__}")

    def warn_if_useless_dropout(self, stacklevel: int = 3) -> None:
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so "
                "non-zero dropout expects num_layers greater than 1, but got "
                f"dropout={self.dropout} and num_layers={self.num_layers}",
                stacklevel=stacklevel,
            )

    # ---- derived sizes -------------------------------------------------------------
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def real_hidden_size(self) -> int:
        """Width of h (and of the output per direction): proj_size when projecting."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    @property
    def output_size(self) -> int:
        return self.num_directions * self.real_hidden_size

    def layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.output_size

    # ---- parameters ------------------------------------------------------------------
    @staticmethod
    def suffix(direction: int) -> str:
        return "_reverse" if direction == 1 else ""

    def layer_param_shapes(self, layer: int, direction: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of one layer-direction's parameters, in torch's registration order."""
        H, P = self.hidden_size, self.real_hidden_size
        sfx = f"_l{layer}{self.suffix(direction)}"
        out = [
            ("weight_ih" + sfx, (4 * H, self.layer_input_size(layer))),
            ("weight_hh" + sfx, (4 * H, P)),
        ]
        if self.bias:
            out += [("bias_ih" + sfx, (4 * H,)), ("bias_hh" + sfx, (4 * H,))]
        if self.proj_size > 0:
            out.append(("weight_hr" + sfx, (P, H)))
        # Variant parameters come after nn.LSTM's own, so shared names and order are kept.
        if self.layer_norm:
            for part, n in (("ih", 4 * H), ("hh", 4 * H), ("cell", H)):
                out += [(f"layer_norm_{part}_weight" + sfx, (n,)), (f"layer_norm_{part}_bias" + sfx, (n,))]
        if self.peephole:
            out.append(("weight_peephole" + sfx, (3, H)))  # rows: i, f, o
        return out

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        out = []
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                out += self.layer_param_shapes(layer, direction)
        return out

    def num_parameters(self) -> int:
        total = 0
        for _, shape in self.param_shapes():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    # ---- state shapes -------------------------------------------------------------------
    def state_shapes(self, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Shapes of (h0, c0) for a batched input with `batch` sequences."""
        LD = self.num_layers * self.num_directions
        return (LD, batch, self.real_hidden_size), (LD, batch, self.hidden_size)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "LSTMConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
