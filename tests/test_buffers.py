"""kernels/numba/buffers.py: the big per-call arrays on pooled mappings. A mapping goes back to
the pool only when nothing views it any more, and a training step whose saved activations
come from the pool still matches torch.nn.LSTM when two forwards run before their backwards."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import lstmkit
from lstmkit.kernels.numba import buffers

from harness import TOL, assert_close

BIG = buffers.PLAIN_PAGES_FROM_BYTES


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.setattr(buffers, "_pool", type(buffers._pool)())


def test_small_arrays_are_plain_numpy():
    a = buffers.empty((10, 10), np.float32)
    assert a.flags.owndata and a.shape == (10, 10)


def test_a_mapping_returns_only_when_nothing_views_it():
    a = buffers.empty((BIG // 4 // 64, 64), np.float32)
    assert a.shape == (BIG // 256, 64) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % 4096 == 0
    a[...] = 1
    t = torch.from_numpy(a[3:])[::2]  # a torch view of a numpy slice
    del a
    gc.collect()
    assert buffers.pooled_bytes() == 0
    t.add_(1)  # still its own memory
    assert t.sum().item() == 2 * t.numel()
    del t
    gc.collect()
    assert buffers.pooled_bytes() == BIG


def test_a_request_of_the_same_size_reuses_the_mapping_and_others_do_not():
    a = buffers.empty(BIG // 8, np.float64)
    address = a.ctypes.data
    del a
    gc.collect()
    b = buffers.empty((BIG // 4,), np.float32)  # the same bytes, another dtype and shape
    assert b.ctypes.data == address and buffers.pooled_bytes() == 0
    c = buffers.empty((BIG // 4 + 16,), np.float32)
    assert c.ctypes.data != address


def test_the_pool_keeps_at_most_its_bytes_oldest_out(monkeypatch):
    monkeypatch.setattr(buffers, "POOL_MAX_BYTES", 3 * BIG)
    arrays = [buffers.empty(BIG + 4096 * k, np.uint8) for k in range(4)]
    for k in range(4):  # freed in this order
        arrays[k] = None
        gc.collect()
    assert buffers.pooled_bytes() <= 3 * BIG
    assert (BIG + 3 * 4096) in buffers._pool and BIG not in buffers._pool  # the first freed went out


@pytest.mark.parametrize("threads", [1, 2])
def test_two_forwards_then_their_backwards_on_pooled_activations_match_torch(threads):
    """Saved activations of 8 MiB (T=64, N=32, hidden 256): the second forward must not take the
    first one's buffers while its graph still holds them; the pool must reuse them after."""
    torch.set_num_threads(threads)
    torch.manual_seed(threads)
    ref = torch.nn.LSTM(64, 256)
    ours = lstmkit.LSTM.from_torch(ref, engine="numba")
    xs = [torch.randn(64, 32, 64) for _ in range(3)]
    grads = []
    for m in (ours, ref):
        m.zero_grad()
        ins = [x.clone().requires_grad_(True) for x in xs]
        outs = [m(x)[0] for x in ins[:2]]
        (outs[0].square().sum() + outs[1].sum()).backward()
        y3, _ = m(ins[2])  # after the pool took the first two back
        y3.pow(3).sum().backward()
        grads.append([o.detach() for o in outs] + [y3.detach()] + [x.grad for x in ins]
                     + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert_close(a, b, TOL[torch.float32])
    gc.collect()
    assert buffers.pooled_bytes() > 0


def test_threads_never_get_a_mapping_that_is_still_viewed():
    """Four threads allocating, writing their own value, checking it and dropping arrays of a few
    sizes at once: no array ever sees another's writes (a mapping handed out twice would)."""
    import threading

    errors = []

    def work(k):
        rng = np.random.default_rng(k)
        held = []
        for i in range(60):
            a = buffers.empty(BIG + 4096 * int(rng.integers(0, 3)), np.uint8)
            a[::4096] = k
            held.append(a)
            if len(held) > 3:
                old = held.pop(int(rng.integers(0, len(held))))
                if not (old[::4096] == k).all():
                    errors.append(k)
        for a in held:
            if not (a[::4096] == k).all():
                errors.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    gc.collect()
    assert 0 < buffers.pooled_bytes() <= buffers.POOL_MAX_BYTES


def test_a_pool_of_zero_bytes_keeps_nothing(monkeypatch):
    monkeypatch.setattr(buffers, "POOL_MAX_BYTES", 0)
    a = buffers.empty(BIG, np.uint8)
    del a
    gc.collect()
    assert buffers.pooled_bytes() == 0 and not buffers._pool


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no madvise huge pages here (not Linux)")
def test_weight_layouts_ask_for_huge_pages_and_per_call_arrays_do_not(monkeypatch):
    """Weight layouts (tile.aligned_empty: every packing) are read at every step, and past L2
    from L3: a new mapping of theirs asks for transparent huge pages; the per-call arrays'
    mappings do not (their faults stalled, call after call, before the pool)."""
    import mmap

    from lstmkit.kernels.numba import tile

    advised = []

    class Mapping(mmap.mmap):
        def madvise(self, option, *args):
            advised.append(option)
            return super().madvise(option, *args)

    monkeypatch.setattr(buffers.mmap, "mmap", Mapping)
    acts = buffers.empty((BIG // 4,), np.float32)
    assert advised == [] and acts.size == BIG // 4
    w = tile.aligned_empty((BIG // 4 + 16,), np.float32)
    assert advised == [mmap.MADV_HUGEPAGE] and w.ctypes.data % tile.ALIGN == 0
    small = tile.aligned_empty((1000,), np.float32)  # below the mappings' size: numpy's own
    assert advised == [mmap.MADV_HUGEPAGE] and small.flags.c_contiguous
