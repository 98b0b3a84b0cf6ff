"""Read an LSTM from a .safetensors file into a Runtime, without torch.

Two kinds of file:
  * lstmkit.save files: the configuration is in the metadata (CONFIG_KEY, JSON);
  * any safetensors state_dict holding a torch.nn.LSTM (bare, or under a prefix such as
    "encoder.lstm."): the configuration is inferred from tensor names and shapes. What the
    weights cannot show (batch_first) is a keyword argument.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open

from ..config import LSTMConfig
from .infer import find_lstms, infer_config
from .model import Runtime

# Metadata keys written by lstmkit.save (interop/serialization.py) and read here.
FORMAT_KEY, FORMAT = "format", "lstmkit"
CONFIG_KEY = "lstmkit.config"


def read_safetensors(path, framework: str = "numpy"):
    """(metadata dict, {name: shape}) of a .safetensors file; clear errors for bad files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        with safe_open(path, framework=framework) as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path!r} is not a readable .safetensors file ({e})") from None
    return meta, shapes


def load(path, prefix: str | None = None, *, batch_first: bool | None = None) -> Runtime:
    """A Runtime for the LSTM in `path`.

    prefix: which LSTM, when a state_dict holds several (e.g. "decoder.lstm."); by default
    the only one. batch_first: the input layout, for files that do not record it.
    """
    path = os.fspath(path)
    meta, shapes = read_safetensors(path)
    if meta.get(FORMAT_KEY) == FORMAT and CONFIG_KEY in meta:
        cfg = LSTMConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        prefix = ""
    else:
        found, rejected = find_lstms(shapes)
        if prefix is None:
            if len(found) != 1:
                what = "no LSTM" if not found else f"{len(found)} LSTMs ({', '.join(repr(x.prefix) for x in found)})"
                why = "".join(f"; {p!r}: {r}" for p, r in rejected)
                raise ValueError(f"{path!r} holds {what}; pass prefix= to choose one{why}")
            prefix = found[0].prefix
        cfg = infer_config(shapes, prefix)
    if batch_first is not None:
        cfg = LSTMConfig.from_dict({**cfg.to_dict(), "batch_first": batch_first})

    weights = {}
    with safe_open(path, framework="numpy") as f:
        for name, _ in cfg.param_shapes():
            dtype = f.get_slice(prefix + name).get_dtype()
            if dtype == "BF16":  # numpy has no bfloat16: widen it ourselves
                weights[name] = _read_bf16_as_f32(path, prefix + name)
            elif dtype in ("F16", "F32", "F64"):
                weights[name] = f.get_tensor(prefix + name)
            else:
                raise TypeError(f"tensor {prefix + name!r} is {dtype}; the runtime computes in float32/float64")
            if dtype == "F16":
                weights[name] = weights[name].astype(np.float32)
    return Runtime(cfg, weights)


def _read_bf16_as_f32(path: str, name: str) -> np.ndarray:
    """A BF16 tensor of a .safetensors file as float32 (bfloat16 is float32's upper 16 bits).

    File layout: 8-byte little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}}, then the data, offsets counted from its start.
    """
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        entry = json.loads(fh.read(n))[name]
        start, end = entry["data_offsets"]
        fh.seek(8 + n + start)
        raw = fh.read(end - start)
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(entry["shape"])


__all__ = ["load", "read_safetensors", "CONFIG_KEY", "FORMAT", "FORMAT_KEY"]
