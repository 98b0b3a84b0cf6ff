"""pytest set-up shared by every test file: Triton's interpreter, the hypothesis profile, the
`engine` fixture. The differential helpers and the tolerance table live in harness.py."""
from __future__ import annotations

import importlib.util
import os

# Triton decides between compiling and interpreting when it is imported: CI has no GPU,
# so the triton engine's tests run its kernels in the interpreter on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

settings.register_profile("lstmkit", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("lstmkit")


def cpu_engines() -> list[str]:
    """The engines that run on CPU tensors here: numba whenever its package is installed (the
    rule of engines.is_available), decided without importing lstmkit's engine, so a bug there
    fails the numba tests loudly instead of removing them or breaking every file's collection."""
    return ["reference"] + (["numba"] if importlib.util.find_spec("numba") is not None else [])


@pytest.fixture(params=cpu_engines(), scope="session")
def engine(request):
    return request.param

