"""`lstmkit train --compare-torch`: the same model with torch.nn.LSTM inside, trained beside it.

The twin starts from the trainer's weights, optimizer state and carried (h, c), then takes
every step on the same batch right after the trainer's step, timed the same way, so the
two throughputs come from interleaved steps on the same machine at the same moment.
"""
from __future__ import annotations

import statistics
import time

import torch

from .model import adam, bptt_step, model_from_config


class TorchTwin:
    """torch.nn.LSTM's copy of a training run, stepped beside it; `report()` compares them."""

    def __init__(self, cfg: dict, model, optimizer, state, device):
        self.model = model_from_config(cfg, lstm_cls=torch.nn.LSTM).to(device)
        self.model.load_state_dict(model.state_dict())
        self.optimizer = adam(self.model.parameters(), cfg["lr"], device)
        self.optimizer.load_state_dict(optimizer.state_dict())
        self.state = tuple(s.clone() for s in state)
        self.clip = cfg["clip"]
        self.seconds = {"lstmkit": [], "torch": []}  # per step, in step order
        self.last_loss = {"lstmkit": float("nan"), "torch": float("nan")}

    def train(self) -> None:
        self.model.train()

    def step(self, x, y, new_epoch: bool, zero_state, lstmkit_loss: float, lstmkit_seconds: float) -> None:
        """The twin's step on batch (x, y), recorded next to the lstmkit step that just ran."""
        t0 = time.perf_counter()
        if new_epoch:
            self.state = zero_state()
        loss, self.state = bptt_step(self.model, self.optimizer, x, y, self.state, self.clip)
        self.last_loss["torch"], self.last_loss["lstmkit"] = loss.item(), lstmkit_loss
        self.seconds["torch"].append(time.perf_counter() - t0)
        self.seconds["lstmkit"].append(lstmkit_seconds)

    def report(self, engine: str, chars_per_step: int) -> dict:
        # Medians over the steps after a short warm-up: robust to a noisy, shared machine.
        times, last = self.seconds, self.last_loss
        skip = min(3, max(0, len(times["lstmkit"]) - 1))
        med = {k: statistics.median(v[skip:]) for k, v in times.items()}
        cps = {k: chars_per_step / v for k, v in med.items()}
        ratio = cps["lstmkit"] / cps["torch"]
        lines = [
            f"throughput (median of {len(times['lstmkit']) - skip} interleaved steps): "
            f"lstmkit.LSTM [{engine}] {cps['lstmkit']:,.0f} chars/s, torch.nn.LSTM {cps['torch']:,.0f} chars/s "
            f"-> lstmkit is {ratio:.2f}x torch",
            f"final train loss: lstmkit {last['lstmkit']:.4f}, torch.nn.LSTM {last['torch']:.4f}",
        ]
        return {"engine": engine, "lstmkit_chars_per_s": cps["lstmkit"], "torch_chars_per_s": cps["torch"],
                "ratio": ratio, "steps": len(times["lstmkit"]) - skip, "loss_lstmkit": last["lstmkit"],
                "loss_torch": last["torch"], "lines": lines}
