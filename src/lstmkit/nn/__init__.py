"""The torch.nn.Module frontends: LSTM and LSTMCell (modules.py) and the variants' masks (variants.py)."""
from .modules import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell"]
