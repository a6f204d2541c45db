"""benchmarks/gpu_check.py in its dry mode (every stage, CPU-sized), so the prepared GPU run
cannot rot; and benchmarks/gpu_suite.py's report inside it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                         text=True, timeout=1500, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # the dry run takes ~50 s
def test_dry_run_passes_every_stage(dry_report):
    assert dry_report["dry_run"] and dry_report["ok"]
    names = [s["stage"] for s in dry_report["stages"]]
    assert names == ["environment", "gpu_tests", "gpu_suite", "domain_scaling", "demo"]
    sweep = next(s for s in dry_report["stages"] if s["stage"] == "domain_scaling")["report"]
    assert [row["side"] for row in sweep["rows"]] == [64, 128] and sweep["per_pixel_growth"] > 0
    env = dry_report["stages"][0]
    assert env["torch"] == torch.__version__ and isinstance(env["backends"], dict)
    assert {"patch_encode", "decode_moments", "batched_eigh"} <= set(env["backends"]["ops"])


@pytest.mark.slow  # the dry run takes ~50 s
def test_dry_run_collects_the_gpu_tests(dry_report):
    counts = next(s for s in dry_report["stages"] if s["stage"] == "gpu_tests")["counts"]
    if torch.cuda.is_available():
        assert counts.get("passed", 0) > 0 and counts.get("failed", 0) == 0
    else:  # every gpu-marked test is collected and skips here
        assert counts.get("skipped", 0) >= 20 and counts.get("failed", 0) == 0 and counts.get("passed", 0) == 0


@pytest.mark.slow  # the dry run takes ~50 s
def test_gpu_suite_checks_every_op_and_reports_bandwidth(dry_report):
    report = next(s for s in dry_report["stages"] if s["stage"] == "gpu_suite")["report"]
    assert report["dry_run"] and report["copy_bandwidth_GBps"] > 0
    names = {op["op"] for op in report["ops"]}
    assert names == {"patch_encode", "patch_decode", "propagate_variance", "decode_moments", "patch_correlate",
                     "patch_stats", "ensemble_moments", "batched_eigh"}
    for op in report["ops"]:
        assert op["ok"] and op["max_rel_error"] < 1e-4 and op["backend"] is not None, op
        assert op["bytes"] > 0 and op["achieved_GBps"] > 0 and op["fraction_of_copy"] > 0
    assert report["eigh"]["speedup"] > 0 and report["eigh"]["backend"] == "cpp"


@pytest.mark.slow  # the dry run takes ~50 s
def test_dry_run_demo_reports_its_metrics(dry_report):
    demo = next(s for s in dry_report["stages"] if s["stage"] == "demo")
    assert "--device cpu" in demo["command"]
    model = demo["metrics"]["model"]
    assert model["rmse"] > 0 and "crps" in model and demo["metrics"]["bicubic"]["rmse"] > 0


def test_without_cuda_the_full_run_says_to_use_dry_run():
    if torch.cuda.is_available():
        pytest.skip("checks the message a machine without CUDA gives")
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 2 and "use --dry-run" in run.stderr
