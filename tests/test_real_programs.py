"""lstmkit inside programs written for torch.nn.LSTM, played the way a client runs them:
torch.save(model) reloaded under the program's own allowlist, torch.onnx.export of the whole
model with both exporters into ONNX Runtime, a packed variable-length classifier trained
against its torch twin."""
from __future__ import annotations

import io
import re
import os
import subprocess
import sys
import textwrap
import warnings

import onnxruntime as ort
import pytest
import torch
from torch import nn
import torch.nn.utils.parametrize
import torch.nn.utils.prune
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from lstmkit.runtime.model import LIVE_STEP_MAX_ROWS
from harness import TOL, assert_all_close, assert_close

# ---- whole-model checkpoints ---------------------------------------------------------------------
CLIENT_MODEL = """
import torch
import torch.nn as nn

import lstmkit


class RNNModel(nn.Module):  # word_language_model's shape: embedding -> LSTM -> linear
    def __init__(self, ntoken=30, ninp=8, nhid=12, nlayers=2, **lstm_options):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = lstmkit.LSTM(ninp, nhid, nlayers, dropout=0.2, **lstm_options)
        self.decoder = nn.Linear(self.rnn.config.output_size, ntoken)

    def forward(self, tokens, hidden=None):
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)), hidden
"""



def save_client_model(model_module, folder):
    torch.manual_seed(0)
    m = model_module.RNNModel(proj_size=5, layer_norm=True, zoneout=0.1, bidirectional=True).eval()
    tokens = torch.randint(0, 30, (7, 3))
    with torch.no_grad():
        logits, _ = m(tokens)
    torch.save(m, folder / "model.pt")
    torch.save({"tokens": tokens, "logits": logits}, folder / "expected.pt")

# The loader knows its own classes and torch's layers, nothing of lstmkit beyond model.py's import.
LOAD = """
{imports}
import model
allow = [model.RNNModel, torch.nn.Embedding, torch.nn.Linear, torch.nn.Dropout, torch.nn.LSTM]
with torch.serialization.safe_globals(allow):
    m = torch.load("model.pt")  # weights_only=True, torch's default
expected = torch.load("expected.pt")
with torch.no_grad():
    logits, _ = m.eval()(expected["tokens"])
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
print("loaded", type(m.rnn).__module__, m.rnn.config.proj_size)
"""


