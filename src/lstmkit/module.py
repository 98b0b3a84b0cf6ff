"""The old home of LSTM and LSTMCell, kept only so old whole-model checkpoints load.

pickle records a class by its module path, and models saved with torch.save(model) before
the frontends moved to lstmkit.nn.modules name lstmkit.module.LSTM / LSTMCell; without this
module such files fail to load. torch.load(weights_only=True) accepts that path too
(interop/safe_globals.py registers it for the same two classes). New code: lstmkit.LSTM.
"""
from .nn.modules import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell"]
