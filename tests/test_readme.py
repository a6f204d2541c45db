"""The README's and docs/'s Python examples run as written (training and sampling sizes shrunk,
outputs in tmp)."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHRINK = [  # (as written, as run here): only sizes, paths and progress bars change
    ("train_steps=2000", "train_steps=3"),
    ("num_samples=32, steps=50", "num_samples=3, steps=2"),
    ('checkpoint="run.ckpt"', 'checkpoint=str(TMP / "run.ckpt"), progress=False'),
    ('"model/"', 'str(TMP / "model")'),
    ("pod.fit(x)", "pod.fit(x, progress=False)"),
    ('out="run"', 'out=TMP / "run"'),
    ('model="run"', 'model=TMP / "run"'),
    ('out="pred.nc"', 'out=TMP / "pred.nc"'),
    ("num_samples=16, seed=0", "num_samples=4, steps=2, seed=0"),
    ('pod.save("pod.safetensors"); pod = PatchPOD.load("pod.safetensors")',
     'pod.save(TMP / "pod.safetensors"); pod = PatchPOD.load(TMP / "pod.safetensors")'),
]


def small_prediction(path):
    """A prediction file like ``podiff sample --out pred.nc`` writes, for the README's xarray snippet."""
    import numpy as np

    from podiff.data.fields import Axis, Grid
    from podiff.data.prediction_file import Prediction, write_prediction

    grid = Grid(Axis("time", np.arange("2001-01", "2001-03", dtype="datetime64[M]").astype("datetime64[ns]")),
                Axis("lat", np.linspace(-1, 1, 8)), Axis("lon", np.linspace(0, 2, 8)), ["sst"], {"units": "K"},
                "sst.nc", "sst")
    mean = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype("f4")
    write_prediction(path, Prediction(mean, np.ones_like(mean), np.arange(2), {
        "model": "run", "data": "sst.nc", "split": "all", "num_samples": 4, "steps": 20, "scale": 4}, grid=grid))
    return path


def test_readme_python_blocks_run(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("xarray")
    pytest.importorskip("netCDF4")
    import matplotlib

    matplotlib.use("Agg")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2  # fifteen lines of Python, the ops in five
    namespace = _run(README, blocks, tmp_path)
    assert namespace["out"].mean.shape == (20, 1, 32, 32)
    assert namespace["pixel_var"].shape == (8, 3, 64, 64)


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) < 150
    assert not re.search(r"\d\.\d+ ?(K|s|GB|×)\b", text), "measured numbers live in benchmarks/RESULTS.md"


def _run(page, blocks, tmp_path) -> dict:
    namespace = {"TMP": tmp_path, "PRED": small_prediction(tmp_path / "pred_example.nc")}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples that write relative paths write here
    try:
        for block in blocks:
            for old, new in SHRINK:
                block = block.replace(old, new)
            exec(compile(block, str(page), "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_python_blocks_run(page, tmp_path):
    text = page.read_text()
    if "from diffusers import" in text:
        pytest.importorskip("diffusers")
    if "import xarray" in text:
        pytest.importorskip("xarray")
        pytest.importorskip("netCDF4")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    if not blocks:
        pytest.skip(f"{page.name} has no Python example")
    _run(page, blocks, tmp_path)


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_links_stay_inside_the_repository_and_resolve(page):
    """Relative links point at files that exist here; nothing points outside the repository."""
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert resolved.exists(), f"{page.name} links to a missing file: {target}"


#: What the README's commands are run with here: fewer steps and members, no progress.
COMMAND_SHRINK = {"train": ["--steps", "3", "--no-regression-baseline", "--quiet"], "sample": ["--quiet"],
                  "evaluate": ["--quiet"]}


def test_readme_commands_on_a_netcdf_file_run_as_written(tmp_path, monkeypatch):
    """The README's ``podiff train / sample / evaluate`` lines, on netCDF files named as there."""
    xr = pytest.importorskip("xarray")
    pytest.importorskip("netCDF4")
    import shlex

    import numpy as np
    import torch
    import torch.nn.functional as F

    from podiff.cli import main

    g = torch.Generator().manual_seed(3)
    field = F.avg_pool2d(torch.randn(30, 1, 24, 32, generator=g), 5, stride=1)[:, 0] * 5 + 290  # [30, 20, 28]
    field = field[:, :16, :24].numpy().astype("f4")
    time = np.arange("2000-01", "2002-07", dtype="datetime64[M]").astype("datetime64[ns]")
    ds = xr.Dataset({"sst": (("time", "lat", "lon"), field, {"units": "K"})},
                    coords={"time": time, "lat": np.linspace(-4, 4, 16), "lon": np.linspace(100, 112, 24)})
    ds.isel(time=slice(0, 24)).to_netcdf(tmp_path / "sst_train.nc")
    ds.isel(time=slice(24, None)).to_netcdf(tmp_path / "sst_test.nc")
    block = re.search(r"## Your own netCDF or Zarr files\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("podiff ")]
    assert [c[1] for c in commands] == ["train", "sample", "evaluate"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = [("4" if arg == "32" and command[1] == "sample" else arg) for arg in command[1:]]
        assert main(argv + COMMAND_SHRINK[command[1]]) == 0, command
    assert (tmp_path / "report" / "metrics.json").is_file() and (tmp_path / "pred.nc").is_file()


def test_readme_covariates_command_runs_as_written(tmp_path, monkeypatch):
    """The README's ``podiff train`` line with predictors, static fields, position and season."""
    xr = pytest.importorskip("xarray")
    pytest.importorskip("netCDF4")
    import shlex

    import numpy as np

    from podiff.cli import main

    rng = np.random.default_rng(0)
    time = np.arange("2000-01", "2002-01", dtype="datetime64[M]").astype("datetime64[ns]")
    lat, lon = np.linspace(-20, 20, 16), np.linspace(0, 45, 16)
    xr.Dataset({"uwnd": (("time", "lat", "lon"), rng.standard_normal((24, 16, 16)).astype("f4"))},
               coords={"time": time, "lat": lat, "lon": lon}).to_netcdf(tmp_path / "winds_train.nc")
    coarse = {name: (("time", "lat", "lon"), rng.standard_normal((24, 6, 6)).astype("f4")) for name in ("vwnd", "slp")}
    xr.Dataset(coarse, coords={"time": time, "lat": np.linspace(-25, 25, 6), "lon": np.linspace(-5, 50, 6)}
               ).to_netcdf(tmp_path / "coarse.nc")
    static = {name: (("lat", "lon"), rng.random((16, 16)).astype("f4")) for name in ("elevation", "land")}
    xr.Dataset(static, coords={"lat": lat, "lon": lon}).to_netcdf(tmp_path / "static.nc")
    block = re.search(r"Predictors, static fields.*?```bash\n(.*?)```", README.read_text(), re.S).group(1)
    command = shlex.split(block.replace("\\\n", " ").split("#")[0])
    assert command[:2] == ["podiff", "train"] and "--predictors" in command and "--static" in command
    monkeypatch.chdir(tmp_path)
    assert main(command[1:] + COMMAND_SHRINK["train"]) == 0
    import json

    info = json.loads((tmp_path / "run" / "train.json").read_text())
    assert len(info["covariates"]) == 2 + 2 * 16 + 3 + 2  # vwnd, slp; two static fields in 4×4 blocks; position; season
