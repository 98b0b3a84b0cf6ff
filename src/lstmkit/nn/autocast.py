"""torch.autocast for lstmkit.LSTM / LSTMCell: the dtypes torch.nn.LSTM / LSTMCell compute in.

Autocast works per op in torch; for the LSTM modules what it does comes down to these
rules (checked against torch.nn.LSTM / nn.LSTMCell in tests/test_autocast.py on CPU):

  CPU, autocast dtype d (bfloat16 by default):
    LSTM, padded input       x, h0, c0 and the weights are cast to d; y, h_n, c_n come out in d
                             (torch runs its oneDNN layer op, which autocast casts).
    LSTM with proj_size > 0  padded or packed: y and h_n in d, but c_n stays float32: torch's
                             generic path casts only some matmuls (the projection among them),
                             and the cell state is never one of them.
    LSTM, PackedSequence     (proj_size 0) no cast: computed and returned in float32.
    LSTMCell                 float32 out (lstm_cell is not in CPU autocast's op lists; torch's
                             CPU cell runs its gate matmuls in d inside, lstmkit in float32, so
                             the values agree to d's precision).
    (d = float16 on CPU: torch's oneDNN LSTM raises; lstmkit computes in float16.)
  CUDA:
    LSTM                     cuDNN's RNN is cast to float16, whatever the autocast dtype
                             (aten/src/ATen/cudnn/AutocastRNN.cpp casts to kHalf), padded or packed.
    LSTMCell                 lstm_cell is in CUDA autocast's lower-precision list: cast to d.

Only "eligible" tensors are cast, as autocast does: floating point, not float64. The module
runs its engine with autocast disabled on the cast tensors, so an engine's own tensor ops
(the reference engine's matmuls) are not cast a second time, and every engine computes the
same thing. The casts are differentiable: gradients of float32 parameters and inputs come
back in float32, as with torch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class AutocastPlan(NamedTuple):
    compute: Optional[torch.dtype]  # dtype eligible tensors are cast to; None: no cast
    c_n: Optional[torch.dtype] = None  # LSTM's c_n returned in this dtype (None: as computed)


NO_CAST = AutocastPlan(None)


def lstm_plan(device_type: str, autocast_dtype: torch.dtype, *, packed: bool, proj_size: int) -> AutocastPlan:
    """What torch.autocast does to nn.LSTM on `device_type` (see the module docstring)."""
    if device_type == "cuda":
        return AutocastPlan(torch.float16)
    if device_type == "cpu":
        if proj_size > 0:
            return AutocastPlan(autocast_dtype, torch.float32)
        return NO_CAST if packed else AutocastPlan(autocast_dtype)
    return NO_CAST


def cell_plan(device_type: str, autocast_dtype: torch.dtype) -> AutocastPlan:
    """What torch.autocast does to nn.LSTMCell on `device_type` (see the module docstring)."""
    if device_type == "cuda":
        return AutocastPlan(autocast_dtype)
    return NO_CAST


def active(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


# A cheap first gate on every module call: one-step inference calls are short enough that the
# device-type lookup and per-device query would show. torch has no public "any device" query;
# where this private one is missing, the per-device check runs every time.
any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def current_dtype(device_type: str) -> torch.dtype:
    return torch.get_autocast_dtype(device_type)


def cast(obj, dtype: Optional[torch.dtype]):
    """obj (a tensor, a tuple/list of them, or None) with its eligible tensors cast to dtype."""
    if dtype is None or obj is None:
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast(t, dtype) for t in obj)
    if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.dtype != torch.float64:
        return obj.to(dtype)
    return obj


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> dict:
    """name -> parameter cast to dtype, for torch.func.functional_call (differentiable casts)."""
    return {name: cast(p, dtype) for name, p in module.named_parameters()}
