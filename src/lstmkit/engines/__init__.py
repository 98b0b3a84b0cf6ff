"""Engine selection. Each engine module exposes `lstm_layer` (see base.py)."""
from __future__ import annotations

import importlib

import torch

from .base import LayerParams, step_offsets  # noqa: F401

ENGINES = ("auto", "reference", "numba", "triton")

# name -> module path; imported on first use so `import lstmkit` stays cheap.
_MODULES = {
    "reference": "lstmkit.engines.reference",
    "numba": "lstmkit.engines.numba_engine",
    "triton": "lstmkit.engines.triton_engine",
}


def check_engine_name(name) -> str:
    if name not in ENGINES:
        raise ValueError(f"engine should be one of {ENGINES}, got {name!r}")
    return name


def _load(name: str):
    return importlib.import_module(_MODULES[name])


def _available(name: str) -> bool:
    try:
        _load(name)
    except ImportError:
        return False
    return True


def auto_engine_name(x: torch.Tensor) -> str:
    """The engine `engine="auto"` picks for input x."""
    if x.device.type == "cuda" and _available("triton"):
        return "triton"
    if x.device.type == "cpu" and _available("numba"):
        return "numba"
    return "reference"


def get_layer_fn(name: str, x: torch.Tensor):
    if name == "auto":
        name = auto_engine_name(x)
    return _load(name).lstm_layer
