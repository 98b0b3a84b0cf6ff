"""`lstmkit params INPUT HIDDEN [...]`: the command line of lstmkit.describe."""
from __future__ import annotations

import argparse
import json
import sys

from ..config import LSTMConfig
from ..describe import describe


# ---- command line ----------------------------------------------------------------------------
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    ap = _OneLineParser(prog="lstmkit params", description="Parameter table, formula, shapes and memory of an LSTM.")
    ap.add_argument("input_size", type=int, metavar="INPUT_SIZE")
    ap.add_argument("hidden_size", type=int, metavar="HIDDEN_SIZE")
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--no-bias", action="store_true")
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--proj-size", type=int, default=0)
    ap.add_argument("--batch-first", action="store_true")
    ap.add_argument("--seq-len", type=int, default=1, metavar="T")
    ap.add_argument("--batch", type=int, default=1, metavar="N")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    a = ap.parse_args(argv)
    try:
        cfg = LSTMConfig(a.input_size, a.hidden_size, a.num_layers, not a.no_bias, a.batch_first, 0.0,
                         a.bidirectional, a.proj_size)
        d = describe(cfg, seq_len=a.seq_len, batch=a.batch)
    except (TypeError, ValueError) as e:
        print(f"lstmkit params: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d.to_dict(), indent=2) if a.json else d.text())
    return 0
