"""Datasets that install with packages (nothing downloads at run time), and users' files.

Every loader returns a ``Dataset``: ``hr [N, C, H, W]`` float32 (NaN = masked), ``lr``
``[N, C, H/scale, W/scale]`` (block averages of ``hr`` unless the file brings its own),
``scale``, a ``name`` and ``meta``. ``dataset.split("train" | "val" | "test" | "all")``
cuts the sample axis in order (time order for SST: the test part is the last).

- ``load_sst``: OSTIA monthly sea-surface temperature (``iris-sample-data``), 54 months of an
  18 × 432 tropical band in kelvin; land is NaN. Read through ``load_gridded`` like a user's file.
- ``load_mri``: axial slices of the MNI152 T1 template shipped in the ``nilearn`` wheel
  (the file only: nilearn is not imported), read with ``nibabel``, scaled to [0, 1].
- ``load_images``: scikit-image's bundled images as grey crops, ordered by their place in
  their photograph so every split holds part of every photograph.
- ``load_npz``: a user's ``.npz``; ``load_gridded``: a user's netCDF file, Zarr store or glob
  of netCDF files, read with xarray (``podiff.data.fields``), coordinates kept in ``dataset.grid``.
- ``load``: any of these by name or by the file's content (not its suffix).

Missing optional packages raise ``MissingDependency`` with the one line to install them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from podiff.core.dependencies import MissingDependency, require  # noqa: F401  (MissingDependency: re-exported)

if TYPE_CHECKING:
    from podiff.data.fields import Grid

SPLITS = ("train", "val", "test", "all", "train+val")


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
    """High- and low-resolution fields with their provenance. ``meta["bounds"]``, where present: the
    field's physical bounds ``[lo, hi]`` (either None), which training uses by default
    (``podiff.data.bounds``)."""

    hr: torch.Tensor
    lr: torch.Tensor
    scale: int
    name: str
    meta: dict = field(default_factory=dict)
    grid: Grid | None = None  # coordinates of ``hr`` (gridded files); None for .npz and images

    def __post_init__(self):
        if self.hr.shape[0] != self.lr.shape[0]:
            raise ValueError(f"lr and hr must hold the same number of samples; got {self.lr.shape[0]} "
                             f"and {self.hr.shape[0]}")
        if self.hr.shape[0] == 0:
            raise ValueError(f"dataset {self.name!r} is empty")
        if self.grid is not None and len(self.grid.sample.values) != self.hr.shape[0]:
            raise ValueError(f"dataset {self.name!r}: {len(self.grid.sample.values)} sample coordinates for "
                             f"{self.hr.shape[0]} fields")

    def __len__(self) -> int:
        return self.hr.shape[0]

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """``(lr, hr, indices)`` of one split."""
        idx = split_indices(len(self), split)
        return self.lr[idx], self.hr[idx], idx


def crop_size(H: int, W: int, scale: int, label: str = "hr") -> tuple[int, int]:
    """The largest ``H' × W'`` within ``H × W`` that ``scale`` divides; a grid smaller than
    ``scale`` is an error naming ``label``."""
    if H < scale or W < scale:
        raise ValueError(f"{label}: a {H}×{W} grid is smaller than --scale {scale}")
    return H - H % scale, W - W % scale


def _crop_to_scale(hr: torch.Tensor, scale: int, label: str = "hr") -> torch.Tensor:
    H, W = crop_size(*hr.shape[-2:], scale, label)
    return hr[..., :H, :W]


def _check_finite(values: torch.Tensor, label: str) -> None:
    bad = int(torch.isinf(values).sum())
    if bad:
        raise ValueError(f"{label} holds {bad} infinite value(s); mark missing points with NaN "
                         f"(or _FillValue in netCDF)")


def load_sst(scale: int = 4) -> Dataset:
    """OSTIA monthly SST ``[54, 1, 16, 432]`` (cropped to a multiple of ``scale``; kelvin; land NaN),
    read through ``load_gridded`` as a user's netCDF file is, coordinates included."""
    path = _package_file("iris_sample_data", "sample_data/ostia_monthly.nc", "the SST dataset")
    ds = load_gridded(path, "surface_temperature", scale)
    grid = ds.grid
    meta = {"source": str(path), "units": grid.attrs.get("units", "K"),
            "latitude": [float(grid.y.values[0]), float(grid.y.values[-1])],
            "longitude": [float(grid.x.values[0]), float(grid.x.values[-1])], "order": "time"}
    return Dataset(ds.hr, ds.lr, scale, "sst", meta, grid)


