"""engine="auto" trusts the Triton engine on a device only after it has checked itself there.

The first time engine="auto" would run a layer on Triton with a given device, dtype and
set of compile-time options (bias or not, projection or not, tile sizes, fp64/TF32/IEEE
dot precision: whatever selects a different compiled kernel), checked_lstm_layer (and
checked_lstm_layer_pair, both directions of a bidirectional layer in the same launches)
first runs a tiny problem through exactly those kernels - one direction, and both directions
paired; forward with gradients, backward, and the no-grad forward - on that device, and compares every output and gradient with the
reference engine computed in float64 from the same rounded inputs. If anything fails to
compile or launch, or a number disagrees beyond what the dtype explains, it warns once
(naming the error and how to report it) and runs that case on the reference engine from
then on: a user of engine="auto" gets the right numbers or a warning, never a crash or a
wrong answer. engine="triton" does not go through here: it fails loudly.

The verdicts are kept per process (VERDICTS); a check costs one compile of the kernels
plus a few milliseconds.
"""
from __future__ import annotations

import threading
import warnings

import torch

from .. import reference
from ..base import LayerParams
from . import engine as triton_engine

# Devices whose tensors are checked; tests add "cpu" (kernels under the interpreter).
DEVICES = ("cuda",)
# Tolerance per compute dtype: max |triton - reference| <= TOL * max(1, max |reference|).
# fp32 allows TF32 dots (10-bit mantissa) when torch's matmul setting asks for them.
TOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}
REPORT = ("Please report it with the message above, your GPU, and your torch and triton versions "
          "(the lstmkit issue tracker); pass engine='triton' to see the failure itself.")

VERDICTS: dict = {}  # key -> None (trusted) or the reason it is not
_lock = threading.Lock()


def _key(x, h0, c0, p: LayerParams):
    B, P = h0.shape[-2], h0.shape[-1]
    H = c0.shape[-1]
    return (str(x.device), x.dtype, p.b_ih is not None, p.w_hr is not None,
            triton_engine.kernel_options(x, B, H, P))


def _trusted(x, h0, c0, p: LayerParams):
    """Whether this case's kernels passed their self-check (running it on first sight); None
    while a CUDA-graph capture is in progress and the case was never checked (no verdict)."""
    h0c, c0c, pc = triton_engine.to_compute_dtype(x.dtype, h0, c0, p)
    key = _key(x, h0c, c0c, pc)
    if key not in VERDICTS and x.is_cuda and torch.cuda.is_current_stream_capturing():
        # A check copies from the host, which a CUDA-graph capture forbids: not verdict-worthy.
        # The call runs on the reference engine; the check happens on the first call outside.
        return None
    if key not in VERDICTS:
        with _lock:
            if key not in VERDICTS:
                VERDICTS[key] = self_check(x, pc, key[-1])
                if VERDICTS[key] is not None:
                    warnings.warn(
                        f"lstmkit engine='auto': the Triton engine failed its self-check on {key[0]} for "
                        f"{x.dtype} ({VERDICTS[key]}); using the reference engine for these layers. " + REPORT,
                        RuntimeWarning, stacklevel=4,
                    )
    return VERDICTS[key] is None


def checked_lstm_layer(x, batch_sizes, h0, c0, p: LayerParams, reverse: bool = False, variant=None):
    """triton_engine.lstm_layer once this case's kernels passed their self-check, else reference's."""
    if variant is not None or x.device.type not in DEVICES:
        return triton_engine.lstm_layer(x, batch_sizes, h0, c0, p, reverse=reverse, variant=variant)
    if _trusted(x, h0, c0, p):
        return triton_engine.lstm_layer(x, batch_sizes, h0, c0, p, reverse=reverse)
    return reference.lstm_layer(x, batch_sizes, h0, c0, p, reverse=reverse)


def checked_lstm_layer_pair(x, batch_sizes, h0, c0, params):
    """triton_engine.lstm_layer_pair (both directions in one launch per step) once this case's
    kernels passed their self-check, which runs that paired path too; else reference's, per direction."""
    if x.device.type not in DEVICES:
        return triton_engine.lstm_layer_pair(x, batch_sizes, h0, c0, params)
    if _trusted(x, h0[0], c0[0], params[0]):
        return triton_engine.lstm_layer_pair(x, batch_sizes, h0, c0, params)
    return tuple(reference.lstm_layer(x, batch_sizes, h, c, p, reverse=d == 1)
                 for d, (h, c, p) in enumerate(zip(h0, c0, params)))


