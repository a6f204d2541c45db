"""What the workflows share: their error, the data a request names, output folders, a saved model."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class WorkflowError(Exception):
    """A user-facing error of a workflow (the command prints it as one line, exit status 1)."""


@contextlib.contextmanager
def naming(source):
    """Errors raised by what the data holds (too few fields, nothing valid) name the data."""
    try:
        yield
    except (ValueError, WorkflowError) as exc:
        text = str(exc)
        if Path(str(source)).name not in text:
            raise type(exc)(f"{source}: {text}") from None
        raise


@dataclass
class DataSource:
    """Fields a request names: ``data`` (a packaged dataset ``sst``/``mri``/``images``, a netCDF
    file, a Zarr store, a glob of netCDF files or an ``.npz``), the ``scale`` (None: from the
    model or the file), what of a netCDF/Zarr dataset is read (``var``, ``channels``,
    ``dims``, ``time``: see ``data.datasets.load``) and the ``covariates`` that go with it
    (``data.covariates.CovariateSpec``: predictors, static fields, position, season)."""

    data: str
    scale: int | None = None
    var: str | None = None
    channels: list | None = None
    dims: list | None = None
    time: str | None = None
    covariates: object = None

    def selection(self) -> dict:
        return {"dims": self.dims, "channels": self.channels, "time": self.time}

    def load(self, scale=None, with_covariates: bool = True):
        """The dataset; its input ``lr`` holds the covariate channels after the target's."""
        from podiff.data import datasets

        ds = datasets.load(self.data, scale if scale is not None else self.scale, self.var, **self.selection())
        return self.attach_covariates(ds) if with_covariates else ds

    def attach_covariates(self, ds):
        """``ds`` with the covariates' channels appended to its input (unchanged without covariates)."""
        from podiff.data.covariates import attach, load_covariates

        if self.covariates is None or self.covariates.empty:
            return ds
        try:
            return attach(ds, load_covariates(self.covariates, ds.grid, ds.scale))
        except (ValueError, FileNotFoundError) as exc:
            raise WorkflowError(str(exc)) from None


def _npz_has(path, key: str) -> bool:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return key in archive.files
    except Exception:  # unreadable: load_npz says so, naming the file
        return False


def data_for_model(source: DataSource, pipe):
    """The data at the model's scale and grid: high-resolution fields (truth; the input made by
    block averages, or the file's own ``lr``) or fields on the model's low-resolution grid (input
    only). A model that samples any domain (``PODiffPipeline.domain_limits()`` empty) takes fields
    of another size as high-resolution fields (cropped to whole input cells). Anything else is a
    one-line error naming the expected and the actual (and what binds the model to its grid)."""
    from podiff.data import datasets
    from podiff.data.fields import sniff

    scale = pipe.config.scale
    if source.scale is not None and source.scale != scale:
        raise WorkflowError(f"--scale {source.scale} does not match the model's scale {scale} "
                            f"(sample and evaluate take it from the model; --scale there is only a check)")
    C = pipe.offset.numel()
    H, W = pipe.image_size
    h, w = H // scale, W // scale
    if source.data in datasets.DATASETS or (sniff(source.data) == "npz" and _npz_has(source.data, "lr")):
        ds = source.load(scale, with_covariates=False)
    else:
        raw = source.load(1, with_covariates=False)
        H0, W0 = raw.hr.shape[-2:]
        if (H0, W0) not in ((H, W), (h, w)) and raw.hr.shape[1] == C and not pipe.domain_limits():
            H, W = H0 - H0 % scale, W0 - W0 % scale  # a model of any domain: the file's fields are the truth
            h, w = H // scale, W // scale
        if (H0 - H0 % scale, W0 - W0 % scale) == (H, W) and (H0, W0) != (H, W):  # cropped as training cropped
            raw = datasets.Dataset(raw.hr[..., :H, :W].contiguous(), raw.hr[..., :H, :W].contiguous(), 1, raw.name,
                                   raw.meta, raw.grid.crop(H, W) if raw.grid is not None else None)
        size = tuple(raw.hr.shape[-2:])
        if raw.hr.shape[1] == C and size == (H, W):
            ds = datasets.Dataset(raw.hr, datasets.block_average(raw.hr, scale), scale, raw.name, raw.meta, raw.grid)
        elif raw.hr.shape[1] == C and size == (h, w):
            ds = datasets.as_low_resolution(raw, scale)
        else:
            limits = pipe.domain_limits()
            why = f" (it samples only its training grid: it holds {'; '.join(limits)})" if limits else ""
            raise WorkflowError(f"{source.data}: fields [{raw.hr.shape[1]}, {size[0]}, {size[1]}] fit neither the "
                                f"model's high-resolution grid [{C}, {H}, {W}] nor its input grid [{C}, {h}, {w}]"
                                + why)
    if tuple(ds.lr.shape[1:]) != (C, h, w):
        raise WorkflowError(f"{source.data}: input [{', '.join(map(str, ds.lr.shape[1:]))}] does not fit the model's "
                            f"input grid [{C}, {h}, {w}]")
    ds = source.attach_covariates(ds)
    given, trained = ds.meta.get("covariates", []), list(pipe.config.covariates)
    if given != trained:
        def shown(names):
            return f"{len(names)} ({', '.join(names[:4])}{', …' if len(names) > 4 else ''})" if names else "none"

        raise WorkflowError(f"the model was trained with covariates {shown(trained)}; --predictors/--static/"
                            f"--position/--season here give {shown(given)}: pass the same as to train")
    return ds


def refuse_existing(path: Path, overwrite: bool, resume_hint: bool = False) -> None:
    """An output that exists and is not empty is an error unless ``overwrite``."""
    if path.exists() and any(path.iterdir() if path.is_dir() else [path]) and not overwrite:
        raise WorkflowError(f"{path} exists and is not empty; pass --overwrite to replace it"
                            + (" or --resume to continue" if resume_hint else ""))


def prepare_out(path: Path, overwrite: bool, resume: bool = False) -> None:
    if not resume:
        refuse_existing(path, overwrite, resume_hint=path.is_dir())
    if path.exists() and overwrite and not resume:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def load_model(model: Path):
    """The ``PODiffPipeline`` of a run folder (``RUN/model``) or of a model folder."""
    from podiff.model.pipeline import PODiffPipeline

    if not (model / "model" / "config.json").is_file() and not (model / "config.json").is_file():
        raise WorkflowError(f"no trained model in {model} (expected {model / 'model' / 'config.json'})")
    return PODiffPipeline.load(model / "model" if (model / "model").is_dir() else model)


def load_baselines(pipe, model_dir: Path) -> dict:
    """The baselines ``train`` saved in ``model_dir/baselines``, by name (``podiff.baselines``)."""
    from podiff.baselines import BASELINES

    folder = model_dir / "baselines"
    return {name: entry.load(pipe, folder / entry.file) for name, entry in BASELINES.items()
            if entry.file is not None and (folder / entry.file).is_file()}


def load_spreads(model_dir: Path) -> dict:
    """The baselines' error spreads ``train`` saved in ``model_dir/baselines`` (``<name>.spread.safetensors``:
    ``baselines.calibrated.ErrorSpread``), by name."""
    from podiff.baselines.calibrated import SUFFIX, ErrorSpread

    folder = model_dir / "baselines"
    return {path.name[: -len(SUFFIX)]: ErrorSpread.load(path) for path in sorted(folder.glob(f"*{SUFFIX}"))}


__all__ = ["DataSource", "WorkflowError", "data_for_model", "load_baselines", "load_model", "load_spreads", "naming",
           "prepare_out", "refuse_existing"]
