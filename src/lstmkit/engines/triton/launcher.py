"""A cached launcher: call a compiled Triton kernel without JITFunction.run's per-call work.

`kernel[grid](*args, **meta)` (JITFunction.run) binds ~20 arguments, computes their
specialization key, looks the compiled kernel up and launches it: tens of microseconds of
Python per call, for a step kernel whose GPU work is a few microseconds. A step loop calls
the same kernel with the same compile-time options T times, so Launcher compiles through
the normal path once per specialization and afterwards calls the CompiledKernel's own
launch handle (`compiled[grid](*all_args)`, the call JITFunction.run ends with in Triton
3.6 .. 3.9, constexpr values included in parameter order).

Safety. A cached kernel is only reused for arguments Triton would have compiled the same
way: the key repeats Triton's specialization rules (per tensor: dtype and 16-byte
alignment of its address; per int: 32/64-bit range, == 1, divisible by 16, except for
parameters in the kernel's do_not_specialize list, which only keep the range). If the
handle is missing or refuses the call (another Triton version), the launcher falls back to
the plain `kernel[grid](...)` for good, with one warning. Under the interpreter it always
takes the plain path (there is nothing compiled to cache).
"""
from __future__ import annotations

import inspect
import os
import warnings

# LSTMKIT_TRITON_FAST_LAUNCH=0 turns the cached path off (every call through kernel[grid]).
FAST_LAUNCH = os.environ.get("LSTMKIT_TRITON_FAST_LAUNCH", "1") != "0"
_disabled_reason = None  # set once when a Triton version refuses the cached call


def fast_launch_disabled_reason():
    """Why the cached path was turned off in this process (None while it is on)."""
    return _disabled_reason


def _do_not_specialize(kernel, names, declared):
    """Per parameter, whether Triton leaves it unspecialized: Triton's own record when the
    kernel is a JITFunction (KernelParam.do_not_specialize, or the decorator's list), else
    `declared` (the interpreter keeps neither; the kernels module declares its lists)."""
    params = getattr(kernel, "params", None)
    if params and all(hasattr(p, "do_not_specialize") for p in params):
        return [bool(p.do_not_specialize) for p in params[: len(names)]]
    listed = getattr(kernel, "do_not_specialize", None)
    dns = set(listed if listed is not None else declared)
    return [i in dns or name in dns for i, name in enumerate(names)]


def _int_key(v: int, specialize: bool):
    wide = not (-(2**31) <= v < 2**31)
    return (wide, v == 1, v % 16 == 0) if specialize else (wide,)


class Launcher:
    """kernel with fixed constexprs and launch options; call it as launcher(grid, *args)."""

    def __init__(self, kernel, interpreted: bool, dns=(), **meta):
        self.kernel = kernel
        self.meta = meta  # constexpr values and num_warps / num_stages
        self.plain = interpreted or not FAST_LAUNCH
        self.compiled = {}  # specialization key -> CompiledKernel
        self.runners = {}  # (key, grid) -> launch handle
        params = list(inspect.signature(kernel.fn).parameters)
        self.n_args = len(params) - sum(p in meta for p in params)
        # Trailing constexpr parameters in signature order: the handle takes them too.
        self.constexprs = tuple(meta[p] for p in params[self.n_args:])
        self.specialize = [not unspecialized for unspecialized in _do_not_specialize(kernel, params[: self.n_args], dns)]

    def _key(self, args):
        key = []
        for a, spec in zip(args, self.specialize):
            if isinstance(a, bool) or a is None:
                key.append(a)
            elif isinstance(a, int):
                key.append(_int_key(a, spec))
            elif hasattr(a, "data_ptr"):
                key.append((a.dtype, a.data_ptr() % 16 == 0))
            else:
                key.append(type(a))
        return tuple(key)

    def loop(self) -> "LoopLauncher":
        """A launcher for one step loop, which computes the specialization key once."""
        return LoopLauncher(self)

    def __call__(self, grid, *args, key=None):
        global _disabled_reason
        if self.plain or _disabled_reason is not None:
            self.kernel[grid](*args, **self.meta)
            return
        if key is None:
            key = self._key(args)
        grid = tuple(grid) + (1,) * (3 - len(grid))  # the compiled handle indexes all three axes
        runner = self.runners.get((key, grid))
        if runner is None:
            compiled = self.compiled.get(key)
            if compiled is None:  # first sighting: compile (or find) and launch the normal way
                self.compiled[key] = self.kernel[grid](*args, **self.meta)
                return
            try:
                runner = compiled[grid]
            except Exception as e:  # noqa: BLE001 - any failure means: not this Triton's API
                self._give_up(e)
                self.kernel[grid](*args, **self.meta)
                return
            self.runners[(key, grid)] = runner
        try:
            runner(*args, *self.constexprs)
        except (TypeError, ValueError, AttributeError, IndexError) as e:  # refused before launching
            # (never relaunch after a launch that happened: the backward kernel updates dc in place)
            self._give_up(e)
            self.kernel[grid](*args, **self.meta)

    @staticmethod
    def _give_up(e: Exception) -> None:
        global _disabled_reason
        _disabled_reason = f"{type(e).__name__}: {e}"
        warnings.warn(
            "lstmkit: this Triton version refused the cached kernel launch "
            f"({_disabled_reason}); using triton's normal launch path from now on (slower, same numbers). "
            "Please report it with your triton version at the lstmkit issue tracker.",
            RuntimeWarning,
            stacklevel=3,
        )


# Tests set this: every LoopLauncher call then checks that its arguments still have the
# specialization key of the loop's first call (the promise LoopLauncher relies on).
CHECK_LOOP_KEYS = False


class LoopLauncher:
    """launcher(grid, *args) for the steps of one loop, keyed once on the first call.

    The promise (kept by the engine's step loops): from step to step only arguments in the
    kernel's do_not_specialize list change - row offsets, row counts - while the tensors,
    strides and sizes stay the same, so the specialization key of the first step holds for
    all and the per-step cost is one dict lookup plus Triton's own launch handle."""

    def __init__(self, launcher: Launcher):
        self.launcher = launcher
        self.key = None

    def __call__(self, grid, *args):
        if self.key is None:
            self.key = self.launcher._key(args)
        elif CHECK_LOOP_KEYS and self.launcher._key(args) != self.key:
            raise AssertionError(f"{self.launcher.kernel}: specialization changed inside a step loop")
        self.launcher(grid, *args, key=self.key)
