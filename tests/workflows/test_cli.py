"""The podiff command end to end on a tiny dataset: every subcommand, resume, outputs, and bad
paths / files giving one-line errors with a nonzero exit status."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from utils import run_command as run

from podiff.cli import main
from podiff.data.prediction_file import read_prediction

TRAIN = ["--steps", "3", "--batch-size", "4", "--patch-size", "4", "--rank", "6", "--quiet"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    hr = F.avg_pool2d(torch.randn(20, 1, 22, 22, generator=g), 7, stride=1) * 3 + 290.0
    hr[:, :, :2, :3] = float("nan")  # a little land
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, hr=hr.numpy())
    return path


def test_train_sample_evaluate_resume(tmp_path, tiny_npz, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", run_dir, *TRAIN)
    assert code == 0, err
    assert (run_dir / "model" / "config.json").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert json.loads((run_dir / "train.json").read_text())["steps"] == 3

    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", run_dir, *TRAIN)
    assert code == 1 and "exists and is not empty; pass --overwrite" in err and len(err.strip().splitlines()) == 1

    more = [a if a != "3" else "6" for a in TRAIN]
    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", run_dir, "--resume", *more,
                       "--spread-calibration", "moments")
    assert code == 0, err
    info = json.loads((run_dir / "train.json").read_text())
    assert info["steps"] == 6 and info["spread_calibration"] == "moments"
    # chosen on the held-out fields, then refitted on every field; the spreads from the held-out errors
    fitted_on = info["fitted_on"]
    every = [info["train_indices"][0], info["val_indices"][1]]
    assert fitted_on["mean_model"]["fields"] == fitted_on["denoiser"]["fields"] == every
    ratio = fitted_on["spread_and_error_shape"]["times_refit_error_ratio"]
    assert fitted_on["spread_and_error_shape"] == {"from_errors_on": info["val_indices"],
                                                   "of_model_fitted_on": info["train_indices"],
                                                   "times_refit_error_ratio": ratio}
    assert 0.5 <= ratio <= 2.0
    assert fitted_on["denoiser"]["from_step"] == 6 and fitted_on["denoiser"]["continued_steps"] >= 1
    from podiff.baselines.calibrated import ErrorSpread

    for name in ("bicubic", "pod_projection", "ridge", "regression", "unet"):
        spread = ErrorSpread.load(run_dir / "model" / "baselines" / f"{name}.spread.safetensors")
        # the refitted baselines' spreads are narrowed as the model's is; bicubic is not refitted
        assert spread.factor == (1.0 if name in ("bicubic", "pod_projection") else ratio), name
    from podiff.model.pipeline import PODiffPipeline

    assert PODiffPipeline.load(run_dir / "model").calibration.spread == info["spread"] * ratio

    pred = tmp_path / "pred.npz"
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tiny_npz, "--scale", 4, "--num-samples", 3,
                       "--sample-steps", 2, "--out", pred, "--members", "--quiet")
    assert code == 0, err
    with np.load(pred) as p:
        n = len(p["indices"])
        assert p["mean"].shape == p["variance"].shape == (n, 1, 16, 16)
        assert p["members"].shape == (3, n, 1, 16, 16) and json.loads(str(p["attrs"]))["split"] == "test"
        assert np.isnan(p["mean"][:, :, :2, :3]).all() and np.isfinite(p["mean"][:, :, 5:, 5:]).all()

    report = tmp_path / "report"
    code, _, err = run(capsys, "evaluate", "--pred", pred, "--data", tiny_npz, "--scale", 4, "--out", report,
                       "--quiet")
    assert code == 0, err
    result = json.loads((report / "metrics.json").read_text())
    assert {"model", "bicubic", "pod_projection", "ridge", "meta"} <= set(result)
    assert {"rmse", "mae", "crps", "coverage", "mace", "spread_skill", "ssim"} <= set(result["model"])
    assert set(result["model"]["coverage"]) == {"0.5", "0.7", "0.9", "0.95"}
    for name in ("bicubic", "pod_projection", "ridge", "regression", "unet"):  # each also as a calibrated forecast
        assert {"rmse", "mae", "crps", "crps_gaussian", "mace"} <= set(result[name])
    assert result["comparison"]["best_calibrated"] in ("bicubic", "pod_projection", "ridge", "regression", "unet")
    assert result["comparison"]["sentence"] in (report / "report.md").read_text()
    assert result["meta"]["split"] == "test" and result["meta"]["seed"] == 0 and "versions" in result["meta"]
    for f in ("report.md", "fields.png", "reliability.png", "spread_skill.png", "pod_spectrum.png"):
        assert (report / f).stat().st_size > 0, f

    all_pred = tmp_path / "all.npz"
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tiny_npz, "--scale", 4, "--num-samples", 2,
                       "--sample-steps", 2, "--sampler", "ddim", "--split", "all", "--out", all_pred, "--quiet")
    assert code == 0, err
    assert np.load(all_pred)["mean"].shape[0] == 20
    assert read_prediction(all_pred).attrs["sampler"] == "ddim"
    attrs = read_prediction(pred).attrs
    assert attrs["sampler"] == "dpmsolver++" and attrs["steps"] == 2  # the model's sampler (the default)
    assert attrs["member_megapixels_per_second"] > 0
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tiny_npz, "--scale", 4, "--out", all_pred,
                       "--quiet")
    assert code == 1 and "exists; pass --overwrite" in err


def test_members_on_several_patch_grids_from_train_and_sample(tmp_path, tiny_npz, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", run_dir, *TRAIN, "--basis",
                       "shared", "--grid-shifts", "--member-grids", 2, "--residual", "ridge", "--no-unet-baseline",
                       "--no-regression-baseline")
    assert code == 0, err
    assert json.loads((run_dir / "model" / "config.json").read_text())["config"]["member_grids"] == 2
    for extra, grids in (([], 2), (["--member-grids", 4], 4), (["--member-grids", 1], 1)):
        pred = tmp_path / f"pred{grids}.npz"
        code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tiny_npz, "--scale", 4, "--num-samples", 8,
                           "--sample-steps", 2, "--out", pred, "--quiet", *extra)
        assert code == 0, err
        prediction = read_prediction(pred)
        assert prediction.attrs["member_grids"] == grids
        assert np.isnan(prediction.mean[:, :, :2, :3]).all() and np.isfinite(prediction.mean[:, :, 5:, 5:]).all()
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tiny_npz, "--scale", 4, "--num-samples", 3,
                       "--out", tmp_path / "odd.npz", "--quiet")
    assert code == 1 and "num_samples must be a multiple of member_grids=2" in err
    assert len(err.strip().splitlines()) == 1


def test_fit_pod_then_train_with_it(tmp_path, tiny_npz, capsys):
    pod = tmp_path / "pod.safetensors"
    code, out, err = run(capsys, "fit-pod", "--data", tiny_npz, "--scale", 4, "--out", pod, "--patch-size", 4,
                         "--rank", 5, "--quiet")
    assert code == 0, err
    assert pod.stat().st_size > 0
    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", tmp_path / "r", "--pod", pod,
                       *TRAIN)
    assert code == 1 and "use it with --residual none" in err
    code, _, err = run(capsys, "train", "--data", tiny_npz, "--scale", 4, "--out", tmp_path / "r", "--pod", pod,
                       "--residual", "none", "--overwrite", *TRAIN)
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
                         "--num-samples", 2, "--sample-steps", 1, "--quiet", "--attention-window", 4,
                         "--grid-shifts")
    assert code == 0, err
    from podiff.model.pipeline import PODiffPipeline

    model = PODiffPipeline.load(tmp_path / "demo" / "run" / "model")
    assert model.denoiser.config.window == 4  # 16 × 16 tokens
    result = json.loads((tmp_path / "demo" / "report" / "metrics.json").read_text())
    assert result["meta"]["dataset"] == "images" and result["meta"]["total_seconds"] > 0
    trained = json.loads((tmp_path / "demo" / "run" / "train.json").read_text())
    assert trained["bounds"] == [0.0, 1.0]  # declared
    # every offset within a patch, for a shared basis
    shared = model.pod.basis_kind == "shared"
    assert trained["training_windows"] == {"windows": model.config.patch_size ** 2 if shared else 1, "crop": 0,
                                           "shifts": shared}
    report = tmp_path / "demo" / "report"
    assert "High-wavenumber power" in (report / "report.md").read_text()
    # The members' spectra beside the truth's, the mean's and the ridge's; the figures of these
    # square fields in a row, not a column.
    spectra = result["spectra"]
    assert {"wavenumber", "truth", "ensemble mean", "members", "ridge"} <= set(spectra)
    assert all(len(v) == len(spectra["wavenumber"]) for v in spectra.values())
    assert 0 < result["model"]["members_high_k_power"] and 0 < result["ridge"]["high_k_power"]
    assert result["model"]["std_seams"] >= 0 and "Patch seams" in (report / "report.md").read_text()
    # what the members' structure looks like: band powers, jumps at patch edges, rank flatness
    bands = result["model"]["members_band_power"]
    assert len(bands) == 4 and bands[0]["k_low"] < bands[-1]["k_high"] == 0.5 and all(b["ratio"] > 0 for b in bands)
    assert result["model"]["patch_edge_ratio"] > 0 and result["model"]["rank_flatness"]["df"] == 2
    text = (report / "report.md").read_text()
    assert "band by band of the wavenumber" in text and "Patch edges" in text and "reliability index" in text
    from PIL import Image

    for figure in ("fields.png", "members.png"):
        width, height = Image.open(report / figure).size
        assert width > 2 * height, (figure, width, height)
    assert (report / "spectra.png").stat().st_size > 0
    if importlib.util.find_spec("xarray") and importlib.util.find_spec("netCDF4"):
        import xarray as xr

        pred = xr.open_dataset(tmp_path / "demo" / "prediction.nc")
        assert {"mean", "std", "input", "truth"} <= set(pred.data_vars) and pred.attrs["scale"] == 4
        assert (tmp_path / "demo" / "report" / "metrics_maps.nc").is_file()


def test_bounds_make_blocks_at_the_bound_certain_for_the_model_and_the_baselines(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    hr = (F.avg_pool2d(torch.randn(20, 1, 22, 22, generator=g), 7, stride=1) * 3 - 0.2).clamp_min(0)
    data = tmp_path / "rain.npz"
    np.savez(data, hr=hr.numpy())
    code, _, err = run(capsys, "train", "--data", data, "--scale", 4, "--out", tmp_path / "bad", "--bounds", "0.5,",
                       *TRAIN)
    assert code == 1 and "--bounds 0.5,: bounds: hr must be >= the lower bound 0.5" in err
    code, _, err = run(capsys, "train", "--data", data, "--scale", 4, "--out", tmp_path / "auto", *TRAIN)
    assert code == 0, err
    assert json.loads((tmp_path / "auto" / "train.json").read_text())["bounds"] is None  # an .npz declares none
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", data, "--scale", 4, "--out", run_dir, "--bounds", "0,", *TRAIN)
    assert code == 0, err
    assert json.loads((run_dir / "train.json").read_text())["bounds"] == [0.0, None]
    pred = tmp_path / "pred.npz"
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", data, "--scale", 4, "--num-samples", 4,
                       "--sample-steps", 2, "--split", "all", "--members", "--out", pred, "--quiet")
    assert code == 0, err
    p = read_prediction(pred)
    from podiff.data.bounds import apply, certain_pixels

    certain = certain_pixels(torch.from_numpy(p.lr), (0, None), 4).numpy()
    assert certain.mean() > 0.1 and (p.mean[certain] == 0).all() and (p.variance[certain] == 0).all()
    assert (p.members[:, certain] == 0).all() and (p.variance[~certain] > 0).mean() > 0.9
    report = tmp_path / "report"
    code, _, err = run(capsys, "evaluate", "--pred", pred, "--data", data, "--scale", 4,
                       "--out", report, "--quiet")
    assert code == 0, err
    result = json.loads((report / "metrics.json").read_text())
    assert 0 <= result["model"]["mace"] <= 1
    assert result["meta"]["bounds"] == {"bounds": [0.0, None], "certain_fraction": pytest.approx(certain.mean())}
    assert "are certain for the model and every baseline" in (report / "report.md").read_text()
    # the baselines get the same certain pixels: bicubic's error on them is gone
    from podiff.baselines import bicubic

    lr, truth = torch.from_numpy(p.lr), torch.from_numpy(p.truth)
    plain = bicubic(lr, 4)
    assert result["bicubic"]["rmse"] == pytest.approx(float((apply(plain, lr, (0, None), 4)[0] - truth).pow(2)
                                                            .mean().sqrt()), rel=1e-5)
    assert result["bicubic"]["rmse"] < float((plain - truth).pow(2).mean().sqrt())


@pytest.mark.parametrize("value", ["2,1", "1", "a,b", ","])
def test_bad_bounds_are_usage_errors(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "x.npz", "--out", "o", "--bounds", value])
    assert exit_.value.code == 2 and "--bounds" in capsys.readouterr().err


@pytest.mark.slow
def test_sst_demo_writes_a_prediction_on_the_files_coordinates(tmp_path, capsys):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("iris_sample_data")
    code, out, err = run(capsys, "demo", "--dataset", "sst", "--out", tmp_path / "demo", "--steps", 2,
                         "--num-samples", 2, "--sample-steps", 1, "--quiet", "--crop", 8)
    assert code == 0, err
    windows = json.loads((tmp_path / "demo" / "run" / "train.json").read_text())["training_windows"]
    from podiff.model.pipeline import PODiffPipeline

    model = PODiffPipeline.load(tmp_path / "demo" / "run" / "model")
    assert model.config.crop == 8  # 8-token crops of the 4 × 108-token grid, at whole patches: 1 × 101 windows
    assert windows == ({"windows": 101, "crop": 8, "shifts": False} if model.pod.basis_kind == "shared" else
                       {"windows": 1, "crop": 0, "shifts": False})
    pred = xr.open_dataset(tmp_path / "demo" / "prediction.nc")
    assert pred["mean"].dims == ("time", "latitude", "longitude") and pred.sizes["time"] == 8
    assert str(pred["time"].values[-1])[:7] == "2010-09" and pred["mean"].attrs["units"] == "K"
    assert np.isnan(pred["mean"].values).any() and np.isfinite(pred["mean"].values).any()  # land NaN, sea not
    from PIL import Image

    width, height = Image.open(tmp_path / "demo" / "report" / "fields.png").size
    assert height > width / 3  # the 16×432 strips stacked, not in a row


def test_help_of_every_command(capsys):
    """In process: each subcommand's --help prints its usage and exits 0."""
    for sub in ([], ["train"], ["sample"], ["evaluate"], ["demo"], ["fit-pod"], ["info"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*sub, "--help"])
        assert exit_info.value.code == 0 and "usage: podiff" in capsys.readouterr().out


