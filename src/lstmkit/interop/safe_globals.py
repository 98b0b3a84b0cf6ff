"""torch.load(weights_only=True) of whole models that contain lstmkit modules, with no lstmkit
name in the loading program.

A program that saved `torch.save(model)` reloads it under an allowlist of its own classes and
torch's layers. The pickle also names lstmkit.nn.modules.LSTM (or LSTMCell), which torch's
weights-only unpickler refuses unless it was registered with
torch.serialization.add_safe_globals. nn/modules.py registers both classes when it is
imported; this file makes sure that happens after `import lstmkit` in any torch program,
also when the program imports lstmkit before torch and never builds a module before loading
(e.g. a generate.py that only loads).

Pickles written before the classes moved name them lstmkit.module.LSTM / LSTMCell: the same
two classes are registered under that path too (and lstmkit/module.py re-exports them there).

What the registration allows: a weights-only pickle may create LSTM / LSTMCell objects and
set their state (tensors, numbers, strings, containers; the config arrives as a plain dict
and is validated again in LSTM.__setstate__, the engine name too). No function or other
class of lstmkit becomes loadable, so a pickle can still call nothing; the worst a crafted
file can do is what a crafted nn.LSTM can: hold wrong weights.

This file must not import torch (lstmkit imports it without torch).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


# Whole models saved before LSTM / LSTMCell moved to lstmkit.nn.modules name them by their old
# module path (lstmkit/module.py re-exports them there): the same two classes, allowed under it.
OLD_MODULE_PATHS = ("lstmkit.module",)


def _register() -> None:
    try:
        from ..nn import modules  # importing nn/modules.py registers its classes
    except ImportError:  # a partial install (e.g. no numba): torch itself must still import
        return
    if not hasattr(modules, "LSTMCell"):
        return  # torch's first import is nn/modules.py's own (`import lstmkit.nn` first): it registers at its end
    register_old_paths(modules.LSTM, modules.LSTMCell)


def register_old_paths(lstm, cell) -> None:
    """Allow the two classes under OLD_MODULE_PATHS too (torch is loaded when this runs)."""
    import torch

    if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
        torch.serialization.add_safe_globals([(cls, f"{path}.{cls.__qualname__}") for path in OLD_MODULE_PATHS
                                              for cls in (lstm, cell)])


class _RegisterAfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when `torch` is first imported, registers once torch is ready."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)  # one use; the real finders locate torch
        spec = importlib.util.find_spec("torch")
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register
        return spec


def register_when_torch_loads() -> None:
    """Register lstmkit's module classes with torch's weights-only unpickler now if torch is
    imported, else right after torch is imported; never imports torch itself."""
    if sys.modules.get("torch") is not None:
        _register()
    elif importlib.util.find_spec("torch") is not None and not any(
        isinstance(f, _RegisterAfterTorch) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterTorch())
