"""The C++ (and, on CUDA builds of torch, CUDA) extension: lazy, cached, ninja-built.

``load()`` returns the compiled module. It first tries an ahead-of-time build
(``podiff_kernels._C``, made by ``PODIFF_BUILD_EXT=1 pip install -e . --no-build-isolation``),
then builds from ``csrc/`` with ``torch.utils.cpp_extension.load``. The build
folder name carries a hash of the sources, flags and torch version, so any change
rebuilds and nothing stale is loaded. ``PODIFF_NO_EXTENSION=1`` turns it off;
``PODIFF_EXTENSION_DIR`` moves the cache (default ``~/.cache/podiff/extensions``).

Processes share the cache through an ``flock`` that the kernel releases when its holder dies.
torch's own build lock is a plain file that a killed build leaves behind, after which every
later process waits on it forever; whoever holds the ``flock`` knows such a file is stale.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# A wheel carries the sources inside the package (setup.py copies them); a checkout has them at the top.
_HERE = Path(__file__).resolve().parent
CSRC = _HERE / "csrc" if (_HERE / "csrc").is_dir() else _HERE.parent / "csrc"
CPU_SOURCES = ("module.cpp", "patch_ops.cpp", "eigh.cpp")
CUDA_SOURCES: tuple[str, ...] = ("eigh_cuda.cu",)  # compiled only on CUDA builds of torch
CXX_FLAGS = ("-O3", "-fopenmp")  # the C++ standard is torch's own choice (its headers need C++20)
LD_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3",)


class ExtensionError(RuntimeError):
    """The extension is disabled, has no compiler, or failed to build."""


_lock = threading.Lock()
_module = None
_failure: str | None = None


def _with_cuda() -> bool:
    """CUDA sources are built when torch is a CUDA build and the CUDA toolkit (nvcc) is found."""
    if torch.version.cuda is None or not CUDA_SOURCES:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _sources() -> list[Path]:
    names = list(CPU_SOURCES) + (list(CUDA_SOURCES) if _with_cuda() else [])
    return [CSRC / n for n in names]


def build_hash() -> str:
    """Hash of everything that changes the binary: sources, flags, torch and Python."""
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    h.update(repr((CXX_FLAGS, LD_FLAGS, NVCC_FLAGS, torch.__version__, torch.version.cuda,
                   sys.version_info[:2])).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("PODIFF_EXTENSION_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "podiff", "extensions"
    )
    return Path(root) / f"podiff_ext_{build_hash()}"


def _module_name() -> str:
    return f"podiff_ext_{build_hash()}"


def _is_cached() -> bool:
    return any(cache_dir().glob(_module_name() + "*.so"))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _prebuilt():
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C if getattr(_C, "BUILD_HASH", None) == build_hash() else None


def status() -> tuple[bool, str]:
    """(usable, why) without building anything."""
    if os.environ.get("PODIFF_NO_EXTENSION", "0") == "1":
        return False, "disabled by PODIFF_NO_EXTENSION=1"
    if _failure is not None:
        return False, f"build failed earlier in this process: {_failure}"
    if _module is not None:
        return True, f"loaded from {getattr(_module, '__file__', '?')}"
    if _prebuilt() is not None:
        return True, "ahead-of-time build podiff_kernels._C"
    if not CSRC.is_dir():
        return False, f"C++ sources not found at {CSRC}"
    if _is_cached():
        return True, f"cached build in {cache_dir()}"
    if _compiler() is None:
        return False, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH; set CXX or install g++"
    return True, f"builds on first use into {cache_dir()}"


@contextmanager
def _build_lock(build_dir: Path):
    """Holds an exclusive ``flock`` on ``build_dir`` and removes a stale torch build lock."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's file lock alone
        yield
        return
    with open(build_dir / ".podiff-build.lock", "a") as handle:
        deadline = time.monotonic() + 3.0  # loading a cached build holds it for about a second: no message
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print(f"podiff: waiting for another process building the extension in {build_dir}",
                          file=sys.stderr, flush=True)
                    fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if its holder dies
                    break
                time.sleep(0.05)
        try:
            stale = build_dir / "lock"  # torch's FileBaton; no live builder holds it now
            if stale.exists():
                print(f"podiff: removing a stale build lock left by a killed build: {stale}", file=sys.stderr,
                      flush=True)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load():
    """The compiled module, building it once if needed. Raises ``ExtensionError``."""
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        ok, why = status()
        if not ok:
            raise ExtensionError(f"podiff C++ extension unavailable: {why}")
        pre = _prebuilt()
        if pre is not None:
            _module = pre
            return _module
        from torch.utils import cpp_extension

        build_dir = cache_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        if not _is_cached():
            print(
                f"podiff: building the C++ extension (first use, about a minute) in {build_dir}",
                file=sys.stderr,
                flush=True,
            )
        try:
            with _build_lock(build_dir):
                _module = cpp_extension.load(
                    name=_module_name(),
                    sources=[str(p) for p in _sources()],
                    extra_cflags=list(CXX_FLAGS) + (["-DPODIFF_WITH_CUDA"] if _with_cuda() else []),
                    extra_ldflags=list(LD_FLAGS),
                    extra_cuda_cflags=list(NVCC_FLAGS),
                    build_directory=str(build_dir),
                    with_cuda=_with_cuda(),
                    verbose=False,
                )
        except Exception as exc:  # compiler errors, missing ninja, ...
            lines = str(exc).strip().splitlines() or [repr(exc)]
            errors = [ln.strip() for ln in lines if "error" in ln.lower()]
            _failure = f"{type(exc).__name__}: {(errors or lines)[0]}"
            raise ExtensionError(
                f"podiff C++ extension failed to build in {build_dir}: {_failure}. "
                f"Set PODIFF_NO_EXTENSION=1 to use the pure-torch CPU path."
            ) from exc
        return _module