def test_entry_point_runs_as_a_module():
    """One subprocess for what only a subprocess shows: ``python -m podiff.cli`` is the command."""
    out = subprocess.run([sys.executable, "-m", "podiff.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "podiff 0.1.0" in out.stdout


def test_default_train_keeps_its_best_validation_model_and_beats_bicubic_on_held_out_fields(tmp_path, capsys):
    """A user's few dozen fields (with land) and the documented commands, with only an upper bound on
    the steps: without the refit on every field (``--no-refit``) the saved model is the best
    validation step's, and it beats bicubic on new fields."""
    from podiff.diffusion.training import Trainer
    from podiff.model.pipeline import PODiffPipeline

    g = torch.Generator().manual_seed(5)
    smooth = F.avg_pool2d(F.avg_pool2d(torch.randn(40, 1, 24, 24, generator=g), 5, stride=1), 5, stride=1)
    hr = smooth * 5 + 290.0
    hr[:, :, :4, :4] = float("nan")
    np.savez(tmp_path / "train.npz", hr=hr[:32].numpy())
    np.savez(tmp_path / "test.npz", hr=hr[32:].numpy())
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--data", tmp_path / "train.npz", "--scale", 4, "--out", run_dir,
                         "--steps", 300, "--eval-every", 25, "--no-refit")
    assert code == 0, err
    assert "training on 27 of the 32 fields" in out and "validating on the last 5" in out and "POD:" in out
    info = json.loads((run_dir / "train.json").read_text())
    assert info["val_indices"] == [27, 31] and info["best_step"] is not None
    assert info["spread_calibration"] == "members" and 0.5 <= info["spread"] <= 2.0
    assert info["error_shape"] == "validation"
    assert {"ridge", "regression"} <= set(info["baselines"]) and info["validation"]["rmse"] > 0
    best = min(info["val_loss"], key=lambda v: v[1])
    assert info["best_step"] == best[0]
    pipe = PODiffPipeline.load(run_dir / "model")
    from podiff.data.datasets import load_npz

    ds = load_npz(tmp_path / "train.npz", 4)
    lr_val, hr_val = ds.lr[27:], ds.hr[27:]
    prediction = pipe.mean_model.predict(lr_val)
    x0, cond = pipe.target_tokens(hr_val, mu=prediction), pipe.condition_tokens(lr_val, prediction)
    assert Trainer(pipe).validation_loss(x0.float(), cond.float()) == pytest.approx(best[1], rel=1e-5)

    pred = tmp_path / "pred.npz"
    code, _, err = run(capsys, "sample", "--model", run_dir, "--data", tmp_path / "test.npz", "--scale", 4,
                       "--split", "all", "--num-samples", 16, "--out", pred, "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", "--pred", pred, "--data", tmp_path / "test.npz", "--scale", 4,
                       "--out", tmp_path / "report", "--quiet")
    assert code == 0, err
    result = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert result["model"]["rmse"] < result["bicubic"]["rmse"], result
    # the scores use the saved error shape; the Gaussian's are kept beside them
    from podiff.evaluation import error_shape, metrics

    written = read_prediction(pred)
    edges = pipe.calibration.error_band_edges
    assert len(edges) == 1 and len(edges[0]) == error_shape.ERROR_BANDS - 1  # one channel, the default bands
    assert len(pipe.calibration.error_quantiles) == error_shape.ERROR_BANDS
    assert np.allclose(written.attrs["error_quantiles"], pipe.calibration.error_quantiles)
    assert np.allclose(written.attrs["error_band_edges"], edges)
    truth = torch.from_numpy(np.load(tmp_path / "test.npz")["hr"])
    mean, variance = torch.from_numpy(written.mean), torch.from_numpy(written.variance)
    expected = error_shape.crps(mean, variance, truth, pipe.calibration.error_quantiles, edges=edges)
    assert result["model"]["crps"] == pytest.approx(expected, rel=1e-6)
    assert result["model"]["crps_gaussian"] == pytest.approx(metrics.crps_gaussian(mean, variance, truth), rel=1e-6)
    shaped = error_shape.coverage(mean, variance, truth, pipe.calibration.error_quantiles, edges=edges)
    assert result["model"]["mace"] == pytest.approx(metrics.mace(shaped))
    assert {"ridge",
            "regression"} <= set(result) and "tuned on its validation fields" in result["meta"]["baselines"]["ridge"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| ridge |" in report and "| regression |" in report
    assert "the error shape of the validation fields" in report and "With a Gaussian shape instead" in report


@pytest.mark.parametrize("option, value", [("--scale", "0"), ("--batch-size", "0"), ("--steps", "-5"),
                                            ("--val-fraction", "1"), ("--energy", "0"), ("--patience", "-1")])
def test_bad_option_values_are_usage_errors(option, value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "x.npz", "--out", "o", option, value])
    assert info.value.code == 2 and option in capsys.readouterr().err
