"""`lstmkit bench`: lstmkit against torch.nn.LSTM and ONNX Runtime on CPU.

    python -m lstmkit bench                 # speed table at 1 and 2 threads (inference, forward+backward),
                                            # GFLOP/s vs sgemm, runtime one step vs ONNX Runtime
    python -m lstmkit bench --extra         # + the sizes beyond the grid (EXTRA_CASES)
    python -m lstmkit bench --memory        # + peak memory of forward+backward, one process per run
    python -m lstmkit bench --startup       # + import time, first forward (warm / cold compile cache)
    python -m lstmkit bench --quick         # fewer repeats
    python -m lstmkit bench --markdown t.md # also write the table as BENCHMARKS.md rows

Every number is a median over interleaved rounds, measured in one process with the same thread
count for everyone (--threads, default "1,2": both, one after the other). Speedup = their time / our time (>1: we win).
ONNX Runtime runs a model built here with onnx.helper: one standard ONNX LSTM node per
layer (gates reordered from torch's i,f,g,o to ONNX's i,o,f,c; biases as [Wb | Rb]).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from ..config import ENGINE_NAMES

# (T, N, input, hidden, layers, bidirectional[, "packed"]) and the targets from issue 11:
# (fwd vs nn.LSTM, fwd vs ORT, fwd+bwd vs nn.LSTM). The packed case: N=16 sequences of lengths
# drawn uniformly from 1..T, enforce_sorted=False (no ORT model for it).
CASES = [
    ((1, 1, 64, 128, 1, False), (8, 1, 2)),
    ((1, 1, 128, 512, 1, False), (4, 1, 2)),
    ((100, 1, 64, 128, 1, False), (2, 1.2, 1.5)),
    ((1000, 1, 32, 64, 1, False), (2, 1.2, 1.5)),
    ((200, 16, 64, 64, 1, False), (1.5, 1.2, 1.5)),
    ((100, 32, 128, 256, 1, False), (1, 1, 1)),
    ((100, 16, 128, 256, 2, True), (1, 1, 1)),
    ((500, 16, 64, 128, 1, False, "packed"), (3, float("nan"), 3)),
]
# Sizes users train at beyond the grid (--extra): "no case slower than torch.nn.LSTM".
EXTRA_CASES = [
    ((50, 64, 512, 1024, 1, False), (1, float("nan"), 1)),
    ((20, 128, 256, 2048, 1, False), (1, float("nan"), 1)),
    ((100, 256, 64, 128, 1, False), (1, float("nan"), 1)),
    ((2000, 8, 64, 128, 1, False), (1, float("nan"), 1)),
    ((10000, 1, 64, 128, 1, False), (1, float("nan"), 1)),
    # batches of 8-32 on wide weights, where the rows split lost (the hidden units split since)
    ((200, 8, 128, 384, 1, False), (1, float("nan"), 1)),
    ((100, 16, 128, 1024, 1, False), (1, float("nan"), 1)),
    ((100, 32, 128, 512, 1, False), (1, float("nan"), 1)),
]


def case_name(c) -> str:
    T, N, I, H, L, bi = c[:6]
    if len(c) > 6:
        return f"packed 1..{T} N={N} I={I} H={H}"
    return f"T={T} N={N} I={I} H={H}" + (f" L={L}" if L > 1 else "") + (" bidir" if bi else "")


# ---- timing --------------------------------------------------------------------------------------
def compare(fns: dict, min_time: float = 0.02, rounds: int = 7) -> dict:
    """Median seconds per call of each function. The functions are timed in interleaved
    rounds, so a change in machine load hits all of them alike; in each round a function runs
    n times, n sized so that it takes >= min_time. The order changes from round to round
    (round_orders): in a fixed order each function runs after the same other one, which leaves
    the caches as it left them, and that alone moved ratios by 10 % (BENCHMARKS.md, twenty-fourth
    session)."""
    ns = {}
    for name, fn in fns.items():
        fn()
        fn()
        t0 = time.perf_counter()
        fn()
        ns[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    times = {name: [] for name in fns}
    for order in round_orders(list(fns), rounds):
        for name in order:
            fn, n = fns[name], ns[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def round_orders(names: list, rounds: int) -> list:
    """The order of each round, from a Williams design (a balanced Latin square): over n rounds
    (2n for an odd number n of names) each name runs once in each place and right after each
    other name equally often. Every permutation in turn does neither over a few rounds (with 4
    names the first 6 of 24 put the same name first), nor do the cyclic rotations, where each
    name always follows the same one; an A/B of five contenders in rotations read a 10 % gain
    that balanced rounds did not (BENCHMARKS.md, twenty-seventh session)."""
    n = len(names)
    first = [0]  # 0, 1, n-1, 2, n-2, ...: its differences between neighbours are all distinct mod n
    for j in range(1, n):
        first.append((j + 1) // 2 if j % 2 else n - j // 2)
    orders = [[names[(k + r) % n] for k in first] for r in range(n)]
    if n % 2:
        orders += [o[::-1] for o in orders]
    return [list(orders[r % len(orders)]) for r in range(rounds)]


# ---- ONNX Runtime --------------------------------------------------------------------------------
def onnx_lstm_model(ref, T: int, N: int):
    """An ONNX graph equivalent to torch.nn.LSTM `ref` (no projection), input (T, N, I)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    H, D = ref.hidden_size, 2 if ref.bidirectional else 1
    perm = [0, 3, 1, 2]  # ONNX gate k = torch gate perm[k]: i, o, f, c(=g)

    def reorder(w):  # (4H, ...) torch order -> ONNX order
        w = w.detach().double().numpy()
        return np.concatenate([w[k * H:(k + 1) * H] for k in perm])

    nodes, inits = [], []
    cur = "X"
    for k in range(ref.num_layers):
        W, R, Bs = [], [], []
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            W.append(reorder(getattr(ref, "weight_ih" + sfx)))
            R.append(reorder(getattr(ref, "weight_hh" + sfx)))
            if ref.bias:
                Bs.append(np.concatenate([reorder(getattr(ref, "bias_ih" + sfx)), reorder(getattr(ref, "bias_hh" + sfx))]))
            else:
                Bs.append(np.zeros(8 * H))
        for name, arr in ((f"W{k}", W), (f"R{k}", R), (f"B{k}", Bs)):
            inits.append(numpy_helper.from_array(np.stack(arr).astype(np.float32), name))
        y = f"Y{k}"
        nodes.append(helper.make_node(
            "LSTM", [cur, f"W{k}", f"R{k}", f"B{k}"], [y], hidden_size=H,
            direction="bidirectional" if D == 2 else "forward",
        ))
        # Y (T, D, N, H) -> (T, N, D*H), the next layer's input and the model output
        nodes.append(helper.make_node("Transpose", [y], [y + "t"], perm=[0, 2, 1, 3]))
        inits.append(numpy_helper.from_array(np.array([T, N, D * H], dtype=np.int64), f"shape{k}"))
        nodes.append(helper.make_node("Reshape", [y + "t", f"shape{k}"], [f"out{k}"]))
        cur = f"out{k}"
    graph = helper.make_graph(
        nodes, "lstm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, N, ref.input_size])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [T, N, D * H])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT's pool spin-waits after each run by default, taking a core from whichever contender
    # the interleaved rounds time next; off, ORT's own times do not change (BENCHMARKS.md, "Threads").
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---- the speed table -----------------------------------------------------------------------------
def bench_case(c, threads: int, quick: bool, engine: str, ort: bool = True):
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    import lstmkit

    T, N, I, H, L, bi = c[:6]
    packed = len(c) > 6
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, L, bidirectional=bi)
    ours = lstmkit.LSTM.from_torch(ref, engine=engine)
    x = torch.randn(T, N, I)
    lengths = torch.randint(1, T + 1, (N,), generator=torch.Generator().manual_seed(0))
    make = (lambda t: pack_padded_sequence(t, lengths, enforce_sorted=False)) if packed else (lambda t: t)
    rounds = 5 if quick else 11
    mt = 0.01 if quick else 0.03
    with torch.no_grad():
        err = (_data(ours(make(x))[0]) - _data(ref(make(x))[0])).abs().max().item()
    assert err < 1e-4, f"lstmkit and nn.LSTM disagree by {err}"
    fwd = {}
    if ort and not packed:
        try:
            sess = ort_session(onnx_lstm_model(ref, T, N), threads)
            xn = x.numpy()
            with torch.no_grad():
                err = abs(sess.run(None, {"X": xn})[0] - ref(x)[0].numpy()).max()
            assert err < 1e-4, f"ONNX Runtime and nn.LSTM disagree by {err}"
            fwd["fwd_ort"] = lambda: sess.run(None, {"X": xn})
        except ImportError:
            pass

    # Inference times the LSTM call on its input as given: the PackedSequence is made once, as
    # the padded tensor is (pack_padded_sequence's cost, alike for both, is not the module's
    # work: BENCHMARKS.md has it). Training packs inside the timed call: the packing is in the graph.
    x_in = make(x)

    def no_grad(m):
        def f():
            with torch.no_grad():
                m(x_in)
        return f

    fwd["fwd_ours"], fwd["fwd_torch"] = no_grad(ours), no_grad(ref)
    res = {"fwd_ort": float("nan"), **compare(fwd, mt, rounds)}
    xg = x.clone().requires_grad_(True)

    def train_step(m):
        def f():
            y, (h, c) = m(make(xg))
            _data(y).sum().backward()
        return f

    res.update(compare({"fb_ours": train_step(ours), "fb_torch": train_step(ref)}, mt, rounds))
    return res


