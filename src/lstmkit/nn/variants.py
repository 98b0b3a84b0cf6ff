"""LSTM variants nn.LSTM lacks: what they add to one layer-direction, and their random masks.

The options live in LSTMConfig (validated there, torch-free). This file turns them into
what an engine call needs: `LayerVariant`, the extra parameters and the masks of one
layer-direction. Masks are drawn here, outside the engines, so every engine sees the
same ones (and so a seeded run gives the same result on every engine).

The equations, for one step with gate order (i, f, g, o) (engines/reference.py runs them):

  layer_norm (Ba, Kiros, Hinton 2016, "Layer Normalization"):
      gates = LN_ih(x_t W_ih^T) + LN_hh(h_{t-1} W_hh^T) + b_ih + b_hh   each LN over all 4H
      c~_t  = f * c_{t-1} + i * g                                       (carried un-normalized)
      h~_t  = o * tanh(LN_cell(c~_t))                                   LN over H, eps 1e-5
  peephole (Gers, Schraudolph, Schmidhuber 2002, "Learning precise timing with LSTM
      recurrent networks"): the gates look at the cell,
      pre_i += p_i * c_{t-1},  pre_f += p_f * c_{t-1},  pre_o += p_o * c~_t
  zoneout (Krueger et al. 2016, "Zoneout: regularizing RNNs by randomly preserving hidden
      activations"): each unit keeps its previous value with probability p,
      c_t = d_c * c_{t-1} + (1 - d_c) * c~_t,   h_t = d_h * h_{t-1} + (1 - d_h) * h~_t
      with h~_t after the projection when proj_size > 0. d ~ Bernoulli(p), fresh per step
      and unit, in training; d = p (the expectation) in eval. y_t = h_t.
  recurrent_dropout (Gal & Ghahramani 2016, "A theoretically grounded application of
      dropout in recurrent neural networks"): h_{t-1} W_hh^T becomes (h_{t-1} * m) W_hh^T,
      m ~ Bernoulli(1-p)/(1-p) drawn once per sequence and kept for every step; training
      only. The carried h itself is not masked.
  weight_drop (Merity, Keskar, Socher 2017, "Regularizing and optimizing LSTM language
      models", AWD-LSTM): DropConnect on W_hh, W_hh * M/(1-p), one M per forward call,
      training only. Applied to the weight before the engine runs, so any engine runs it
      and the gradient flows through the mask to the real weight.
  forget_bias (Jozefowicz, Zaremba, Sutskever 2015): bias_ih[H:2H] += v at initialisation.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LSTMConfig

LN_EPS = 1e-5


class LayerVariant(NamedTuple):
    """Everything a variant adds to one layer-direction call (None = that part is off)."""

    ln_ih_w: Optional[torch.Tensor] = None  # (4H,)  layer norm of x W_ih^T
    ln_ih_b: Optional[torch.Tensor] = None  # (4H,)
    ln_hh_w: Optional[torch.Tensor] = None  # (4H,)  layer norm of h W_hh^T
    ln_hh_b: Optional[torch.Tensor] = None  # (4H,)
    ln_c_w: Optional[torch.Tensor] = None  # (H,)   layer norm of c before tanh
    ln_c_b: Optional[torch.Tensor] = None  # (H,)
    w_peep: Optional[torch.Tensor] = None  # (3, H) rows p_i, p_f, p_o
    zoneout_c: Optional[torch.Tensor] = None  # (total, H) d_c per packed row: 0/1 in training, p in eval
    zoneout_h: Optional[torch.Tensor] = None  # (total, P) d_h
    rec_mask: Optional[torch.Tensor] = None  # (B, P) recurrent-dropout mask, already scaled

    @property
    def layer_norm(self) -> bool:
        return self.ln_ih_w is not None


def layer_norm(v: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LN over the last dim: (v - mean) / sqrt(var + eps) * w + b, biased variance."""
    return F.layer_norm(v, v.shape[-1:], w, b, LN_EPS)


@torch.no_grad()
def init_parameters(module) -> None:
    """After the uniform init of every parameter: LN weights 1, LN biases 0, forget bias."""
    cfg = module.config
    H = cfg.hidden_size
    for k in range(cfg.num_layers):
        for d in range(cfg.num_directions):
            sfx = f"_l{k}{cfg.suffix(d)}"
            if cfg.layer_norm:
                for part in ("ih", "hh", "cell"):
                    getattr(module, f"layer_norm_{part}_weight{sfx}").fill_(1.0)
                    getattr(module, f"layer_norm_{part}_bias{sfx}").zero_()
            if cfg.forget_bias != 0:
                getattr(module, f"bias_ih{sfx}")[H : 2 * H] += cfg.forget_bias


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}


def _bernoulli(shape, p: float, like: torch.Tensor) -> torch.Tensor:
    """1 with probability p, else 0 (like's dtype and device). On CPU, float32/64: a compiled
    hash seeded from torch's generator (kernels/numba/masks.py: torch's CPU generator is 8x
    slower, and the masks were a fifth of a zoneout step); elsewhere uniform < p (faster than
    Tensor.bernoulli_(p))."""
    if like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64):
        from ..kernels.numba.masks import bernoulli

        seed = int(torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64))  # torch.manual_seed fixes it
        return torch.from_numpy(bernoulli(tuple(shape), p, _NUMPY_FLOAT[like.dtype], seed))
    return (torch.rand(shape, dtype=like.dtype, device=like.device) < p).to(like.dtype)


def drop_weights(w_hh: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """weight_drop: DropConnect on W_hh, one mask per call, scaled by 1/(1-p)."""
    if not training or p == 0:
        return w_hh
    return w_hh * _bernoulli(w_hh.shape, 1.0 - p, w_hh).div_(1.0 - p)


def layer_variant(module, layer: int, direction: int, batch_sizes: list[int], x: torch.Tensor) -> LayerVariant:
    """The parameters and freshly drawn masks of one layer-direction for one forward call."""
    cfg = module.config
    H, P = cfg.hidden_size, cfg.real_hidden_size
    total, B = sum(batch_sizes), batch_sizes[0]
    sfx = f"_l{layer}{cfg.suffix(direction)}"
    get = lambda n: getattr(module, n + sfx)  # noqa: E731
    parts = {}
    if cfg.layer_norm:
        parts.update(
            ln_ih_w=get("layer_norm_ih_weight"), ln_ih_b=get("layer_norm_ih_bias"),
            ln_hh_w=get("layer_norm_hh_weight"), ln_hh_b=get("layer_norm_hh_bias"),
            ln_c_w=get("layer_norm_cell_weight"), ln_c_b=get("layer_norm_cell_bias"),
        )
    if cfg.peephole:
        parts["w_peep"] = get("weight_peephole")
    pc, ph = cfg.zoneout_probs
    for key, p, width in (("zoneout_c", pc, H), ("zoneout_h", ph, P)):
        if p == 0:
            continue
        if module.training:  # d = 1 keeps the previous value: Bernoulli(p)
            parts[key] = _bernoulli((total, width), p, x)
        else:
            parts[key] = torch.full((total, width), p, dtype=x.dtype, device=x.device)
    if module.training and cfg.recurrent_dropout > 0:
        q = cfg.recurrent_dropout
        parts["rec_mask"] = _bernoulli((B, P), 1.0 - q, x).div_(1.0 - q)
    return LayerVariant(**parts)
