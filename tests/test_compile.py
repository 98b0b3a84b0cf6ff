"""torch.compile(fullgraph=True) of models containing lstmkit.LSTM: the fused engine as custom ops."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lstmkit
from lstmkit.engines.numba import compile_ops  # noqa: F401  (registers torch.ops.lstmkit.*)
from harness import TOL, TOL_SAME_KERNELS, assert_all_close, outputs_and_grads, tensor_input

F64, SAME = TOL[torch.float64], TOL_SAME_KERNELS[torch.float64]
pytestmark = pytest.mark.slow  # every test here compiles (dynamo, AOTAutograd, inductor)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def grads_of(model, x, state=None):
    """Output, (h_n, c_n) and the gradients of a fixed random loss w.r.t. input, state and parameters."""
    outputs, grads, _ = outputs_and_grads(model, tensor_input(x), state)
    return outputs + grads


def test_custom_ops_pass_opcheck():
    torch.manual_seed(0)
    T, N, I, H, P = 3, 2, 4, 5, 3
    f = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(T * N, I, **f), [N] * T, torch.randn(N, P, **f), torch.randn(N, H, **f),
            torch.randn(4 * H, I, **f), torch.randn(4 * H, P, **f), torch.randn(4 * H, **f), torch.randn(4 * H, **f),
            torch.randn(P, H, **f), True)
    # schema, fake (meta) implementation, autograd registration, AOT dispatch with dynamic shapes
    torch.library.opcheck(torch.ops.lstmkit.lstm_forward.default, args)


@pytest.mark.parametrize("cfg, shape, with_state", [
    (dict(num_layers=2, bidirectional=True), (5, 3, 4), True),
    (dict(batch_first=True, proj_size=2), (3, 5, 4), False),
    (dict(bias=False), (5, 4), True),  # unbatched 2-D input
])
def test_fullgraph_forward_backward_equal_eager(cfg, shape, with_state):
    torch.manual_seed(0)
    ref = nn.LSTM(4, 6, **cfg, dtype=torch.float64)
    ours = lstmkit.LSTM.from_torch(ref)
    # aot_eager traces forward and backward through AOTAutograd (fake tensors, the custom
    # ops' autograd) like inductor does, without paying for C++ code generation.
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager", dynamic=True)
    D, P = (2 if ref.bidirectional else 1) * ref.num_layers, ref.proj_size or 6
    for scale in (1, 2):  # a second shape reuses the dynamic graph
        s = tuple(d * scale if i < len(shape) - 1 else d for i, d in enumerate(shape))
        x = torch.randn(s, dtype=torch.float64)
        state = None
        if with_state:
            batch = () if len(s) == 2 else (s[0] if ref.batch_first else s[1],)
            state = (torch.randn(D, *batch, P, dtype=torch.float64), torch.randn(D, *batch, 6, dtype=torch.float64))
        eager = grads_of(ours, x, state)
        assert_all_close(grads_of(compiled, x, state), eager, SAME)
        assert_all_close(grads_of(ref, x, state), eager, F64)  # and eager is nn.LSTM


@pytest.mark.parametrize("cfg", [dict(num_layers=2, bidirectional=True), dict(batch_first=True, proj_size=2)])
def test_dynamic_compile_serves_every_sequence_length_with_one_graph(cfg):
    """torch.compile(dynamic=True): one graph for every sequence length and batch from 2 up
    (the padded call's batch sizes go to the op as base.PaddedSizes, not a list of one entry per
    step, which held the graph to one length: a new compile at each), forward and backward equal
    eager."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    ours = lstmkit.LSTM(4, 6, **cfg, dtype=torch.float64)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager", dynamic=True)
    for L, N in ((5, 2), (7, 2), (7, 3), (9, 4), (2, 5)):
        x = torch.randn((N, L, 4) if cfg.get("batch_first") else (L, N, 4), dtype=torch.float64)
        assert_all_close(grads_of(compiled, x), grads_of(ours, x), SAME)
    assert counters["stats"]["unique_graphs"] == 1


def test_torch_export_with_dynamic_length_and_batch():
    """torch.export.export with the sequence length and the batch as dynamic dimensions: the
    exported program's answers on other shapes are eager's."""
    torch.manual_seed(0)
    ours = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)
    program = torch.export.export(ours, (torch.randn(5, 3, 3),), dynamic_shapes=({0: T, 1: B},))
    for L, N in ((7, 4), (2, 2), (11, 3)):
        x = torch.randn(L, N, 3)
        y, (h, c) = program.module()(x)
        want = ours(x)
        assert_all_close([y, h, c], [want[0], *want[1]], 1e-6)


def test_module_forward_has_no_graph_breaks():
    m = lstmkit.LSTM(3, 4, num_layers=2, batch_first=True)
    for x in (torch.randn(2, 5, 3), torch.randn(5, 3)):
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
    cell = lstmkit.LSTMCell(3, 4)
    assert torch._dynamo.explain(cell)(torch.randn(2, 3)).graph_break_count == 0


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = lstmkit.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, tokens):
        y, _ = self.lstm(self.embed(tokens))
        return self.head(torch.relu(y))


def test_inductor_fullgraph_model():
    torch.manual_seed(0)
    model = Tagger()
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    tokens = torch.randint(0, 20, (3, 7))
    results = []
    for m in (model, compiled):
        model.zero_grad()
        out = m(tokens)
        out.square().mean().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    assert_all_close(results[1], results[0], TOL[torch.float32])


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_variants_and_reference_engine_compile(engine):
    """Variant models and engine="reference" compile too: plain torch ops, traced step by step."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 5, layer_norm=True, peephole=True, zoneout=0.1, dtype=torch.float64, engine=engine)
    m.eval()  # zoneout in eval is deterministic (its expectation), so eager and compiled can be compared
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 2, 3, dtype=torch.float64)  # the reference engine unrolls the steps: keep T small
    eager = lstmkit.LSTM(3, 5, layer_norm=True, peephole=True, zoneout=0.1, dtype=torch.float64, engine="reference")
    eager.load_state_dict(m.state_dict())
    assert_all_close(grads_of(compiled, x), grads_of(eager.eval(), x), F64)
    # a plain LSTM on the reference engine, too
    torch._dynamo.reset()
    plain = lstmkit.LSTM(3, 5, engine="reference", dtype=torch.float64)
    assert_all_close(grads_of(torch.compile(plain, fullgraph=True, backend="aot_eager"), x), grads_of(plain, x), SAME)
