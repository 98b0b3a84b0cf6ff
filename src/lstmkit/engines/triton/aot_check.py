"""Compile the Triton kernels for a CUDA architecture on a machine without a GPU.

    python -m lstmkit.engines.triton.aot_check             # sm_90 (H100/H200), every option set
    python -m lstmkit.engines.triton.aot_check --quick     # one option set per kernel and dtype
    python -m lstmkit.engines.triton.aot_check --arch 80

Triton's frontend, its MLIR passes and ptxas (bundled with the triton wheel) need no GPU, so
this catches what the interpreter cannot: type rules the compiler enforces (tl.dot's
out_dtype against an fp64 accumulator on Triton 3.6, operand dtypes), layouts that do not
lower (the gate split/join reshapes), shared-memory budgets. It does not run anything: the
numbers are the interpreter tests' and the GPU tier's job. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DTYPES = ("fp16", "bf16", "fp32", "fp64")
_ACC_POINTERS = ("b_ptr", "c_ptr", "cp_ptr", "c0_ptr", "dc_ptr")  # buffers kept in the accumulation dtype


def option_sets(quick: bool):
    """(label, kernel name, dtype, constexprs, num_stages) for every option set the engine's
    _Cfg can choose on a GPU (dtype, bias, saved gates, projection, TF32 or IEEE, tiles)."""
    for dt in DTYPES:
        precisions = ("tf32", "ieee") if dt == "fp32" else ("ieee" if dt == "fp64" else "tf32",)
        bk = {"fp16": 64, "bf16": 64, "fp32": 32, "fp64": 16}[dt]
        tiles = [(16, 4)] if quick else [(16, 4), (16, 8), (32, 16), (64, 32)]
        for precision in precisions[:1] if quick else precisions:
            for bb, bh in tiles:
                common = dict(ACC_F64=dt == "fp64", UPCAST_DOT=False, PRECISION=precision, BLOCK_B=bb, BLOCK_K=bk)
                stages = 2 if dt == "fp64" else 3
                tag = f"{dt} {precision} BB={bb} BH={bh}"
                yield (f"{tag} forward", "lstm_fwd_step", dt,
                       dict(common, HAS_BIAS=True, STORE_GATES=True, BLOCK_H=bh), stages)
                if not quick:
                    yield (f"{tag} forward no-grad no-bias", "lstm_fwd_step", dt,
                           dict(common, HAS_BIAS=False, STORE_GATES=False, BLOCK_H=bh), stages)
                yield (f"{tag} backward", "lstm_bwd_step", dt,
                       dict(common, HAS_DH=True, HAS_DHN=True, BLOCK_H=max(16, bh)), stages)
                yield (f"{tag} backward proj", "lstm_bwd_step", dt,
                       dict(common, HAS_DH=False, HAS_DHN=False, BLOCK_H=max(16, bh)), stages)
                yield (f"{tag} projection forward", "rows_matmul_step", dt,
                       dict(common, HAS_BASE=False, HAS_ALT=False, BLOCK_N=32), stages)
                yield (f"{tag} projection backward", "rows_matmul_step", dt,
                       dict(common, HAS_BASE=True, HAS_ALT=True, BLOCK_N=32), stages)


def _signature(kernel, dt: str, constexprs: dict) -> dict:
    acc = "fp64" if dt == "fp64" else "fp32"
    sig = {}
    for p in kernel.params:
        if p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + (acc if p.name in _ACC_POINTERS else dt)
        else:
            sig[p.name] = "i32"
    return sig


def compile_all(arch: int = 90, quick: bool = False, out=print) -> list[str]:
    """Compile every option set for sm_<arch>; returns the failures (empty: all compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from ...kernels.triton import lstm as tk

    if tk.mode() != "compiled":
        raise RuntimeError("aot_check compiles kernels: run it without TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    failures = []
    for label, name, dt, constexprs, stages in option_sets(quick):
        kernel = getattr(tk, name)
        src = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, dt, constexprs), constexprs=constexprs)
        t0 = time.time()
        try:
            compiled = triton.compile(src, target=target, options=dict(num_warps=4, num_stages=stages))
            out(f"ok   {label}: {time.time() - t0:.1f} s, {compiled.metadata.shared} B shared memory")
        except Exception as e:  # noqa: BLE001 - report every failure, then the count
            failures.append(f"{label}: {type(e).__name__}: {e}")
            out(f"FAIL {label}: {type(e).__name__}: {str(e)[:1000]}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="one tile set and precision per dtype")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this compiles the kernels", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__}: compiling for sm_{args.arch}", flush=True)
    failures = compile_all(args.arch, args.quick, out=lambda s: print(s, flush=True))
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
