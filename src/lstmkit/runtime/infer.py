"""Find the LSTMs in a bag of named tensors and infer their configuration.

A torch.nn.LSTM (or lstmkit.LSTM) registers, per layer k and direction,
    weight_ih_l{k}[_reverse]  (4H, I or D*P)    weight_hh_l{k}[_reverse]  (4H, P)
    bias_ih_l{k}[_reverse]    (4H,)             bias_hh_l{k}[_reverse]    (4H,)      (bias=True)
    weight_hr_l{k}[_reverse]  (P, H)                                                  (proj_size > 0)
so every LSTM in a checkpoint is a prefix (e.g. "encoder.lstm.") in front of "weight_ih_l0".
Everything else follows from the shapes. The inferred LSTMConfig then tells which names and
shapes *must* be there; a mismatch is an error rather than a guess.

Only names and shapes are used here (no tensors, no torch), so `lstmkit inspect` and the
torch-free runtime share it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import LSTMConfig

_ANCHOR = "weight_ih_l0"


@dataclass(frozen=True)
class FoundLSTM:
    prefix: str  # "" for a bare state_dict, else e.g. "encoder.lstm."
    config: LSTMConfig

    def names(self) -> list[str]:
        """The full tensor names of this LSTM, in torch's registration order."""
        return [self.prefix + n for n, _ in self.config.param_shapes()]


def infer_config(shapes: dict[str, tuple[int, ...]], prefix: str = "", **options) -> LSTMConfig:
    """The LSTMConfig of the LSTM stored under `prefix` in {name: shape}.

    `options` (batch_first, dropout) are not visible in the weights and are passed through.
    Raises ValueError when the tensors do not form a valid LSTM.
    """
    get = lambda n: shapes.get(prefix + n)  # noqa: E731
    w_ih = get(_ANCHOR)
    if w_ih is None or len(w_ih) != 2 or w_ih[0] % 4:
        raise ValueError(
            f"no LSTM at prefix {prefix!r}: {prefix + _ANCHOR!r} is missing or not a (4*hidden_size, input_size) matrix"
        )
    hidden_size, input_size = w_ih[0] // 4, w_ih[1]
    num_layers = 0
    while get(f"weight_ih_l{num_layers}") is not None:
        num_layers += 1
    hr = get("weight_hr_l0")
    # Variant parameters (lstmkit.LSTM options nn.LSTM lacks) show up as extra names.
    if get("layer_norm_ih_weight_l0") is not None:
        options.setdefault("layer_norm", True)
    if get("weight_peephole_l0") is not None:
        options.setdefault("peephole", True)
    cfg = LSTMConfig(
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        bias=get("bias_ih_l0") is not None,
        bidirectional=get("weight_ih_l0_reverse") is not None,
        proj_size=hr[0] if hr is not None else 0,
        **options,
    )
    # The configuration fixes every name and shape: check them all, and that nothing is left over.
    for name, shape in cfg.param_shapes():
        got = get(name)
        if got is None:
            raise ValueError(f"LSTM at prefix {prefix!r}: tensor {prefix + name!r} is missing")
        if tuple(got) != shape:
            raise ValueError(
                f"LSTM at prefix {prefix!r}: tensor {prefix + name!r} has shape {tuple(got)}, expected {shape}"
            )
    expected = {prefix + n for n, _ in cfg.param_shapes()}
    extra = [n for n in shapes if n.startswith(prefix) and _is_lstm_param(n[len(prefix):]) and n not in expected]
    if extra:
        raise ValueError(f"LSTM at prefix {prefix!r}: unexpected tensors {extra} for {cfg}")
    return cfg


def _is_lstm_param(rest: str) -> bool:
    """Is `rest` (a name with the prefix removed) one of an LSTM's own parameter names?"""
    stems = ("weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l", "weight_hr_l", "weight_peephole_l")
    stems += tuple(f"layer_norm_{part}_{kind}_l" for part in ("ih", "hh", "cell") for kind in ("weight", "bias"))
    for stem in stems:
        if rest.startswith(stem):
            tail = rest[len(stem):].removesuffix("_reverse")
            return tail.isdigit()
    return False


def find_lstms(shapes: dict[str, tuple[int, ...]]) -> tuple[list[FoundLSTM], list[tuple[str, str]]]:
    """Every LSTM in {name: shape}, in the order the checkpoint lists them.

    Returns (found, rejected): `rejected` holds (prefix, reason) for names ending in
    "weight_ih_l0" whose siblings do not form an LSTM (a GRU has 3H rows and no cell state,
    a damaged checkpoint misses tensors), so callers can say why instead of guessing.
    """
    found, rejected = [], []
    for name in shapes:
        if not name.endswith(_ANCHOR):
            continue
        prefix = name[: -len(_ANCHOR)]
        if prefix and not prefix.endswith("."):
            continue  # e.g. "myweight_ih_l0": not a module's parameter
        hh = shapes.get(prefix + "weight_hh_l0")
        if hh is not None and len(hh) == 2 and hh[0] in (hh[1], 3 * hh[1]) and prefix + "weight_hr_l0" not in shapes:
            continue  # weight_hh (H, H) or (3H, H): an nn.RNN or nn.GRU, same names, not an LSTM
        try:
            found.append(FoundLSTM(prefix, infer_config(shapes, prefix)))
        except (ValueError, TypeError) as e:
            rejected.append((prefix, str(e)))
    return found, rejected
