"""``python -m podiff_kernels.compile_check``: every Triton kernel through the real GPU compiler.

The suite runs the kernels under the interpreter, so these tests run the checker in a
subprocess with ``TRITON_INTERPRET`` unset. The default run compiles a few configurations for
sm_90; the full sweep (every dtype, basis, mean, shape; sm_80, sm_86, sm_90) is marked
``compile_full`` and run by ``.ci/run`` as a second command.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

KERNELS = {"_patch_encode_kernel", "_patch_decode_kernel", "_patch_correlate_kernel", "_decode_moments_kernel",
           "_ensemble_moments_kernel", "_patch_encode_masked_kernel", "_patch_stats_kernel"}


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PODIFF_BACKEND")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _have_triton_compiler() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _have_triton_compiler(), reason="needs triton with its NVIDIA backend")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc for the CUDA eigensolver")


def _run(args, timeout):
    return subprocess.run([sys.executable, "-m", "podiff_kernels.compile_check", *args], capture_output=True,
                          text=True, env=_env(), timeout=timeout)


@needs_compiler
@needs_nvcc
def test_quick_check_compiles_every_kernel_without_spills(tmp_path):
    out = tmp_path / "compile.json"
    run = _run(["--quick", "--arch", "sm_90", "--json", str(out)], timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and not report["failures"]
    rows = report["triton_kernels"]
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        assert r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["occupancy"] <= 1 and r["shared_bytes"] <= 232448, r
    (eigh,) = report["eigh"]
    assert eigh["ok"] and eigh["registers"] > 0 and eigh["max_n_in_shared_memory"] >= 64, eigh
    assert "| `_patch_decode_kernel` | sm_90 |" in run.stdout  # the summary table


@needs_compiler
def test_configurations_come_from_the_launchers_and_a_spilling_one_fails():
    """A change to a launcher changes what is compiled, and the decode tile this check retuned
    (256 pixels × 32 modes, which used every register and spilled) fails it."""
    script = textwrap.dedent("""
        import json, importlib, torch
        from podiff_kernels import compile_check as cc
        decode = importlib.import_module("podiff_kernels.ops.patch_decode")
        geometry = cc.Geometry("mri", 1, 1, 32, 32, 8, 8, 24)

        def decode_launches():
            return [l for _, l, _ in cc.capture((geometry,), (torch.float32,), (16,)) if "decode_kernel" in l.name
                    and "moments" not in l.name]

        picked = {l.kwargs["BLOCK_PIX"] for l in decode_launches()}
        original = decode.block
        decode.block = lambda n, lo=16, hi=64: 64 if hi == 32 else original(n, lo, hi)  # a launcher change
        changed = {(l.kwargs["BLOCK_PIX"], l.kwargs["BLOCK_R"]) for l in decode_launches()}
        decode.block = original
        launch = decode_launches()[0]
        launch.kwargs.update(BLOCK_PIX=256, BLOCK_R=32)  # the tile before compile_check
        cc._JOBS[:] = [("planted", launch, "planted", "sm_90")]
        row = cc.compile_one(0)
        print(json.dumps({"picked": sorted(picked), "changed": sorted(changed), "row": row}))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["picked"] == [32]  # 1024 // BLOCK_R(32)
    assert result["changed"] == [[16, 64]]  # BLOCK_R 64 -> BLOCK_PIX max(16, 1024 // 64)
    row = result["row"]
    assert not row["ok"] and "spills" in row["problem"] and row["registers"] >= 200, row


def test_refuses_the_interpreter():
    env = {**_env(), "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "podiff_kernels.compile_check", "--quick"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 2 and "run with it unset" in run.stderr


def test_unknown_arch_is_a_clear_error():
    run = _run(["--arch", "sm_75"], timeout=300)
    assert run.returncode == 2 and "--arch must be among ['sm_80', 'sm_86', 'sm_90']; got ['sm_75']" in run.stderr


@pytest.mark.compile_full
@needs_compiler
@needs_nvcc
def test_full_sweep_every_configuration_every_architecture(tmp_path):
    out = tmp_path / "compile.json"
    run = _run(["--arch", "sm_80,sm_86,sm_90", "--json", str(out)], timeout=5400)
    report = json.loads(out.read_text())
    assert run.returncode == 0 and report["ok"], "\n".join(f"{f['kernel']} {f['arch']} {f.get('config')}: "
                                                           f"{f['problem']}" for f in report["failures"][:20])
    assert {r["kernel"] for r in report["triton_kernels"]} == KERNELS
    dtypes = {r["config"]["dtype"] for r in report["triton_kernels"]}
    assert dtypes == {"float32", "float64", "float16", "bfloat16"}
