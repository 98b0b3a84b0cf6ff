"""The char-LM main job: train, sample, resume, DDP, demo and the error paths.

Short runs of tiny models on a small, very regular text (so the loss falls within a
few dozen steps). The reference engine keeps runs free of JIT compile time."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lstmkit.apps.charlm import demo, sample, train
from lstmkit.apps.charlm import model as charlm

TINY = ["--hidden-size", "32", "--num-layers", "2", "--embed-size", "8", "--seq-len", "16",
        "--batch-size", "8", "--lr", "3e-2", "--engine", "reference", "--eval-chars", "400", "--threads", "1"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    lines = [f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n\n" for i in range(160)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("".join(lines))
    return path


def train_run(text, out, *extra):
    return train.run(["--text", str(text), "--out", str(out), *TINY, *extra], log=False)


@pytest.fixture(scope="module")
def trained(text_file, tmp_path_factory):
    """One 60-step run shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    summary = train_run(text_file, out, "--steps", "60", "--eval-every", "20", "--ckpt-every", "30")
    return out, summary


# ---- the trainer ------------------------------------------------------------------------------
def test_training_learns_and_writes_the_run(trained):
    out, summary = trained
    for name in ("config.json", "model.safetensors", "trainer.pt", "history.json", "loss.png"):
        assert (out / name).is_file(), name
    hist = json.loads((out / "history.json").read_text())
    evals = [bpc for _, bpc, *_ in hist["eval"]]
    assert [s for s, *_ in hist["eval"]] == [20, 40, 60]
    assert evals[-1] < evals[0]
    # A regular text: after 60 steps the model must beat the context-free baseline clearly.
    assert summary["val_bpc"] < 0.8 * summary["unigram_bpc"]
    assert summary["step"] == 60 and summary["stopped"] == "steps" and summary["chars_per_s"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["num_layers"] == 2
    assert "".join(cfg["vocab"]) == "".join(sorted(set(Path(cfg["text_paths"][0]).read_text())))


def test_unigram_baseline_is_the_entropy_of_char_frequencies():
    ids = torch.tensor([0, 0, 1, 1])  # two equally frequent chars -> 1 bit each (+1 smoothing keeps it so)
    assert charlm.unigram_bpc(ids, ids, 2) == pytest.approx(1.0)


def test_bptt_streams_are_consecutive_chunks():
    ids = torch.arange(2 * 3 * 4 + 1)  # 2 streams of 12 chars, chunks of 4 -> 3 steps per epoch
    s = train.Streams(ids, batch=2, seq_len=4, rank=0, world=1)
    x0, y0, new0 = s.batch(0)
    x1, _, new1 = s.batch(1)
    assert new0 and not new1 and s.chunks == 3
    assert x0.tolist() == [[0, 1, 2, 3], [12, 13, 14, 15]]
    assert y0.tolist() == [[1, 2, 3, 4], [13, 14, 15, 16]]
    assert x1[:, 0].tolist() == [4, 16]  # the next chunk continues each stream
    assert s.batch(3)[2]  # epoch 2 restarts the streams
    r1 = train.Streams(ids, batch=1, seq_len=4, rank=1, world=2)  # rank 1 owns the second stream
    assert r1.batch(0)[0].tolist() == [[12, 13, 14, 15]]


def test_lstm_weights_load_into_torch_nn_lstm_unchanged(trained):
    out, summary = trained
    cfg = json.loads((out / "config.json").read_text())
    ref = torch.nn.LSTM(cfg["embed_size"], cfg["hidden_size"], cfg["num_layers"], batch_first=True)
    ref.load_state_dict(charlm.lstm_state_dict(out), strict=True)
    ours = summary["model"].lstm.eval()
    x = torch.randn(3, 7, cfg["embed_size"])
    with torch.no_grad():
        y_ref, (h_ref, c_ref) = ref(x)
        y, (h, c) = ours(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)
    # The whole checkpoint loads, strict, into the model built around torch.nn.LSTM.
    twin = charlm.model_from_config(cfg, lstm_cls=torch.nn.LSTM)
    twin.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)


