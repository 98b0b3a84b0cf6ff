"""`lstmkit params INPUT HIDDEN [...]`: the command line of lstmkit.describe."""
from __future__ import annotations

import argparse
import json
import sys

from . import CommandError, run_guarded
from ..config import LSTMConfig
from ..describe import DTYPE_BYTES, describe
from ..diagram import picture_format


# ---- command line ----------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def _zoneout(text: str):
    """'P' or 'P_CELL,P_HIDDEN'."""
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P or P_CELL,P_HIDDEN, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected P or P_CELL,P_HIDDEN, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _add_variant_options(ap) -> None:
    v = ap.add_argument_group("variants (lstmkit only; see lstmkit.LSTM)")
    v.add_argument("--layer-norm", action="store_true", help="layer norm on both gate products and the cell")
    v.add_argument("--peephole", action="store_true", help="gates i, f, o see the cell")
    v.add_argument("--zoneout", type=_zoneout, default=0.0, metavar="P[,P_H]", help="zoneout of c (and h)")
    v.add_argument("--recurrent-dropout", type=float, default=0.0, metavar="P")
    v.add_argument("--weight-drop", type=float, default=0.0, metavar="P", help="DropConnect on weight_hh")
    v.add_argument("--forget-bias", type=float, default=0.0, metavar="B",
                   help="added to the forget gate's bias at init")


def _write_plot(d, path) -> int:
    try:
        d.plot(path)
    except ImportError as e:  # PNG without matplotlib
        raise CommandError(f"error: {e}") from None
    except OSError as e:
        raise CommandError(f"error: cannot write {path}: {e.strerror or e}") from None
    print(f"lstmkit params: wrote {path}", file=sys.stderr)  # stderr keeps --json output parseable
    return 0


def _described(a):
    """The description of the LSTM the arguments give; a bad option is the user's error (exit 2),
    found before anything is printed (a bad --plot extension too)."""
    try:
        cfg = LSTMConfig(a.input_size, a.hidden_size, a.num_layers, not a.no_bias, a.batch_first, a.dropout,
                         a.bidirectional, a.proj_size, layer_norm=a.layer_norm, peephole=a.peephole,
                         zoneout=a.zoneout, recurrent_dropout=a.recurrent_dropout, weight_drop=a.weight_drop,
                         forget_bias=a.forget_bias)
        d = describe(cfg, seq_len=a.seq_len, batch=a.batch, dtype=a.dtype)
        if a.plot is not None:
            picture_format(a.plot)
    except (TypeError, ValueError) as e:
        raise CommandError(f"error: {e}", status=2) from None
    return d


def _run(a) -> int:
    d = _described(a)
    print(json.dumps(d.to_dict(), indent=2) if a.json else d.text())
    return _write_plot(d, a.plot) if a.plot is not None else 0


def main(argv=None) -> int:
    ap = _OneLineParser(prog="lstmkit params", description="Parameter table, formula, shapes and memory of an LSTM; "
                        "--plot draws them.")
    ap.add_argument("input_size", type=int, metavar="INPUT_SIZE")
    ap.add_argument("hidden_size", type=int, metavar="HIDDEN_SIZE")
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--no-bias", action="store_true")
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--proj-size", type=int, default=0)
    ap.add_argument("--batch-first", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0, metavar="P", help="between layers, training only")
    ap.add_argument("--seq-len", type=int, default=1, metavar="T")
    ap.add_argument("--batch", type=int, default=1, metavar="N")
    ap.add_argument("--dtype", choices=list(DTYPE_BYTES), default="float32", help="for the memory figures")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--plot", metavar="FILE", help="also draw the network: FILE.svg, or FILE.png (needs matplotlib)")
    _add_variant_options(ap)
    a = ap.parse_args(argv)
    return run_guarded("lstmkit params", lambda: _run(a))
