"""GPU benchmark: lstmkit (engine="triton") against torch.nn.LSTM (cuDNN), on one CUDA GPU.

    python benchmarks/gpu.py --out DIR          # check, time; DIR/gpu.json + DIR/gpu_section.md after every step
    python benchmarks/gpu.py --write            # also replace BENCHMARKS.md's GPU section at the end
    python benchmarks/gpu.py --apply FILE.md    # no GPU: splice a section written by --out into BENCHMARKS.md
    python benchmarks/gpu.py --dry-run --out D  # no GPU: the whole script at toy shapes on the CPU
                                                # (Triton interpreter), to check the script itself (CI runs it)

On the lent GPU machine (Python 3.12, torch 2.11, Triton 3.6, numba/scipy/safetensors/
threadpoolctl/onnx already installed, no network), from the repository root:

    python -m pip install --no-deps --no-build-isolation -e .   # lstmkit itself; the dependencies
                                                # are there, and without network pip must not try to
                                                # fetch a build backend (setuptools is installed)
    python benchmarks/gpu.py --out "$OUT"       # (it finds ./src without the install too)
    python -m pytest tests/test_triton_engine.py -m gpu -q   # the compiled-kernel test tier

If the install fails, `PYTHONPATH=src` in front of each command does the same.

In one run, in this order, each step written to --out as soon as it is done (a run killed
at the device's time limit keeps everything before the kill):
(1) the environment: GPU, versions, whether Triton's cached-launch path works, how
    torch.nn.LSTM and lstmkit behave under torch.autocast (output dtypes);
(2) correctness against torch.nn.LSTM - float64 at 1e-10 and float32 at 1e-5 with TF32 off in
    both (outputs and every gradient, every option, packed input, CUDA-graph replays) - and
    engine="auto"'s self-check verdicts;
(3) per benchmark case: agreement with cuDNN in the case's dtype (fp32 with TF32 off on both
    sides), then timings of forward (no grad) and forward+backward, CUDA events, median of
    repeats: lstmkit eager, lstmkit with CUDA-graph replay, torch.nn.LSTM (cuDNN), and a
    torch.nn.LSTMCell loop. Everything runs in one process on one GPU so the ratios compare
    like with like.
The time budget (--budget, default 330 s, first compiles included) is checked before every
case and every measurement: a case starts only if the slowest case so far still fits. Cases
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
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the checkout's lstmkit, installed or not
SMOKE = "--dry-run" in sys.argv or "--smoke" in sys.argv
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
    ("mid batch", 64, 100, 256, 256, 1, False, 0, torch.float16, False, True),
    ("mid batch", 64, 100, 512, 512, 1, False, 0, torch.float32, False, True),
    ("batch 1, long", 1, 1000, 256, 256, 1, False, 0, torch.float32, False, True),
    ("2 layers bidirectional", 32, 200, 512, 512, 2, True, 0, torch.float16, False, False),
    ("packed, lengths 50..200", 64, 200, 512, 512, 1, False, 0, torch.float16, True, False),
    ("cuDNN persistent shape", 16, 1024, 768, 768, 1, False, 0, torch.bfloat16, False, False),
    ("packed bidirectional", 64, 200, 512, 512, 1, True, 0, torch.float16, True, False),
    ("proj_size 256", 32, 200, 512, 1024, 1, False, 256, torch.float16, False, False),
    ("2 layers bidirectional", 32, 200, 512, 512, 2, True, 0, torch.float32, False, False),
]
DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Same-dtype agreement with cuDNN at the benchmark shapes: max |ours - cudnn| / max |cudnn|.
# fp32 is compared with TF32 off on both sides, so only summation order differs.
CASE_TOL = {torch.float16: 3e-2, torch.bfloat16: 1e-1, torch.float32: 1e-4}
FIRST_CASE_GUESS_S = 60.0  # budget for the first case (compiles included) before one has been timed


# ---- TF32 off, whichever torch API is in force ---------------------------------------------------
class tf32_off:
    """IEEE fp32 for torch.matmul (so lstmkit's dots too) and for cuDNN's RNN within the block.

    torch >= 2.9 has `fp32_precision` settings; mixing them with the legacy `allow_tf32` flags
    makes reading the legacy ones raise, so only the new API is touched when it exists."""

    def __enter__(self):
        b = torch.backends
        self.new = hasattr(b.cuda.matmul, "fp32_precision")
        if self.new:
            self.saved = (b.cuda.matmul.fp32_precision, b.cudnn.rnn.fp32_precision)
            b.cuda.matmul.fp32_precision = "ieee"
            b.cudnn.rnn.fp32_precision = "ieee"
        else:
            self.saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
            b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc):
        b = torch.backends
        if self.new:
            b.cuda.matmul.fp32_precision, b.cudnn.rnn.fp32_precision = self.saved
        else:
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = self.saved


# ---- building inputs ---------------------------------------------------------------------------
def make_pair(B, T, I, H, layers, bidir, proj, dtype, seed=0, bias=True, engine="triton"):
    import lstmkit

    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, layers, bias=bias, bidirectional=bidir, proj_size=proj, device=DEV, dtype=dtype)
    ours = lstmkit.LSTM.from_torch(ref, engine=engine)
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


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


# ---- correctness -------------------------------------------------------------------------------
def rel_err(a, b, floor=1e-30):
    """max |a - b| / max(floor, max |b|): floor=1 is the tests' rule (absolute below magnitude 1)."""
    if a.numel() == 0:
        return 0.0
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


# (layers, bidirectional, proj, bias, packed, CUDA graphs)
CHECK_OPTIONS = [
    (1, False, 0, True, False, False), (1, True, 0, False, True, False), (2, True, 3, True, True, False),
    (1, False, 7, True, False, False), (2, False, 0, True, True, False),
    (2, True, 0, True, False, True), (1, True, 5, False, True, True),
]


def exactness_checks(report):
    """float64 (1e-10) and float32 (1e-5, TF32 off) against torch.nn.LSTM, every option."""
    B, T, I, H = (5, 4, 5, 8) if SMOKE else (37, 9, 19, 40)
    options = [CHECK_OPTIONS[2], CHECK_OPTIONS[-1]] if SMOKE else CHECK_OPTIONS
    with tf32_off():
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            for layers, bidir, proj, bias, packed, graphed in options:
                name = (f"{DTYPE_NAME[dtype]} layers={layers} bidir={bidir} proj={proj} bias={bias} packed={packed}"
                        + (" cuda-graphs" if graphed else ""))
                t0 = time.time()
                try:
                    ref, ours = make_pair(B, T, I, H, layers, bidir, proj, dtype, bias=bias)
                    x, lengths = make_input(B, T, I, dtype, packed)
                    D, P = (2 if bidir else 1), (proj or H)
                    hx = (torch.randn(D * layers, B, P, device=DEV, dtype=dtype),
                          torch.randn(D * layers, B, H, device=DEV, dtype=dtype))
                    with graphs(graphed):  # graphed: 1st call eager, 2nd captures, 3rd replays
                        err = max(compare(ref, ours, x, lengths, hx, floor=1.0) for _ in range(3 if graphed else 1))
                    row = dict(name=name, err=err, tol=tol, ok=err <= tol, error="")
                except Exception as e:  # report and go on: the other checks and timings still tell
                    row = dict(name=name, err=math.nan, tol=tol, ok=False, error=f"{type(e).__name__}: {e}"[:300])
                row["seconds"] = round(time.time() - t0, 2)
                report.checks.append(row)
                print(f"  check {name}: err {row['err']:.2e} (tol {tol:g}) {'ok' if row['ok'] else 'FAIL'} "
                      f"{row['error']} ({row['seconds']:.1f} s)", flush=True)
                report.save()


def self_check_verdicts(report):
    """engine="auto"'s self-check on this device for each dtype (see engines/triton/selfcheck.py)."""
    from lstmkit.engines.triton import selfcheck

    if SMOKE:
        selfcheck.DEVICES = ("cpu",)
    for dtype in (torch.float32,) if SMOKE else (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        t0 = time.time()
        try:
            ref, ours = make_pair(4, 5, 8, 16, 1, False, 0, dtype, engine="auto")
            x, _ = make_input(4, 5, 8, dtype, False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                from lstmkit.engines import get_layer_fn

                layer_fn = get_layer_fn("auto", x) if not SMOKE else selfcheck.checked_lstm_layer
                p = ours.layer_params(0, 0)
                with torch.no_grad():
                    layer_fn(x.reshape(-1, 8), [4] * 5, x.new_zeros(4, 16), x.new_zeros(4, 16), p)
            verdicts = {k: v for k, v in selfcheck.VERDICTS.items() if k[1] == dtype}
            verdict = "; ".join("trusted" if v is None else f"NOT TRUSTED: {v}" for v in verdicts.values()) or "-"
            if caught:
                verdict += " | warning: " + str(caught[0].message)[:200]
        except Exception as e:
            verdict = f"ERROR {type(e).__name__}: {e}"[:300]
        report.env[f"self_check_{DTYPE_NAME[dtype]}"] = verdict
        print(f"  self-check {DTYPE_NAME[dtype]}: {verdict} ({time.time() - t0:.1f} s)", flush=True)
        report.save()


def autocast_behaviour(report):
    """Output dtypes of torch.nn.LSTM and lstmkit.LSTM (fp32 weights) under torch.autocast."""
    device_type = "cpu" if SMOKE else "cuda"
    for dtype in (torch.float16, torch.bfloat16):
        row = {}
        try:
            ref, ours = make_pair(3, 4, 8, 16, 1, False, 0, torch.float32)
            x, _ = make_input(3, 4, 8, torch.float32, False)
            with torch.autocast(device_type, dtype=dtype):
                for key, m in (("torch", ref), ("lstmkit", ours)):
                    try:
                        y, (h, c) = m(x)
                        row[key] = f"y {DTYPE_NAME.get(y.dtype, y.dtype)}, h {DTYPE_NAME.get(h.dtype, h.dtype)}"
                    except Exception as e:
                        row[key] = f"ERROR {type(e).__name__}: {e}"[:200]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        report.env[f"autocast_{DTYPE_NAME[dtype]}"] = row
        print(f"  autocast({device_type}, {DTYPE_NAME[dtype]}) with fp32 weights: {row}", flush=True)
    report.save()


# ---- timing ------------------------------------------------------------------------------------
def time_ms(fn, reps, warmup=2):
    for _ in range(0 if SMOKE else warmup):
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


def bench_case(case, reps, report, deadline):
    name, B, T, I, H, layers, bidir, proj, dtype, packed, cell = case
    if SMOKE:  # toy shapes: this only exercises the script
        B, T, I, H = min(B, 3), min(T, 5), min(I, 6), min(H, 8)
        proj = min(proj, H - 1)
    row = dict(name=name, B=B, T=T, I=I, H=H, layers=layers, bidir=bidir, proj=proj,
               dtype=DTYPE_NAME[dtype], packed=packed)
    report.rows.append(row)
    ref, ours = make_pair(B, T, I, H, layers, bidir, proj, dtype)
    x, lengths = make_input(B, T, I, dtype, packed)
    # Correctness first: same dtype as cuDNN; fp32 with TF32 off on both sides.
    try:
        with tf32_off():
            row["err_vs_cudnn"] = compare(ref, ours, x, lengths)
            with graphs(True):  # eager, capture, replay: the replayed graphs must agree too
                row["err_graphs_vs_cudnn"] = max(compare(ref, ours, x, lengths) for _ in range(3))
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        report.save()
        return
    row["check_ok"] = max(row["err_vs_cudnn"], row["err_graphs_vs_cudnn"]) <= CASE_TOL[dtype]
    report.save()

    # Then timings, each skipped if the budget has run out. (key, model, CUDA graphs on)
    models = [("cudnn", ref, False), ("lstmkit", ours, False), ("lstmkit_graphs", ours, True)]
    if cell and not packed and layers == 1 and not bidir and not proj:
        models.append(("cell_loop", CellLoop(ref), False))
    xg = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in run(ref, x, lengths)]
    for key, m, graphed in models:
        if time.time() > deadline:
            row.setdefault("not_timed", []).append(key)
            continue
        lens = lengths if key != "cell_loop" else None

        def fwd():
            with torch.no_grad():
                run(m, x, lens)

        def fb():
            fwd_bwd(m, xg, lens, grads)

        try:
            with graphs(graphed):
                row[f"{key}_fwd_ms"] = time_ms(fwd, reps)
                row[f"{key}_fwdbwd_ms"] = time_ms(fb, reps)
        except Exception as e:  # one failing mode must not cost the others' numbers
            row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:200]
        for q in m.parameters():
            q.grad = None
        report.save()
    from lstmkit.engines.triton import engine as triton_engine

    triton_engine.clear_graphs()  # their static buffers would pile up over the cases


# ---- the report ----------------------------------------------------------------------------------
class Report:
    """Everything measured so far; save() rewrites --out's files (atomically) after every step."""

    def __init__(self, env, out):
        self.env, self.out = env, out
        self.checks, self.rows, self.skipped = [], [], []

    def save(self):
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu.json", json.dumps(dict(meta=self.env, checks=self.checks, rows=self.rows,
                                                            skipped=self.skipped), indent=1, default=str)),
                           ("gpu_section.md", markdown(self.env, self.checks, self.rows, self.skipped))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(meta, checks, rows, skipped):
    L = [HEADING, ""]
    L.append(f"Measured by `python benchmarks/gpu.py` on **{meta['gpu']}** ({meta['date']}; torch {meta['torch']}, "
             f"triton {meta['triton']}, CUDA {meta['cuda']}, Python {meta['python']}). Times are medians of "
             f"{meta['reps']} repeats, CUDA events, in milliseconds; forward is under `torch.no_grad()`, "
             "forward+backward backpropagates a fixed random gradient of every output. \"lstmkit\" launches its "
             "fused step kernels eagerly (one launch per step for both directions of a bidirectional layer); \"+graphs\" replays them from CUDA graphs (the default for shapes seen "
             "before). \"vs cuDNN\" = lstmkit time / torch.nn.LSTM time, eager / graphs (below 1 = lstmkit faster); "
             "\"err vs cuDNN\" = max relative difference of outputs and all gradients, eager / graphs, with TF32 "
             "off on both sides for fp32; \"cell loop\" = torch.nn.LSTMCell called per step, its time / lstmkit's "
             "best time. Timings run with torch's default TF32 settings.")
    L.append("")
    env = [f"{k}: {v}" for k, v in meta.items() if k.startswith(("self_check", "autocast", "fast_launch"))]
    if env:
        L.append("Environment checks: " + "; ".join(env) + ".")
        L.append("")
    n_ok = sum(c["ok"] for c in checks)
    L.append(f"Correctness against torch.nn.LSTM on this GPU: {n_ok}/{len(checks)} exactness checks passed "
             "(float64 at 1e-10, float32 at 1e-5 with TF32 off; outputs and every gradient; bidirectional, "
             "proj_size, no bias, packed, CUDA-graph replays)." + ("" if n_ok == len(checks) else " FAILED: " + "; ".join(
                 f"{c['name']} err={c['err']:.2e} {c['error']}" for c in checks if not c["ok"])))
    L.append("")
    L.append("| case | B | T | I | H | dtype | err vs cuDNN | fwd: lstmkit | +graphs | cuDNN | vs cuDNN "
             "| fwd+bwd: lstmkit | +graphs | cuDNN | vs cuDNN | cell loop fwd+bwd | cell loop / lstmkit |")
    L.append("|" + "---|" * 17)
    ms = lambda r, k: f"{r[k]:.2f}" if k in r else ("err" if k.rsplit("_", 2)[0] + "_error" in r else "-")  # noqa: E731
    for r in rows:
        head = f"| {r['name']} | {r['B']} | {r['T']} | {r['I']} | {r['H']} | {r['dtype']} "
        if "error" in r:
            L.append(head + f"| ERROR: {r['error']} |" + " |" * 10)
            continue
        if "err_vs_cudnn" not in r:
            L.append(head + "| (killed or running) |" + " |" * 10)
            continue
        err = f"{r['err_vs_cudnn']:.1e} / {r.get('err_graphs_vs_cudnn', math.nan):.1e}"
        err += "" if r.get("check_ok") else " FAIL"
        cells = [err]
        for ph in ("fwd", "fwdbwd"):
            a, g, c = (r.get(f"{k}_{ph}_ms") for k in ("lstmkit", "lstmkit_graphs", "cudnn"))
            cells += [ms(r, f"lstmkit_{ph}_ms"), ms(r, f"lstmkit_graphs_{ph}_ms"), ms(r, f"cudnn_{ph}_ms"),
                      f"{fmt_ratio(a, c)} / {fmt_ratio(g, c)}"]
        cl = r.get("cell_loop_fwdbwd_ms")
        mine = [v for v in (r.get("lstmkit_fwdbwd_ms"), r.get("lstmkit_graphs_fwdbwd_ms")) if v]
        best = min(mine) if mine else None
        cells += [f"{cl:.2f}" if cl else "-", fmt_ratio(cl, best) if cl and best else "-"]
        L.append(head + "| " + " | ".join(cells) + " |")
    errs = [f"{r['name']} {r['dtype']} {k[:-6]}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    if errs:
        L += ["", "Errors: " + "; ".join(errs)]
    untimed = [f"{r['name']} {r['dtype']}: {', '.join(r['not_timed'])}" for r in rows if r.get("not_timed")]
    if untimed:
        L += ["", "Not timed (time budget): " + "; ".join(untimed) + "."]
    if skipped:
        L += ["", "Not run (time budget): " + "; ".join(skipped) + "."]
    L += ["", "Targets (issue 7): within 1.25x of cuDNN where cuDNN runs its persistent kernels (1 layer, 1 direction, "
          "no projection, unpacked, fp16, H a multiple of 128); faster than cuDNN for bidirectional, multi-layer, "
          "proj_size and packed input; >= 10x faster than the LSTMCell loop.", ""]
    return "\n".join(L)


def splice(section: str, path: Path) -> None:
    """Replace the GPU section of BENCHMARKS.md (from its heading to the next '## '), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pat = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n\n"
    text = pat.sub(lambda _: section, text, count=1) if pat.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def environment(reps):
    import triton

    from lstmkit.engines.triton import launcher

    gpu = "CPU dry run (Triton interpreter), NOT A MEASUREMENT" if SMOKE else torch.cuda.get_device_name()
    return dict(gpu=gpu, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), reps=reps, dry_run=SMOKE,
                fast_launch="off (interpreter)" if SMOKE else (launcher.fast_launch_disabled_reason() or "on"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="timed repeats per measurement (median)")
    ap.add_argument("--budget", type=float, default=330.0,
                    help="seconds for the whole run, compiles included; no case or measurement starts past it")
    ap.add_argument("--out", type=Path, help="write gpu.json and gpu_section.md here, after every step")
    ap.add_argument("--write", action="store_true", help="replace BENCHMARKS.md's GPU section at the end")
    ap.add_argument("--apply", type=Path, help="splice this section file into BENCHMARKS.md and exit (no GPU)")
    ap.add_argument("--dry-run", "--smoke", dest="dry_run", action="store_true",
                    help="toy shapes on the CPU (Triton interpreter); checks the script, measures nothing")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.write, args.reps = False, 1
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
        from lstmkit.engines.triton import engine as triton_engine
    except ImportError as e:
        print(f"benchmarks/gpu.py needs triton: {e}", file=sys.stderr)
        return 2

    if SMOKE:  # no CUDA graphs on the CPU: "capture" = remember the loop, "replay" = run it again
        triton_engine.GRAPH_DEVICES = ("cpu",)
        triton_engine._capture = lambda fn: (fn(), fn)[1]
    t0 = time.time()
    deadline = t0 + args.budget
    report = Report(environment(args.reps), args.out)
    print(f"GPU: {report.env['gpu']}  torch {report.env['torch']}  triton {report.env['triton']}", flush=True)
    report.save()
    print("autocast behaviour:", flush=True)
    autocast_behaviour(report)
    print("exactness checks vs torch.nn.LSTM:", flush=True)
    exactness_checks(report)
    print("engine='auto' self-checks:", flush=True)
    self_check_verdicts(report)
    if not SMOKE:
        from lstmkit.engines.triton import launcher

        report.env["fast_launch"] = launcher.fast_launch_disabled_reason() or "on"
    print(f"  ({time.time() - t0:.0f} s)", flush=True)

    slowest = FIRST_CASE_GUESS_S if not SMOKE else 0.0
    # The dry run: a few cases that cover every path of the script (cell loop, packed
    # bidirectional, projection; fp32 and TF32 handling are in the checks).
    for case in [CASES[i] for i in (0, 7, 8)] if SMOKE else CASES:
        label = f"{case[0]} B={case[1]} T={case[2]} H={case[4]} {DTYPE_NAME[case[8]]}"
        if time.time() + slowest > deadline:
            report.skipped.append(label)
            report.save()
            continue
        t1 = time.time()
        try:
            bench_case(case, args.reps, report, deadline)
        except Exception as e:  # building the models, or anything else: record, go on
            report.rows.append(dict(name=case[0], B=case[1], T=case[2], I=case[3], H=case[4],
                                    dtype=DTYPE_NAME[case[8]], error=f"{type(e).__name__}: {e}"[:300]))
        sync()
        took = time.time() - t1
        slowest = max(slowest, took)
        row = report.rows[-1]
        report.save()
        print(f"{label}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items() if k.endswith("ms") or k.startswith("err")
                                      or k.endswith("error")) + f"  ({took:.0f} s)", flush=True)

    section = markdown(report.env, report.checks, report.rows, report.skipped)
    print("\n" + section)
    if args.write:
        splice(section, bench_md)
    print(f"total {time.time() - t0:.0f} s", flush=True)
    failed = [c for c in report.checks if not c["ok"]] + [r for r in report.rows if not r.get("check_ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
