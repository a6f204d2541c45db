"""benchmarks/gpu_suite.py in its dry mode (tiny sizes on CPU), so the GPU script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"


def test_dry_run_checks_every_op_and_reports_bandwidth(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["copy_bandwidth_GBps"] > 0
    names = {op["op"] for op in report["ops"]}
    assert names == {"patch_encode", "patch_decode", "propagate_variance", "decode_moments", "patch_correlate",
                     "patch_stats", "ensemble_moments", "batched_eigh"}
    for op in report["ops"]:
        assert op["ok"] and op["max_rel_error"] < 1e-4 and op["backend"] is not None, op
        assert op["bytes"] > 0 and op["achieved_GBps"] > 0 and op["fraction_of_copy"] > 0
    assert report["eigh"]["speedup"] > 0 and report["eigh"]["backend"] == "cpp"


def test_without_cuda_the_full_run_says_to_use_dry_run():
    import torch

    if torch.cuda.is_available():
        return
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "use --dry-run" in result.stderr
