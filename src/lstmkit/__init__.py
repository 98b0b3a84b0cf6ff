"""lstmkit: torch.nn.LSTM re-implemented from scratch — exact, fused, extended."""
from .config import GATES, LSTMConfig
from .describe import describe

__version__ = "0.1.0"
__all__ = ["LSTM", "LSTMCell", "LSTMConfig", "GATES", "describe", "save", "load", "export_onnx"]

# name -> (module, attribute) for torch-dependent functions, imported on first use.
_LAZY = {"save": ("interop.serialization", "save"), "load": ("interop.serialization", "load"),
         "export_onnx": ("interop.onnx_export", "export_onnx")}


def __getattr__(name):
    # Torch-dependent pieces load on first use, so the torch-free parts import without it.
    if name in ("LSTM", "LSTMCell") or name in _LAZY:
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"lstmkit.{name} {'is a torch.nn.Module and needs' if name not in _LAZY else 'needs'} "
                "PyTorch: pip install 'lstmkit[torch]'. "
                "Without torch, use lstmkit.runtime (numpy arrays in, numpy arrays out)."
            ) from e
        if name in _LAZY:
            import importlib

            mod, attr = _LAZY[name]
            return getattr(importlib.import_module(f".{mod}", __name__), attr)
        from . import nn

        return getattr(nn, name)
    raise AttributeError(f"module 'lstmkit' has no attribute {name!r}")


# Whole models saved with torch.save(model) load with torch.load(weights_only=True) under the
# program's own allowlist (interop/safe_globals.py says what this allows); torch is not imported here.
from .interop.safe_globals import register_when_torch_loads as _register_when_torch_loads  # noqa: E402

_register_when_torch_loads()
