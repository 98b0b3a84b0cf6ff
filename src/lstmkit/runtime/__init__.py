"""lstmkit.runtime: LSTM inference with numpy, numba and safetensors only (no torch).

    from lstmkit import runtime
    rt = runtime.load("model.safetensors")      # lstmkit.save file, or a torch.nn.LSTM state_dict
    out, (h, c) = rt(x)                         # x: numpy array, the module's layouts
    y_t, (h, c) = rt(x_t, (h, c))               # streaming, one step (or chunk) at a time

Nothing in this package imports torch.
"""
from .infer import FoundLSTM, find_lstms, infer_config
from .load import load
from .model import Runtime

__all__ = ["load", "Runtime", "find_lstms", "infer_config", "FoundLSTM"]