def run_python(code: str, cwd) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd)] + sys.path))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_whole_model_checkpoint_loads_under_the_programs_allowlist(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text(CLIENT_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    import model

    save_client_model(model, tmp_path)
    # fresh interpreters that never built an lstmkit module:
    # torch imported before lstmkit (model.py) and after it (the hook in lstmkit/__init__)
    for imports in ("import torch", "import lstmkit\nimport torch"):
        assert "loaded lstmkit.nn.modules 5" in run_python(LOAD.format(imports=imports), tmp_path)


def test_allowlist_holds_only_lstmkits_module_classes():
    entries = torch.serialization.get_safe_globals()
    allowed = {g for g in entries if getattr(g, "__module__", "").startswith("lstmkit")}
    assert allowed == {lstmkit.LSTM, lstmkit.LSTMCell}
    # and the same two classes under their old path (lstmkit.module), nothing else of lstmkit
    renamed = {g for g in entries if isinstance(g, tuple) and "lstmkit" in (g[1] + getattr(g[0], "__module__", ""))}
    assert renamed == {(lstmkit.LSTM, "lstmkit.module.LSTM"), (lstmkit.LSTMCell, "lstmkit.module.LSTMCell")}


# ---- checkpoints from before LSTM / LSTMCell moved to lstmkit.nn.modules ------------------------------
def old_path_checkpoint(model) -> bytes:
    """torch.save(model) as written when the classes lived in lstmkit.module: pickle names a
    class by its __module__, so the file says lstmkit.module.LSTM / LSTMCell."""
    classes = (lstmkit.LSTM, lstmkit.LSTMCell)
    buf = io.BytesIO()
    try:
        for cls in classes:
            cls.__module__ = "lstmkit.module"
        torch.save(model, buf)  # pickle checks lstmkit.module.LSTM is this very class: the re-export
    finally:
        for cls in classes:
            cls.__module__ = "lstmkit.nn.modules"
    data = buf.getvalue()
    assert b"lstmkit.module\nLSTM\n" in data and b"lstmkit.module\nLSTMCell\n" in data
    assert b"lstmkit.nn.modules" not in data
    return data


OLD_PATH_LOAD = """
import lstmkit  # before torch: the registration waits for torch's import
import torch
with torch.serialization.safe_globals([torch.nn.ModuleDict]):
    m = torch.load("old.pt")  # weights_only=True, torch's default
print(type(m["rnn"]).__module__, type(m["cell"]).__name__)
"""


def test_checkpoint_naming_the_old_module_path_loads(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(rnn=lstmkit.LSTM(3, 4, proj_size=2, layer_norm=True), cell=lstmkit.LSTMCell(3, 4)))
    (tmp_path / "old.pt").write_bytes(old_path_checkpoint(model))
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        want = [model["rnn"](x)[0], *model["cell"](x[0])]
    for weights_only in (True, False):
        with torch.serialization.safe_globals([nn.ModuleDict]):
            back = torch.load(tmp_path / "old.pt", weights_only=weights_only)
        assert type(back["rnn"]) is lstmkit.LSTM and type(back["cell"]) is lstmkit.LSTMCell
        with torch.no_grad():
            got = [back["rnn"](x)[0], *back["cell"](x[0])]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert run_python(OLD_PATH_LOAD, tmp_path).split() == ["lstmkit.nn.modules", "LSTMCell"]


def test_pickled_state_is_plain_and_validated():
    m = lstmkit.LSTM(3, 4, zoneout=(0.1, 0.2), proj_size=2)
    state = m.__getstate__()
    assert state["config"] == m.config.to_dict() and "_runtime" not in state
    for key, bad, error in (("config", {**state["config"], "hidden_size": -1}, ValueError),
                            ("config", "not a dict", TypeError), ("engine", "evil", ValueError)):
        fresh = lstmkit.LSTM.__new__(lstmkit.LSTM)
        with pytest.raises(error):
            fresh.__setstate__({**state, key: bad})


# ---- torch.onnx.export of the whole model ------------------------------------------------------------
class Client(nn.Module):
    def __init__(self, **lstm_options):
        super().__init__()
        self.encoder = nn.Embedding(30, 8)
        self.rnn = lstmkit.LSTM(8, 12, **lstm_options)
        self.decoder = nn.Linear(self.rnn.config.output_size, 30)

    def forward(self, tokens):
        output, (h, c) = self.rnn(self.encoder(tokens))
        return self.decoder(output), h, c


EXPORTED = [
    dict(num_layers=2, dropout=0.3),  # ONNX LSTM nodes
    dict(num_layers=2, proj_size=5, bidirectional=True),  # step loops from here on
    dict(layer_norm=True, peephole=True, zoneout=(0.1, 0.3), batch_first=True, bidirectional=True,
         recurrent_dropout=0.2),
]


def export_whole_model(model, path, dynamo: bool):
    tokens = torch.randint(0, 30, (5, 2))  # exported with T=5, N=2; run with other sizes
    first, second = (("batch", "seq_len") if model.rnn.batch_first else ("seq_len", "batch"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim(first, min=1), 1: torch.export.Dim(second, min=1)}
            torch.onnx.export(model, (tokens,), str(path), dynamo=True, dynamic_shapes=({0: dims[0], 1: dims[1]},),
                              input_names=["tokens"], verbose=False)
        else:
            torch.onnx.export(model, (tokens,), str(path), dynamo=False, input_names=["tokens"],
                              output_names=["logits", "h", "c"], dynamic_axes={"tokens": {0: first, 1: second}})


# The dynamo exporter takes seconds per model: its LSTM node and one step-loop case (Scan).
CASES = [(o, False) for o in EXPORTED] + [(EXPORTED[0], True), (EXPORTED[2], True)]


@pytest.mark.parametrize("options, dynamo", CASES,
                         ids=lambda v: ("dynamo" if v else "torchscript") if isinstance(v, bool)
                         else ",".join(f"{k}={x}" for k, x in v.items()))
def test_torch_onnx_export_of_a_model_with_lstmkit(tmp_path, options, dynamo):
    torch.manual_seed(1)
    model = Client(**options).eval()
    with torch.no_grad():
        for name, p in model.rnn.named_parameters():
            if "peephole" in name:
                p.normal_(0.0, 0.3)
    export_whole_model(model, tmp_path / "m.onnx", dynamo)
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), "a custom domain ORT cannot run"
    ops = {n.op_type for n in graph.node}
    assert ("LSTM" in ops) == (options == EXPORTED[0])
    if "LSTM" in ops:  # lstmkit inspect reads the sizes from the nodes, whichever exporter wrote them
        from lstmkit.interop.inspection import find_in_file

        (row,), _ = find_in_file(tmp_path / "m.onnx")
        assert (row["hidden_size"], row["num_layers"], row["parameters"]) == (
            12, 2, sum(p.numel() for p in model.rnn.parameters()))
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for T, N in ((23, 3), (1, 1), (5, 2)):  # longer than exported with, too
        tokens = torch.randint(0, 30, (N, T) if model.rnn.batch_first else (T, N))
        got = s.run(None, {s.get_inputs()[0].name: tokens.numpy()})
        with torch.no_grad():
            want = model(tokens)
        for a, b in zip(got, want):
            assert_close(a, b, TOL[torch.float32], f"ONNX Runtime vs the model, T={T} N={N}")


def test_training_after_export_still_runs_the_engine(tmp_path):
    model = Client(num_layers=1)
    export_whole_model(model.eval(), tmp_path / "m.onnx", dynamo=False)
    model.train()
    logits, _, _ = model(torch.randint(0, 30, (4, 2)))
    logits.sum().backward()  # an engine ran: gradients reach the LSTM's weights
    assert model.rnn.weight_hh_l0.grad is not None and model.rnn.weight_hh_l0.grad.abs().sum() > 0


def test_packed_input_is_refused_by_the_exporter_with_a_clear_error(tmp_path):
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = lstmkit.LSTM(3, 4)

        def forward(self, x, lengths):
            return self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))[1][0]

    with pytest.raises(Exception, match="PackedSequence"):
        torch.onnx.export(Packed().eval(), (torch.randn(5, 2, 3), torch.tensor([5, 3])), str(tmp_path / "p.onnx"),
                          dynamo=False)