def _tiny_problem(like: torch.Tensor, p: LayerParams, seed: int = 0):
    """Random inputs in x's dtype and device, shaped like p's layer but tiny (I=3, H=5)."""
    H, P = 5, (3 if p.w_hr is not None else 5)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (0.5 * torch.randn(*s, generator=g, dtype=torch.float64)).to(like)  # noqa: E731
    bias = p.b_ih is not None
    params = LayerParams(r(4 * H, 3), r(4 * H, P), r(4 * H) if bias else None, r(4 * H) if bias else None,
                         r(P, H) if p.w_hr is not None else None)
    batch_sizes = [3, 3, 2, 1]  # packed: rows end (forward) and join (reverse)
    total = sum(batch_sizes)
    return r(total, 3), batch_sizes, r(3, P), r(3, H), params


def _run(fn, x, batch_sizes, h0, c0, p, reverse, grads):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, h0, c0, *p)]
    with torch.enable_grad():
        outs = fn(leaves[0], batch_sizes, leaves[1], leaves[2], LayerParams(*leaves[3:]), reverse=reverse)
        torch.autograd.backward(list(outs), [g.to(o.dtype) for g, o in zip(grads, outs)])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def _run_pair(x, batch_sizes, h0, c0, p, grads):
    """Both directions through lstm_layer_pair (x shared, each direction its own copies of h0,
    c0 and the weights): per direction, its outputs, dx (of both), and its other gradients."""
    xl = x.detach().clone().requires_grad_(True)
    sides = [[t.detach().clone().requires_grad_(True) if t is not None else None for t in (h0, c0, *p)]
             for _ in range(2)]
    with torch.enable_grad():
        outs = triton_engine.lstm_layer_pair(xl, batch_sizes, (sides[0][0], sides[1][0]), (sides[0][1], sides[1][1]),
                                             (LayerParams(*sides[0][2:]), LayerParams(*sides[1][2:])))
        flat = [o for side in outs for o in side]
        torch.autograd.backward(flat, [g.to(o.dtype) for g, o in zip(grads * 2, flat)])
    return [[o.detach() for o in outs[d]] + [xl.grad] + [t.grad for t in sides[d] if t is not None]
            for d in range(2)]


def _disagreement(names, ours, ref, tol, label):
    """The first name whose values differ beyond tol (relative to max(1, max |ref|)), or None."""
    for name, a, b in zip(names, ours, ref):
        err = (a.double() - b).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        if not err <= tol * scale:  # also catches NaN
            return f"{name} {label}: max error {err:.3g} > {tol:g}"
    return None


def self_check(like: torch.Tensor, p: LayerParams, options: tuple):
    """None when the kernels compiled with `options` agree with the reference on like's
    device and dtype, for one direction and for both directions paired; otherwise a
    one-line reason."""
    tol = TOL.get(like.dtype, 1e-1)
    try:
        x, batch_sizes, h0, c0, tp = _tiny_problem(like, p)
        as64 = lambda t: None if t is None else t.double()  # noqa: E731
        names = ["y", "h_n", "c_n", "dx", "dh0", "dc0", "dW_ih", "dW_hh", "db_ih", "db_hh", "dW_hr"]
        names = names[:6] + [n for n, t in zip(names[6:], tp) if t is not None]
        names_nograd = [f"{n} (no grad)" for n in names[:3]]
        # With CUDA graphs on, a third call replays a captured graph: check that too.
        graphs = triton_engine.CUDA_GRAPHS and like.device.type in triton_engine.GRAPH_DEVICES
        for _ in range(3 if graphs else 1):
            gen = torch.Generator().manual_seed(1)
            shapes = [(x.shape[0], h0.shape[1]), h0.shape, c0.shape]
            grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(like.device) for s in shapes]
            refs = [_run(reference.lstm_layer, as64(x), batch_sizes, as64(h0), as64(c0),
                         LayerParams(*(as64(t) for t in tp)), reverse, grads) for reverse in (False, True)]
            # One direction alone (unidirectional layers), then both paired (bidirectional layers
            # take only that path): the same kernels with one and with two direction slots.
            with triton_engine.forced_options(options):
                ours = _run(triton_engine.lstm_layer, x, batch_sizes, h0, c0, tp, False, grads)
                with torch.no_grad():
                    ours_nograd = triton_engine.lstm_layer(x, batch_sizes, h0, c0, tp)
                why = (_disagreement(names, ours, refs[0], tol, "forward")
                       or _disagreement(names_nograd, ours_nograd, refs[0], tol, "forward"))
                if why:
                    return why
                paired = _run_pair(x, batch_sizes, h0, c0, tp, grads)
                with torch.no_grad():
                    paired_nograd = triton_engine.lstm_layer_pair(x, batch_sizes, (h0, h0), (c0, c0), (tp, tp))
            dx_both = refs[0][3] + refs[1][3]
            for d, label in enumerate(("paired forward", "paired reverse")):
                ref = refs[d][:3] + [dx_both] + refs[d][4:]
                why = (_disagreement(names, paired[d], ref, tol, label)
                       or _disagreement(names_nograd, paired_nograd[d], ref, tol, label))
                if why:
                    return why
    except Exception as e:  # noqa: BLE001 - compile errors, launch failures, out of resources...
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return None
