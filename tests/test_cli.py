"""The podiff command end to end on a tiny dataset: every subcommand, resume, outputs, and bad
paths / files giving one-line errors with a nonzero exit status."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch.nn.functional as F
import torch

from podiff.cli import main

TRAIN = ["--steps", "3", "--batch-size", "4", "--patch-size", "4", "--rank", "6", "--quiet"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    hr = F.avg_pool2d(torch.randn(20, 1, 22, 22, generator=g), 7, stride=1) * 3 + 290.0
    hr[:, :, :2, :3] = float("nan")  # a little land
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, hr=hr.numpy())
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_sample_evaluate_resume(tmp_path, tiny_npz, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", run_dir, *TRAIN)
    assert code == 0, err
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert json.loads((run_dir / "train.json").read_text())["steps"] == 3

    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", run_dir, *TRAIN)
    assert code == 1 and "exists and is not empty; pass --overwrite" in err and len(err.strip().splitlines()) == 1

    more = [a if a != "3" else "6" for a in TRAIN]
    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", run_dir, "--resume", *more)
    assert code == 0, err
    assert json.loads((run_dir / "train.json").read_text())["steps"] == 6

    pred = tmp_path / "pred.npz"
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tiny_npz, "--scale", 4, "--num-samples", 3,
                       "--steps", 2, "--out", pred, "--members", "--quiet")
    assert code == 0, err
    with np.load(pred) as p:
        n = len(p["indices"])
        assert p["mean"].shape == p["variance"].shape == (n, 1, 16, 16)
        assert p["members"].shape == (3, n, 1, 16, 16) and str(p["split"]) == "test"
        assert np.isnan(p["mean"][:, :, :2, :3]).all() and np.isfinite(p["mean"][:, :, 5:, 5:]).all()

    report = tmp_path / "report"
    code, _, err = run(capsys, "evaluate", "--pred", pred, "--data", tiny_npz, "--scale", 4, "--out", report,
                       "--quiet")
    assert code == 0, err
    result = json.loads((report / "metrics.json").read_text())
    assert {"model", "bicubic", "pod_projection", "ridge", "meta"} <= set(result)
    assert {"rmse", "mae", "crps", "coverage", "mace", "spread_skill", "ssim"} <= set(result["model"])
    assert set(result["model"]["coverage"]) == {"0.5", "0.7", "0.9", "0.95"}
    for name in ("bicubic", "pod_projection", "ridge"):
        assert {"rmse", "mae"} <= set(result[name])
    assert result["meta"]["split"] == "test" and result["meta"]["seed"] == 0 and "versions" in result["meta"]
    for f in ("report.md", "fields.png", "reliability.png", "spread_skill.png", "pod_spectrum.png"):
        assert (report / f).stat().st_size > 0, f

    all_pred = tmp_path / "all.npz"
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tiny_npz, "--scale", 4, "--num-samples", 2,
                       "--steps", 1, "--split", "all", "--out", all_pred, "--quiet")
    assert code == 0, err
    assert np.load(all_pred)["mean"].shape[0] == 20
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tiny_npz, "--scale", 4, "--out", all_pred,
                       "--quiet")
    assert code == 1 and "exists; pass --overwrite" in err


def test_fit_pod_then_train_with_it(tmp_path, tiny_npz, capsys):
    pod = tmp_path / "pod.safetensors"
    code, out, err = run(capsys, "fit-pod", "--data", tiny_npz, "--scale", 4, "--out", pod, "--patch-size", 4,
                         "--rank", 5, "--quiet")
    assert code == 0, err
    assert pod.stat().st_size > 0
    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", tmp_path / "r", "--pod", pod,
                       *TRAIN)
    assert code == 0, err
    cfg = json.loads((tmp_path / "r" / "model" / "config.json").read_text())
    assert cfg["denoiser"]["rank"] == 5  # the given POD, not a new fit with rank 6


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "missing.npz", "--scale", "4", "--out", "OUT"], "no data file at missing.npz"),
    (["train", "--data", "nowhere", "--out", "OUT"], "no dataset named 'nowhere'"),
    (["sample", "--model", "NOMODEL", "--data", "DATA", "--scale", "4", "--out", "p.npz"], "no trained model in"),
    (["evaluate", "--pred", "missing.npz", "--data", "DATA", "--scale", "4", "--out", "R"], "no prediction file"),
    (["evaluate", "--pred", "BAD", "--data", "DATA", "--scale", "4", "--out", "R"], "not a readable prediction"),
    (["train", "--data", "BAD", "--scale", "4", "--out", "OUT"], "not a readable .npz file"),
])
def test_bad_paths_and_files_give_one_line_errors(tmp_path, tiny_npz, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    subst = {"DATA": str(tiny_npz), "BAD": "bad.npz", "OUT": str(tmp_path / "out"), "R": str(tmp_path / "r")}
    code, _, err = run(capsys, *[subst.get(a, a) for a in argv])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_demo_runs_end_to_end_on_packaged_images(tmp_path, capsys):
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, "demo", "--dataset", "images", "--out", tmp_path / "demo", "--steps", 2,
                         "--num-samples", 2, "--sample-steps", 1, "--quiet")
    assert code == 0, err
    result = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert result["meta"]["dataset"] == "images" and result["meta"]["total_seconds"] > 0
    assert (tmp_path / "demo" / "report" / "report.md").stat().st_size > 0


def test_entry_point_help_and_info():
    for sub in ([], ["train"], ["sample"], ["evaluate"], ["demo"], ["fit-pod"]):
        out = subprocess.run([sys.executable, "-m", "podiff.cli", *sub, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: podiff" in out.stdout
    out = subprocess.run([sys.executable, "-m", "podiff.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "podiff 0.1.0" in out.stdout
