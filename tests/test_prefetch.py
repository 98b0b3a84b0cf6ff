"""kernels/numba/prefetch.py: with a cold compile cache, a second process compiles the backward
kernels while the first compiles the forward. It only helps if it compiles the very
signatures the engine calls; a wrong argument type would compile something nobody uses."""
import json
import os
import subprocess
import sys

import pytest

from lstmkit.kernels.numba import prefetch

# The engine's backward kernels on each path: a training step of each size must find every one
# of them in the cache the prefetch wrote, compiling none itself.
_CHECK = r"""
import json, sys
from numba.core import event
compiled = []

class Listener(event.Listener):
    def on_start(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__qualname__)

    def on_end(self, ev):
        pass

event.register("numba:compile", Listener())
import torch, lstmkit
from lstmkit.kernels.numba import lstm as kernels
torch.manual_seed(0)
torch.set_num_threads(2)  # the last size splits its calls over a team (compiled team bodies)
for I, H, T, N in [(3, 4, 1, 2), (3, 4, 3, 2), (3, 4, 9, 5), (96, 128, 9, 5)]:  # one step, few steps, loop x2
    m = lstmkit.LSTM(I, H, engine="numba")
    x = torch.randn(T, N, I, requires_grad=True)
    y, (h, c) = m(x)
    (y.sum() + c.sum()).backward()
with torch.no_grad():  # batch 1 on two threads: split by hidden units (columns.py)
    m(torch.randn(9, 1, 96))
print(json.dumps(compiled))
"""

BACKWARD_KERNELS = {"backward_chunk", "steps_backward", "step_backward", "step_backward_all"}
# What the team calls compile besides the kernels: their bodies' helpers, encoders, the column kernel.
TEAM_CODE = {"encode", "row_chunks", "whole_team", "forward_columns"}


def test_prefetched_kernels_are_the_ones_the_engine_calls(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), LSTMKIT_PREFETCH="0")
    subprocess.run([sys.executable, "-m", "lstmkit.kernels.numba.prefetch", "few steps"], env=env, check=True,
                   timeout=300)
    out = subprocess.run([sys.executable, "-c", _CHECK], env=env, check=True, capture_output=True, text=True,
                         timeout=300)
    compiled = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "forward_chunk" in compiled  # the check does compile what the prefetch leaves out
    assert not compiled & (BACKWARD_KERNELS | TEAM_CODE), sorted(compiled & (BACKWARD_KERNELS | TEAM_CODE))


def test_the_check_sees_team_code_compiled_without_the_prefetch(tmp_path):
    """The check above could pass by never splitting a call: with an empty cache it must see
    the team code compiled."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), LSTMKIT_PREFETCH="0")
    out = subprocess.run([sys.executable, "-c", _CHECK], env=env, check=True, capture_output=True, text=True,
                         timeout=300)
    compiled = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert compiled >= TEAM_CODE, sorted(TEAM_CODE - compiled)


def test_start_runs_once_and_only_when_wanted(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(prefetch.subprocess, "Popen", lambda args, **kw: launched.append(args))
    monkeypatch.setattr(prefetch, "started", False)
    monkeypatch.setenv("LSTMKIT_PREFETCH", "0")
    assert not prefetch.start("time loop") and not launched  # turned off
    monkeypatch.setattr(prefetch, "started", False)
    monkeypatch.delenv("LSTMKIT_PREFETCH")
    monkeypatch.setattr("lstmkit.kernels.numba.cache_guard.numba_cache_dir", lambda _: tmp_path)
    assert prefetch.start("few steps") and launched[-1][-1] == "few steps"  # empty cache: the child starts
    assert not prefetch.start("few steps") and len(launched) == 1  # once per process
    for name in ("lstm.backward_chunk-1.py311.nbi", "step.steps_backward-1.py311.nbi"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(prefetch, "started", False)
    assert not prefetch.start("time loop") and len(launched) == 1  # already cached: nothing to do


@pytest.mark.parametrize("first", ["time loop", "few steps", "one step"])
def test_first_path_is_compiled_first(first, monkeypatch):
    """The child's order: the first call's path, then the others."""
    from lstmkit.kernels.numba import lstm, step

    order = []
    for mod, name in ((lstm, "backward_core"), (step, "steps_forward"), (step, "steps_backward"),
                      (step, "step_forward"), (step, "step_backward"), (step, "step_backward_all")):
        monkeypatch.setattr(mod, name, lambda *a, name=name: order.append(name))
    prefetch.compile_backward_kernels(first)
    firsts = {"time loop": "backward_core", "few steps": "steps_forward", "one step": "step_forward"}
    assert order[0] == firsts[first] and set(order) >= set(firsts.values())
