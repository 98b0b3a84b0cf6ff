"""`lstmkit tour`: a two-minute look at the system.

Prints the parameter table of an example LSTM, runs it forward and backward on every
engine that runs here, and checks each against torch.nn.LSTM (the oracle).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ..config import LSTMConfig
from ..describe import describe
from ..engines import ENGINES, is_available
from ..nn import LSTM

TOLERANCE_FLOAT64 = 1e-10  # the project's float64 agreement bound with torch.nn.LSTM


def engines_here() -> list[str]:
    """The CPU engines that import on this machine (triton needs a GPU)."""
    return [name for name in ("reference", "numba") if is_available(name)]


def _forward_backward(module, x, grad_output):
    """(output, h_n, c_n, input grad, every parameter grad), seconds."""
    xi = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    y, (h, c) = module(xi)
    (y * grad_output).sum().backward()
    seconds = time.perf_counter() - t0
    return [y, h, c, xi.grad] + [p.grad for p in module.parameters()], seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lstmkit tour", description=__doc__)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    T, N = a.seq_len, a.batch

    cfg = LSTMConfig(input_size=32, hidden_size=64, num_layers=2, bidirectional=True, proj_size=48)
    print(describe(cfg, seq_len=T, batch=N).text())
    print()

    torch.manual_seed(0)
    oracle = nn.LSTM(**cfg.torch_kwargs(), dtype=torch.float64)
    x = torch.randn(T, N, cfg.input_size, dtype=torch.float64)
    grad_output = torch.randn(T, N, cfg.output_size, dtype=torch.float64)

    want, t_ref = _forward_backward(oracle, x, grad_output)
    print(f"engines: {', '.join(e for e in ENGINES if e != 'auto')}; here: {', '.join(engines_here())}")
    print(f"torch.nn.LSTM float64 forward+backward: {t_ref * 1e3:.1f} ms")
    ok = True
    for engine in engines_here():
        got, dt = _forward_backward(LSTM.from_torch(oracle, engine=engine), x, grad_output)
        err = max((g - w).abs().max().item() for g, w in zip(got, want))
        good = err < TOLERANCE_FLOAT64
        ok &= good
        print(f"lstmkit engine={engine:<9} forward+backward: {dt * 1e3:.1f} ms   "
              f"max |difference| vs torch.nn.LSTM (output, h_n, c_n, every gradient): {err:.2e}  "
              f"{'OK' if good else 'MISMATCH'}")
    return 0 if ok else 1
