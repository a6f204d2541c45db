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

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per xdist worker: the workers share the cores
    torch.set_num_threads(1)

from podiff_kernels import _triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run every test: also those marked slow and the interpreter's float64 grids "
                          "beyond the first shape (what .ci/run runs)")


def _slow_interpreter_case(item) -> bool:
    """A Triton-interpreter case in float64 on any shape but the first: the fast run keeps the
    float32 grid and one float64 shape per test (the interpreter runs each program in Python)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("name") != "triton" or params.get("dtype") is not torch.float64 or "shape" not in params:
        return False
    from cases import SHAPES

    return params["shape"] != SHAPES[0]


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The suite runs on every core (pytest-xdist, ``-n auto``) unless ``-n`` is given (``-n 0``:
    one process). A file stays on one worker (``--dist loadfile``), so a module's shared trained
    model is trained once. Only ``tests/`` does this: benchmarks time one process."""
    if os.environ.get("PYTEST_XDIST_WORKER") or getattr(config.option, "numprocesses", 0) is not None:
        return
    if config.getoption("collectonly") or config.getoption("usepdb"):
        return
    config.option.numprocesses = "auto"
    if config.option.dist == "no":
        config.option.dist = "loadfile"


def pytest_configure(config):
    import cases

    cases.FULL = bool(config.getoption("--full"))
    if not cases.FULL and _triton.INTERPRETED:
        _without_overflow_sanitizer()


def _without_overflow_sanitizer():
    """The fast run turns off the Triton interpreter's int32-overflow check of every integer op,
    half of its time: the interpreter's cases index arrays of a few thousand elements, where no
    int32 index can overflow, and the values are checked against the references either way.
    ``--full`` keeps it (and the compile checks build every kernel for the GPU)."""
    import dataclasses

    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    if builder is not None and hasattr(builder.options, "sanitize_overflow"):
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="slow: run with --full (as .ci/run does)")
    for item in items:
        if "slow" in item.keywords or _slow_interpreter_case(item):
            item.add_marker(skip)


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
