"""The character-level language model and what `train`, `sample` and `demo` share:
reading text, the vocabulary, the model, and the run directory (checkpoints).

A run directory holds
    config.json     model + training configuration and the vocabulary
    model.safetensors   the weights; keys "embed.*", "lstm.*", "head.*". The "lstm.*"
                    tensors are exactly torch.nn.LSTM's state_dict (same names, shapes,
                    gate order i,f,g,o), so they load into torch.nn.LSTM unchanged.
    trainer.pt      what resuming needs besides the weights: optimizer state, step,
                    RNG state, the carried (h, c) of the training streams
    history.json    one row per evaluation: step, train loss, held-out bpc, chars/s
    loss.png        the loss curve (needs matplotlib)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...nn import LSTM

LN2 = math.log(2.0)


class RunError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits non-zero."""


# ---- text and vocabulary ---------------------------------------------------------------
def read_text(path) -> str:
    """One text file as a str, or a RunError saying why it can't be used."""
    p = Path(path)
    if not p.exists():
        raise RunError(f"{path}: no such file")
    if p.is_dir():
        raise RunError(f"{path}: is a directory, expected a text file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise RunError(f"{path}: cannot read ({e.strerror})") from None
    if not raw.strip():
        raise RunError(f"{path}: file is empty")
    # NUL bytes never occur in text; undecodable bytes mean it isn't UTF-8 text.
    if b"\x00" in raw[:65536]:
        raise RunError(f"{path}: looks like a binary file, expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); binary file?") from None


def codepoints(text: str) -> np.ndarray:
    """The text as an array of Unicode code points, (n,) uint32."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def build_vocab(text: str) -> list[str]:
    """Every distinct character, sorted by code point."""
    return [chr(c) for c in np.unique(codepoints(text))]


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    """Character ids, (n,) int64. Characters outside the vocabulary are an error."""
    table = np.array([ord(ch) for ch in vocab], dtype=np.uint32)  # sorted
    cp = codepoints(text)
    ids = np.searchsorted(table, cp)
    ids = np.minimum(ids, len(table) - 1)
    bad = table[ids] != cp
    if bad.any():
        ch = chr(int(cp[bad.argmax()]))
        raise RunError(f"character {ch!r} is not in the model's vocabulary")
    return torch.from_numpy(ids.astype(np.int64, copy=False))


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def unigram_bpc(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Bits per char of the best context-free model: character frequencies of the
    training text (add-one smoothed), scored on the held-out text. Any model that
    uses context must beat this."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(-logp[eval_ids].mean() / LN2)


# ---- the model --------------------------------------------------------------------------
class CharLM(nn.Module):
    """ids (B, T) -> logits (B, T, V), carrying the LSTM state (h, c) between calls."""

    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, num_layers: int,
                 dropout: float = 0.0, engine: str = "auto", lstm_cls=None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_size)
        lstm_cls = lstm_cls or LSTM
        kw = {"engine": engine} if lstm_cls is LSTM else {}
        # dropout acts between LSTM layers only (as in torch.nn.LSTM), so 1 layer ignores it.
        drop = dropout if num_layers > 1 else 0.0
        self.lstm = lstm_cls(embed_size, hidden_size, num_layers, batch_first=True, dropout=drop, **kw)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids, state=None):
        x = self.embed(ids)  # (B, T, E)
        y, state = self.lstm(x, state)  # (B, T, H); state: h, c each (L, B, H)
        return self.head(y), state  # (B, T, V)


def model_from_config(cfg: dict, engine: str = "auto", lstm_cls=None) -> CharLM:
    return CharLM(len(cfg["vocab"]), cfg["embed_size"], cfg["hidden_size"], cfg["num_layers"],
                  cfg["dropout"], engine=engine, lstm_cls=lstm_cls)


def adam(params, lr: float, device) -> torch.optim.Adam:
    """The trainer's optimizer: Adam, as one fused kernel over all parameters where torch has
    one (CPU and CUDA). torch's default on CPU runs a dozen small ops per parameter tensor,
    several milliseconds a step of the demo model, which the LSTM's speed then hides."""
    return torch.optim.Adam(params, lr=lr, fused=True if torch.device(device).type in ("cpu", "cuda") else None)


def use_fused_adam(optimizer: torch.optim.Adam, device) -> None:
    """After load_state_dict: a checkpoint's param groups bring their own `fused` flag (None in
    runs saved before the fused optimizer); the state is the same, so the kernel can change."""
    fused = True if torch.device(device).type in ("cpu", "cuda") else None
    for group in optimizer.param_groups:
        group["fused"] = fused


def bptt_step(model: nn.Module, optimizer, x, y, state, clip: float):
    """One step of truncated BPTT on ids x (B, T) with targets y (B, T), from the carried
    state; returns (loss, the new state detached: carried on, without the graph)."""
    logits, state = model(x, state)  # (B, T, V)
    state = (state[0].detach(), state[1].detach())
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss, state


# ---- the run directory -------------------------------------------------------------------
CONFIG, WEIGHTS, TRAINER, HISTORY, CURVE = (
    "config.json", "model.safetensors", "trainer.pt", "history.json", "loss.png")


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename: an interrupted save never leaves a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj, indent=1) -> None:
    _atomic_write(path, lambda t: t.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"))


def read_config(run_dir) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise RunError(f"{run_dir}: not a run directory (no {CONFIG})")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None
    need = ("vocab", "embed_size", "hidden_size", "num_layers", "dropout")
    missing = [k for k in need if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise RunError(f"{path}: not an lstmkit char-LM config (missing {', '.join(missing)})")
    return cfg


def save_weights(run_dir, model: CharLM, step: int = 0) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "step": str(step)}
    _atomic_write(Path(run_dir) / WEIGHTS, lambda t: save_file(sd, str(t), metadata=meta))


def load_weights(run_dir, model: CharLM) -> None:
    from safetensors.torch import load_file

    path = Path(run_dir) / WEIGHTS
    if not path.exists():
        raise RunError(f"{run_dir}: no {WEIGHTS} (training never saved a checkpoint?)")
    model.load_state_dict(load_file(str(path)), strict=True)


def lstm_state_dict(run_dir) -> dict:
    """The LSTM's tensors from a run, keyed as torch.nn.LSTM's state_dict."""
    from safetensors.torch import load_file

    sd = load_file(str(Path(run_dir) / WEIGHTS))
    return {k[len("lstm."):]: v for k, v in sd.items() if k.startswith("lstm.")}


def load_model(run_dir, engine: str = "auto") -> tuple[CharLM, dict]:
    cfg = read_config(run_dir)
    model = model_from_config(cfg, engine=engine)
    load_weights(run_dir, model)
    return model.eval(), cfg
