"""`lstmkit` / `python -m lstmkit`: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing `main(argv) -> int`, imported only
when used, so `lstmkit params` never pays for torch or numba.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "params": ("lstmkit.cli.params", "parameter table, formula and shapes of an LSTM"),
    "bench": ("lstmkit.cli.bench", "benchmark lstmkit against torch.nn.LSTM and ONNX Runtime"),
    "train": ("lstmkit.apps.charlm.train", "train a character-level language model"),
    "sample": ("lstmkit.apps.charlm.sample", "generate text from a trained model"),
    "demo": ("lstmkit.apps.charlm.demo", "train on the Python standard library, then sample"),
    "inspect": ("lstmkit.cli.inspect_cmd", "list the LSTMs in a checkpoint"),
    "tour": ("lstmkit.cli.tour", "a short tour: parameters, forward/backward checked against torch"),
}


def usage() -> str:
    lines = ["usage: lstmkit COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "`lstmkit COMMAND --help` for a command's options."]
    return "\n".join(lines)


class CommandError(Exception):
    """A command's failure that is no bug in lstmkit, worded by the command: run_guarded prints
    `prog: <message>` as one line and exits with `status` (2: the user's arguments; 1: a file
    that cannot be read or written, an optional package that is missing)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def run_guarded(prog: str, body, user_errors: tuple = ()) -> int:
    """body() -> exit code, under the commands' error policy: an error in the user's input
    (one of user_errors) prints one line `prog: error: ...` and exits 2; a CommandError prints
    `prog: <its message>` and exits with its status; Ctrl-C prints `prog: interrupted` and
    exits 130; anything else is a bug and raises with its traceback."""
    try:
        return int(body() or 0)
    except CommandError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.status
    except user_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lstmkit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        # Only a missing third-party package is the user's to fix; a missing lstmkit module
        # is a bug in lstmkit and propagates with its real traceback.
        if e.name is None or e.name.split(".")[0] == "lstmkit":
            raise
        print(f"lstmkit {name}: needs the package {e.name!r}, which is not installed", file=sys.stderr)
        return 2
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