def _data(y):
    return y.data if hasattr(y, "batch_sizes") else y


def gflops_vs_sgemm(quick: bool) -> dict:
    """At T=100 N=32 I=128 H=256, 1 thread: our forward's GFLOP/s (2 T N (I+H) 4H flops) against a
    plain sgemm of the same total shape, (T N, I+H) @ (I+H, 4H), in torch (MKL/OpenBLAS)."""
    import torch

    import lstmkit

    torch.set_num_threads(1)
    T, N, I, H = 100, 32, 128, 256
    torch.manual_seed(0)
    m = lstmkit.LSTM(I, H)
    x = torch.randn(T, N, I)
    a, b = torch.randn(T * N, I + H), torch.randn(I + H, 4 * H)

    def ours():
        with torch.no_grad():
            m(x)

    t = compare({"ours": ours, "sgemm": lambda: torch.mm(a, b)}, 0.01 if quick else 0.03, 5 if quick else 11)
    flops = 2 * T * N * (I + H) * 4 * H
    res = {"ours_gflops": flops / t["ours"] / 1e9, "sgemm_gflops": flops / t["sgemm"] / 1e9}
    res["ratio"] = res["ours_gflops"] / res["sgemm_gflops"]
    print(f"# T=100 N=32 I=128 H=256 forward, 1 thread: {res['ours_gflops']:.1f} GFLOP/s vs sgemm "
          f"{res['sgemm_gflops']:.1f} GFLOP/s = {res['ratio']:.0%} (target >= 85%)")
    return res


