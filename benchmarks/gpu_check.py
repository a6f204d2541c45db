"""The prepared GPU run: everything a CUDA machine proves, in one command, into one JSON.

    python benchmarks/gpu_check.py --out gpu_check.json            # on a CUDA machine, < 11 minutes
    python benchmarks/gpu_check.py --install --out gpu_check.json  # from a fresh checkout: pip install first
    python benchmarks/gpu_check.py --dry-run --out dry.json        # anywhere: the same stages, CPU-sized

Stages, each with its own time limit (30 + 90 + 200 + 90 + 150 + 100 s: at most 11 minutes), each recorded
(exit code, seconds, figures) even when one fails:

1. ``environment``: GPU name and memory, torch / CUDA / Triton versions, which kernel runs
   where (``python -m podiff_kernels.info --json``).
2. ``install`` (only with ``--install``): ``pip install -e .[test,data]``.
3. ``gpu_tests``: ``pytest -m gpu tests`` — each Triton kernel and the CUDA eigensolver
   against the float64 reference on CUDA, the pipeline training and sampling on CUDA with
   the seeding guarantees (the counts of passed / failed / skipped).
4. ``gpu_suite``: ``benchmarks/gpu_suite.py`` — every op's error and achieved bandwidth as a
   fraction of the device's copy bandwidth; the eigensolver against ``torch.linalg.eigh``.
5. ``domain_scaling``: ``benchmarks/domain_scaling.py --device cuda`` — a model of any domain
   trained on 64 × 64-pixel crops sampling 256² to 2048² fields: time per member and pixel, peak
   RSS and peak GPU memory (issue 33's sweep, as on the CPU).
6. ``demo``: ``podiff demo --device cuda --quiet`` — the SST demo's metrics and times on the GPU.

Exit status 0 when every stage passed. ``--dry-run`` runs stages 1, 3, 4, a two-size sweep and a tiny demo on the
CPU (the GPU tests then skip) so the script is tested where no GPU is (``tests/benchmarks/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), \
            f"timed out after {timeout} s"
    stage = {"stage": name, "command": " ".join(cmd), "returncode": rc, "ok": rc == 0,
             "seconds": round(time.perf_counter() - t0, 1), "stdout_tail": out[-4000:], "stderr_tail": err[-4000:]}
    print(f"gpu_check: {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {stage['seconds']} s", file=sys.stderr)
    return stage


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # reported, not fatal
        info["triton"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_GiB=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count, devices=torch.cuda.device_count())
    kernels = subprocess.run([sys.executable, "-m", "podiff_kernels.info", "--json"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    try:
        info["backends"] = json.loads(kernels.stdout)
    except json.JSONDecodeError:
        info["backends"] = f"podiff_kernels.info failed (exit {kernels.returncode}): {kernels.stderr[-2000:]}"
    return {"stage": "environment", "ok": True, **info}


def _pytest_counts(text: str) -> dict:
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized stages, for checking the script")
    parser.add_argument("--install", action="store_true", help="pip install -e .[test,data] first")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    stages = [environment()]
    if args.install:
        stages.append(_run("install", [sys.executable, "-m", "pip", "install", "-q", "-e", ".[test,data]"], 90))
    gpu_tests = _run("gpu_tests", [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p",
                                   "no:cacheprovider"],
                     200)
    gpu_tests["counts"] = _pytest_counts(gpu_tests["stdout_tail"])
    if args.dry_run:  # no GPU: every gpu test skips; that is the expected outcome here
        gpu_tests["ok"] = gpu_tests["returncode"] == 0 and gpu_tests["counts"].get("failed", 0) == 0
    else:
        gpu_tests["ok"] = gpu_tests["ok"] and gpu_tests["counts"].get("passed", 0) > 0 and \
            gpu_tests["counts"].get("skipped", 0) == 0
    stages.append(gpu_tests)
    with tempfile.TemporaryDirectory() as tmp:
        suite_json = Path(tmp) / "gpu_suite.json"
        suite = _run("gpu_suite", [sys.executable, "benchmarks/gpu_suite.py", "--out", str(suite_json)]
                     + (["--dry-run"] if args.dry_run else []), 90)
        if suite_json.is_file():
            suite["report"] = json.loads(suite_json.read_text())
        stages.append(suite)
        scaling_json = Path(tmp) / "domain_scaling.json"  # issue 33's sweep: a crop-trained model up to 2048²
        sweep = ["--sides", "64,128", "--steps", "2"] if args.dry_run else ["--device", "cuda"]
        scaling = _run("domain_scaling", [sys.executable, "benchmarks/domain_scaling.py", "--out", str(scaling_json),
                                          *sweep], 600 if args.dry_run else 150)
        if scaling_json.is_file():
            scaling["report"] = json.loads(scaling_json.read_text())
        stages.append(scaling)
        demo_dir = Path(tmp) / "demo"
        demo_cmd = [sys.executable, "-m", "podiff.cli", "demo", "--quiet", "--out", str(demo_dir),
                    "--device", "cpu" if args.dry_run else "cuda"]
        if args.dry_run:
            demo_cmd += ["--steps", "5", "--num-samples", "2", "--sample-steps", "2"]
        # The CPU dry run fits the ridge, POD and baselines for real: a minute on an idle 2-core box,
        # over five on a busy one; its limit only catches a hang.
        demo = _run("demo", demo_cmd, 900 if args.dry_run else 100)
        metrics = demo_dir / "report" / "metrics.json"
        if metrics.is_file():
            result = json.loads(metrics.read_text())
            demo["metrics"] = {k: result[k] for k in ("model", "bicubic", "ridge", "pod_projection") if k in result}
            demo["meta"] = {k: result["meta"].get(k) for k in ("train_seconds", "total_seconds", "sample_seconds")}
        stages.append(demo)
    report = {"dry_run": args.dry_run, "ok": all(s["ok"] for s in stages),
              "seconds": round(time.perf_counter() - t0, 1),
              "stages": stages}
    out = Path(args.out)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp_out, out)  # never a half-written report
    print(f"gpu_check: {'all stages passed' if report['ok'] else 'FAILED'} in {report['seconds']} s -> {out}",
          file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
