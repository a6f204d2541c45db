"""benchmarks/gpu_suite.py: its dry-mode report is checked inside gpu_check's dry run
(tests/benchmarks/test_gpu_check.py); here, what it says where there is no GPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"


def test_without_cuda_the_full_run_says_to_use_dry_run():
    if torch.cuda.is_available():
        pytest.skip("checks the message a machine without CUDA gives")
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "use --dry-run" in result.stderr