def load_mri(scale: int = 4, size: int = 128, step: int = 2) -> Dataset:
    """Axial slices of the MNI152 T1 template, centre-cropped/padded to ``size``², in [0, 1]
    (``meta["bounds"]``: the space around the head is exactly 0, ``podiff.data.bounds``)."""
    nib = require("nibabel", "the MRI dataset")
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
    return Dataset(hr, block_average(hr, scale), scale, "mri",
                   {"source": str(path), "order": "axial slice", "bounds": [0.0, 1.0]})


IMAGES = ("camera", "astronaut", "coffee", "chelsea", "coins", "moon", "page", "text", "rocket", "immunohistochemistry")


def load_images(scale: int = 4, size: int = 64, names=IMAGES, rgb: bool = False,
                by_position: bool = True) -> Dataset:
    """Non-overlapping ``size``² crops of scikit-image's bundled images, in [0, 1] (``meta["bounds"]``): grey
    (``C = 1``), or with ``rgb`` colour (``C = 3``; grey images repeated on the three channels).

    ``by_position`` (the default) orders the crops by their place in their photograph (raster
    order, as a fraction of its crops), then by photograph, so the ordered split takes about the
    top 70 % of every photograph to train, the next 15 % to validate and the bottom 15 % to test:
    validation and test are then the same kind of picture, which the spread calibration needs
    (photograph by photograph, the validation crops were the white paper of ``page`` and
    ``text`` and the test crops other scenes). ``False``: photograph by photograph, row by row.
    """
    skdata = require("skimage.data", "the natural-image dataset")
    color = require("skimage.color", "the natural-image dataset")
    crops, keys = [], []
    for image_index, name in enumerate(names):
        img = np.asarray(getattr(skdata, name)(), dtype=np.float64)
        img = img / (255.0 if img.max() > 1.0 else 1.0)
        if rgb:
            img = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]
            img = np.moveaxis(img, -1, 0)  # C, H, W
        else:
            img = (color.rgb2gray(img[..., :3]) if img.ndim == 3 else img)[None]
        first = len(crops)
        for y in range(0, img.shape[1] - size + 1, size):
            for x in range(0, img.shape[2] - size + 1, size):
                crops.append(img[:, y : y + size, x : x + size])
        count = len(crops) - first
        keys += [((i + 0.5) / count, image_index) for i in range(count)]
    if not crops:
        raise ValueError(f"size: no photograph in names holds a {size}×{size} crop")
    order = sorted(range(len(crops)), key=keys.__getitem__) if by_position else range(len(crops))
    hr = _crop_to_scale(torch.from_numpy(np.stack([crops[i] for i in order])).float(), scale)
    return Dataset(hr, block_average(hr, scale), scale, "images",
                   {"images": list(names), "rgb": rgb,
                    "order": "place in the photograph, photograph" if by_position else "photograph, row",
                    "photograph": [names[keys[i][1]] for i in order], "bounds": [0.0, 1.0]})


