"""What every engine shares: the parameter bundle of one layer-direction and helpers.

An engine is a function

    lstm_layer(x, batch_sizes, h0, c0, params, reverse) -> (y, h_n, c_n)

over packed data (see reference.py for the shapes and the equations). `batch_sizes`
is a list of Python ints.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class LayerParams(NamedTuple):
    w_ih: torch.Tensor  # (4H, I)
    w_hh: torch.Tensor  # (4H, P)
    b_ih: Optional[torch.Tensor] = None  # (4H,)
    b_hh: Optional[torch.Tensor] = None  # (4H,)
    w_hr: Optional[torch.Tensor] = None  # (P, H)


def step_offsets(batch_sizes: list[int]) -> list[int]:
    """Row where each step starts in the packed data."""
    offsets, total = [], 0
    for bs in batch_sizes:
        offsets.append(total)
        total += bs
    return offsets
