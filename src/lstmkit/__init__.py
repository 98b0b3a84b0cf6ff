"""lstmkit: torch.nn.LSTM re-implemented from scratch — exact, fused, extended."""
from .config import GATES, LSTMConfig
from .params import describe

__version__ = "0.1.0"
__all__ = ["LSTM", "LSTMCell", "LSTMConfig", "GATES", "describe"]


def __getattr__(name):
    # Torch-dependent pieces load on first use, so the torch-free parts import without it.
    if name in ("LSTM", "LSTMCell"):
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"lstmkit.{name} is a torch.nn.Module and needs PyTorch: pip install 'lstmkit[torch]'. "
                "Without torch, use lstmkit.runtime (numpy arrays in, numpy arrays out)."
            ) from e
        from . import module

        return getattr(module, name)
    raise AttributeError(f"module 'lstmkit' has no attribute {name!r}")