def test_compare_torch_trains_the_same_model_on_the_same_data(text_file, tmp_path):
    s = train_run(text_file, tmp_path / "cmp", "--steps", "8", "--compare-torch")
    c = s["compare"]
    assert c["lstmkit_chars_per_s"] > 0 and c["torch_chars_per_s"] > 0
    assert c["ratio"] == pytest.approx(c["lstmkit_chars_per_s"] / c["torch_chars_per_s"])
    # Same weights, same batches, same optimizer: the two losses agree to float32 noise.
    assert abs(c["loss_lstmkit"] - c["loss_torch"]) < 1e-3
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["steps"] >= 1


# ---- resume -----------------------------------------------------------------------------------
def test_resume_continues_exactly(text_file, tmp_path):
    extra = ["--dropout", "0.3", "--ckpt-every", "100", "--eval-every", "100"]  # dropout: RNG restored too
    straight = train_run(text_file, tmp_path / "a", "--steps", "12", *extra)
    train_run(text_file, tmp_path / "b", "--steps", "6", *extra)
    resumed = train.run(["--out", str(tmp_path / "b"), "--resume", "--steps", "12",
                         "--engine", "reference", "--eval-chars", "400"], log=False)
    assert resumed["step"] == 12
    for (k, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def test_lr_schedule_cosine_to_the_floor_then_constant():
    cfg = {"lr": 4e-3, "lr_decay_steps": 100}
    lrs = [train.lr_at(cfg, k) for k in range(0, 131)]
    assert lrs[0] == 4e-3 and lrs[100] == pytest.approx(4e-3 * train.LR_FLOOR) and lrs[130] == lrs[100]
    assert lrs[50] == pytest.approx(4e-3 * (1 + train.LR_FLOOR) / 2)
    assert all(a > b for a, b in zip(lrs[:100], lrs[1:101]))
    assert {train.lr_at({"lr": 1e-3, "lr_decay_steps": n}, 77) for n in (0, -1)} == {1e-3}


def test_decayed_lr_reaches_the_optimizer_and_resume_continues_it_exactly(text_file, tmp_path):
    extra = ["--lr-decay-steps", "10", "--ckpt-every", "100", "--eval-every", "100"]
    straight = train_run(text_file, tmp_path / "a", "--steps", "12", *extra)
    assert straight["model"] is not None
    train_run(text_file, tmp_path / "b", "--steps", "5", *extra)
    resumed = train.run(["--out", str(tmp_path / "b"), "--resume", "--steps", "12",
                         "--engine", "reference", "--eval-chars", "400"], log=False)
    for (k, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    const = train_run(text_file, tmp_path / "c", "--steps", "12", "--ckpt-every", "100", "--eval-every", "100")
    moved = [(a - b).abs().max().item() for a, b in zip(straight["model"].state_dict().values(),
                                                       const["model"].state_dict().values())]
    assert max(moved) > 1e-4  # the schedule changed the training: the lr did reach the optimizer
    saved = torch.load(tmp_path / "b" / "trainer.pt", weights_only=True)["optimizer"]
    assert saved["param_groups"][0]["lr"] == pytest.approx(train.lr_at({"lr": 3e-2, "lr_decay_steps": 10}, 11))


def test_the_optimizer_is_fused_adam_and_an_older_unfused_checkpoint_resumes_fused(text_file, tmp_path):
    """The trainer steps Adam as torch's fused kernel (one pass over all parameters, the same
    update rule). A run saved before that (param groups with fused=None) resumes on the fused
    kernel and lands where a run fused from the start lands."""
    extra = ["--ckpt-every", "100", "--eval-every", "100"]
    straight = train_run(text_file, tmp_path / "a", "--steps", "8", *extra)
    train_run(text_file, tmp_path / "b", "--steps", "4", *extra)
    saved = torch.load(tmp_path / "b" / "trainer.pt", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["fused"] is True
    for group in saved["optimizer"]["param_groups"]:  # as an older run wrote it
        group["fused"] = None
    torch.save(saved, tmp_path / "b" / "trainer.pt")
    trainer = train.Trainer(train.build_parser().parse_args(
        ["--out", str(tmp_path / "b"), "--resume", "--steps", "8", "--engine", "reference", "--eval-chars", "400"]),
        log=False)
    resumed = trainer.train()
    assert all(g["fused"] is True for g in trainer.optimizer.param_groups)  # what Adam.step reads each step
    for (k, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def test_lr_decay_fitted_to_the_time_budget_is_stored_in_the_run(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "FIT_AT_STEP", 4)
    out = tmp_path / "fit"
    s = train_run(text_file, out, "--steps", "0", "--minutes", "0.05", "--lr-decay-steps", "-1")
    decided = json.loads((out / "config.json").read_text())["lr_decay_steps"]
    assert s["step"] > 4 and decided > 4  # counted at step 4 from the measured rate
    assert decided < 3 * s["step"]  # about the steps the budget held (loose: a shared machine)
    # --resume with -1 again takes the stored number, not a new fit
    r = train.run(["--out", str(out), "--resume", "--steps", str(s["step"] + 2), "--lr-decay-steps", "-1",
                   "--engine", "reference", "--eval-chars", "400"], log=False)
    assert r["step"] == s["step"] + 2
    assert json.loads((out / "config.json").read_text())["lr_decay_steps"] == decided


def test_resume_with_a_mismatched_configuration_is_a_one_line_error(trained, capsys):
    out, _ = trained
    before = (out / "model.safetensors").read_bytes()
    assert train.main(["--out", str(out), "--resume", "--hidden-size", "48", "--steps", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hidden_size=32" in err and "hidden_size=48" in err
    assert (out / "model.safetensors").read_bytes() == before


def test_resume_with_other_text_is_an_error(trained, tmp_path, capsys):
    out, _ = trained
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n" * 200)
    assert train.main(["--out", str(out), "--resume", "--text", str(other), "--steps", "100"]) == 2
    assert "text differs" in capsys.readouterr().err


def test_existing_run_is_never_silently_overwritten(trained, text_file, capsys):
    out, _ = trained
    cfg_before = (out / "config.json").read_text()
    argv = ["--text", str(text_file), "--out", str(out), *TINY, "--hidden-size", "24", "--steps", "5"]
    assert train.main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "config.json").read_text() == cfg_before


@pytest.mark.slow  # a subprocess, signalled
def test_sigint_writes_a_checkpoint_then_resume_goes_on(text_file, tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "lstmkit", "train", "--text", str(text_file), "--out", str(out), *TINY,
           "--steps", "100000", "--ckpt-every", "100000", "--eval-every", "100000"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # some steps
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    step = torch.load(out / "trainer.pt", weights_only=True)["step"]
    assert step > 0
    s = train.run(["--out", str(out), "--resume", "--steps", str(step + 2), "--engine", "reference"], log=False)
    assert s["step"] == step + 2


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "empty", "binary", "latin1", "directory", "too_short"])
def test_bad_text_is_a_one_line_error(case, tmp_path, capsys):
    p = tmp_path / "in.txt"
    if case == "empty":
        p.write_text("")
    elif case == "binary":
        p.write_bytes(bytes(range(256)) * 4)
    elif case == "latin1":
        p.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    elif case == "directory":
        p.mkdir()
    elif case == "too_short":
        p.write_text("hello world\n" * 3)
    rc = train.main(["--text", str(p), "--out", str(tmp_path / "run"), *TINY, "--steps", "5"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("lstmkit train: error: ") and err.count("\n") == 1, err
    assert str(p) in err or case == "too_short"


def test_unwritable_output_dir_is_a_one_line_error(text_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a directory should be: no one can write under it
    rc = train.main(["--text", str(text_file), "--out", str(blocker / "run"), *TINY, "--steps", "5"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "cannot write" in err


@pytest.mark.slow  # subprocesses
def test_cli_errors_have_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lstmkit", "train", "--text", str(tmp_path / "nope.txt"),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"lstmkit train: error: {tmp_path / 'nope.txt'}: no such file"


# ---- the sampler ------------------------------------------------------------------------------
def test_single_step_streaming_equals_the_full_sequence(trained):
    model = trained[1]["model"].eval()
    ids = torch.randint(0, model.head.out_features, (2, 9))
    with torch.inference_mode():
        full, _ = model(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):
            logits, state = model(ids[:, t : t + 1], state)  # T=1, carried state
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_sample_cli_prints_as_it_goes_and_is_repeatable(trained, capsys):
    out, _ = trained
    assert sample.main([str(out), "--length", "80", "--seed", "3", "--prime", "def "]) == 0
    first = capsys.readouterr().out
    assert sample.main([str(out), "--length", "80", "--seed", "3", "--prime", "def "]) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("def ") and len(first) == len("def ") + 80 + 1
    vocab = set(json.loads((out / "config.json").read_text())["vocab"])
    assert set(first[:-1]) <= vocab


def test_greedy_sampling_has_learned_the_pattern(trained):
    model, cfg = charlm.load_model(trained[0])
    text = sample.generate(model, cfg["vocab"], 40, temperature=0, prime="def f1(x):\n")
    assert "return x" in text


def test_sample_errors(trained, capsys):
    out, _ = trained
    assert sample.main([str(out), "--prime", "\u2603"]) == 2  # a character the model never saw
    assert "not in the model's vocabulary" in capsys.readouterr().err
    assert sample.main([str(out / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ---- data-parallel ------------------------------------------------------------------------------
DDP_WORKER = """
import sys, torch
from lstmkit.apps.charlm import train
out, dump, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
s = train.run(["--out", out, *argv], log=False)
torch.save(s["model"].state_dict(), dump)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun processes
def test_ddp_two_processes_keep_identical_weights_and_learn(text_file, tmp_path):
    out = tmp_path / "ddp"
    argv = ["--text", str(text_file), *TINY, "--steps", "30", "--eval-every", "10", "--ckpt-every", "15"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", DDP_WORKER, str(out), str(tmp_path / f"rank{r}.pt"), *argv],
                         env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for r, (p, err) in enumerate(zip(procs, errs)):
        # Gloo's worker threads can abort the interpreter's own teardown after the run is done
        # and its process group destroyed ("terminate called without an active exception",
        # SIGABRT; pytorch/pytorch#190489, #179291): seen once here, in a fresh-clone CI run. Accepted only
        # when the worker had finished: its weights are saved (and checked below).
        teardown_abort = (p.returncode == -signal.SIGABRT and "terminate called without an active exception" in err
                          and (tmp_path / f"rank{r}.pt").exists())
        assert p.returncode == 0 or teardown_abort, errs
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2
    hist = json.loads((out / "history.json").read_text())
    assert [s for s, *_ in hist["eval"]] == [10, 20, 30]  # rank 0 alone evaluates and writes
    assert hist["eval"][-1][1] < hist["eval"][0][1] and hist["eval"][-1][1] < hist["unigram_bpc"]
    assert hist["eval"][-1][2] == 30 * 2 * 8 * 16  # chars seen: steps x ranks x B x T
    # The two ranks trained on different shards, and rank 0 saved the carried state of both.
    tr = torch.load(out / "trainer.pt", weights_only=True)
    assert len(tr["h"]) == 2 and not torch.equal(tr["h"][0], tr["h"][1])
    for k, v in load_file(str(out / "model.safetensors")).items():
        assert torch.equal(v, w0[k]), k


# ---- the demo -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_quick_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "MODEL", ["--hidden-size", "16", "--num-layers", "2", "--embed-size", "8",
                                        "--seq-len", "16", "--batch-size", "4"])
    monkeypatch.setattr(demo, "PRIMES", [("def ", 0.8)])
    out = tmp_path / "demo"
    assert demo.main(["--steps", "3", "--out", str(out), "--engine", "reference"]) == 0
    stdout = capsys.readouterr().out
    assert "held-out:" in stdout and "unigram baseline:" in stdout
    result = json.loads((out / "summary.json").read_text())
    assert result["steps"] == 3 and result["files"] > 100 and 3 < result["unigram_bpc"] < 6
    assert (out / "samples.txt").read_text().startswith("--- prime 'def '")
    corpus = (out / "stdlib.txt").read_text()
    assert "import " in corpus and "site-packages" not in str(demo.stdlib_sources()[:50])
    # Rerunning the same demo starts over; a demo dir with another configuration is refused.
    assert demo.main(["--steps", "2", "--out", str(out), "--engine", "reference"]) == 0
    monkeypatch.setattr(demo, "MODEL", ["--hidden-size", "12"])
    capsys.readouterr()
    assert demo.main(["--steps", "2", "--out", str(out), "--engine", "reference"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_demo_rerun_accepts_its_own_fitted_lr_decay(tmp_path, text_file):
    """The demo asks for --lr-decay-steps -1; its run stores the fitted number, and the next
    demo over it is the same configuration, not another one."""
    run_dir = tmp_path / "run"
    train_run(text_file, run_dir, "--steps", "2")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["lr_decay_steps"] = 1234
    (run_dir / "config.json").write_text(json.dumps(cfg))
    flags = ["--text", str(text_file), "--out", str(run_dir), *TINY, "--lr-decay-steps", "-1"]
    assert not demo._differs(run_dir, flags)
    assert demo._differs(run_dir, flags[:-1] + ["77"])


def test_time_limit_includes_the_final_evaluation(text_file, tmp_path):
    t0 = time.perf_counter()
    s = train_run(text_file, tmp_path / "t", "--steps", "0", "--minutes", "0.03", "--threads", "1")
    assert s["stopped"] == "time" and s["step"] > 0 and s["val_bpc"] is not None
    assert time.perf_counter() - t0 < 0.03 * 60 + 10  # loose: a shared machine
    assert torch.load(tmp_path / "t" / "trainer.pt", weights_only=True)["step"] == s["step"]


def test_missing_matplotlib_skips_the_curve_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    msg = train.write_curve(tmp_path, {"train": [[1, 2.0, 10]], "eval": [], "unigram_bpc": 3.0})
    assert "matplotlib is not installed" in msg and "lstmkit[train]" in msg
    assert not (tmp_path / "loss.png").exists()


_FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "kept":
    from lstmkit.apps.charlm.train import keep_freed_memory
    assert keep_freed_memory()
n = (7 << 20) // 8  # two 7 MiB arrays freed together: more free at the top of the heap than glibc keeps
for _ in range(3):
    a, b = np.ones(n), np.ones(n)
    del a, b
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a, b = np.ones(n), np.ones(n)
    del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_freed_memory_is_not_faulted_in_again():
    """The trainer's --malloc kept (the default): a step's arrays freed and allocated again come
    back with their pages mapped; glibc's own setting returns them and faults them in anew."""
    import platform

    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        assert not train.keep_freed_memory()  # another C library: the trainer leaves it alone (and says nothing)
        return
    # glibc: in processes of their own (the setting stays for the rest of a process); "kept"
    # asserts that keep_freed_memory() took effect
    run = lambda how: int(subprocess.run([sys.executable, "-c", _FAULTS, how], capture_output=True, text=True,  # noqa: E731
                                         check=True, timeout=120).stdout.split()[-1])
    pages = 20 * 2 * (7 << 20) // 4096
    assert run("default") > pages // 8  # the steps fault their arrays in again
    assert run("kept") < pages // 100