# ---- a packed variable-length classifier, trained against its torch twin ------------------------------
class Classifier(nn.Module):
    def __init__(self, lstm_class, **kwargs):
        super().__init__()
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.rnn = lstm_class(6, 7, num_layers=2, bidirectional=True, batch_first=True, **kwargs)
        self.head = nn.Linear(2 * 7, 3)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(torch.cat([h[-2], h[-1]], dim=1))  # last layer, both directions


def test_packed_classifier_trains_like_its_torch_twin():
    torch.manual_seed(0)
    twin = Classifier(nn.LSTM).double()
    ours = Classifier(lstmkit.LSTM).double()
    ours.load_state_dict(twin.state_dict())
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    for step in range(4):
        lengths = torch.randint(1, 9, (5,))
        tokens = torch.randint(1, 20, (5, 8)) * (torch.arange(8) < lengths[:, None])  # 0 = padding
        labels = torch.randint(0, 3, (5,))
        losses = []
        for model, opt in ((twin, opt_twin), (ours, opt_ours)):
            opt.zero_grad()
            logits = model(tokens, lengths)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            losses.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            opt.step()
        (want, want_grads), (got, got_grads) = losses
        assert_close(got, want, TOL[torch.float64], f"logits, step {step}")
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            assert_close(got_grads[name], want_grads[name], TOL[torch.float64], f"grad of {name}, step {step}")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_onnx_export_of_lstmkit_lstmcell(tmp_path, dynamo):
    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = lstmkit.LSTMCell(4, 6)

        def forward(self, x, h, c):
            return self.cell(x, (h, c))

    model = Step().eval()
    names = ["x", "h", "c"]
    example = (torch.randn(2, 4), torch.randn(2, 6), torch.randn(2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, example, str(tmp_path / "c.onnx"), dynamo=True, input_names=names,
                              dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
        else:
            torch.onnx.export(model, example, str(tmp_path / "c.onnx"), dynamo=False, input_names=names,
                              dynamic_axes={n: {0: "batch"} for n in names})
    s = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    inputs = (torch.randn(5, 4), torch.randn(5, 6), torch.randn(5, 6))
    got = s.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    with torch.no_grad():
        want = model(*inputs)
    for a, b in zip(got, want):
        assert_close(a, b, TOL[torch.float32], "ONNX Runtime vs the cell")


# ---- torch.func ------------------------------------------------------------------------------------
def test_torch_func_grad_and_vmap_match_torch():
    """Per-sample gradients and functional training (torch.func.grad over functional_call, vmap
    over a batch of sequences): engine="auto" runs the reference engine under the transforms and
    matches torch.nn.LSTM; an engine named explicitly says it cannot, and what to use."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype=torch.float64)
    ours = lstmkit.LSTM.from_torch(ref)
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def loss(model):
        return lambda p, x: torch.func.functional_call(model, p, (x,))[0].square().sum()

    want = torch.func.grad(loss(ref))(dict(ref.named_parameters()), x)
    got = torch.func.grad(loss(ours))(dict(ours.named_parameters()), x)
    assert want.keys() == got.keys()
    for k in want:
        assert_close(got[k], want[k], TOL[torch.float64])
    xs = torch.randn(4, 5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        vm = torch.func.vmap(lambda s: ours(s)[0])(xs)
        for i in range(4):
            assert_close(vm[i], ref(xs[i])[0], TOL[torch.float64])
    explicit = lstmkit.LSTM.from_torch(ref, engine="numba")
    with pytest.raises(RuntimeError, match="engine='reference'"):
        torch.func.grad(loss(explicit))(dict(explicit.named_parameters()), x)


@pytest.mark.parametrize("options", [dict(), dict(bidirectional=True, proj_size=2, batch_first=True),
                                     dict(layer_norm=True)], ids=["plain", "bidir-proj-batch_first", "layer_norm"])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_jit_trace_records_the_computation(options, steps, with_state):
    """torch.jit.trace of lstmkit.LSTM (a TorchScript deployment): the trace replayed on new input
    gives that input's answer (the engines' numpy outputs must not be recorded as constants: the
    example's answer would come back for every input). The trace holds the example's sequence
    length and batch: any other shape raises, never a wrong answer, and a PackedSequence raises
    at tracing."""
    torch.manual_seed(0)
    ours = lstmkit.LSTM(3, 4, num_layers=2, **options)
    ref = ours.to_torch() if not options.get("layer_norm") else None
    N, bf = 2, options.get("batch_first", False)
    shape = (lambda L, n: (n, L, 3) if bf else (L, n, 3))
    D, P = (2 if options.get("bidirectional") else 1), options.get("proj_size") or 4
    state = lambda n: (torch.randn(2 * D, n, P), torch.randn(2 * D, n, 4))  # noqa: E731
    args = lambda L, n: (torch.randn(shape(L, n)),) + ((state(n),) if with_state else ())  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about sizes held as constants
        traced = torch.jit.trace(ours, args(steps, N), check_trace=False)
    for _ in range(2):
        new = args(steps, N)
        want = ours(*new)
        got = traced(*new)
        # A traced variant runs the reference engine's ops (engines.get_layer_fn), eager the fused
        # kernel: the two agree to float32 rounding. A plain LSTM runs the same kernel both ways.
        assert_all_close([got[0], *got[1]], [want[0], *want[1]], TOL[torch.float32] if ref is None else 1e-6)
        if ref is not None:
            theirs = ref(*new)
            assert_all_close([got[0], *got[1]], [theirs[0], *theirs[1]], TOL[torch.float32])
    for L, n in {(steps + 1, N), (steps, N + 1), (N, steps), (1, steps * N), (steps * N, 1)} - {(steps, N)}:
        with pytest.raises(RuntimeError):
            traced(*args(L, n))
    if with_state:  # the state of another batch than the input's
        with pytest.raises(RuntimeError):
            traced(torch.randn(shape(steps, N)), state(N + 1))
    lengths = torch.tensor([3, 2])
    packs_inside = lambda x: ours(pack_padded_sequence(x, lengths, batch_first=bf))[0].data  # noqa: E731
    with pytest.raises(RuntimeError, match="PackedSequence"):
        torch.jit.trace(packs_inside, (torch.randn(shape(3, 2)),), check_trace=False)


@pytest.mark.parametrize("first", ["import lstmkit, torch", "import torch, lstmkit"])
def test_a_saved_trace_loads_and_runs_in_a_fresh_program(tmp_path, first):
    """torch.jit.save of a traced model, torch.jit.load in another interpreter that imported
    lstmkit (either order): the trace's lstmkit::lstm_forward op is registered there, and its
    answer on new input is the module's."""
    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(m, (torch.randn(5, 2, 3),), check_trace=False), tmp_path / "traced.pt")
    x = torch.randn(5, 2, 3)
    torch.save(x, tmp_path / "x.pt")
    run_python(f"""
        {first}
        y = torch.jit.load("traced.pt")(torch.load("x.pt"))[0]
        torch.save(y, "y.pt")
        """, tmp_path)
    assert_close(torch.load(tmp_path / "y.pt"), m(x)[0], 1e-6)


@pytest.mark.parametrize("tool", ["checkpoint", "checkpoint reentrant", "save_on_cpu"])
@pytest.mark.parametrize("shape, dtype", [((1, 2, 3, 5), torch.float64), ((6, 3, 3, 5), torch.float64),
                                          ((30, 16, 64, 256), torch.float32)], ids=["one step", "steps", "mkl"])
def test_activation_checkpointing_and_saved_tensor_hooks_match_torch(tool, shape, dtype):
    """The memory tools of long-sequence training: torch.utils.checkpoint (the forward run again
    in the backward: it must save the same tensors, and give the same numbers) and
    torch.autograd.graph.save_on_cpu (saved-tensor hooks on everything the engine saves). Every
    gradient as torch.nn.LSTM's under the same tool."""
    from torch.utils.checkpoint import checkpoint

    T, N, I, H = shape
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, num_layers=2, dtype=dtype)
    ours = lstmkit.LSTM.from_torch(ref)
    x = torch.randn(T, N, I, dtype=dtype)
    grads = []
    for m in (ref, ours):
        xg = x.clone().requires_grad_(True)
        if tool == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                y = m(xg)[0]
        else:
            y = checkpoint(lambda t: m(t)[0], xg, use_reentrant=tool.endswith("reentrant"))
        y.square().sum().backward()
        grads.append([xg.grad] + [p.grad for p in m.parameters()])
    assert_all_close(grads[1], grads[0], TOL[dtype])


