"""Engine selection. Each engine module exposes `lstm_layer` (see base.py)."""
from __future__ import annotations

import importlib
import sys
import warnings

import torch
from torch.autograd import forward_ad

from .base import LayerParams, step_offsets  # noqa: F401
from ..config import ENGINE_NAMES

ENGINES = ENGINE_NAMES  # the names live in config.py, which the command lines read without torch

# name -> module path; imported on first use so `import lstmkit` stays cheap.
_MODULES = {
    "reference": "lstmkit.engines.reference",
    "numba": "lstmkit.engines.numba.engine",
    "triton": "lstmkit.engines.triton.engine",
}


def check_engine_name(name) -> str:
    if name not in ENGINES:
        raise ValueError(f"engine should be one of {ENGINES}, got {name!r}")
    return name


def _load(name: str):
    # sys.modules first: importlib's own lookup runs several Python frames, and this is on the
    # path of every call (get_layer_fn).
    path = _MODULES[name]
    return sys.modules.get(path) or importlib.import_module(path)


# The third-party package each optional engine needs; without it the engine is unavailable.
_NEEDS = {"numba": "numba", "triton": "triton"}


def is_available(name: str) -> bool:
    """Whether engine `name` imports here. Only its third-party package being absent means
    "unavailable"; any other import error (a bug in lstmkit) propagates, so it cannot
    silently downgrade engine="auto" to the slow reference engine."""
    try:
        _load(name)
    except ModuleNotFoundError as e:
        package = _NEEDS.get(name)
        if package is not None and e.name is not None and e.name.split(".")[0] == package:
            return False
        raise
    return True


def auto_engine_name(x: torch.Tensor) -> str:
    """The engine `engine="auto"` picks for input x."""
    if x.is_cuda and is_available("triton"):
        return "triton"
    # The Numba kernels compute in float32/float64 only; other CPU dtypes (bfloat16,
    # float16) run on the reference engine, in their own dtype, like torch.nn.LSTM.
    if x.is_cpu and x.dtype in (torch.float32, torch.float64) and is_available("numba"):
        return "numba"
    return "reference"


# Engines that run the variants of nn/variants.py (layer_norm, peephole, zoneout,
# recurrent_dropout), called with an extra `variant=LayerVariant` keyword.
_VARIANT_MODULES = {
    "reference": "lstmkit.engines.reference",
    "numba": "lstmkit.engines.numba.variants",
}
_warned_variant_fallback = set()


def _under_torch_func(name: str) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running. The fused engines'
    autograd Functions work on the raw data (numpy views, Triton launches), which functorch's
    wrapped tensors do not expose: engine="auto" then runs the reference engine (plain torch ops,
    which every transform supports); an engine named explicitly raises, naming the way out."""
    if not torch._C._are_functorch_transforms_active():
        return False
    if name not in ("auto", "reference"):
        raise RuntimeError(
            f"lstmkit.LSTM(engine={name!r}) cannot run under torch.func transforms (grad, vmap, jacrev, "
            "functional_call inside them); use engine='reference' or engine='auto' (which switches to "
            "the reference engine there), or torch.autograd outside torch.func"
        )
    return True


def _under_forward_ad(name: str, tensors) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad) carries a tangent on any of `tensors`
    (the input, the state, the parameters). The fused engines compute on the raw data and would
    drop it without a word; engine="auto" then runs the reference engine (plain torch ops, which
    propagate tangents as torch.nn.LSTM does); an engine named explicitly raises."""
    if forward_ad._current_level < 0:  # no dual level entered: no tensor can carry a tangent
        return False
    if not any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return False
    if name not in ("auto", "reference"):
        raise RuntimeError(
            f"lstmkit.LSTM(engine={name!r}) does not propagate forward-mode AD tangents "
            "(torch.autograd.forward_ad); use engine='reference' or engine='auto' (which switches to "
            "the reference engine there)"
        )
    return True


def get_layer_fn(name: str, x: torch.Tensor, variant: bool = False, tensors=()):
    """The engine's lstm_layer for input x. tensors: the call's others (state, parameters), which
    forward-mode AD may carry tangents on too (_under_forward_ad)."""
    if _under_torch_func(name) or _under_forward_ad(name, (x, *tensors)):
        from . import reference

        return reference.lstm_layer  # (its variant= keyword runs the variants)
    # torch.compile cannot trace into Numba (nor importlib, below): while compiling, the fused
    # kernels run as torch.library custom ops (numba/compile_ops.py), one opaque graph node per
    # layer-direction; variants and the reference engine run plain torch ops the compiler traces.
    # torch.jit.trace likewise: it records torch ops only, and an engine's outputs made from
    # numpy arrays or raw pointers would be recorded as constants, the first input's answer
    # given back for every other input.
    tracing = torch.jit.is_tracing()
    if (tracing or torch.compiler.is_compiling()) and x.device.type == "cpu":
        fused = name in ("auto", "numba") and x.dtype in (torch.float32, torch.float64)
        if fused and not variant:
            from .numba import compile_ops

            return compile_ops.lstm_layer
        if variant or name in ("auto", "reference"):
            from . import reference

            return reference.lstm_layer
    if tracing:
        if name not in ("auto", "reference"):
            raise RuntimeError(f"lstmkit.LSTM(engine={name!r}) cannot be recorded by torch.jit.trace on "
                               f"{x.device.type}; use engine='auto' (the reference engine's ops there)")
        from . import reference

        return reference.lstm_layer
    if name == "auto":
        name = auto_engine_name(x)
        if name == "triton" and not variant:
            # "auto" trusts the GPU engine only after its kernels checked themselves on this
            # device (engines/triton/selfcheck.py); engine="triton" skips that and fails loudly.
            from .triton import selfcheck

            return selfcheck.checked_lstm_layer
    if not variant:
        return _load(name).lstm_layer
    if name not in _VARIANT_MODULES:
        if name not in _warned_variant_fallback:
            _warned_variant_fallback.add(name)
            warnings.warn(
                f"engine {name!r} has no support for LSTM variants (layer_norm, peephole, zoneout, "
                "recurrent_dropout); using the reference engine",
                stacklevel=3,
            )
        name = "reference"
    return importlib.import_module(_VARIANT_MODULES[name]).lstm_layer


def numba_layer_fn(name: str, x: torch.Tensor):
    """get_layer_fn's answer for a call none of its special cases concern (the module's training
    fast path has checked: no torch.func transform, no forward-mode AD, no tracing or compiling,
    no variant) where it is the Numba engine's lstm_layer ("numba", or "auto" picking it for x);
    else None. A broken lstmkit import raises here as there (is_available)."""
    if name == "auto":
        name = auto_engine_name(x)
    return _load(name).lstm_layer if name == "numba" else None


def get_pair_fn(name: str, x: torch.Tensor, variant: bool = False, tensors=()):
    """The engine's optional `lstm_layer_pair(x, batch_sizes, (h0_f, h0_b), (c0_f, c0_b), (p_f, p_b))
    -> ((y_f, h_f, c_f), (y_b, h_b, c_b))`, which runs both directions of a bidirectional layer
    at once (the Triton engine: one kernel launch per step for the two); None when the engine
    has none (the caller then runs the directions one by one with get_layer_fn's function)."""
    if (variant or torch.compiler.is_compiling() or torch.jit.is_tracing() or _under_torch_func(name)
            or _under_forward_ad(name, (x, *tensors))):
        return None
    if name == "auto":
        name = auto_engine_name(x)
        if name == "triton":
            from .triton import selfcheck

            return selfcheck.checked_lstm_layer_pair
    return getattr(_load(name), "lstm_layer_pair", None)

