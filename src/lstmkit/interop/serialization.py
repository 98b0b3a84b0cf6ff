"""lstmkit.save / lstmkit.load: one .safetensors file per LSTM, configuration included.

The file holds the module's state_dict (same names as torch.nn.LSTM, plus any variant
parameters) and, in its metadata, the constructor configuration as JSON (LSTMConfig.to_dict:
sizes, batch_first, dropout, variant options). So the file is also a plain torch.nn.LSTM
state_dict for any safetensors reader, and lstmkit.runtime.load reads it without torch.
"""
from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from ..config import LSTMConfig
from ..runtime.load import CONFIG_KEY, FORMAT, FORMAT_KEY, read_safetensors


def save(module, path) -> None:
    """Write `module` (lstmkit.LSTM or torch.nn.LSTM) to `path` (.safetensors)."""
    cfg = LSTMConfig.from_module(module, "lstmkit.save")
    # safetensors wants contiguous CPU tensors that share no memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    meta = {
        FORMAT_KEY: FORMAT,
        CONFIG_KEY: json.dumps(cfg.to_dict()),
        "lstmkit.version": _version(),
    }
    save_file(tensors, os.fspath(path), metadata=meta)


def load(path, *, device=None, **kwargs):
    """The lstmkit.LSTM saved in `path` (in training mode, like a new module). kwargs go to the constructor (e.g. engine=)."""
    from ..nn import LSTM

    path = os.fspath(path)
    meta, _ = read_safetensors(path, framework="pt")
    if meta.get(FORMAT_KEY) != FORMAT or CONFIG_KEY not in meta:
        raise ValueError(
            f"{path!r} was not written by lstmkit.save (no {CONFIG_KEY!r} metadata); for a plain "
            "torch.nn.LSTM state_dict use lstmkit.runtime.load, or build the LSTM and load_state_dict"
        )
    cfg = LSTMConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    from safetensors.torch import load_file

    state = load_file(path, device="cpu" if device is None else str(device))
    dtype = state[cfg.param_shapes()[0][0]].dtype
    module = LSTM(*cfg.torch_args(), device=device, dtype=dtype, **cfg.variant_kwargs(), **kwargs)
    module.load_state_dict(state, strict=True)
    return module


def _version() -> str:
    from .. import __version__

    return __version__
