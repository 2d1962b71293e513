"""Shared test configuration and fixtures.

The CPU suite runs with TRITON_INTERPRET=1 (set by `make test`), so Triton kernels execute in the
interpreter on CPU tensors. Tests marked `gpu` need CUDA and are skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="module")
def tok():
    """The word-level test tokenizer (``helpers.tiny_tokenizer``), one per test module."""
    return tiny_tokenizer()


@pytest.fixture
def one_thread():
    """One intra-op thread for this test: on a shared, busy 2-core runner two threads per process thrash
    (about 10x slower). Modules that train tiny models ask for it with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def reference_backend(monkeypatch):
    """Runs the fused ops on their PyTorch reference path for this test.

    For tests of the logic around the kernels: under TRITON_INTERPRET=1 every kernel call costs about a
    second, and the kernels themselves are checked in their own tests (and once per objective elsewhere).
    """
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")
