"""Benchmark: lstmkit.LSTMCell against torch.nn.LSTMCell, one step: inference (under no_grad, a
streaming policy's step) and a training step ((h.sum() + c.sum()).backward()), float32, on CPU.

Each shape: the contenders in interleaved rounds in one process, medians
(lstmkit.cli.bench.compare), at each thread count given. Speedup = torch's time / ours.

    python benchmarks/cell.py
    python benchmarks/cell.py --threads 1,2 --shapes 1,64,128 1,128,512 16,64,128 32,128,256
"""
import argparse

import torch

import lstmkit
from lstmkit.cli.bench import compare


def one_shape(N: int, I: int, H: int, rounds: int) -> dict:
    """Median seconds a call, ours and torch's, inference and training, at batch N."""
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(I, H)
    ours = lstmkit.LSTMCell(I, H)
    ours.load_state_dict(ref.state_dict())
    x, h, c = torch.randn(N, I), torch.randn(N, H), torch.randn(N, H)
    xg = x.clone().requires_grad_(True)
    with torch.no_grad():
        got, want = ours(x, (h, c)), ref(x, (h, c))
    err = max((a - b).abs().max().item() for a, b in zip(got, want))
    assert err < 1e-4, f"lstmkit and nn.LSTMCell disagree by {err}"

    def infer(m):
        def f():
            with torch.no_grad():
                m(x, (h, c))
        return f

    def train(m):
        def f():
            h1, c1 = m(xg, (h, c))
            (h1.sum() + c1.sum()).backward()
        return f

    res = {f"infer_{k}": v for k, v in compare({"ours": infer(ours), "torch": infer(ref)}, 0.02, rounds).items()}
    res.update({f"train_{k}": v for k, v in compare({"ours": train(ours), "torch": train(ref)}, 0.02, rounds).items()})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--shapes", nargs="+", default=["1,64,128", "2,64,128", "1,128,512", "16,64,128", "32,128,256"],
                    help="N,input,hidden")
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    print("| threads | N, input, hidden | inference ours / torch (us) | speedup | training ours / torch (us) | speedup |")
    print("|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in args.shapes:
            N, I, H = (int(v) for v in shape.split(","))
            r = one_shape(N, I, H, args.rounds)
            print(f"| {threads} | {N}, {I}, {H} | {r['infer_ours'] * 1e6:.1f} / {r['infer_torch'] * 1e6:.1f} | "
                  f"{r['infer_torch'] / r['infer_ours']:.2f}x | {r['train_ours'] * 1e6:.1f} / {r['train_torch'] * 1e6:.1f} | "
                  f"{r['train_torch'] / r['train_ours']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
