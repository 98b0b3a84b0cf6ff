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
from ..engines import ENGINES
from ..nn import LSTM
from ..describe import describe


def _engines_here() -> list[str]:
    out = ["reference"]
    try:
        import lstmkit.engines.numba_engine  # noqa: F401

        out.append("numba")
    except ImportError:
        pass
    return out


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
    oracle = nn.LSTM(**{k: v for k, v in cfg.to_dict().items() if k in
                        ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional", "proj_size")},
                     dtype=torch.float64)
    x = torch.randn(T, N, cfg.input_size, dtype=torch.float64)
    gy = torch.randn(T, N, cfg.output_size, dtype=torch.float64)

    def run(m):
        xi = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        y, (h, c) = m(xi)
        (y * gy).sum().backward()
        dt = time.perf_counter() - t0
        return [y, h, c, xi.grad] + [p.grad for p in m.parameters()], dt

    want, t_ref = run(oracle)
    print(f"engines: {', '.join(e for e in ENGINES if e != 'auto')}; here: {', '.join(_engines_here())}")
    print(f"torch.nn.LSTM float64 forward+backward: {t_ref * 1e3:.1f} ms")
    ok = True
    for engine in _engines_here():
        ours = LSTM.from_torch(oracle, engine=engine)
        got, dt = run(ours)
        err = max((g - w).abs().max().item() for g, w in zip(got, want))
        good = err < 1e-10
        ok &= good
        print(f"lstmkit engine={engine:<9} forward+backward: {dt * 1e3:.1f} ms   "
              f"max |difference| vs torch.nn.LSTM (output, h_n, c_n, every gradient): {err:.2e}  "
              f"{'OK' if good else 'MISMATCH'}")
    return 0 if ok else 1
