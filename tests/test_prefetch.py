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

BACKWARD_KERNELS = {"backward_chunk", "steps_backward", "step_backward", "step_backward_all", "step_backward_tiles"}
# The weights' packing: the parent packs with numpy while the child compiles it (tile.pack2).
PACKING = {"_pack2_into"}
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
    prefetched = BACKWARD_KERNELS | TEAM_CODE | PACKING
    assert not compiled & prefetched, sorted(compiled & prefetched)


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
    monkeypatch.setattr(prefetch, "_child", [None, None, None])  # restored after the test, as is pending
    monkeypatch.setattr(prefetch, "pending", False)
    assert prefetch.start("few steps") and launched[-1][-4] == "few steps"  # empty cache: the child starts
    assert launched[-1][-3].startswith(str(tmp_path)) and prefetch.pending  # with a file to name its parts in
    assert launched[-1][-2:] == ["training", "-"]
    assert not prefetch.start("few steps") and len(launched) == 1  # once per process
    for name in ("lstm.backward_chunk-1.py311.nbi", "step.steps_backward-1.py311.nbi"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(prefetch, "started", False)
    assert prefetch.start("time loop") and len(launched) == 2  # the one-step tiles not cached yet
    (tmp_path / "step.step_backward_tiles-1.py311.nbi").write_bytes(b"")
    monkeypatch.setattr(prefetch, "started", False)
    assert not prefetch.start("time loop") and len(launched) == 2  # all cached: nothing to do
    for f in tmp_path.glob("*.nbi"):
        f.unlink()
    monkeypatch.setattr(prefetch, "started", False)
    assert prefetch.start("time loop", False, own_gemm=True) and launched[-1][-2:] == ["inference", "own-gemm"]


@pytest.mark.parametrize("first", ["time loop", "few steps", "one step"])
def test_first_path_is_compiled_first(first, monkeypatch):
    """The child's order: the first call's path, then the others."""
    from lstmkit.kernels.numba import lstm, step

    order = []
    for mod, name in ((lstm, "backward_core"), (step, "steps_forward"), (step, "steps_backward"),
                      (step, "step_forward"), (step, "step_forward_all"), (step, "step_backward"),
                      (step, "step_backward_all"), (step, "step_backward_tiles")):
        monkeypatch.setattr(mod, name, lambda *a, name=name: order.append(name))
    parts = []
    monkeypatch.setattr(prefetch, "_announce", lambda _, part: parts.append(part))
    monkeypatch.setattr(prefetch, "compile_team_bodies", lambda: order.append("team bodies"))
    prefetch.compile_backward_kernels(first)
    # Each path's backward before its forward: see compile_backward_kernels.
    firsts = {"time loop": "backward_core", "few steps": "steps_backward", "one step": "step_backward"}
    assert order[0] == firsts[first] and set(order) >= set(firsts.values())
    assert order.index("steps_backward") < order.index("steps_forward")
    assert order.index("step_backward_all") < order.index("step_forward") < order.index("step_forward_all")
    assert order.index("step_forward_all") < order.index("step_backward_tiles")  # the parent does without them
    assert order[order.index("team bodies") - 1].startswith(firsts[first][:4])  # right after the first path
    assert parts[0] == f"{first} backward" and "team bodies" in parts
    assert len(parts) == len(set(parts)) == 7  # every part named, once
    monkeypatch.setattr(lstm, "gate_row", lambda *a: order.append("gate_row"))
    parts.clear()
    order.clear()
    prefetch.compile_backward_kernels(first, None, forward_rows=True)  # an inference call came first
    assert parts[:2] == ["forward rows", f"{first} backward"] and order[:2] == ["gate_row", firsts[first]]
    from lstmkit.kernels.numba import gemm

    monkeypatch.setattr(gemm, "matmul_rows", lambda *a, **k: order.append("matmul_rows"))
    parts.clear()
    order.clear()
    prefetch.compile_backward_kernels(first, None, own_gemm=True)  # the engine's products on gemm.py
    assert parts.index("own gemm") == parts.index("team bodies") + 1  # right after the first path
    assert order.index("matmul_rows") == order.index("team bodies") + 1
    assert order.count("matmul_rows") == 3 and len(parts) == len(set(parts)) == 8


def _fake_child(monkeypatch, tmp_path, seconds):
    """A child process that lives `seconds` and a part file this test writes for it."""
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    part_file = tmp_path / "part"
    monkeypatch.setattr(prefetch, "_child", [child, tmp_path, part_file])
    monkeypatch.setattr(prefetch, "pending", True)
    monkeypatch.setattr(prefetch, "_waited", set())
    return child, part_file


def test_wait_for_waits_while_the_child_compiles_that_part(tmp_path, monkeypatch):
    import threading
    import time

    child, part_file = _fake_child(monkeypatch, tmp_path, 30)
    try:
        prefetch._announce(part_file, "few steps backward")
        t0 = time.monotonic()
        prefetch.wait_for("few steps forward")  # another part: no wait
        prefetch.wait_for("time loop backward")
        assert time.monotonic() - t0 < 0.5
        threading.Timer(0.4, prefetch._announce, (part_file, "few steps forward")).start()
        t0 = time.monotonic()
        prefetch.wait_for("few steps backward")  # the child's part now: until it moves on
        assert 0.3 < time.monotonic() - t0 < 5
        assert prefetch.pending  # the child still runs
    finally:
        child.kill()
        child.wait()
    prefetch.wait_for("few steps forward")  # the child is gone: no wait, and nothing pending
    assert not prefetch.pending


def test_wait_for_waits_once_per_part(tmp_path, monkeypatch):
    """A part's kernels are in this process after its first call: the calls after it do not
    wait (nor read the child's part file), even while the child compiles that part."""
    import time

    child, part_file = _fake_child(monkeypatch, tmp_path, 30)
    monkeypatch.setattr(prefetch, "WAIT_LIMIT_S", 0.3)
    try:
        prefetch._announce(part_file, "one step forward")
        t0 = time.monotonic()
        prefetch.wait_for("one step forward")  # the first call: waits (here, to the limit)
        assert time.monotonic() - t0 > 0.25
        monkeypatch.setattr(prefetch, "_part_now", lambda _: pytest.fail("read the part file again"))
        t0 = time.monotonic()
        for _ in range(100):
            prefetch.wait_for("one step forward")
        assert time.monotonic() - t0 < 0.1 and prefetch.pending
    finally:
        child.kill()
        child.wait()
    prefetch.wait_for("one step forward")  # the child is gone: nothing pending
    assert not prefetch.pending


def test_wait_for_ends_when_the_child_exits(tmp_path, monkeypatch):
    import time

    child, part_file = _fake_child(monkeypatch, tmp_path, 0.3)
    prefetch._announce(part_file, "one step backward")  # a child that dies in its part
    t0 = time.monotonic()
    prefetch.wait_for("one step backward")
    assert time.monotonic() - t0 < 5 and child.poll() is not None and not prefetch.pending


def test_wait_for_is_bounded(tmp_path, monkeypatch):
    import time

    child, part_file = _fake_child(monkeypatch, tmp_path, 30)
    monkeypatch.setattr(prefetch, "WAIT_LIMIT_S", 0.3)
    try:
        prefetch._announce(part_file, "time loop backward")  # a child stuck in its part
        t0 = time.monotonic()
        prefetch.wait_for("time loop backward")
        assert 0.25 < time.monotonic() - t0 < 5
    finally:
        child.kill()
        child.wait()


def test_no_child_no_wait(monkeypatch):
    monkeypatch.setattr(prefetch, "_child", [None, None, None])
    monkeypatch.setattr(prefetch, "pending", True)
    prefetch.wait_for("few steps backward")
    assert not prefetch.pending
