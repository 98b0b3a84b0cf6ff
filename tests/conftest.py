"""pytest set-up shared by every test file: Triton's interpreter, the hypothesis profile, the
`engine` fixture. The differential helpers and the tolerance table live in harness.py."""
from __future__ import annotations

import os

# Triton decides between compiling and interpreting when it is imported: CI has no GPU,
# so the triton engine's tests run its kernels in the interpreter on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

settings.register_profile("lstmkit", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("lstmkit")


def cpu_engines() -> list[str]:
    """The engines that run on CPU tensors here: always both. numba is a core dependency
    (pyproject.toml), so an install without it is broken and its cases must fail, not vanish
    (deciding by find_spec("numba") dropped half of test_lstm.py without a word). Named, not
    imported: a bug in lstmkit's engine fails the numba cases, not every file's collection."""
    return ["reference", "numba"]


@pytest.fixture(params=cpu_engines(), scope="session")
def engine(request):
    return request.param

