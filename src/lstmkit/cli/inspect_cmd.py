"""`lstmkit inspect PATH [--json]`: list the LSTMs in a checkpoint (see interop/inspection.py)."""
from __future__ import annotations

import argparse
import json
import sys

from . import CommandError, run_guarded
from ..interop.inspection import KEYS, InspectError, find_in_file, short_error


def format_variants(variants: dict) -> str:
    """The variant options as the constructor takes them ("layer_norm, zoneout=0.1"), or "-"."""
    return ", ".join(k if v is True else f"{k}={v!r}" for k, v in variants.items()) or "-"


def format_table(path: str, rows: list[dict]) -> str:
    heads = ("prefix", "input", "hidden", "layers", "bias", "bidir", "proj", "parameters", "variants")
    body = [
        (r["prefix"] or "(top level)", r["input_size"], r["hidden_size"], r["num_layers"], r["bias"],
         r["bidirectional"], r["proj_size"], f"{r['parameters']:,}", format_variants(r["variants"]))
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(heads, *body)]
    line = lambda cells: "  ".join(  # noqa: E731 - text left, numbers right
        str(c).ljust(w) if i in (0, len(cells) - 1) else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    n = len(rows)
    return "\n".join([f"{path}: {n} LSTM{'s' if n != 1 else ''}", line(heads)] + [line(b) for b in body])


def _lstms_in(path: str):
    """find_in_file(path), its failures as one-line CommandErrors (exit 1)."""
    try:
        rows, rejected = find_in_file(path)
    except InspectError as e:
        raise CommandError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a damaged file must not end in a traceback
        raise CommandError(f"cannot read {path} ({short_error(e)})") from None
    if not rows:
        why = "".join(f"; {p or '(top level)'}: {r}" for p, r in rejected)
        raise CommandError(f"no LSTM found in {path}{why}")
    return rows, rejected


def _run(args) -> int:
    rows, rejected = _lstms_in(args.path)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(args.path, rows))
        for p, r in rejected:
            print(f"(skipped {p or '(top level)'}: {r})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lstmkit inspect", description="List the LSTMs in a checkpoint "
                                 "(.pt/.pth state_dict or saved module, .safetensors, .onnx).")
    ap.add_argument("path")
    ap.add_argument("--json", action="store_true", help="print a JSON list of objects with keys " + ", ".join(KEYS))
    args = ap.parse_args(argv)
    return run_guarded("lstmkit inspect", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