class _Halve(nn.Module):
    def forward(self, w):
        return w * 0.5


# What programs do to an LSTM's weights from outside: each one takes a weight out of the module's
# parameters and makes it again at every call (a parametrization, or a forward pre-hook).
WEIGHT_TOOLS = {
    "parametrize": lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight_hh_l0", _Halve()),
    "weight_norm": lambda m: nn.utils.weight_norm(m, "weight_hh_l1"),
    "parametrizations.weight_norm": lambda m: nn.utils.parametrizations.weight_norm(m, "weight_ih_l1"),
    "prune": lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight_ih_l0", amount=0.5),
    "prune the last": lambda m: torch.nn.utils.prune.random_unstructured(m, "bias_hh_l1", amount=0.5),
    "spectral_norm": lambda m: nn.utils.spectral_norm(m, "weight_hh_l0"),
}


@pytest.mark.parametrize("tool", list(WEIGHT_TOOLS))
@pytest.mark.parametrize("steps", [1, 6])
def test_weights_made_by_parametrizations_pruning_and_norms_match_torch(tool, steps):
    """torch.nn.utils' parametrize, weight_norm (both), prune and spectral_norm on the module,
    before or after calls that built the no-grad fast path's runtime (and its one-step lane):
    every call, under no_grad or not, reads the weight as the tool makes it, as torch.nn.LSTM."""
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    ours = lstmkit.LSTM.from_torch(ref)
    x = torch.randn(steps, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        ours(x), ours(x)  # the fast path's runtime (one step: the lane too), on the plain weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation
        for m in (ref, ours):
            torch.manual_seed(1)  # the same pruning mask, the same spectral_norm start
            WEIGHT_TOOLS[tool](m)
    ours.load_state_dict(ref.state_dict())  # every buffer the tool made, as torch's
    ref.eval(), ours.eval()  # spectral_norm: no power iteration, so both read the same u
    for grad in (False, True, False):
        with torch.set_grad_enabled(grad):
            for state in (None, (torch.randn(2, 2, 4, dtype=torch.float64),) * 2):
                assert_all_close(ours(x, state)[0], ref(x, state)[0], TOL[torch.float64])


@pytest.mark.parametrize("where", ["input", "state", "weight"])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("no_grad", [False, True])
def test_forward_mode_ad_tangents_match_torch(where, frozen, no_grad):
    """Forward-mode AD (torch.autograd.forward_ad: jvp by dual tensors, what torch.func.jvp does
    without functorch) through the module and the cell: tangents on the input, the state or a
    weight come out as torch.nn.LSTM's, frozen or not, under no_grad or not; the fused engines
    would drop them without a word, so engine="auto" runs the reference engine there, and an
    engine named explicitly raises."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64).requires_grad_(not frozen)
    ours = lstmkit.LSTM.from_torch(ref).requires_grad_(not frozen)
    x, h = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(4, 2, 4, dtype=torch.float64)
    tangent = {"input": torch.randn_like(x), "state": torch.randn_like(h), "weight": torch.randn(16, 4, dtype=torch.float64)}

    def tangents(model):
        with fwAD.dual_level(), torch.set_grad_enabled(not no_grad):
            xd = fwAD.make_dual(x, tangent["input"]) if where == "input" else x
            hd = fwAD.make_dual(h, tangent["state"]) if where == "state" else h
            params = dict(model.named_parameters())
            if where == "weight":
                params["weight_hh_l1"] = fwAD.make_dual(params["weight_hh_l1"].detach(), tangent["weight"])
            y, (h_n, c_n) = torch.func.functional_call(model, params, (xd, (hd, h.clone())))
            return [fwAD.unpack_dual(v).tangent for v in (y, h_n, c_n)]

    got, want = tangents(ours), tangents(ref)
    assert all(t is not None for t in want)
    for a, b in zip(got, want):
        assert a is not None
        assert_close(a, b, TOL[torch.float64])
    cell_ref = nn.LSTMCell(3, 4, dtype=torch.float64).requires_grad_(not frozen)
    cell = lstmkit.LSTMCell(3, 4, dtype=torch.float64).requires_grad_(not frozen)
    cell.load_state_dict(cell_ref.state_dict())
    with fwAD.dual_level(), torch.set_grad_enabled(not no_grad):
        xd = fwAD.make_dual(x[0], tangent["input"][0])
        for a, b in zip(cell(xd), cell_ref(xd)):
            assert_close(fwAD.unpack_dual(a).tangent, fwAD.unpack_dual(b).tangent, TOL[torch.float64])
    explicit = lstmkit.LSTM.from_torch(ref, engine="numba").requires_grad_(not frozen)
    with pytest.raises(RuntimeError, match="engine='reference'"):
        tangents(explicit)


@pytest.mark.parametrize("options", [dict(), dict(peephole=True, zoneout=0.1), dict(layer_norm=True, proj_size=2)],
                         ids=["plain", "peephole-zoneout", "layernorm-proj"])
@pytest.mark.parametrize("engine", ["numba", "reference"])
def test_output_changed_in_place_before_backward_never_gives_a_wrong_gradient(options, engine):
    """A program that scales the output in place and then calls backward gets either autograd's
    error (the fused engines save y for their backward, as torch.nn.LSTM does) or the right
    gradient (the reference engine's ops do not need y): never one computed from changed numbers."""
    def grad(scale_in_place):
        torch.manual_seed(1)  # the same masks
        x = torch.randn(5, 2, 3, requires_grad=True)
        y, _ = m(x)
        if scale_in_place:
            y.mul_(2)
        else:
            y = 2 * y
        y.sum().backward()
        return x.grad

    torch.manual_seed(0)
    m = lstmkit.LSTM(3, 4, engine=engine, **options)
    want = grad(False)
    try:
        got = grad(True)
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        assert engine == "numba"  # the engines that save y
    else:
        assert engine == "reference"
        assert_close(got, want, TOL[torch.float32])


def test_nn_lstm_raises_on_an_output_changed_in_place_too():
    """What the fused engines copy: torch.nn.LSTM's own error."""
    y, _ = nn.LSTM(3, 4)(torch.randn(5, 2, 3, requires_grad=True))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- weights changed where autograd's version counter does not look ----------------------------------
def _update(m, how):
    """A change to m's weights the way programs make them; the first four leave the tensors'
    version counters as they were (p.data is a tensor with its own counter)."""
    w = m.weight_hh_l0
    if how == "data.mul_":  # an EMA / manual SGD step through .data
        w.data.mul_(0.5)
    elif how == "data.copy_":  # loading weights by hand
        w.data.copy_(torch.randn_like(w))
    elif how == "data.clamp_":  # WGAN's weight clipping
        m.bias_ih_l0.data.clamp_(-0.01, 0.01)
    elif how == "numpy view":  # a write through numpy
        w.detach().numpy()[0, 0] += 1.0
    elif how == "data =":  # new storage
        w.data = torch.randn_like(w)
    elif how == "not contiguous":  # a transposed copy (no flat view to watch), then changed through .data
        w.data = torch.randn(w.shape[1], w.shape[0], dtype=w.dtype).t()
        m(_stream_input(m))
        w.data.mul_(0.5)
    else:  # under no_grad: the version counter moves
        with torch.no_grad():
            w.add_(0.25)


def _stream_input(m):
    return torch.randn(1, 1, m.input_size, dtype=m.weight_ih_l0.dtype)


@pytest.mark.parametrize("how", ["data.mul_", "data.copy_", "data.clamp_", "numpy view", "data =", "not contiguous",
                                 "no_grad add_"])
@pytest.mark.parametrize("call", ["stream", "stream big", "padded", "packed", "layer_norm"])
def test_inference_sees_every_change_to_the_weights(how, call):
    """Inference reuses weights laid out at an earlier call (the module's runtime, the packed
    weights cache) and checks them; a one-step call reads them as they are. After each kind of
    update the next call must compute with the new weights, as torch.nn.LSTM (or the reference
    engine, for a variant) does, float64 to 1e-10."""
    torch.manual_seed(0)
    kw = {"layer_norm": True} if call == "layer_norm" else {}
    I, H = (128, 128) if call == "stream big" else (4, 6)  # 1 MiB of float64 weights
    m = lstmkit.LSTM(I, H, **kw).double().eval()
    T, N = (1, 1) if call.startswith("stream") else (5, 3)
    x = torch.randn(T, N, I, dtype=torch.float64)
    if call == "packed":
        x = pack_padded_sequence(x, torch.tensor([5, 3, 2]))
    with torch.no_grad():
        state = m(x)[1]
        state = m(x, state)[1]  # the state it returned fed back: the streaming lane
        _update(m, how)
        y, (h, c) = m(x, state)
        if call == "layer_norm":
            twin = lstmkit.LSTM(I, H, engine="reference", **kw).double().eval()
        else:
            twin = nn.LSTM(I, H).double().eval()
        twin.load_state_dict(m.state_dict())
        y_ref, (h_ref, c_ref) = twin(x, state)
    if call.startswith("stream"):  # one layer: the runtime's one step on the parameters themselves
        assert ("_runtime" in m.__dict__) == (how != "not contiguous")
    data = (lambda t: t.data) if call == "packed" else (lambda t: t)  # noqa: E731
    for ours, ref in ((data(y), data(y_ref)), (h, h_ref), (c, c_ref)):
        assert_close(ours, ref, TOL[torch.float64])


@pytest.mark.parametrize("first", ["from lstmkit.nn import LSTM", "import lstmkit.nn.modules", "import lstmkit",
                                   "import torch, lstmkit"])
def test_every_import_order_loads_and_registers_both_paths(first):
    """A program's first import may be lstmkit.nn itself, which then imports torch for the first
    time (torch's import hook must not reach the half-made module); either way both classes end
    up allowlisted under their current and their old module path."""
    code = f"""
{first}
import torch, lstmkit
names = sorted(str(g) for g in torch.serialization.get_safe_globals() if "lstmkit" in str(g))
assert len(names) == 4 and sum("lstmkit.module." in n for n in names) == 2, names
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw,N", [(dict(), 1), (dict(), 2), (dict(proj_size=3), 2), (dict(bias=False), 1),
                                  (dict(batch_first=True), 2), (dict(), None), (dict(num_layers=2), 1),
                                  (dict(num_layers=3, bidirectional=True, proj_size=4), 2),
                                  (dict(num_layers=2, batch_first=True), None),
                                  (dict(), 5), (dict(num_layers=2, bidirectional=True), 3)])
def test_one_step_reads_the_parameters_as_they_are(dtype, kw, N):
    """A streaming step of at most runtime.model.LIVE_STEP_MAX_ROWS rows (None: unbatched input)
    through the fast path runs on the parameters' own memory, every layer and direction
    (kernels/numba/lstm.one_step_live): it matches torch.nn.LSTM step after step with the state
    fed back, sees a p.data update at once, and never needs the copy's check. A step of more
    rows runs on the packed copy and checks it: the same results."""
    torch.manual_seed(N or 0)
    ref = nn.LSTM(7, 9, **kw).to(dtype).eval()
    m = lstmkit.LSTM.from_torch(ref).eval()
    if N is None:
        xs = torch.randn(4, 1, 7, dtype=dtype)
    else:
        xs = torch.randn(4, N, 1, 7, dtype=dtype) if kw.get("batch_first") else torch.randn(4, 1, N, 7, dtype=dtype)
    live = N is None or N <= LIVE_STEP_MAX_ROWS
    checks = []
    with torch.no_grad():
        state = ref_state = None
        for k, x in enumerate(xs):
            if k == 2:  # an update no version counter records, on both
                for p, q in zip(m.parameters(), ref.parameters()):
                    p.data.mul_(0.5)
                    q.data.mul_(0.5)
            y, state = m(x, state)
            y_ref, ref_state = ref(x, ref_state)
            assert_close(y, y_ref, TOL[dtype])
            assert_close(state[0], ref_state[0], TOL[dtype])
            assert_close(state[1], ref_state[1], TOL[dtype])
            if k == 0:  # the runtime exists now: from here on a live step must not check a copy
                watch = m.__dict__["_runtime"][3]
                unchanged = watch.unchanged
                watch.unchanged = lambda: checks.append(k) or unchanged()
    assert (checks == []) == live, checks


def _lane_events(m):
    """Wraps m._on_lane: a list that gets True for each call it ran, False for each it declined."""
    events, on_lane = [], m._on_lane

    def spy(*args):
        out = on_lane(*args)
        events.append(out is not None)
        return out

    m._on_lane = spy
    return events


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [dict(), dict(batch_first=True), dict(bias=False), dict(proj_size=3),
                                dict(num_layers=2), dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)])
def test_streaming_lane_sees_everything_that_changes_between_steps(dtype, kw):
    """The module's streaming lane (a one-step call of an input shape seen before, state None or
    the one it returned, any model without a variant) decides once what _inference_fast decides per call. Between steps, a
    program may: reset the state in place (h.zero_() at an episode's end), update the weights in
    place or move them (p.data = ...), feed a state of its own, change the thread count, run a
    longer call, or pass an input that is not contiguous or that requires grad. After each, the
    step matches torch.nn.LSTM fed the same, and the lane really ran where it should."""
    torch.manual_seed(0)
    ref = nn.LSTM(5, 8, **kw).to(dtype).eval()
    m = lstmkit.LSTM.from_torch(ref).eval()
    events = _lane_events(m)
    bf = kw.get("batch_first", False)
    step = (lambda n: torch.randn(n, 1, 5, dtype=dtype)) if bf else (lambda n: torch.randn(1, n, 5, dtype=dtype))
    threads = torch.get_num_threads()
    ours = theirs = None

    def both(x, fed=True):
        nonlocal ours, theirs
        y, ours = m(x, ours if fed else None)
        y_ref, theirs = ref(x, theirs if fed else None)
        for a, b in ((y, y_ref), (ours[0], theirs[0]), (ours[1], theirs[1])):
            assert_close(a, b, TOL[dtype])

    try:
        with torch.no_grad():
            both(step(2), fed=False)  # makes the lane
            both(step(2), fed=False)  # from zeros, on the lane
            both(step(2))  # the returned state fed back, on the lane
            assert events == [True, True], events
            ours[0].zero_(); ours[1].zero_(); theirs[0].zero_(); theirs[1].zero_()  # noqa: E702
            both(step(2))
            for p, q in zip(m.parameters(), ref.parameters()):  # an update no version counter records
                p.data.mul_(0.75)
                q.data.mul_(0.75)
            both(step(2))
            assert events[-2:] == [True, True], events
            new = [torch.randn_like(p) for p in ref.parameters()]
            for p, q, w in zip(m.parameters(), ref.parameters(), new):  # new storage
                p.data, q.data = w.clone(), w.clone()
            both(step(2))
            assert events[-1] is False, events  # the lane's parameters moved: a new runtime, a new lane
            both(step(2))
            assert events[-1] is True, events
            ours = (ours[0].clone(), ours[1].clone())  # a state of the program's own: the lane reads it
            both(step(2))
            assert events[-1] is True, events
            ours = (ours[0].detach(), ours[1].detach())  # the returned one detached (truncated BPTT's habit)
            both(step(2))
            assert events[-1] is True, events
            ours = (ours[0].transpose(0, 1).contiguous().transpose(0, 1), ours[1])  # not contiguous: checked
            both(step(2))
            assert events[-1] is (ours[0].shape[1] == 1 or ours[0].shape[0] == 1), events
            both(torch.randn(2, 3, 5, dtype=dtype) if bf else torch.randn(3, 2, 5, dtype=dtype))  # a longer call
            both(step(2))  # its state fed back
            torch.set_num_threads(1 if threads > 1 else 2)
            both(step(2))
            assert events[-1] is False, events  # another thread count: planned again
            both(step(2))
            assert events[-1] is True, events
            strided = torch.randn(*step(2).shape[:2], 10, dtype=dtype)[..., ::2]  # the lane's shape, not contiguous
            assert not strided.is_contiguous()
            both(strided)
            assert events[-1] is False, events
            both(step(2).requires_grad_())  # a leaf that requires grad, under no_grad
            both(step(3), fed=False)  # another batch size: its own lane
            both(step(3))
            assert events[-1] is True, events
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():  # the state of a call of 3 rows fed to a step of 2 on its lane: torch's error
        m(step(2))
        m(step(2))
        assert events[-1] is True, events
        three = m(torch.randn(3, 2, 5, dtype=dtype) if bf else torch.randn(2, 3, 5, dtype=dtype))[1]
        with pytest.raises(RuntimeError) as theirs_error:
            ref(step(2), tuple(t.clone() for t in three))
        with pytest.raises(RuntimeError, match=re.escape(str(theirs_error.value).split(",")[0])):
            m(step(2), three)
    wrong = step(3).to(torch.float64 if dtype == torch.float32 else torch.float32)  # the lane's shape
    with torch.no_grad(), pytest.raises(Exception) as theirs_error:
        ref(wrong)
    with torch.no_grad(), pytest.raises(theirs_error.type, match="dtype"):  # torch's error, torch's type
        m(wrong)


@pytest.mark.parametrize("kw", [dict(), dict(proj_size=3), dict(num_layers=2, bidirectional=True)])
@pytest.mark.parametrize("grad", [False, True])
def test_negative_views_as_torch(kw, grad):
    """A tensor with torch's negative bit (torch._neg_view: the negation left lazy, so its memory
    holds the values un-negated) as input or state: the same as torch.nn.LSTM on the resolved
    values, on every path: one step (first call, then the streaming lane, which reads the
    input by address), a sequence, under no_grad and with grad. A negative view on the lane read
    by its address would be a silently wrong step; numpy() raised on it before."""
    torch.manual_seed(0)
    ref = nn.LSTM(5, 8, **kw).double()
    m = lstmkit.LSTM.from_torch(ref)
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1) * D
    for T in (1, 1, 1, 4):
        x = torch.randn(T, 2, 5, dtype=torch.float64)
        h = torch.randn(L, 2, kw.get("proj_size", 8), dtype=torch.float64)
        c = torch.randn(L, 2, 8, dtype=torch.float64)
        with torch.set_grad_enabled(grad):
            m(x)  # a plain call first: the one-step calls below then find the lane made
            for got, want in ((m(torch._neg_view(x)), ref(-x)),
                              (m(x, (torch._neg_view(h), torch._neg_view(c))), ref(x, (-h, -c))),
                              (m(torch._neg_view(x), (h, torch._neg_view(c))), ref(-x, (h, -c)))):
                assert_close(got[0], want[0], TOL[torch.float64])
                assert_close(got[1][0], want[1][0], TOL[torch.float64])
                assert_close(got[1][1], want[1][1], TOL[torch.float64])


@pytest.mark.parametrize("layers", [1, 2])
def test_batch_first_set_after_calls(layers):
    """A program may set `lstm.batch_first` on a module that has already run (adapting a loaded
    model): torch.nn.LSTM reads it at every call, and so must the no-grad fast path's runtime
    and streaming lane, which were made for the old value. Multi-step calls and one-step calls
    (the lane), both ways, against torch.nn.LSTM in float64."""
    torch.manual_seed(layers)
    ref = nn.LSTM(4, 8, num_layers=layers).double()
    m = lstmkit.LSTM.from_torch(ref)
    with torch.no_grad():
        for shape in ((5, 3, 4), (1, 2, 4), (1, 2, 4)):  # twice the one-step shape: its lane
            for batch_first in (False, True, False):
                ref.batch_first = m.batch_first = batch_first
                x = torch.randn(*shape, dtype=torch.float64)
                for _ in range(2):
                    y, (h, c) = m(x)
                    y_ref, (h_ref, c_ref) = ref(x)
                    assert_all_close([y, h, c], [y_ref, h_ref, c_ref], TOL[torch.float64])


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_state_of_another_dtype_raises_torchs_error(state_dtype):
    """Under no_grad a float32 model given (h_0, c_0) of another dtype raises the exception type
    torch.nn.LSTM raises (numpy cannot even hold bfloat16: the fast path must not try)."""
    ref = nn.LSTM(4, 8)
    m = lstmkit.LSTM.from_torch(ref)
    x = torch.randn(2, 1, 4)
    hx = (torch.zeros(1, 1, 8, dtype=state_dtype), torch.zeros(1, 1, 8, dtype=state_dtype))
    with torch.no_grad():
        with pytest.raises(Exception) as theirs:
            ref(x, hx)
        with pytest.raises(theirs.type):
            m(x, hx)
