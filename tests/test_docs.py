"""The documentation cannot drift from the code.

- Every command shown in README.md and docs/*.md in a shell code block (```bash, ```console,
  or a bare ``` block whose line starts with `lstmkit `, `python -m lstmkit ` or `$ `) exists and
  its arguments parse: `lstmkit ...`, `python -m lstmkit ...` and `torchrun ... -m lstmkit ...`
  go through `lstmkit.cli.main`, `python benchmarks/X.py ...` through the script, with
  `argparse.ArgumentParser.parse_args` patched to stop right after a successful parse — so no
  command actually trains, benchmarks or writes anything.
- Every ```python block runs, file by file in one namespace, in a fresh temporary directory
  (a block preceded by `<!-- doctest: skip -->` is left out; keep those rare).
- Every relative link points at a file that exists, and every `#anchor` at a heading; every
  repository path named in the text (`src/...`, `tests/...::test_name`, `benchmarks/...`) exists.
- The README's test command is the one CI runs (.ci/run).
"""
from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lstmkit import cli

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = "<!-- doctest: skip -->"
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}


# ---- reading the Markdown ---------------------------------------------------------------------------
@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    lang: str
    lines: list[str]
    skip: bool


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their language and skip mark."""
    blocks, text = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(text):
        m = re.match(r"^```\s*([\w+-]*)\s*$", text[i])
        if not m:
            i += 1
            continue
        before = [t for t in text[:i] if t.strip()]
        skip = bool(before) and before[-1].strip() == SKIP_MARK
        start, i = i + 1, i + 1
        while i < len(text) and not text[i].startswith("```"):
            i += 1
        blocks.append(Block(path, start + 1, m.group(1).lower(), text[start:i], skip))
        i += 1
    return blocks


def logical_lines(block: Block):
    """(line number, text) of each shell line, backslash continuations joined."""
    pending, first = "", None
    for k, raw in enumerate(block.lines):
        if first is None:
            first = block.line + k
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield first, pending + raw
        pending, first = "", None


def shell_segments(block: Block):
    """(line number, argv) of every simple command shown in a shell block."""
    for line_no, line in logical_lines(block):
        stripped = line.strip()
        prompt = stripped.startswith("$ ")
        if block.lang == "console" and not prompt:
            continue  # program output
        if block.lang == "" and not (prompt or stripped.startswith(("lstmkit ", "python -m lstmkit "))):
            continue  # a bare block of output or source text
        lexer = shlex.shlex(stripped[2:] if prompt else stripped, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        argv = []
        for tok in list(lexer) + [";"]:
            if tok in ("&&", "||", "|", ";", "&"):
                if argv:
                    yield line_no, argv
                argv = []
            else:
                argv.append(tok)


def lstmkit_args(argv: list[str]) -> list[str] | None:
    """The arguments given to lstmkit by this command, or None if it does not run lstmkit."""
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if argv and argv[0] == "lstmkit":
        return argv[1:]
    for k in range(len(argv) - 1):
        if argv[k] == "-m" and argv[k + 1] == "lstmkit":
            return argv[k + 2 :]
    return None


def script_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script, arguments) of `python path/to/script.py ...`, else None."""
    if len(argv) >= 2 and Path(argv[0]).name.startswith("python") and argv[1].endswith(".py"):
        return argv[1], argv[2:]
    return None


def shown_commands():
    found = []
    for path in DOC_FILES:
        for block in code_blocks(path):
            if block.lang not in SHELL_LANGS:
                continue
            for line_no, argv in shell_segments(block):
                where = f"{path.relative_to(ROOT)}:{line_no}"
                if (args := lstmkit_args(argv)) is not None:
                    found.append(pytest.param("lstmkit", args, id=f"{where} lstmkit {' '.join(args)}"))
                elif (script := script_args(argv)) is not None:
                    found.append(pytest.param(script[0], script[1], id=f"{where} {' '.join(argv[1:])}"))
    return found


COMMANDS = shown_commands()


# ---- checking a command's arguments without running it -------------------------------------------------
class Parsed(BaseException):
    """Raised in place of running a command once argparse has accepted its arguments
    (a BaseException, so no `except Exception` in a command can swallow it)."""


@pytest.fixture
def parse_only(monkeypatch):
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def verdict(run) -> str:
    """'parsed', 'help' or 'rejected (...)' for a callable that starts a command."""
    try:
        code = run()
    except Parsed:
        return "parsed"
    except SystemExit as e:
        return "help" if e.code in (0, None) else f"rejected (exit {e.code})"
    return f"rejected (returned {code} before parsing any arguments)"


def check_lstmkit(args: list[str]) -> str:
    return verdict(lambda: cli.main(list(args)))


def check_script(script: str, args: list[str], monkeypatch) -> str:
    path = ROOT / script
    assert path.is_file(), f"{script}: no such script"
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])
    return verdict(lambda: runpy.run_path(str(path), run_name="__main__"))


@pytest.mark.parametrize("program, args", COMMANDS)
def test_shown_command_parses(program, args, parse_only, monkeypatch, capsys):
    if program == "lstmkit":
        result = check_lstmkit(args)
    else:
        result = check_script(program, args, monkeypatch)
    assert result in ("parsed", "help"), f"{result}: {capsys.readouterr().err.strip()}"


