"""The variant engine's row split (kernels/numba/variants.py): the batch rows of a call run as
chunks of whole sequences on several threads. Forced here at small sizes (the engine splits only
calls with enough work): every split gives the one-chunk numbers bit for bit, outputs and every
gradient."""
import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import lstmkit
from lstmkit.engines.numba import binding

from harness import TOL, assert_all_close

OPTIONS = [
    dict(layer_norm=True, peephole=True, zoneout=(0.3, 0.2), recurrent_dropout=0.3),
    dict(peephole=True, proj_size=3),
    dict(zoneout=0.25, bidirectional=True, num_layers=2),
    dict(layer_norm=True, recurrent_dropout=0.5, proj_size=2, bidirectional=True),
]


def _run(m, data, hx, seed):
    torch.manual_seed(seed)  # the same masks for every split
    params = list(m.parameters())
    for p in params:
        p.grad = None
    if isinstance(data, torch.Tensor):
        data = data.clone().requires_grad_()
        leaf = data
    else:
        leaf = data.data.requires_grad_()
    h0, c0 = (t.clone().requires_grad_() for t in hx)
    out, (h, c) = m(data, (h0, c0))
    y = out if isinstance(out, torch.Tensor) else out.data
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (h * 2).sum() + (c * 3).sum()
    loss.backward()
    leaf_grad = leaf.grad.clone()
    leaf.grad = None
    return [y.detach(), h.detach(), c.detach(), leaf_grad, h0.grad, c0.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_row_split_equals_one_chunk(monkeypatch, opts, packed, chunks):
    torch.manual_seed(0)
    m = lstmkit.LSTM(4, 5, engine="numba", **opts).double().train()
    lengths = [6, 2, 5, 6, 1, 3, 4]
    seqs = [torch.randn(L, 4, dtype=torch.float64) for L in lengths]
    data = pack_sequence(seqs, enforce_sorted=False) if packed else torch.randn(6, 7, 4, dtype=torch.float64)
    h_shape, c_shape = m.config.state_shapes(7)
    hx = (torch.randn(h_shape, dtype=torch.float64), torch.randn(c_shape, dtype=torch.float64))

    monkeypatch.setattr(binding, "chunks_for", lambda batch, macs: 1)
    one = _run(m, data, hx, seed=5)
    calls = []
    monkeypatch.setattr(binding, "chunks_for", lambda batch, macs: calls.append(batch) or chunks)
    split = _run(m, data, hx, seed=5)
    assert calls  # the split path ran
    # Bitwise: each row is computed by the same operations whichever chunk holds it, the sums
    # over rows are kept per batch row and added in one order, the GEMMs run on all rows.
    for a, b in zip(split, one):
        assert torch.equal(a, b)


def test_row_split_matches_torch_with_zero_peepholes(monkeypatch):
    """Peepholes of zero make the variant kernel compute nn.LSTM: a split call equals
    torch.nn.LSTM (float64, every gradient but the peepholes')."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 6, engine="numba", peephole=True).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "peephole" in name:
                p.zero_()
    ref = torch.nn.LSTM(3, 6).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "peephole" not in k})
    calls = []
    monkeypatch.setattr(binding, "chunks_for", lambda batch, macs: calls.append(batch) or 3)
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    hx = (torch.randn(1, 6, 6, dtype=torch.float64), torch.randn(1, 6, 6, dtype=torch.float64))
    ours = _run(m, x, hx, 0)
    names = [n for n, _ in m.named_parameters()]
    ours = ours[:6] + [g for n, g in zip(names, ours[6:]) if "peephole" not in n]
    assert calls
    assert_all_close(ours, _run(ref, x, hx, 0), TOL[torch.float64])


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("chunks", [1, 2])
def test_the_same_call_gives_the_same_bits_every_time(monkeypatch, opts, chunks):
    """Run to run, nothing but the heap's layout changes; it must not reach the numbers. (A loop
    compiled with 'reassoc' ran as a vector or a scalar loop as LLVM's run-time check of its
    pointers said, and the two rounded differently: rows.KW_STORE.)"""
    torch.manual_seed(0)
    m = lstmkit.LSTM(4, 5, engine="numba", **opts).double().train()
    data = torch.randn(6, 7, 4, dtype=torch.float64)
    h_shape, c_shape = m.config.state_shapes(7)
    hx = (torch.randn(h_shape, dtype=torch.float64), torch.randn(c_shape, dtype=torch.float64))
    monkeypatch.setattr(binding, "chunks_for", lambda batch, macs: chunks)
    first = _run(m, data, hx, seed=5)
    for _ in range(12):
        keep = [torch.empty(n) for n in (3, 17, 40)]  # move the allocator's next blocks about
        for a, b in zip(_run(m, data, hx, seed=5), first):
            assert torch.equal(a, b)
        del keep
