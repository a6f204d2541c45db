"""The C++ extension: built lazily with ninja, cached by a hash of its sources, clear errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from podiff_kernels import _extension

ROOT = Path(__file__).resolve().parents[2]


def test_loads_and_reports_its_build():
    module = _extension.load()
    for name in ("patch_encode", "patch_decode", "patch_correlate"):
        assert hasattr(module, name)
    ok, why = _extension.status()
    assert ok, why


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("PODIFF_BACKEND", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600)


def test_missing_compiler_is_reported_and_cpu_path_falls_back(tmp_path):
    code = (
        "import torch, podiff_kernels as pk; from podiff_kernels import _extension, dispatch\n"
        "print(_extension.status())\n"
        "x = torch.randn(1, 1, 9, 9); b = torch.randn(49, 9, 3)\n"
        "pk.patch_encode(x, b, None, 3, 1)\n"
        "print(dispatch.last_choice['patch_encode'].backend)\n"
    )
    out = _run(code, {"PODIFF_EXTENSION_DIR": str(tmp_path), "CXX": "/nonexistent/c++"})
    assert out.returncode == 0, out.stderr
    assert "no C++ compiler (/nonexistent/c++) on PATH" in out.stdout
    assert out.stdout.strip().endswith("torch")


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_the_build_lock_clears_a_stale_torch_lock_and_waits_for_a_live_builder(tmp_path, capsys):
    """torch's build lock is a plain file: a build killed mid-way leaves it, and torch alone would
    wait on it forever. load() holds an flock around the build (freed by the kernel when its
    holder dies); whoever holds it knows a torch lock file is stale."""
    import fcntl
    import threading

    (tmp_path / "lock").write_text("")
    with _extension._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert "removing a stale build lock left by a killed build" in capsys.readouterr().err

    entered = threading.Event()
    with open(tmp_path / ".podiff-build.lock", "a") as live:  # a live builder holds the flock
        fcntl.flock(live, fcntl.LOCK_EX)
        (tmp_path / "lock").write_text("")  # ... and torch's lock, which is not stale

        def build():
            with _extension._build_lock(tmp_path):
                entered.set()

        waiter = threading.Thread(target=build)
        waiter.start()
        assert not entered.wait(4.0) and (tmp_path / "lock").exists()  # it waits, and leaves the live lock
        (tmp_path / "lock").unlink()  # the builder finishes (torch removes its lock) and lets go
        fcntl.flock(live, fcntl.LOCK_UN)
    waiter.join(30)
    assert entered.is_set()
    assert "waiting for another process building the extension" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_process_after_a_killed_build_loads_instead_of_hanging():
    _extension.load()  # a cached build, so the subprocess only loads
    (_extension.cache_dir() / "lock").write_text("")  # what a killed build leaves
    out = _run("from podiff_kernels import _extension as e; print(e.load().patch_encode.__doc__ is not None)", {})
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr  # torch alone waits forever here
    assert not (_extension.cache_dir() / "lock").exists()


def test_disable_switch():
    out = _run("from podiff_kernels import _extension; print(_extension.status())", {"PODIFF_NO_EXTENSION": "1"})
    assert "disabled by PODIFF_NO_EXTENSION=1" in out.stdout


@pytest.mark.slow
def test_source_change_rebuilds_into_a_new_cache_entry(tmp_path):
    """A changed source changes the build hash: a fresh build with a one-line message, nothing stale."""
    (tmp_path / "csrc").mkdir()
    for f in (ROOT / "csrc").glob("*"):  # sources and headers
        shutil.copy2(f, tmp_path / "csrc" / f.name)
    code = (
        "import sys; from pathlib import Path; from podiff_kernels import _extension as e\n"
        f"e.CSRC = Path({str(tmp_path / 'csrc')!r})\n"
        "print(e.build_hash()); m = e.load(); print(m.patch_encode.__doc__ is not None)\n"
    )
    env = {"PODIFF_EXTENSION_DIR": str(tmp_path / "cache")}
    first = _run(code, env)
    assert first.returncode == 0, first.stderr
    assert "podiff: building the C++ extension" in first.stderr
    again = _run(code, env)
    assert "building" not in again.stderr and again.stdout == first.stdout  # cached, same hash
    with open(tmp_path / "csrc" / "patch_ops.cpp", "a") as f:
        f.write("\n// changed\n")
    changed = _run(code, env)
    assert changed.returncode == 0, changed.stderr
    assert "building" in changed.stderr and changed.stdout.split()[0] != first.stdout.split()[0]


def test_build_failure_is_a_clear_error(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "patch_ops.cpp").write_text("this is not C++;\n")
    code = (
        "from pathlib import Path; from podiff_kernels import _extension as e\n"
        f"e.CSRC = Path({str(tmp_path / 'csrc')!r})\n"
        "try:\n    e.load()\nexcept e.ExtensionError as exc:\n    print('ERR', exc)\n"
    )
    out = _run(code, {"PODIFF_EXTENSION_DIR": str(tmp_path / "cache")})
    assert "ERR podiff C++ extension failed to build" in out.stdout
    assert "error" in out.stdout.lower() and "PODIFF_NO_EXTENSION=1" in out.stdout


@pytest.mark.slow
def test_ahead_of_time_build_is_picked_up(tmp_path):
    """PODIFF_BUILD_EXT=1 setup.py build_ext makes podiff_kernels._C, which load() then prefers."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "csrc", copy / "csrc")
    shutil.copytree(ROOT / "podiff_kernels", copy / "podiff_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, copy / name)
    env = {**os.environ, "PODIFF_BUILD_EXT": "1"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy, env=env,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-2000:]
    code = ("from podiff_kernels import _extension as e; ok, why = e.status(); m = e.load(); "
            "print(why, m.BUILD_HASH == e.build_hash())")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PODIFF_EXTENSION_DIR": str(tmp_path / "empty_cache")})
    assert out.stdout.strip() == "ahead-of-time build podiff_kernels._C True", out.stdout + out.stderr