def test_the_checker_rejects_what_does_not_parse(parse_only, capsys):
    assert check_lstmkit(["params", "10", "20", "--num-layers", "2"]) == "parsed"
    assert check_lstmkit(["params", "10", "20", "--no-such-flag"]).startswith("rejected")
    assert check_lstmkit(["train", "--text", "book.txt"]).startswith("rejected")  # --out is required
    assert check_lstmkit(["sample", "runs/book", "--temperature", "warm"]).startswith("rejected")
    assert check_lstmkit(["no-such-command"]).startswith("rejected")


def test_every_subcommand_is_shown():
    """Every `lstmkit` subcommand appears in some shell block (and so an extractor that
    finds nothing cannot pass)."""
    shown = {p.values[1][0] for p in COMMANDS if p.values[0] == "lstmkit" and p.values[1]}
    assert set(cli.COMMANDS) <= shown, sorted(set(cli.COMMANDS) - shown)
    assert any(p.values[0].startswith("benchmarks/") for p in COMMANDS)


# Where each command's options are documented, every one of them.
OPTIONS_DOCUMENTED_IN = {
    "train": "docs/training.md", "sample": "docs/training.md", "demo": "docs/training.md",
    "bench": "docs/performance.md", "inspect": "docs/onnx.md", "params": "README.md",
    "benchmarks/gpu.py": "docs/performance.md", "benchmarks/runtime.py": "docs/performance.md",
    "benchmarks/variants.py": "docs/performance.md", "benchmarks/memory.py": "docs/performance.md",
    "benchmarks/products.py": "docs/performance.md", "benchmarks/sweep.py": "docs/performance.md",
    "benchmarks/fuzz.py": "docs/drop-in.md", "benchmarks/tile_rows.py": "docs/performance.md",
    "benchmarks/precompute.py": "docs/performance.md",
    "benchmarks/cell.py": "docs/performance.md",
}


def command_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser a subcommand or benchmark script builds, caught as it parses `--help`."""
    built = []

    def catch(self, args=None, namespace=None):
        built.append(self)
        raise Parsed(None)

    with monkeypatch.context() as patched:
        patched.setattr(argparse.ArgumentParser, "parse_args", catch)
        if name.endswith(".py"):
            check_script(name, ["--help"], patched)
        else:
            check_lstmkit([name, "--help"])
    assert built, f"{name} built no ArgumentParser"
    return built[0]


@pytest.mark.parametrize("name", sorted(OPTIONS_DOCUMENTED_IN))
def test_every_option_is_documented(name, monkeypatch):
    parser = command_parser(name, monkeypatch)
    options = [opt for action in parser._actions if action.help != argparse.SUPPRESS
               for opt in action.option_strings if opt.startswith("--") and opt != "--help"]
    assert options, f"{name} has no options?"
    text = (ROOT / OPTIONS_DOCUMENTED_IN[name]).read_text(encoding="utf-8")
    missing = [opt for opt in options if not re.search(re.escape(opt) + r"(?![\w-])", text)]
    assert not missing, f"{OPTIONS_DOCUMENTED_IN[name]} does not mention {name} {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    shown = [line for b in code_blocks(ROOT / "README.md") if b.lang == "bash" for line in b.lines]
    assert ci_command in shown


# ---- the Python examples ---------------------------------------------------------------------------------
def python_blocks(path: Path) -> list[Block]:
    return [b for b in code_blocks(path) if b.lang == "python" and not b.skip]


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile examples run with backend="aot_eager": Dynamo's full-graph capture and
    AOTAutograd, as inductor does, without inductor's C++ code generation (tens of seconds
    on a small machine). tests/test_compile.py runs the inductor backend."""
    real = torch.compile

    def compile_(model=None, **kwargs):
        kwargs.setdefault("backend", "aot_eager")
        return real(model, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy ONNX exporter says it is legacy
@pytest.mark.parametrize("path", [p for p in DOC_FILES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(path, tmp_path, monkeypatch, quick_compile):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    for block in python_blocks(path):
        code = compile("\n".join(block.lines), f"{path.relative_to(ROOT)}:{block.line}", "exec")
        exec(code, namespace)  # noqa: S102 - the examples are this repository's own text


def test_readme_has_python_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 3


# ---- links ---------------------------------------------------------------------------------------------------
def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    anchors, seen, in_code = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"^[a-z]+:", target):
            yield target


@pytest.mark.parametrize("path", DOC_FILES + [ROOT / "BENCHMARKS.md", ROOT / "ARCHITECTURE.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


# a path, not a template such as tests/test_<name>.py
REPO_PATH = re.compile(r"(?<![\w/.-])((?:src|tests|benchmarks|docs)/[\w./-]*\w)(?![\w<-])(?:::(\w+))?")


@pytest.mark.parametrize("path", DOC_FILES + [ROOT / "BENCHMARKS.md", ROOT / "ARCHITECTURE.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(path):
    missing = []
    for name, test_name in REPO_PATH.findall(path.read_text(encoding="utf-8")):
        target = ROOT / name
        if not target.exists():
            missing.append(name)
        elif test_name and not re.search(rf"def {test_name}\b", target.read_text(encoding="utf-8")):
            missing.append(f"{name}::{test_name}")
    assert not missing, missing
