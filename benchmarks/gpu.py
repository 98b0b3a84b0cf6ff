"""GPU benchmark: lstmkit (engine="triton") against torch.nn.LSTM (cuDNN), on one CUDA GPU.

    python benchmarks/gpu.py                    # check, time, print, rewrite BENCHMARKS.md's GPU section
    python benchmarks/gpu.py --out DIR          # also write DIR/gpu_section.md and DIR/gpu.json
    python benchmarks/gpu.py --apply FILE.md    # no GPU: splice a section written by --out into BENCHMARKS.md
    python benchmarks/gpu.py --smoke            # no GPU: the whole script at toy shapes on the CPU
                                                # (Triton interpreter), to check the script itself

In one run: (1) correctness against torch.nn.LSTM - float64 at 1e-10 and float32 at 1e-5
(outputs and every gradient, every option, packed input) - then, at every benchmark case, a
same-dtype comparison with cuDNN; (2) timings of forward (no grad) and forward+backward,
CUDA events, median of repeats, lstmkit vs torch.nn.LSTM vs a torch.nn.LSTMCell loop.
Everything runs in one process on one GPU so the ratios compare like with like. A time
budget (--budget, default 420 s) keeps the whole run under ~8 minutes on an H100: cases
it cannot reach are listed as not run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the checkout's lstmkit, installed or not
SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cpu" if SMOKE else "cuda"

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

HEADING = "## GPU engine (Triton)"

# name, B, T, I, H, layers, bidirectional, proj, dtype, packed (variable lengths), cell-loop baseline
CASES = [
    ("cuDNN persistent shape", 16, 1024, 768, 768, 1, False, 0, torch.float16, False, True),
    ("cuDNN persistent shape", 16, 1024, 768, 768, 1, False, 0, torch.bfloat16, False, False),
    ("mid batch", 64, 100, 512, 512, 1, False, 0, torch.float32, False, True),
    ("mid batch", 64, 100, 512, 512, 1, False, 0, torch.float16, False, False),
    ("batch 1, long", 1, 1000, 256, 256, 1, False, 0, torch.float32, False, True),
    ("2 layers bidirectional", 32, 200, 512, 512, 2, True, 0, torch.float16, False, False),
    ("2 layers bidirectional", 32, 200, 512, 512, 2, True, 0, torch.float32, False, False),
    ("packed, lengths 50..200", 64, 200, 512, 512, 1, False, 0, torch.float16, True, False),
    ("packed bidirectional", 64, 200, 512, 512, 1, True, 0, torch.float16, True, False),
    ("proj_size 256", 32, 200, 512, 1024, 1, False, 256, torch.float16, False, False),
]
DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Same-dtype agreement with cuDNN at the benchmark shapes: max |ours - cudnn| / max |cudnn|.
CASE_TOL = {torch.float16: 3e-2, torch.bfloat16: 1e-1, torch.float32: 1e-3}


# ---- building inputs ---------------------------------------------------------------------------
def make_pair(B, T, I, H, layers, bidir, proj, dtype, seed=0):
    import lstmkit

    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, layers, bidirectional=bidir, proj_size=proj, device=DEV, dtype=dtype)
    ours = lstmkit.LSTM.from_torch(ref, engine="triton")
    return ref, ours


def make_input(B, T, I, dtype, packed, seed=1):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, B, I, device=DEV, dtype=dtype, generator=g)
    if not packed:
        return x, None
    lengths = torch.randint(T // 4, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = T
    return x, lengths


def run(model, x, lengths, hx=None):
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    y, (h, c) = model(inp, hx)
    return [y if lengths is None else y.data, h, c]


def fwd_bwd(model, x, lengths, grads, hx=None):
    outs = run(model, x, lengths, hx)
    torch.autograd.backward(outs, grads)
    return outs


class graphs:
    """Turn the triton engine's CUDA-graph replay of its step loops on (or off) for a block."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        from lstmkit.engines.triton import engine as triton_engine

        self.mod, self.was = triton_engine, triton_engine.CUDA_GRAPHS
        triton_engine.CUDA_GRAPHS = self.on

    def __exit__(self, *exc):
        self.mod.CUDA_GRAPHS = self.was


