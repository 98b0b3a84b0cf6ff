"""Training calls of one or a few time steps: forward+backward of lstmkit (engine "numba") against
torch.nn.LSTM, with the unpacked paths (binding.unpacked_path: one step, few steps) and with
the time-loop kernels on packed weights (the engine before them), in the same run.

    python benchmarks/few_steps.py                 # 1 and 2 threads, the cases below
    python benchmarks/few_steps.py --threads 1 --crossover   # + the few-steps vs time-loop grid

Medians of interleaved rounds (lstmkit.cli.bench.compare); speedup = their time / ours.
BENCHMARKS.md ("Training calls of one or a few steps") has a run.
"""
from __future__ import annotations

import argparse

import torch

import lstmkit
from lstmkit.cli.bench import compare
from lstmkit.engines.numba import binding

# (T, N, input, hidden): the bench's two one-step cases, then a few steps of a few rows.
CASES = [(1, 1, 64, 128), (1, 1, 128, 512), (4, 1, 64, 128), (16, 1, 64, 128), (16, 1, 128, 512),
         (8, 2, 64, 128), (4, 4, 128, 512)]
# The grid that placed FEW_STEPS_MAX_ROWS: the few-steps path against the time loop.
CROSSOVER = [(T, N, I, H) for N, Ts in ((1, (16, 32, 64, 100)), (2, (8, 16)), (4, (4, 8)), (8, (2, 4)))
             for T in Ts for I, H in ((64, 128), (128, 512))]
DEFAULTS = (binding.STEP_PATH_MAX_STEPS, binding.FEW_STEPS_MAX_ROWS)


def use_paths(one_step: bool, few_rows: int) -> None:
    binding.STEP_PATH_MAX_STEPS = DEFAULTS[0] if one_step else 0
    binding.FEW_STEPS_MAX_ROWS = few_rows


def train_step(m, x, paths=None):
    def f():
        if paths is not None:
            use_paths(*paths)
        y, _ = m(x)
        y.sum().backward()
    return f


def run_case(T, N, I, H, contenders) -> dict:
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    x = torch.randn(T, N, I, requires_grad=True)
    fns = {name: train_step(ours, x, paths) for name, paths in contenders.items()}
    if "torch" in contenders:
        fns["torch"] = train_step(ref, x)
    try:
        return compare(fns, 0.05, 11)
    finally:
        use_paths(True, DEFAULTS[1])


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--crossover", action="store_true")
    args = ap.parse_args(argv)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"# {threads} thread(s), load average {loadavg()}")
        print("case | new ms | time loop ms | torch ms | new vs torch | time loop vs torch")
        for c in CASES:
            r = run_case(*c, {"new": (True, DEFAULTS[1]), "loop": (False, 0), "torch": None})
            print(f"T={c[0]} N={c[1]} I={c[2]} H={c[3]} | {r['new'] * 1e3:.3f} | {r['loop'] * 1e3:.3f} | "
                  f"{r['torch'] * 1e3:.3f} | {r['torch'] / r['new']:.2f}x | {r['torch'] / r['loop']:.2f}x", flush=True)
        if args.crossover:
            print("case | few steps ms | time loop ms | time loop / few steps")
            for c in CROSSOVER:
                r = run_case(*c, {"few": (True, 1 << 30), "loop": (True, 0)})
                print(f"T={c[0]} N={c[1]} I={c[2]} H={c[3]} | {r['few'] * 1e3:.3f} | {r['loop'] * 1e3:.3f} | "
                      f"{r['loop'] / r['few']:.2f}", flush=True)
        print(f"# load average after: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
