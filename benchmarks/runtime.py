"""Streaming latency: one LSTM step at batch 1 (input 64, hidden 128), lstmkit.runtime vs
ONNX Runtime's LSTM operator vs torch.nn.LSTM, in one process.

    python benchmarks/runtime.py [--repeats 20000] [--rounds 7] [--hidden 128] [--input 64]

Every contender does the same work per call: take x_t (1, 1, I) and the state (h, c), return
y_t and the new state, carried into the next call (a real stream, not the same input
again). Single-threaded everywhere (latency, not throughput; ONNX Runtime intra/inter-op
threads 1, torch.set_num_threads(1), the kernels' OpenBLAS pool 1). Rounds interleave the
contenders so background load hits all of them alike; each round's number is the median
over `repeats` calls; the table reports the median over rounds, and the ratios are computed
per round, then the median taken.

ONNX Runtime runs a graph holding a single LSTM node (its best case: no Transpose/Reshape
around it), float32, with the same weights, and agrees with lstmkit to 1e-5 (checked below).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np


def timed(fn, repeats: int) -> float:
    """Median seconds per call of fn()."""
    ts = np.empty(repeats)
    clock = time.perf_counter
    for k in range(repeats):
        t = clock()
        fn()
        ts[k] = clock() - t
    return float(np.median(ts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    import lstmkit
    from lstmkit import runtime

    try:  # one BLAS thread for the kernels' GEMVs, as for the others
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    torch.set_num_threads(1)
    I, H = args.input, args.hidden

    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H).eval()  # the weights everyone uses
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "lstm.safetensors")
    lstmkit.save(ref, path)
    rt = runtime.load(path)

    # ONNX Runtime: one LSTM node, weights converted the way export_onnx converts them.
    from lstmkit.interop.onnx_export import to_onnx_gate_order

    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    W = to_onnx_gate_order(sd["weight_ih_l0"])[None]
    R = to_onnx_gate_order(sd["weight_hh_l0"])[None]
    B = np.concatenate([to_onnx_gate_order(sd["bias_ih_l0"]), to_onnx_gate_order(sd["bias_hh_l0"])])[None]
    f32 = TensorProto.FLOAT
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "h0", "c0"], ["Y", "Y_h", "Y_c"], hidden_size=H)
    graph = helper.make_graph(
        [node], "step",
        [helper.make_tensor_value_info("X", f32, [1, 1, I]), helper.make_tensor_value_info("h0", f32, [1, 1, H]),
         helper.make_tensor_value_info("c0", f32, [1, 1, H])],
        [helper.make_tensor_value_info(n, f32, None) for n in ("Y", "Y_h", "Y_c")],
        [numpy_helper.from_array(a, n) for a, n in ((W, "W"), (R, "R"), (B, "B"))],
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                so, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((64, 1, 1, I)).astype(np.float32)  # a cycle of inputs

    # ---- the three streaming steps --------------------------------------------------------------
    st = {"rt": rt.initial_state(1), "ort": (np.zeros((1, 1, H), np.float32),) * 2,
          "torch": (torch.zeros(1, 1, H), torch.zeros(1, 1, H)), "k": 0}
    xts = [torch.from_numpy(x) for x in xs]

    def step_rt():
        k = st["k"] = (st["k"] + 1) & 63
        _, st["rt"] = rt(xs[k], st["rt"])

    def step_ort():
        k = st["k"] = (st["k"] + 1) & 63
        _, h, c = sess.run(None, {"X": xs[k], "h0": st["ort"][0], "c0": st["ort"][1]})
        st["ort"] = (h, c)

    def step_torch():  # called inside torch.inference_mode() (entered once, torch's best case)
        k = st["k"] = (st["k"] + 1) & 63
        _, st["torch"] = ref(xts[k], st["torch"])

    no_autograd = torch.inference_mode()  # entered once for the whole run: torch's best case
    no_autograd.__enter__()
    # agreement over a 64-step stream
    for name in ("rt", "ort", "torch"):
        st["k"] = -1
        st[name] = rt.initial_state(1) if name == "rt" else (
            (torch.zeros(1, 1, H), torch.zeros(1, 1, H)) if name == "torch" else (np.zeros((1, 1, H), np.float32),) * 2)
        for _ in range(64):
            {"rt": step_rt, "ort": step_ort, "torch": step_torch}[name]()
    h_rt, h_ort, h_torch = st["rt"][0], st["ort"][0], st["torch"][0].numpy()
    err_ort, err_torch = float(np.abs(h_rt - h_ort).max()), float(np.abs(h_rt - h_torch).max())
    assert err_ort < 1e-5 and err_torch < 1e-5, (err_ort, err_torch)

    # Not a contender: the floor under any exact float32 step, one GEMV through [W_ih | W_hh]
    # ((I+H) x 4H weights streamed from cache, laid out the way BLAS is fastest on,
    # [x | h] @ W^T with W^T row-major), through numpy's BLAS, no gate math at all.
    w_cat_t = np.ascontiguousarray(np.concatenate([sd["weight_ih_l0"], sd["weight_hh_l0"]], axis=1).T)
    z, g = rng.standard_normal(I + H).astype(np.float32), np.empty(4 * H, np.float32)

    def gemv_floor():
        np.dot(z, w_cat_t, out=g)

    contenders = {"lstmkit.runtime": step_rt, "ONNX Runtime LSTM": step_ort, "torch.nn.LSTM": step_torch,
                  "floor": gemv_floor}
    for fn in contenders.values():  # warm up (JIT, allocator, caches)
        for _ in range(2000):
            fn()
    per_round = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            per_round[name].append(timed(fn, args.repeats))
    med = {name: float(np.median(v)) * 1e6 for name, v in per_round.items()}
    ours = np.array(per_round["lstmkit.runtime"])
    vs_ort = float(np.median(np.array(per_round["ONNX Runtime LSTM"]) / ours))
    vs_torch = float(np.median(np.array(per_round["torch.nn.LSTM"]) / ours))

    import numba
    import onnxruntime

    print(f"One LSTM step, batch 1, input {I}, hidden {H}, float32, 1 thread; median of {args.rounds} rounds x "
          f"{args.repeats} calls ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numba {numba.__version__})")
    print()
    print("| contender | µs per step | lstmkit.runtime is |")
    print("|---|---:|---:|")
    print(f"| lstmkit.runtime | {med['lstmkit.runtime']:.2f} | |")
    print(f"| ONNX Runtime LSTM | {med['ONNX Runtime LSTM']:.2f} | {vs_ort:.2f}x faster |")
    print(f"| torch.nn.LSTM | {med['torch.nn.LSTM']:.2f} | {vs_torch:.2f}x faster |")
    print(f"| (floor: the step's GEMV alone, numpy BLAS) | {med['floor']:.2f} | |")
    print()
    print(f"state after 64 steps: max |lstmkit - ORT| = {err_ort:.1e}, max |lstmkit - torch| = {err_torch:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