def _as_nchw(array: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{path}: '{key}' must be [N, C, H, W] or [N, H, W]; got shape {array.shape}")
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{path}: '{key}' must hold numbers; got dtype {array.dtype}")
    if array.shape[0] == 0 or array.size == 0:
        raise ValueError(f"{path}: '{key}' holds no data; got shape {array.shape}")
    values = torch.from_numpy(np.asarray(array, dtype=np.float32))
    _check_finite(values, f"{path}: '{key}'")
    return values


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
        hr = _crop_to_scale(hr, scale, f"{path}: 'hr'")
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


def load_gridded(source: str | Path, var: str | None, scale: int, *, dims=None, channels=None,
                 time: str | None = None) -> Dataset:
    """A variable of a netCDF file, Zarr store or glob of netCDF files (``podiff.data.fields.open_field``)
    as ``hr [N, C, H, W]`` (cropped to a multiple of ``scale``), ``lr`` by block averages, and
    ``grid``: the sample, y and x coordinates of ``hr`` and the variable's attributes;
    ``meta["bounds"]`` from its CF valid range, if it declares one (``fields.declared_bounds``)."""
    from podiff.data.fields import one_line, open_field

    field_, grid = open_field(source, var, dims=dims, channels=channels, time=time)
    label = f"{source}: variable {grid.var!r}"
    try:
        values = np.asarray(field_.values)
    except Exception as exc:  # a corrupt chunk, a codec that is missing
        raise ValueError(f"{label} could not be read: {one_line(exc)}") from None
    hr = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    _check_finite(hr, label)
    hr = _crop_to_scale(hr, scale, label)
    H, W = hr.shape[-2:]
    grid = grid.crop(H, W)
    name = f"{Path(str(source)).stem}:{grid.var}"
    meta = {"source": str(source), "var": grid.var}
    if grid.bounds is not None:  # the variable's CF valid range
        meta["bounds"] = list(grid.bounds)
    return Dataset(hr, block_average(hr, scale), scale, name, meta, grid)


def as_low_resolution(ds: Dataset, scale: int) -> Dataset:
    """A dataset whose fields are the low-resolution input (no truth): ``lr`` is ``ds.hr``, ``hr`` is
    NaN on the ``scale``× finer grid, and the grid's coordinates are refined exactly
    (``fields.refine_axis``)."""
    lr = ds.hr
    N, C, h, w = lr.shape
    hr = torch.full((N, C, h * scale, w * scale), float("nan"))
    grid = None
    if ds.grid is not None:
        from podiff.data.fields import refine_axis

        grid = replace(ds.grid, y=refine_axis(ds.grid.y, scale), x=refine_axis(ds.grid.x, scale))
    return Dataset(hr, lr, scale, ds.name, {**ds.meta, "truth": False}, grid)


DATASETS = {"sst": load_sst, "mri": load_mri, "images": load_images}


def load(name_or_path: str, scale: int | None = None, var: str | None = None, *, dims=None, channels=None,
         time: str | None = None) -> Dataset:
    """A packaged dataset by name (``sst``, ``mri``, ``images``), or a user's ``.npz``, netCDF file,
    Zarr store or glob of netCDF files, recognised by content (``fields.sniff``)."""
    from podiff.data.fields import sniff

    if name_or_path in DATASETS:
        return DATASETS[name_or_path](scale or 4)
    kind = sniff(name_or_path)
    path = Path(name_or_path)
    if kind == "npz" or (kind is None and path.suffix == ".npz"):  # a damaged .npz says so
        return load_npz(path, scale)
    if kind in ("netcdf3", "netcdf4", "zarr", "glob"):
        if scale is None:
            raise ValueError(f"{path}: give --scale to make the low-resolution input")
        return load_gridded(name_or_path, var, scale, dims=dims, channels=channels, time=time)
    if not path.exists():
        if path.suffix:
            raise FileNotFoundError(f"no data file at {path}")
        raise FileNotFoundError(f"no dataset named {name_or_path!r} and no file at {path} "
                                f"(packaged: {sorted(DATASETS)})")
    raise ValueError(f"{path} is not an .npz archive, a netCDF file or a Zarr store (read by content)")