def runtime_vs_ort(quick: bool) -> dict:
    """The torch-free runtime's one step (1, 1, 64, 128), 1 thread, state fed back, vs ONNX Runtime."""
    import dataclasses

    import numpy as np
    import torch

    import lstmkit
    from lstmkit.runtime import Runtime

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(64, 128)
    m = lstmkit.LSTM.from_torch(ref)
    rt = Runtime(dataclasses.replace(m.config), {n: p.detach().numpy().copy() for n, p in m.named_parameters()})
    x = np.random.default_rng(0).standard_normal((1, 1, 64)).astype(np.float32)
    state = [rt(x)[1]]

    def step():
        state[0] = rt(x, state[0])[1]

    sess = ort_session(onnx_lstm_model(ref, 1, 1), 1)
    t = compare({"runtime": step, "ort": lambda: sess.run(None, {"X": x})}, 0.01 if quick else 0.03, 5 if quick else 11)
    res = {"runtime_us": t["runtime"] * 1e6, "ort_us": t["ort"] * 1e6, "speedup": t["ort"] / t["runtime"]}
    print(f"# runtime one step 1,1,64,128, 1 thread: {res['runtime_us']:.1f} us vs ORT {res['ort_us']:.1f} us "
          f"= {res['speedup']:.2f}x (target >= 2x)")
    return res


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba
    import torch

    try:
        import onnxruntime

        ortv = onnxruntime.__version__
    except ImportError:
        ortv = "-"
    return (f"{cpu}, {os.cpu_count()} cores; python {platform.python_version()}, torch {torch.__version__}, "
            f"numba {numba.__version__}, onnxruntime {ortv}")