# ---- correctness -------------------------------------------------------------------------------
def rel_err(a, b, floor=1e-30):
    """max |a - b| / max(floor, max |b|): floor=1 is the tests' rule (absolute below magnitude 1)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(floor)).item()


def compare(ref, ours, x, lengths, hx=None, seed=2, floor=1e-30):
    """Worst error (rel_err) over outputs and the gradients of input, h0, c0, every parameter."""
    results = []
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        state = None if hx is None else tuple(t.detach().clone().requires_grad_(True) for t in hx)
        outs = run(m, xi, lengths, state)
        g = torch.Generator(device=DEV).manual_seed(seed)
        grads = [torch.randn(o.shape, device=DEV, dtype=o.dtype, generator=g) for o in outs]
        torch.autograd.backward(outs, grads)
        leaves = [xi] + ([] if state is None else list(state))
        results.append([o.detach() for o in outs] + [t.grad for t in leaves] + [p.grad for p in m.parameters()])
    return max(rel_err(b, a, floor) for a, b in zip(*results))


def exactness_checks():
    """float64 (1e-10) and float32 (1e-5, TF32 off) against torch.nn.LSTM, every option."""
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            for layers, bidir, proj, bias, packed, graphed in (
                (1, False, 0, True, False, False), (1, True, 0, False, True, False), (2, True, 3, True, True, False),
                (1, False, 7, True, False, False), (2, False, 0, True, True, False),
                (2, True, 0, True, False, True), (1, True, 5, False, True, True),
            ):
                name = (f"{DTYPE_NAME[dtype]} layers={layers} bidir={bidir} proj={proj} bias={bias} packed={packed}"
                        + (" cuda-graphs" if graphed else ""))
                try:
                    torch.manual_seed(0)
                    import lstmkit

                    ref = nn.LSTM(19, 40, layers, bias=bias, bidirectional=bidir, proj_size=proj,
                                  device=DEV, dtype=dtype)
                    ours = lstmkit.LSTM.from_torch(ref, engine="triton")
                    x, lengths = make_input(37, 9, 19, dtype, packed)
                    P = proj or 40
                    D = 2 if bidir else 1
                    hx = (torch.randn(D * layers, 37, P, device=DEV, dtype=dtype),
                          torch.randn(D * layers, 37, 40, device=DEV, dtype=dtype))
                    with graphs(graphed):  # graphed: 1st call eager, 2nd captures, 3rd replays
                        for _ in range(3 if graphed else 1):
                            err = compare(ref, ours, x, lengths, hx, floor=1.0)
                    rows.append((name, err, tol, err <= tol, ""))
                except Exception as e:  # report and go on: the other checks and timings still tell
                    rows.append((name, math.nan, tol, False, f"{type(e).__name__}: {e}"[:300]))
                print(f"  check {rows[-1][0]}: err {rows[-1][1]:.2e} (tol {tol:g}) "
                      f"{'ok' if rows[-1][3] else 'FAIL'} {rows[-1][4]}", flush=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows


# ---- timing ------------------------------------------------------------------------------------
def time_ms(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    if SMOKE:  # no CUDA events on the CPU
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class CellLoop(nn.Module):
    """The baseline people write by hand: torch.nn.LSTMCell called once per step (1 layer)."""

    def __init__(self, ref: nn.LSTM):
        super().__init__()
        w = ref.weight_ih_l0
        self.cell = nn.LSTMCell(ref.input_size, ref.hidden_size, device=w.device, dtype=w.dtype)
        self.cell.load_state_dict({k[:-3]: v for k, v in ref.state_dict().items()})

    def forward(self, x, hx=None):
        h = c = x.new_zeros(x.shape[1], self.cell.hidden_size)
        ys = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
            ys.append(h)
        return torch.stack(ys), (h[None], c[None])


def bench_case(case, reps):
    name, B, T, I, H, layers, bidir, proj, dtype, packed, cell = case
    if SMOKE:  # toy shapes: this only exercises the script
        B, T, I, H = min(B, 3), min(T, 5), min(I, 6), min(H, 8)
        proj = min(proj, H - 1)
    ref, ours = make_pair(B, T, I, H, layers, bidir, proj, dtype)
    x, lengths = make_input(B, T, I, dtype, packed)
    row = dict(name=name, B=B, T=T, I=I, H=H, layers=layers, bidir=bidir, proj=proj,
               dtype=DTYPE_NAME[dtype], packed=packed)
    try:
        row["err_vs_cudnn"] = compare(ref, ours, x, lengths)
    except Exception as e:
        row["err_vs_cudnn"] = math.nan
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        return row
    row["check_ok"] = row["err_vs_cudnn"] <= CASE_TOL[dtype]

    # (key, model, CUDA graphs on)
    models = [("lstmkit", ours, False), ("lstmkit_graphs", ours, True), ("cudnn", ref, False)]
    if cell and not packed and layers == 1 and not bidir and not proj:
        models.append(("cell_loop", CellLoop(ref), False))
    xg = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in run(ref, x, lengths)]
    for key, m, graphed in models:
        lens = lengths if key != "cell_loop" else None

        def fwd():
            with torch.no_grad():
                run(m, x, lens)

        def fb():
            fwd_bwd(m, xg, lens, grads)

        try:
            with graphs(graphed):
                if graphed:  # the replayed graphs must still agree with cuDNN
                    for _ in range(3):
                        row["err_graphs_vs_cudnn"] = compare(ref, ours, x, lengths)
                row[f"{key}_fwd_ms"] = time_ms(fwd, reps)
                row[f"{key}_fwdbwd_ms"] = time_ms(fb, reps)
        except Exception as e:  # one failing mode must not cost the others' numbers
            row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:200]
        for p in m.parameters():
            p.grad = None
    from lstmkit.engines.triton import engine as triton_engine

    triton_engine.clear_graphs()  # their static buffers would pile up over the cases
    if "err_graphs_vs_cudnn" in row:
        row["check_ok"] = row["check_ok"] and row["err_graphs_vs_cudnn"] <= CASE_TOL[dtype]
    return row


# ---- the report ----------------------------------------------------------------------------------
def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(meta, checks, rows, skipped):
    L = [HEADING, ""]
    L.append(f"Measured by `python benchmarks/gpu.py` on **{meta['gpu']}** ({meta['date']}; torch {meta['torch']}, "
             f"triton {meta['triton']}, CUDA {meta['cuda']}). Times are medians of {meta['reps']} repeats, CUDA events, "
             "in milliseconds; forward is under `torch.no_grad()`, forward+backward backpropagates a fixed random "
             "gradient of every output. \"lstmkit\" launches its fused step kernels eagerly; \"+graphs\" replays "
             "them from CUDA graphs (`LSTMKIT_TRITON_GRAPHS=1`, shapes seen before). \"vs cuDNN\" = lstmkit time / "
             "torch.nn.LSTM time, eager / graphs (below 1 = lstmkit faster); \"err vs cuDNN\" = max relative "
             "difference of outputs and all gradients, eager / graphs; \"cell loop\" = torch.nn.LSTMCell called per "
             "step, its time / lstmkit's best time. fp32: lstmkit's recurrent "
             "GEMM follows `torch.backends.cuda.matmul.allow_tf32` (off by default, so IEEE fp32), cuDNN follows "
             "`torch.backends.cudnn.allow_tf32` (on by default).")
    L.append("")
    n_ok = sum(c[3] for c in checks)
    L.append(f"Correctness against torch.nn.LSTM on this GPU: {n_ok}/{len(checks)} exactness checks passed "
             "(float64 at 1e-10, float32 at 1e-5 with TF32 off; outputs and every gradient; bidirectional, "
             "proj_size, no bias, packed)." + ("" if n_ok == len(checks) else " FAILED: " + "; ".join(
                 f"{c[0]} err={c[1]:.2e} {c[4]}" for c in checks if not c[3])))
    L.append("")
    L.append("| case | B | T | I | H | dtype | err vs cuDNN | fwd: lstmkit | +graphs | cuDNN | vs cuDNN "
             "| fwd+bwd: lstmkit | +graphs | cuDNN | vs cuDNN | cell loop fwd+bwd | cell loop / lstmkit |")
    L.append("|" + "---|" * 16)
    ms = lambda r, k: f"{r[k]:.2f}" if k in r else "err"  # noqa: E731
    for r in rows:
        head = f"| {r['name']} | {r['B']} | {r['T']} | {r['I']} | {r['H']} | {r['dtype']} "
        if "error" in r:
            L.append(head + f"| ERROR: {r['error']} |" + " |" * 9)
            continue
        err = f"{r['err_vs_cudnn']:.1e}"
        if "err_graphs_vs_cudnn" in r:
            err += f" / {r['err_graphs_vs_cudnn']:.1e}"
        err += "" if r.get("check_ok") else " FAIL"
        cells = [err]
        for ph in ("fwd", "fwdbwd"):
            a, g, c = (r.get(f"{k}_{ph}_ms") for k in ("lstmkit", "lstmkit_graphs", "cudnn"))
            cells += [ms(r, f"lstmkit_{ph}_ms"), ms(r, f"lstmkit_graphs_{ph}_ms"), ms(r, f"cudnn_{ph}_ms"),
                      f"{fmt_ratio(a, c)} / {fmt_ratio(g, c)}"]
        cl = r.get("cell_loop_fwdbwd_ms")
        best = min(v for v in (r.get("lstmkit_fwdbwd_ms"), r.get("lstmkit_graphs_fwdbwd_ms")) if v) \
            if (r.get("lstmkit_fwdbwd_ms") or r.get("lstmkit_graphs_fwdbwd_ms")) else None
        cells += [f"{cl:.2f}" if cl else "-", fmt_ratio(cl, best) if cl and best else "-"]
        L.append(head + "| " + " | ".join(cells) + " |")
    errs = [f"{r['name']} {r['dtype']} {k[:-6]}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    if errs:
        L.append("")
        L.append("Errors: " + "; ".join(errs))
    if skipped:
        L.append("")
        L.append("Not run (time budget): " + "; ".join(skipped) + ".")
    L.append("")
    L.append("Targets (issue 7): within 1.25x of cuDNN where cuDNN runs its persistent kernels (1 layer, 1 direction, "
             "no projection, unpacked, fp16, H a multiple of 128); faster than cuDNN for bidirectional, multi-layer, "
             "proj_size and packed input; >= 10x faster than the LSTMCell loop.")
    L.append("")
    return "\n".join(L)


def splice(section: str, path: Path) -> None:
    """Replace the GPU section of BENCHMARKS.md (from its heading to the next '## '), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pat = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n\n"
    text = pat.sub(lambda _: section, text, count=1) if pat.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="timed repeats per measurement (median)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later cases are skipped past it")
    ap.add_argument("--out", type=Path, help="also write gpu_section.md and gpu.json here")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--apply", type=Path, help="splice this section file into BENCHMARKS.md and exit (no GPU)")
    ap.add_argument("--smoke", action="store_true", help="toy shapes on the CPU (Triton interpreter); never "
                    "writes BENCHMARKS.md; checks the script, measures nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.no_write, args.reps = True, 2
    bench_md = ROOT / "BENCHMARKS.md"

    if args.apply:
        splice(args.apply.read_text(), bench_md)
        print(f"wrote {args.apply} into {bench_md}")
        return 0
    if not SMOKE and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured.",
              file=sys.stderr)
        return 2
    try:
        import triton
        import lstmkit.engines.triton_engine  # noqa: F401
    except ImportError as e:
        print(f"benchmarks/gpu.py needs triton: {e}", file=sys.stderr)
        return 2

    if SMOKE:  # no CUDA graphs on the CPU: "capture" = remember the loop, "replay" = run it again
        from lstmkit.engines.triton import engine as triton_engine

        triton_engine.GRAPH_DEVICES = ("cpu",)
        triton_engine._capture = lambda fn: (fn(), fn)[1]
    t0 = time.time()
    gpu = "CPU smoke run (Triton interpreter), NOT A MEASUREMENT" if SMOKE else torch.cuda.get_device_name()
    meta = dict(gpu=gpu, date=time.strftime("%Y-%m-%d", time.gmtime()),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), reps=args.reps)
    print(f"GPU: {meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}", flush=True)
    print("exactness checks vs torch.nn.LSTM:", flush=True)
    checks = exactness_checks()
    print(f"  ({time.time() - t0:.0f} s)", flush=True)

    rows, skipped = [], []
    for case in CASES:
        label = f"{case[0]} B={case[1]} T={case[2]} H={case[4]} {DTYPE_NAME[case[8]]}"
        if time.time() - t0 > args.budget:
            skipped.append(label)
            continue
        t1 = time.time()
        row = bench_case(case, args.reps)
        rows.append(row)
        print(f"{label}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if k.endswith("ms") or k.startswith("err")
                                      or k == "error") + f"  ({time.time() - t1:.0f} s)", flush=True)

    section = markdown(meta, checks, rows, skipped)
    print("\n" + section)
    if not args.no_write:
        splice(section, bench_md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_section.md").write_text(section)
        (args.out / "gpu.json").write_text(json.dumps(dict(meta=meta, checks=checks, rows=rows, skipped=skipped),
                                                      indent=1, default=str))
    print(f"total {time.time() - t0:.0f} s", flush=True)
    failed = [c for c in checks if not c[3]] + [r for r in rows if not r.get("check_ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
