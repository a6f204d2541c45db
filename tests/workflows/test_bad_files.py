"""Property-based: whatever file a user hands the command, it runs or ends with one line that names
the file — never a traceback — and a failure leaves no output behind. The command's numeric
options likewise: in range, or argparse's one-line usage error."""

import contextlib
import io
import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from podiff.cli import build_parser, main  # noqa: E402

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "uint8", "bool"]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def arrays(draw):
    rank = draw(st.sampled_from([3, 3, 3, 4, 1, 2, 5]))  # mostly fields, some odd ranks
    size = st.sampled_from([8, 4, 6, 3, 5, 9, 2, 7, 0, 1])  # shrinks towards 8: a field, not an empty one
    shape = tuple(draw(st.lists(size, min_size=rank, max_size=rank)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(size=shape) * draw(st.sampled_from([1.0, 100.0]))
    if dtype.startswith("float") and values.size:
        flat = values.reshape(-1)
        pattern = draw(st.sampled_from(["none", "nan", "inf", "all-nan", "corner"]))
        if pattern == "nan":
            flat[rng.random(flat.size) < 0.3] = np.nan
        elif pattern == "inf":
            flat[rng.integers(flat.size)] = np.inf
        elif pattern == "all-nan":
            flat[:] = np.nan
        elif pattern == "corner":
            flat[: max(1, flat.size // 4)] = np.nan
    return values.astype(dtype) if dtype != "bool" else values > 0


def run_fit_pod(path, scale, out, extra=()):
    err, outs = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outs):
        code = main(["fit-pod", "--data", str(path), "--scale", str(scale), "--rank", "2", "--out", str(out),
                     "--quiet", *extra])
    return code, err.getvalue()


def check_outcome(code, err, path, out):
    assert code in (0, 1), err
    hypothesis.event("ran" if code == 0 else "refused: " + err.split(": error: ")[-1].replace(str(path), "FILE")[:60])
    if code == 1:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("podiff fit-pod: error: "), err
        assert path.name in lines[0], f"the error does not name the file: {lines[0]}"
        assert not out.exists(), "a failed run left its output behind"
    else:
        assert out.is_file()


@SETTINGS
@given(values=arrays(), key=st.sampled_from(["hr", "hr", "x"]), scale=st.integers(1, 5))
def test_npz_inputs(tmp_path_factory, values, key, scale):
    root = tmp_path_factory.mktemp("npz")
    path, out = root / "fields.npz", root / "pod.safetensors"
    np.savez(path, **{key: values})
    code, err = run_fit_pod(path, scale, out)
    check_outcome(code, err, path, out)


@st.composite
def datasets(draw):
    xr = pytest.importorskip("xarray")
    values = draw(arrays())
    if values.dtype == np.bool_ or values.dtype == np.float16:
        values = values.astype("f4")  # netCDF stores neither
    dims = {1: ["lon"], 2: ["lat", "lon"], 3: ["time", "lat", "lon"], 4: ["time", "level", "lat", "lon"],
            5: ["time", "level", "band", "lat", "lon"]}[values.ndim]
    if draw(st.booleans()):  # names the reader does not know: the last two dimensions are the grid
        dims = [f"d{i}" for i in range(values.ndim)]
    coords = {}
    for d, n in zip(dims, values.shape, strict=False):
        kind = draw(st.sampled_from(["none", "regular", "reversed", "duplicated", "shuffled"]))
        if kind == "none" or n == 0:
            continue
        c = np.arange(n, dtype="f8") * 0.5
        if kind == "reversed":
            c = c[::-1].copy()
        elif kind == "duplicated" and n > 1:
            c[1] = c[0]
        elif kind == "shuffled" and n > 2:
            c[[0, 2]] = c[[2, 0]]
        coords[d] = c
    name = draw(st.sampled_from(["sst", "sst", "tos"]))
    encoding = {}
    if values.dtype.kind == "f" and draw(st.booleans()):
        encoding[name] = {"dtype": "int16", "scale_factor": 0.01, "add_offset": 1.0, "_FillValue": np.int16(-32767)}
    elif values.dtype.kind == "f":
        encoding[name] = {"_FillValue": draw(st.sampled_from([np.float32(-999.0), np.float32(1e20)]))}
    if encoding.get(name, {}).get("dtype") == "int16":
        values = np.clip(np.nan_to_num(values.astype("f8"), posinf=300.0, neginf=-300.0), -300, 300)
    fmt = draw(st.sampled_from(["NETCDF4", "NETCDF3_CLASSIC", "zarr"]))
    if fmt == "NETCDF3_CLASSIC" and values.dtype in (np.uint8, np.int64, np.uint64):
        values = values.astype("i2")
    return xr.Dataset({name: (dims, values)}, coords=coords), encoding, fmt


@SETTINGS
@given(spec=datasets(), scale=st.integers(1, 5), var=st.sampled_from([None, "sst"]))
def test_netcdf_and_zarr_inputs(tmp_path_factory, spec, scale, var):
    pytest.importorskip("netCDF4")
    pytest.importorskip("zarr")
    ds, encoding, fmt = spec
    root = tmp_path_factory.mktemp("nc")
    out = root / "pod.safetensors"
    path = root / ("fields.zarr" if fmt == "zarr" else "fields.nc")
    try:
        if fmt == "zarr":
            ds.to_zarr(path, mode="w", encoding=encoding, consolidated=False)
        else:
            ds.to_netcdf(path, format=fmt, encoding=encoding)
    except Exception:  # a file the format itself cannot hold (netCDF-3: two empty dimensions)
        hypothesis.reject()
    code, err = run_fit_pod(path, scale, out, ("--var", var) if var else ())
    check_outcome(code, err, path, out)


NUMERIC = {"--scale": (int, 1, math.inf), "--steps": (int, 0, math.inf), "--batch-size": (int, 1, math.inf),
           "--rank": (int, 1, math.inf), "--patch-size": (int, 1, math.inf), "--eval-every": (int, 1, math.inf),
           "--patience": (int, 0, math.inf), "--sample-steps": (int, 1, math.inf),
           "--val-fraction": (float, 0.0, 1.0), "--energy": (float, 0.0, 1.0),
           "--learning-rate": (float, 0.0, math.inf),
           "--memory-mb": (float, 0.0, math.inf), "--error-bands": (int, 1, math.inf),
           "--attention-window": (int, 0, math.inf), "--crop": (int, 0, math.inf)}


@settings(max_examples=150, deadline=None)
@given(option=st.sampled_from(sorted(NUMERIC)),
       text=st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                      st.sampled_from(["", "abc", "1e400", "-0", "nan", "inf", "0x10", "3.5", " 2"])))
def test_numeric_options_are_validated(option, text):
    kind, low, high = NUMERIC[option]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(["train", "--data", "x.npz", "--out", "o", option, text])
        except SystemExit as exit_info:
            assert exit_info.code == 2
            assert f"argument {option}" in err.getvalue() and "Traceback" not in err.getvalue()
            return
    value = getattr(args, option.lstrip("-").replace("-", "_"))
    assert isinstance(value, kind) and math.isfinite(value) and low <= value <= high
    if option in ("--val-fraction",):
        assert value < 1.0
    if option in ("--attention-window", "--crop"):
        assert value != 1
    if option in ("--energy", "--learning-rate", "--memory-mb"):
        assert value > 0.0


def test_failed_train_and_evaluate_leave_nothing_behind(tmp_path):
    np.savez(tmp_path / "two.npz", hr=np.random.default_rng(0).normal(size=(2, 8, 8)).astype("f4"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--data", str(tmp_path / "two.npz"), "--scale", "2", "--out", str(tmp_path / "run"),
                     "--quiet"])
    assert code == 1 and "two.npz" in err.getvalue() and not (tmp_path / "run").exists()


def test_atomic_directory_keeps_the_old_folder_on_failure(tmp_path):
    from podiff.core.io import atomic_directory

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "old.md").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "report") as folder:
            (folder / "new.md").write_text("half")
            raise RuntimeError("figure failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["old.md"]
    with atomic_directory(tmp_path / "report") as folder:
        (folder / "new.md").write_text("whole")
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["new.md"]