def speed_table(threads: int, quick: bool, engine: str, only=None, cases=CASES, ort=True) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    print(f"\n# lstmkit bench, {threads} thread(s); {machine()}; load average {load_average()}")
    print("# times: median per call (ms); speedup = their time / ours (target in brackets)")
    hdr = f"{'case':<32} {'ours':>8} {'torch':>8} {'ORT':>8} {'vs torch':>13} {'vs ORT':>13} | {'ours':>8} {'torch':>8} {'fwd+bwd vs torch':>17}"
    print(f"{'':<32} {'---------------- inference ----------------':^66} | {'------ forward+backward ------':^36}")
    print(hdr)
    rows = []
    for k, (c, tgt) in enumerate(cases):
        if only is not None and k not in only:
            continue
        r = bench_case(c, threads, quick, engine, ort)
        s1, s2, s3 = r["fwd_torch"] / r["fwd_ours"], r["fwd_ort"] / r["fwd_ours"], r["fb_torch"] / r["fb_ours"]
        ms = lambda v: f"{v * 1e3:8.3f}" if v == v else f"{'-':>8}"  # noqa: E731 - nan: not measured
        sp = lambda s, t: f"{s:5.2f}x [{t:g}x]" + ("*" if s < t else " ") if s == s else "-"  # noqa: E731
        print(f"{case_name(c):<32} {ms(r['fwd_ours'])} {ms(r['fwd_torch'])} {ms(r['fwd_ort'])} "
              f"{sp(s1, tgt[0]):>13} {sp(s2, tgt[1]):>13} | {ms(r['fb_ours'])} {ms(r['fb_torch'])} {sp(s3, tgt[2]):>17}",
              flush=True)
        rows.append(dict(case=case_name(c), **r, targets=tgt, threads=threads))
    print("# * = below target")
    return rows


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def markdown_table(rows: list[dict], extras: dict) -> str:
    """The speed table (every thread count) in the layout of BENCHMARKS.md's CPU section."""
    lines = [
        f"{machine()}; load average at the end {load_average()}",
        "",
        "| case: T, N, input, hidden | thr | ours ms | torch ms | ORT ms | fwd vs nn.LSTM | fwd vs ORT "
        "| fwd+bwd ours / torch ms | fwd+bwd vs nn.LSTM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["targets"]
        s1, s2, s3 = r["fwd_torch"] / r["fwd_ours"], r["fwd_ort"] / r["fwd_ours"], r["fb_torch"] / r["fb_ours"]
        sp = lambda v, tg: f"{v:.2f}x [{tg:g}x]" + ("*" if v < tg else "") if v == v else "–"  # noqa: E731 - nan: no ORT
        ort_ms = f"{r['fwd_ort'] * 1e3:.3f}" if r["fwd_ort"] == r["fwd_ort"] else "–"
        lines.append(
            f"| {r['case']} | {r['threads']} | {r['fwd_ours'] * 1e3:.3f} | {r['fwd_torch'] * 1e3:.3f} | {ort_ms} "
            f"| {sp(s1, t[0])} | {sp(s2, t[1])} | {r['fb_ours'] * 1e3:.3f} / {r['fb_torch'] * 1e3:.3f} | {sp(s3, t[2])} |"
        )
    if "gflops" in extras:
        g = extras["gflops"]
        lines.append(f"\nT=100 N=32 I=128 H=256 forward, 1 thread: {g['ours_gflops']:.1f} GFLOP/s, sgemm of the same "
                     f"shape {g['sgemm_gflops']:.1f} GFLOP/s: {g['ratio']:.0%} (target >= 85%)")
    if "runtime" in extras:
        r = extras["runtime"]
        lines.append(f"\nruntime one step 1,1,64,128, 1 thread: {r['runtime_us']:.1f} us vs ONNX Runtime "
                     f"{r['ort_us']:.1f} us: {r['speedup']:.2f}x (target >= 2x)")
    return "\n".join(lines) + "\n"


# ---- memory: one fresh process per (case, implementation) ----------------------------------------
def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(case_index: int, impl: str, threads: int) -> dict:
    """Peak RSS growth of one forward+backward, after imports and a warm-up at a tiny size."""
    import torch

    import lstmkit

    torch.set_num_threads(threads)
    T, N, I, H, L, bi = CASES[case_index][0][:6]
    torch.manual_seed(0)

    def make(T, N):
        ref = torch.nn.LSTM(I, H, L, bidirectional=bi)
        return ref if impl == "torch" else lstmkit.LSTM.from_torch(ref)

    m = make(2, 1)  # warm-up: load kernels / allocator pools at a tiny size
    m(torch.randn(2, 1, I))[0].sum().backward()
    m = make(T, N)
    x = torch.randn(T, N, I)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    y, _ = m(x)
    y.sum().backward()
    peak = _rss_kib("VmHWM")
    return {"peak_growth_mib": (peak - before) / 1024}


def memory_table(threads: int) -> list[dict]:
    print("\n# peak memory of forward+backward (max RSS growth in a fresh process, MiB)")
    print(f"{'case':<32} {'lstmkit':>9} {'torch':>9} {'ratio':>7}")
    rows = []
    for k, (c, _) in enumerate(CASES):
        got = {}
        for impl in ("lstmkit", "torch"):
            out = subprocess.run(
                [sys.executable, "-m", "lstmkit.cli.bench", "--memory-child", str(k), impl, "--threads", str(threads)],
                capture_output=True, text=True, check=True,
            )
            got[impl] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]
        ratio = got["lstmkit"] / max(got["torch"], 1e-9)
        print(f"{case_name(c):<32} {got['lstmkit']:9.2f} {got['torch']:9.2f} {ratio:7.2f}", flush=True)
        rows.append(dict(case=case_name(c), **got))
    return rows


