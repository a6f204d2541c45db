"""Test set-up. Without CUDA, Triton kernels are checked under the interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton`` is imported (``triton.jit``
chooses the interpreter at decoration time), so it is set here, before any
``podiff_kernels`` import, whenever no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from podiff_kernels import _triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def backend(monkeypatch):
    """``backend("triton")`` forces a backend for the rest of the test."""

    def force(name: str | None):
        if name is None:
            monkeypatch.delenv("PODIFF_BACKEND", raising=False)
        else:
            monkeypatch.setenv("PODIFF_BACKEND", name)
        if name == "triton" and not (_triton.HAS_TRITON and (_triton.INTERPRETED or DEVICE == "cuda")):
            pytest.skip("Triton kernels cannot run here")

    yield force


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("PODIFF_BACKEND", raising=False)
