"""benchmarks/fuzz.py, the differential fuzzer over the engine's size thresholds, on a few of its
cases: small enough for CI (the script itself runs the big ones), drawn from fixed seeds, so the
fuzzer keeps working and its comparison keeps meaning something."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("lstmkit_fuzz", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_cases_agree_with_torch(fuzz, seed, capsys):
    threads = torch.get_num_threads()
    assert fuzz.main(["--seed", str(seed), "--cases", "6", "--max-macs", "2e7"]) == 0, capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the thread count the cases set is put back
    out = capsys.readouterr().out
    assert out.count("\nok ") == 6 and "# 6 cases, 0 failed" in out


@pytest.mark.parametrize("seed", range(2))
def test_fuzz_variant_cases_agree_with_the_reference_engine(fuzz, seed, capsys):
    assert fuzz.main(["--seed", str(seed), "--cases", "5", "--max-macs", "2e7", "--variants"]) == 0, \
        capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("\nok ") == 5 and "# 5 cases, 0 failed" in out and "(variants)" in out


def test_fuzz_covers_every_mode_and_both_thread_counts(fuzz):
    rng = random.Random(0)
    cases = [fuzz.draw(rng, 2e7) for _ in range(200)]
    assert {c["mode"] for c in cases} == {"infer", "infer_update", "train", "train_frozen_x", "train_frozen_w", "stream"}
    assert {c["threads"] for c in cases} == {1, 2} and any(c["packed"] for c in cases)
    assert all(c["T"] * c["N"] * (max(c["I"], (2 if c["bidir"] else 1) * (c["proj"] or c["H"])) + c["H"]) * 4 * c["H"]
               <= 2e7 for c in cases)
    assert not any(c["variants"] for c in cases)
    with_variants = [fuzz.draw(rng, 2e7, variants=True)["variants"] for _ in range(200)]
    assert all(with_variants) and {k for v in with_variants for k in v} == {
        "layer_norm", "peephole", "zoneout", "recurrent_dropout", "weight_drop", "forget_bias"}


def test_the_comparison_catches_a_wrong_number(fuzz, monkeypatch):
    """A case whose lstmkit output is off by 1e-3 fails: the tolerance is not so loose that
    anything passes."""
    import lstmkit

    real = lstmkit.LSTM.forward

    def off(self, *args, **kwargs):
        y, (h, c) = real(self, *args, **kwargs)
        return y + 1e-3, (h, c)

    monkeypatch.setattr(lstmkit.LSTM, "forward", off)
    cfg = dict(T=5, N=3, I=8, H=16, layers=1, bidir=False, proj=0, bias=True, batch_first=False, use_hx=False,
               mode="infer", packed=False, threads=1, dtype=torch.float32, seed=1)
    ok, detail = fuzz.run_case(cfg)
    assert not ok and "item 0" in detail


def test_the_variant_comparison_catches_a_wrong_number(fuzz, monkeypatch):
    """In --variants cases the Numba engine is compared with the reference engine: an offset of
    1e-3 on the Numba engine's output alone fails."""
    import lstmkit

    real = lstmkit.LSTM.forward

    def off(self, *args, **kwargs):
        y, (h, c) = real(self, *args, **kwargs)
        return (y + 1e-3 if self.engine == "numba" else y), (h, c)

    monkeypatch.setattr(lstmkit.LSTM, "forward", off)
    cfg = dict(T=5, N=3, I=8, H=16, layers=1, bidir=False, proj=0, bias=True, batch_first=False, use_hx=False,
               mode="train", packed=False, threads=1, dtype=torch.float32, seed=1,
               variants={"peephole": True, "zoneout": 0.1})
    ok, detail = fuzz.run_case(cfg)
    assert not ok and "item 0" in detail


def test_a_chaotic_float64_case_is_judged_by_the_oracles_own_sensitivity(fuzz, monkeypatch):
    """With a projection and big weights the recurrence is chaotic: torch.nn.LSTM's own float64
    output moves far past 1e-10 when its input moves by a few ulps, and so does any other order
    of the same sums. Such a case passes within CHAOS_FACTOR times that sensitivity and says it
    was ill-conditioned; a wrong number of 1e-3 still fails there."""
    import lstmkit

    def big_update(model, how, seed):  # weights 0.4 randn bigger: chaotic by T = 64 at hidden 64
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))

    monkeypatch.setattr(fuzz, "update_weights", big_update)
    cfg = dict(T=64, N=3, I=16, H=64, layers=1, bidir=False, proj=32, bias=False, batch_first=False, use_hx=False,
               mode="infer_update", packed=False, threads=1, dtype=torch.float64, seed=1)
    ok, detail = fuzz.run_case(cfg)
    assert ok and "ill-conditioned" in detail, detail
    ok, detail = fuzz.run_case(dict(cfg, T=2))  # two steps: well-conditioned, the plain 1e-10
    assert ok and "ill-conditioned" not in detail, detail

    real = lstmkit.LSTM.forward

    def off(self, *args, **kwargs):
        y, (h, c) = real(self, *args, **kwargs)
        return y + 1e-3, (h, c)

    monkeypatch.setattr(lstmkit.LSTM, "forward", off)
    ok, detail = fuzz.run_case(cfg)
    assert not ok and "item 0" in detail