# ---- startup: import, first forward with a warm and a cold compile cache ---------------------------
_STARTUP = r"""
import time, json, sys
t0 = time.perf_counter()
import lstmkit
t1 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[1]))
m = lstmkit.LSTM(64, 128)
x = torch.randn(10, 1, 64)
t2 = time.perf_counter()
with torch.no_grad():
    m(x)
t3 = time.perf_counter()
y, _ = m(x)
y.sum().backward()
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first_forward": t3 - t2, "first_backward": t4 - t3}))
"""


def startup(threads: int) -> dict:
    import tempfile

    def run(env):
        out = subprocess.run([sys.executable, "-c", _STARTUP, str(threads)], capture_output=True, text=True,
                             check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    env = dict(os.environ)
    run(env)  # make sure the cache is warm
    warm = [run(env) for _ in range(3)]
    with tempfile.TemporaryDirectory() as d:
        cold = run(dict(env, NUMBA_CACHE_DIR=d))
    med = lambda k: sorted(w[k] for w in warm)[1]  # noqa: E731
    print("\n# startup (fresh processes)")
    print(f"import lstmkit: {med('import'):.3f} s (target < 0.5 s)")
    print(f"first forward, warm compile cache: {med('first_forward'):.3f} s (target < 1 s); "
          f"first forward+backward after it: {med('first_backward'):.3f} s")
    print(f"first forward, cold compile cache: {cold['first_forward']:.3f} s; first backward: {cold['first_backward']:.3f} s")
    return {"warm": warm, "cold": cold}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lstmkit bench", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=str, default="1,2", help="thread counts, comma-separated (default 1,2)")
    ap.add_argument("--extra", action="store_true", help="also the sizes beyond the grid (EXTRA_CASES)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory of forward+backward")
    ap.add_argument("--startup", action="store_true", help="also measure import and first-call times")
    ap.add_argument("--cases", type=str, default=None, help="comma-separated case indices (0-based)")
    ap.add_argument("--engine", default="auto", choices=ENGINE_NAMES, help="lstmkit engine (default auto)")
    ap.add_argument("--json", type=str, default=None, help="write the results to this file")
    ap.add_argument("--markdown", type=str, default=None, help="write the speed table as markdown (BENCHMARKS.md rows)")
    ap.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    if a.memory_child:
        print(json.dumps(memory_child(int(a.memory_child[0]), a.memory_child[1], threads[0])))
        return 0
    only = None if a.cases is None else {int(k) for k in a.cases.split(",")}
    out = {"speed": [], "extras": {}}
    for n in threads:
        out["speed"] += speed_table(n, a.quick, a.engine, only)
        if a.extra:
            out["speed"] += speed_table(n, True, a.engine, None, EXTRA_CASES, ort=False)
    if only is None:
        out["extras"]["gflops"] = gflops_vs_sgemm(a.quick)
        try:
            out["extras"]["runtime"] = runtime_vs_ort(a.quick)
        except ImportError:
            pass
    if a.memory:
        out["memory"] = memory_table(threads[-1])
    if a.startup:
        out["startup"] = startup(threads[-1])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown_table(out["speed"], out["extras"]))
    return 0
