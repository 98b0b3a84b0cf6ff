"""What every engine shares: the parameter bundle of one layer-direction and helpers.

An engine is a function

    lstm_layer(x, batch_sizes, h0, c0, params, reverse) -> (y, h_n, c_n)

over packed data (see reference.py for the shapes and the equations). `batch_sizes`
is a list of Python ints; while torch.compile or torch.export traces a padded call, a
PaddedSizes instead, which only the compile ops take (engines/numba/compile_ops.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class PaddedSizes:
    """The batch_sizes of padded data, [batch] * steps, without the list. While torch.compile or
    torch.export traces a call, steps may be a symbolic size, and a list of `steps` entries
    would make the compiler hold the graph to one sequence length (a new graph for each, and
    torch.export's dynamic dimensions refused). The compile ops take it as an empty list and
    make the batch sizes from their input's rows when they run."""

    __slots__ = ("steps", "batch")

    def __init__(self, steps, batch):
        self.steps, self.batch = steps, batch

    def __getitem__(self, i):  # the first step's batch: every step's
        if i != 0:
            raise IndexError("PaddedSizes: only [0] (the batch) is defined; as_list() for the rest")
        return self.batch

    def as_list(self) -> list:
        return [self.batch] * self.steps


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
