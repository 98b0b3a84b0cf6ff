"""Differentiable backward for the fused engines: what makes double backward correct.

A fused engine (numba, triton) computes its backward with kernels autograd cannot see
through: the gradients it returns are constants to autograd. That is right for the
common training step (loss.backward()), and wrong whenever the backward itself is
differentiated: a gradient penalty (create_graph=True), a Hessian-vector product,
torch.autograd.gradgradcheck, MAML.

Autograd runs a Function's backward with grad mode on exactly in those cases
(create_graph=True). So every fused autograd Function starts its backward with

    if torch.is_grad_enabled():
        return differentiable_backward(...)

which recomputes the layer from the saved inputs with the reference engine's tensor ops
(engines/reference.py, the readable spec) and returns torch.autograd.grad(...,
create_graph=True) of that recomputation: gradients that carry their own graph back to
the inputs and to the incoming output gradients. The plain single backward never enters
here and stays fused.

The recomputation costs one reference forward + backward of the layer, only on the
create_graph path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import LayerParams

# The order of the tensors a layer-direction call differentiates: the engine interface's
# inputs and LayerParams, then (variants only) the differentiable LayerVariant fields.
INPUT_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
VARIANT_PARAM_NAMES = ("ln_ih_w", "ln_ih_b", "ln_hh_w", "ln_hh_b", "ln_c_w", "ln_c_b", "w_peep")


def differentiable_backward(
    engine: str,
    inputs: Sequence[Optional[torch.Tensor]],
    grad_outputs: Sequence[Optional[torch.Tensor]],
    batch_sizes: list[int],
    reverse: bool,
    needs_input_grad: Sequence[bool],
    variant=None,
) -> tuple:
    """The gradients of one layer-direction call, as differentiable tensors.

    engine:        the calling engine's name (for error messages)
    inputs:        (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) as the Function received them
                   (ctx.saved_tensors of inputs keep their autograd graph), followed, when
                   `variant` is given, by its differentiable parameters in
                   VARIANT_PARAM_NAMES order (None where absent)
    grad_outputs:  (dy, dh_n, dc_n), None for an output without a gradient
    variant:       the LayerVariant the forward ran (its masks are constants); None for
                   the plain LSTM layer
    returns        one gradient per entry of `inputs` (None where not needed or unused)
    """
    n_plain = len(INPUT_NAMES)
    expected = n_plain + (len(VARIANT_PARAM_NAMES) if variant is not None else 0)
    if len(inputs) != expected:
        raise ValueError(f"differentiable_backward: expected {expected} inputs, got {len(inputs)}")
    from . import reference

    wanted = [k for k, t in enumerate(inputs) if t is not None and needs_input_grad[k]]
    if not wanted:
        return (None,) * len(inputs)
    for k in wanted:
        if not inputs[k].requires_grad:
            _raise_detached(engine, _name(k))
    with torch.enable_grad():
        # Differentiate w.r.t. aliases, not the inputs themselves: when one input depends on
        # another (a cell step fed (x, c) with c computed from x), autograd.grad w.r.t. x would
        # add the path through c, a total derivative. The aliases make it the partial derivative
        # this Function owes, still connected (through the alias) to the inputs' graph.
        local = [t.view_as(t) if t is not None else None for t in inputs]
        x, h0, c0 = local[:3]
        p = LayerParams(*local[3:n_plain])
        if variant is None:
            outs = reference.lstm_layer(x, batch_sizes, h0, c0, p, reverse=reverse)
        else:
            v = variant._replace(**dict(zip(VARIANT_PARAM_NAMES, local[n_plain:])))
            outs = reference.lstm_layer_variant(x, batch_sizes, h0, c0, p, reverse, v)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        if not pairs:
            return (None,) * len(inputs)
        grads = torch.autograd.grad(
            [o for o, _ in pairs], [local[k] for k in wanted], [g for _, g in pairs],
            create_graph=True, allow_unused=True,
        )
    result = [None] * len(inputs)
    for k, g in zip(wanted, grads):
        result[k] = g
    return tuple(result)


def _name(k: int) -> str:
    names = INPUT_NAMES + VARIANT_PARAM_NAMES
    return names[k] if k < len(names) else f"input {k}"


def _raise_detached(engine: str, what: str):
    raise not_twice_differentiable(
        engine, f"the saved input {what} lost its autograd graph, so its gradient cannot be differentiated"
    )


def not_twice_differentiable(engine: str, why: str) -> RuntimeError:
    """The error for a path whose backward cannot be differentiated (raise it): it names the
    engine and the alternative, so no caller ever gets a gradient silently treated as constant."""
    return RuntimeError(
        f"engine={engine!r} cannot differentiate its backward here: {why}. "
        "Use engine='reference' (plain differentiable tensor ops) for double backward."
    )
