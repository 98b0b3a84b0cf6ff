"""Benchmark: the LSTM variants on the fused Numba engine, forward + backward, training mode.

For each variant, three contenders on the same input, timed in the same run, interleaved
(one call of each per round) and summarised by the median over rounds:

  fused    lstmkit.LSTM(..., <variant>, engine="numba")
  vanilla  lstmkit.LSTM(..., engine="numba") with no variant (the cost floor)
  loop     what users write today: a Python loop over the steps, one LSTMCell-style
           cell in torch ops implementing the same variant (F.layer_norm, masks, ...)
  nn.LSTM  torch.nn.LSTM, no variant (PyTorch's own C++ kernel), for context: how far any
           fused engine can get from the loop on this machine

Reported: the ratios fused/vanilla (target <= 1.3) and loop/fused (target >= 10 at
batch <= 16, >= 3 at T=100, N=32, I=128, H=256).

    python benchmarks/variants.py                     # the issue's shapes
    python benchmarks/variants.py --T 20 --rounds 5   # quick look
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import lstmkit

VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "peephole": dict(peephole=True),
    "zoneout": dict(zoneout=0.1),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "weight_drop": dict(weight_drop=0.5),
    "all": dict(layer_norm=True, peephole=True, zoneout=0.1, recurrent_dropout=0.25, weight_drop=0.5),
}


def loop_lstm(m: lstmkit.LSTM, x: torch.Tensor, opts: dict):
    """A one-layer LSTM with the variant as a Python loop over LSTMCell-style steps."""
    T, N, _ = x.shape
    H = m.hidden_size
    w_ih, w_hh, b = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0 + m.bias_hh_l0
    p_zone = opts.get("zoneout", 0.0)
    if opts.get("weight_drop", 0.0):
        q = opts["weight_drop"]
        w_hh = w_hh * (torch.bernoulli(torch.full_like(w_hh, 1 - q)) / (1 - q))
    rec_mask = None
    if opts.get("recurrent_dropout", 0.0):
        q = opts["recurrent_dropout"]
        rec_mask = torch.bernoulli(x.new_full((N, H), 1 - q)) / (1 - q)
    h = c = x.new_zeros(N, H)
    ys = []
    for t in range(T):  # one LSTMCell-style step: both projections inside the step
        a_x, a_h = x[t] @ w_ih.t(), (h if rec_mask is None else h * rec_mask) @ w_hh.t()
        if opts.get("layer_norm"):
            a_x = F.layer_norm(a_x, (4 * H,), m.layer_norm_ih_weight_l0, m.layer_norm_ih_bias_l0)
            a_h = F.layer_norm(a_h, (4 * H,), m.layer_norm_hh_weight_l0, m.layer_norm_hh_bias_l0)
        zi, zf, zg, zo = (a_x + a_h + b).chunk(4, 1)
        if opts.get("peephole"):
            zi = zi + m.weight_peephole_l0[0] * c
            zf = zf + m.weight_peephole_l0[1] * c
        c_new = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
        if opts.get("peephole"):
            zo = zo + m.weight_peephole_l0[2] * c_new
        c_out = F.layer_norm(c_new, (H,), m.layer_norm_cell_weight_l0, m.layer_norm_cell_bias_l0) if opts.get("layer_norm") else c_new
        h_new = torch.sigmoid(zo) * torch.tanh(c_out)
        if p_zone:
            dc = torch.bernoulli(torch.full_like(c, p_zone))
            dh = torch.bernoulli(torch.full_like(h, p_zone))
            c_new = dc * c + (1 - dc) * c_new
            h_new = dh * h + (1 - dh) * h_new
        h, c = h_new, c_new
        ys.append(h)
    return torch.stack(ys)


def fwd_bwd(fn):
    """(wall seconds, CPU seconds of this process) of one forward + backward."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn().sum().backward()
    return time.perf_counter() - w0, time.process_time() - c0


def bench(T, N, I, H, rounds, warmup=2):
    torch.manual_seed(0)
    x = torch.randn(T, N, I)
    vanilla = lstmkit.LSTM(I, H, engine="numba")
    torch_lstm = torch.nn.LSTM(I, H)
    rows = []
    for name, opts in VARIANTS.items():
        fused = lstmkit.LSTM(I, H, engine="numba", **opts)
        contenders = {
            "fused": lambda: fused(x)[0],
            "vanilla": lambda: vanilla(x)[0],
            "loop": lambda: loop_lstm(fused, x, opts),
            "nn.LSTM": lambda: torch_lstm(x)[0],
        }
        times = {k: [] for k in contenders}
        for r in range(warmup + rounds):
            for k, fn in contenders.items():
                dt = fwd_bwd(fn)
                if r >= warmup:
                    times[k].append(dt)
        wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        rows.append((name, wall, cpu))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--I", type=int, default=128)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the numba engine follows it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# lstmkit variants, float32, fwd+bwd, training mode; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, threads={args.threads}, median of {args.rounds} rounds")
    print("# ms are CPU time of the process (process_time), robust to other processes on a shared machine;")
    print("# the wall-clock ratios are in parentheses.")
    print("| T | N | I | H | variant | fused ms | vanilla fused ms | loop ms | nn.LSTM ms | fused/vanilla (wall) | loop/fused (wall) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for N in args.batches:
        for name, wall, cpu in bench(args.T, N, args.I, args.H, args.rounds):
            f, v, lp = cpu["fused"], cpu["vanilla"], cpu["loop"]
            wf, wv, wl = wall["fused"], wall["vanilla"], wall["loop"]
            print(f"| {args.T} | {N} | {args.I} | {args.H} | {name} | {f * 1e3:.2f} | {v * 1e3:.2f} | {lp * 1e3:.2f} "
                  f"| {cpu['nn.LSTM'] * 1e3:.2f} "
                  f"| {f / v:.2f} ({wf / wv:.2f}) | {lp / f:.1f} ({wl / wf:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
