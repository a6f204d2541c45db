"""Datasets that install with packages (nothing downloads at run time), and users' files.

Every loader returns a ``Dataset``: ``hr [N, C, H, W]`` float32 (NaN = masked), ``lr``
``[N, C, H/scale, W/scale]`` (block averages of ``hr`` unless the file brings its own),
``scale``, a ``name`` and ``meta``. ``dataset.split("train" | "val" | "test" | "all")``
cuts the sample axis in order (time order for SST: the test part is the last).

- ``load_sst``: OSTIA monthly sea-surface temperature (``iris-sample-data``), 54 months of an
  18 × 432 tropical band in kelvin; land is NaN. Read with ``h5py``.
- ``load_mri``: axial slices of the MNI152 T1 template shipped in the ``nilearn`` wheel
  (the file only: nilearn is not imported), read with ``nibabel``, scaled to [0, 1].
- ``load_images``: scikit-image's bundled images as grey crops.
- ``load_npz`` / ``load_netcdf``: users' files.

Missing optional packages raise ``MissingDependency`` with the one line to install them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test", "all", "train+val")


class MissingDependency(ImportError):
    """An optional package is missing; the message says which extra installs it."""


def _require(module: str, purpose: str, extra: str = "data"):
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(f"{purpose} needs the '{module}' package: pip install 'podiff[{extra}]'")
    return importlib.import_module(module)


def _package_file(package: str, relative: str, purpose: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(f"{purpose} needs the '{package}' package: pip install 'podiff[data]'")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{purpose}: {path} is not in the installed '{package}' package")
    return path


def block_average(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C, H/scale, W/scale]``: the mean of the valid pixels of each block
    (NaN where a block has none)."""
    N, C, H, W = hr.shape
    if H % scale or W % scale:
        raise ValueError(f"hr size {H}×{W} is not divisible by scale={scale}")
    blocks = hr.reshape(N, C, H // scale, scale, W // scale, scale)
    valid = ~torch.isnan(blocks)
    total = torch.where(valid, blocks, 0.0).sum((3, 5))
    count = valid.sum((3, 5))
    return torch.where(count > 0, total / count.clamp_min(1), float("nan"))


def split_indices(n: int, split: str, fractions=(0.7, 0.15, 0.15)) -> np.ndarray:
    """Indices of ``split`` for ``n`` ordered samples: train first, then val, test last."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if split == "all":
        return np.arange(n)
    n_test = max(1, int(round(n * fractions[2])))
    n_val = max(1, int(round(n * fractions[1]))) if n >= 3 else 0
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{n} samples are too few to split into train/val/test")
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n),
              "train+val": (0, n_train + n_val)}
    lo, hi = bounds[split]
    return np.arange(lo, hi)


@dataclass
class Dataset:
    """High- and low-resolution fields with their provenance."""

    hr: torch.Tensor
    lr: torch.Tensor
    scale: int
    name: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.hr.shape[0] != self.lr.shape[0]:
            raise ValueError(f"lr and hr must hold the same number of samples; got {self.lr.shape[0]} "
                             f"and {self.hr.shape[0]}")
        if self.hr.shape[0] == 0:
            raise ValueError(f"dataset {self.name!r} is empty")

    def __len__(self) -> int:
        return self.hr.shape[0]

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """``(lr, hr, indices)`` of one split."""
        idx = split_indices(len(self), split)
        return self.lr[idx], self.hr[idx], idx


def _crop_to_scale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    H, W = hr.shape[-2:]
    return hr[..., : H - H % scale, : W - W % scale]


def load_sst(scale: int = 4) -> Dataset:
    """OSTIA monthly SST ``[54, 1, 16, 432]`` (cropped to a multiple of ``scale``; kelvin; land NaN)."""
    h5py = _require("h5py", "the SST dataset")
    path = _package_file("iris_sample_data", "sample_data/ostia_monthly.nc", "the SST dataset")
    with h5py.File(path, "r") as f:
        var = f["surface_temperature"]
        values = var[:].astype(np.float64)
        fill = var.attrs.get("_FillValue")
        lat, lon = f["latitude"][:], f["longitude"][:]
    if fill is not None:
        values[np.isclose(values, float(np.asarray(fill).ravel()[0]))] = np.nan
    hr = _crop_to_scale(torch.from_numpy(values).float()[:, None], scale)
    meta = {"source": str(path), "units": "K", "latitude": [float(lat[0]), float(lat[hr.shape[-2] - 1])],
            "longitude": [float(lon[0]), float(lon[hr.shape[-1] - 1])], "order": "time"}
    return Dataset(hr, block_average(hr, scale), scale, "sst", meta)


def load_mri(scale: int = 4, size: int = 128, step: int = 2) -> Dataset:
    """Axial slices of the MNI152 T1 template, centre-cropped/padded to ``size``², in [0, 1]."""
    nib = _require("nibabel", "the MRI dataset")
    path = _package_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                         "the MRI dataset")
    volume = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float64)  # x, y, z
    volume = (volume - volume.min()) / max(volume.max() - volume.min(), 1e-12)
    slices = []
    for z in range(0, volume.shape[2], step):
        img = volume[:, :, z].T[::-1]
        if img.mean() < 0.02:  # empty slices above/below the head
            continue
        canvas = np.zeros((size, size))
        h, w = img.shape
        ys, xs = max(0, (h - size) // 2), max(0, (w - size) // 2)
        crop = img[ys : ys + size, xs : xs + size]
        oy, ox = (size - crop.shape[0]) // 2, (size - crop.shape[1]) // 2
        canvas[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] = crop
        slices.append(canvas)
    hr = _crop_to_scale(torch.from_numpy(np.stack(slices)).float()[:, None], scale)
    return Dataset(hr, block_average(hr, scale), scale, "mri", {"source": str(path), "order": "axial slice"})


IMAGES = ("camera", "astronaut", "coffee", "chelsea", "coins", "moon", "page", "text", "rocket", "immunohistochemistry")


def load_images(scale: int = 4, size: int = 64, names=IMAGES, rgb: bool = False) -> Dataset:
    """Non-overlapping ``size``² crops of scikit-image's bundled images, in [0, 1]: grey
    (``C = 1``), or with ``rgb`` colour (``C = 3``; grey images repeated on the three channels)."""
    skdata = _require("skimage.data", "the natural-image dataset")
    color = _require("skimage.color", "the natural-image dataset")
    crops = []
    for name in names:
        img = np.asarray(getattr(skdata, name)(), dtype=np.float64)
        img = img / (255.0 if img.max() > 1.0 else 1.0)
        if rgb:
            img = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]
            img = np.moveaxis(img, -1, 0)  # C, H, W
        else:
            img = (color.rgb2gray(img[..., :3]) if img.ndim == 3 else img)[None]
        for y in range(0, img.shape[1] - size + 1, size):
            for x in range(0, img.shape[2] - size + 1, size):
                crops.append(img[:, y : y + size, x : x + size])
    hr = _crop_to_scale(torch.from_numpy(np.stack(crops)).float(), scale)
    return Dataset(hr, block_average(hr, scale), scale, "images",
                   {"images": list(names), "rgb": rgb, "order": "image, row"})


def _as_nchw(array: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{path}: '{key}' must be [N, C, H, W] or [N, H, W]; got shape {array.shape}")
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{path}: '{key}' must hold numbers; got dtype {array.dtype}")
    if array.shape[0] == 0 or array.size == 0:
        raise ValueError(f"{path}: '{key}' holds no data; got shape {array.shape}")
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def load_npz(path: str | Path, scale: int | None = None) -> Dataset:
    """A ``.npz`` with ``hr`` (and optionally ``lr``): ``[N, C, H, W]`` or ``[N, H, W]``, NaN = masked.

    Without ``lr``, it is made by block-averaging ``hr`` with ``scale`` (required then); with
    ``lr``, ``scale`` is inferred and must match when given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable .npz file: {exc}") from None
    with archive:
        if "hr" not in archive.files:
            raise ValueError(f"{path} has no 'hr' array (keys: {sorted(archive.files)}); it needs 'hr' and "
                             f"optionally 'lr'")
        hr = _as_nchw(archive["hr"], "hr", path)
        lr = _as_nchw(archive["lr"], "lr", path) if "lr" in archive.files else None
    if lr is None:
        if scale is None:
            raise ValueError(f"{path} has no 'lr': give --scale to make it by block-averaging 'hr'")
        hr = _crop_to_scale(hr, scale)
        lr = block_average(hr, scale)
    else:
        if lr.shape[0] != hr.shape[0]:
            raise ValueError(f"{path}: 'lr' has {lr.shape[0]} samples but 'hr' has {hr.shape[0]}")
        inferred = hr.shape[-1] // lr.shape[-1]
        if hr.shape[-2] != lr.shape[-2] * inferred or hr.shape[-1] != lr.shape[-1] * inferred:
            raise ValueError(f"{path}: 'hr' {tuple(hr.shape[-2:])} is not an integer multiple of "
                             f"'lr' {tuple(lr.shape[-2:])}")
        if scale is not None and scale != inferred:
            raise ValueError(f"{path}: --scale {scale} does not match the file's lr/hr ratio {inferred}")
        scale = inferred
    return Dataset(hr, lr, int(scale), path.stem, {"source": str(path)})


def load_netcdf(path: str | Path, var: str, scale: int) -> Dataset:
    """Variable ``var`` of a netCDF-4 file (``[time, y, x]`` or ``[time, C, y, x]``), fill values
    as NaN, LR by block-averaging."""
    h5py = _require("h5py", "reading netCDF")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    try:
        with h5py.File(path, "r") as f:
            if var not in f:
                names = sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))
                raise ValueError(f"{path} has no variable {var!r} (variables: {names})")
            ds = f[var]
            values = ds[:].astype(np.float64)
            for attr in ("_FillValue", "missing_value"):
                if attr in ds.attrs:
                    values[np.isclose(values, float(np.asarray(ds.attrs[attr]).ravel()[0]))] = np.nan
            scale_factor = float(np.asarray(ds.attrs.get("scale_factor", 1.0)).ravel()[0])
            offset = float(np.asarray(ds.attrs.get("add_offset", 0.0)).ravel()[0])
    except OSError as exc:
        raise ValueError(f"{path} is not a readable netCDF-4/HDF5 file: {exc}") from None
    hr = _crop_to_scale(_as_nchw(values * scale_factor + offset, var, path), scale)
    return Dataset(hr, block_average(hr, scale), scale, f"{path.stem}:{var}", {"source": str(path), "var": var})


DATASETS = {"sst": load_sst, "mri": load_mri, "images": load_images}


def load(name_or_path: str, scale: int | None = None, var: str | None = None) -> Dataset:
    """A packaged dataset by name (``sst``, ``mri``, ``images``) or a user's ``.npz`` / netCDF file."""
    if name_or_path in DATASETS:
        return DATASETS[name_or_path](scale or 4)
    path = Path(name_or_path)
    if path.suffix == ".npz":
        return load_npz(path, scale)
    if path.suffix in (".nc", ".nc4", ".h5", ".hdf5"):
        if var is None:
            raise ValueError(f"{path}: give --var NAME to choose the netCDF variable")
        if scale is None:
            raise ValueError(f"{path}: give --scale to make the low-resolution input")
        return load_netcdf(path, var, scale)
    if not path.exists():
        raise FileNotFoundError(f"no dataset named {name_or_path!r} and no file at {path} "
                                f"(packaged: {sorted(DATASETS)})")
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .npz or netCDF .nc)")
