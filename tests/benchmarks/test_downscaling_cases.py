"""The downscaling cases built from packaged data (``benchmarks/downscaling_cases.py``) and the table
of their reports (``benchmarks/downscaling_table.py``)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

xr = pytest.importorskip("xarray")
pytest.importorskip("netCDF4")
pytest.importorskip("iris_sample_data")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import downscaling_cases  # noqa: E402
import downscaling_table  # noqa: E402


def test_the_trend_case_is_the_sst_warming_by_its_pattern_split_by_time(tmp_path):
    plain, trend = downscaling_cases.build("sst", tmp_path), downscaling_cases.build("sst_trend", tmp_path)
    a = xr.concat([xr.open_dataset(plain / f)["sst"] for f in ("train.nc", "test.nc")], "time")
    b = xr.concat([xr.open_dataset(trend / f)["sst"] for f in ("train.nc", "test.nc")], "time")
    n = a.sizes["time"]
    assert xr.open_dataset(plain / "test.nc").sizes["time"] == round(downscaling_cases.TEST_FRACTION * n)
    added = (b - a).values  # NaN on land
    months = np.arange(n)[:, None, None]
    rate = np.nanmean(added[1:] / months[1:], 0)
    assert np.nanmean(rate) == pytest.approx(0.05, rel=0.05) and 0.2 < np.nanstd(rate) / 0.05 < 1.0
    np.testing.assert_allclose(added[1:] / months[1:], np.broadcast_to(rate, added[1:].shape), rtol=1e-3, atol=1e-4)


def test_the_table_lists_podiff_beside_each_calibrated_baseline(tmp_path):
    report = tmp_path / "case.report"
    report.mkdir()
    result = {"model": {"rmse": 0.1, "crps": 0.05, "crps_gaussian": 0.051, "crps_ensemble_fair": 0.049, "mace": 0.01},
              "ridge": {"rmse": 0.11, "crps": 0.06, "crps_gaussian": 0.058, "mace": 0.02}, "meta": {},
              "comparison": {"rmse_ratio": 0.909, "best_rmse_baseline": "ridge", "crps_ratio": 0.845,
                             "best_calibrated": "ridge"}}
    (report / "metrics.json").write_text(json.dumps(result))
    lines = downscaling_table.rows(report)
    assert lines[0] == "| case | podiff | 0.1 | 0.049 | 0.05 | 0.051 | 0.01 |"
    assert lines[1] == "| case | ridge | 0.11 | — | 0.06 | 0.058 | 0.02 |"
    assert lines[2].startswith("| case | **podiff / best** | 0.909 (ridge) | 0.845 (ridge)")
