"""The training workflow (``podiff train``): read the fields, hold out the last ones, resolve the
bounds, fit and train the model, calibrate it, fit the baselines beside it, save it all, and
write ``train.json``.

Example (a netCDF file; ``podiff train --data sst.nc --out run`` does the same)::

    from podiff.workflows import TrainRequest, train
    pipe = train(TrainRequest(DataSource("sst.nc", scale=4), out="run"))
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from podiff.config import PipelineConfig, TrainOptions
from podiff.core import distributed
from podiff.core.devices import resolve_device
from podiff.workflows.common import DataSource, WorkflowError, load_baselines, naming, prepare_out


@dataclass
class TrainRequest:
    """A training run: the fields (``source``, the ``split`` of them, the last ``val_count`` or
    ``options.val_fraction`` of which validate), the model (``config``; a fitted POD file ``pod``;
    ``bounds`` ``"auto"``, ``"none"`` or ``[lo, hi]``), how it trains (``options``), where it
    goes (``out``, ``overwrite``, ``resume``) and runs (``device``); ``quiet``: no progress."""

    source: DataSource
    out: str | Path
    config: PipelineConfig = field(default_factory=PipelineConfig)
    options: TrainOptions = field(default_factory=TrainOptions)
    split: str = "all"
    val_count: int | None = None
    pod: str | None = None
    bounds: object = "auto"
    device: object = "auto"
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False


def validation_count(request: TrainRequest, idx) -> int:
    """How many of the fields ``idx`` are held out for validation (the last ones)."""
    n_val = request.val_count
    fraction = request.options.val_fraction
    if n_val is None:
        n_val = math.ceil(fraction * len(idx)) if fraction > 0 else 0
    if len(idx) - n_val < 2:
        raise WorkflowError(f"--split {request.split} holds {len(idx)} fields; holding out {n_val} for validation "
                            f"leaves {len(idx) - n_val} to train on (at least 2 needed; lower --val-fraction)")
    return n_val


def training_stream(request: TrainRequest):
    """netCDF/Zarr training fields larger than ``memory_mb``: ``(stream, lr_val, hr_val, idx, n, bounds)``
    with the validation fields read (an evenly spaced subsample of them if they too exceed the
    budget); ``None`` when the data fit (or are not netCDF/Zarr): the fields are then loaded."""
    from podiff.data.datasets import DATASETS, split_indices
    from podiff.data.fields import open_field, sniff
    from podiff.data.streaming import FieldStream

    source, budget = request.source, request.options.memory_mb
    if (budget is None or source.scale is None or source.data in DATASETS
            or sniff(source.data) not in ("netcdf3", "netcdf4", "zarr", "glob")):
        return None
    field_, grid = open_field(source.data, source.var, **source.selection())
    n = field_.sizes[field_.dims[0]]
    idx = split_indices(n, request.split)
    n_val = validation_count(request, idx)
    label = f"{source.data}: variable {grid.var!r}"
    stream = FieldStream(field_, idx[: len(idx) - n_val], source.scale, label)
    budget_bytes = int(budget * 2**20)
    if stream.nbytes <= budget_bytes:
        return None
    lr_val = hr_val = None
    if n_val:
        held = FieldStream(field_, idx[len(idx) - n_val :], source.scale, label)
        lr_val, hr_val = held.read(held.subsample(budget_bytes))
    return stream, lr_val, hr_val, idx, n, grid.bounds


def resolve_bounds(request: TrainRequest, declared, lr, hr, scale: int):
    """The bounds the model uses: ``[lo, hi]`` (checked on the training fields: an error if they
    break them), none, or with ``auto`` those the data declare (the packaged MRI and images, a
    netCDF/Zarr variable's CF valid range), kept only where the training fields obey them."""
    from podiff.data.bounds import check_bounds, check_pairs

    choice = request.bounds
    if choice == "none":
        return None
    bounds = check_bounds(declared) if choice == "auto" else choice
    if bounds is None:
        return None
    try:
        if hr is not None:
            check_pairs(lr, hr, bounds, scale)
    except ValueError as exc:
        if choice != "auto":
            text = ",".join("" if b is None else f"{b:g}" for b in choice)
            raise WorkflowError(f"--bounds {text}: {exc}") from None
        if not request.quiet:
            print(f"note: the data declare bounds {list(bounds)} but {exc}; training without bounds")
        return None
    return list(bounds)


def train(request: TrainRequest, ds=None):
    """Runs the training workflow; returns the trained ``PODiffPipeline``. ``ds``: the fields
    already loaded (a ``data.datasets.Dataset``), else read from ``request.source``. A run that
    fails leaves no half-made run folder (a checkpoint is kept for ``resume``)."""
    out = Path(request.out)
    existed = out.exists()
    try:
        with naming(request.source.data):
            return _train(request, ds)
    except (WorkflowError, ValueError, RuntimeError, OSError):
        if not existed and out.is_dir() and not (out / "checkpoint.pt").exists() and distributed.rank_world()[0] == 0:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(request: TrainRequest, ds=None):
    from podiff.core.io import write_json
    from podiff.fitting import calibrate_spread, fit, fit_streamed
    from podiff.latent.pod import PatchPOD
    from podiff.model.pipeline import PODiffPipeline

    source, options, quiet = request.source, request.options, request.quiet
    streamed = None if ds is not None else training_stream(request)
    if streamed is None:
        ds = ds or source.load()
        scale, n_fields = ds.scale, len(ds)
        lr, hr, idx = ds.split(request.split)
    else:
        stream, lr_val, hr_val, idx, n_fields, streamed_bounds = streamed
        scale = source.scale
    out = Path(request.out)
    rank, world = distributed.rank_world()
    if streamed is not None and world > 1:
        raise WorkflowError(f"{source.data}: training fields larger than --memory-mb stream in one process; "
                            f"raise --memory-mb above {stream.nbytes / 2**20:.0f} to train under torchrun")
    if rank == 0:
        prepare_out(out, request.overwrite, resume=request.resume)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    n_val = validation_count(request, idx)
    train_idx, val_idx = idx[: len(idx) - n_val], idx[len(idx) - n_val :]
    if streamed is None:
        lr_val, hr_val = lr[len(train_idx) :], hr[len(train_idx) :]
        lr, hr = lr[: len(train_idx)], hr[: len(train_idx)]
    if rank == 0 and not quiet:
        held = (f"validating on the last {n_val} (fields {int(val_idx[0])}-{int(val_idx[-1])}, --val-fraction "
                f"{options.val_fraction})" if n_val else "no validation (--val-fraction 0)")
        print(f"training on {len(train_idx)} of the {n_fields} fields of {source.data} (--split {request.split}), "
              f"{held}")
    stream_info = None
    if streamed is not None:
        budget_bytes = int(options.memory_mb * 2**20)
        fitted = stream.subsample(budget_bytes)
        stream_info = {"memory_mb": options.memory_mb, "train_mib": stream.nbytes / 2**20,
                       "fit_fields": len(fitted), "val_fields": 0 if hr_val is None else hr_val.shape[0]}
        if not quiet:
            print(f"streaming: the {len(stream)} training fields ({stream.nbytes / 2**20:.0f} MiB) exceed --memory-mb "
                  f"{options.memory_mb:g}; scaling, ridge and POD are fitted on {len(fitted)} evenly spaced fields, "
                  f"validation uses {stream_info['val_fields']} of {n_val}, and each step reads its batch from the "
                  f"file")
    if world > 1:  # each rank reads its contiguous shard; the pipeline reduces and gathers exactly
        rows = distributed.shard(len(train_idx), rank, world)
        lr, hr = lr[rows], hr[rows]
    device = resolve_device(request.device)
    if request.pod and request.config.residual != "none":
        raise WorkflowError("--pod gives a POD of the fields themselves; use it with --residual none "
                            "(a residual model fits its POD to what the ridge misses)")
    pod = PatchPOD.load(request.pod) if request.pod else None
    declared = ds.meta.get("bounds") if streamed is None else streamed_bounds
    # every field of the data (the same decision on every rank), or the validation fields when streamed
    bounds = resolve_bounds(request, declared, lr_val if streamed is not None else ds.lr,
                            hr_val if streamed is not None else ds.hr, scale)
    if bounds is not None and rank == 0 and not quiet:
        print(f"bounds {bounds}: blocks whose input sits at a bound are certain (--bounds none to drop)")
    config = replace(request.config, scale=scale, bounds=bounds)
    pipe = PODiffPipeline(config, pod=pod, device=device)  # fit moves the data there
    t0 = time.perf_counter()
    fit_options = dict(progress=not quiet, checkpoint=out / "checkpoint.pt", resume=request.resume,
                       checkpoint_every=options.checkpoint_every, validation=(lr_val, hr_val) if n_val else None,
                       eval_every=options.eval_every, patience=options.patience or None)
    if streamed is None:
        fit(pipe, lr, hr, **fit_options)
    else:
        fit_streamed(pipe, stream, memory_bytes=budget_bytes, **fit_options)
        lr, hr = stream.read(fitted)  # the baselines are fitted on the same fields as the ridge and POD
    seconds = time.perf_counter() - t0
    if rank != 0:
        return pipe
    if pipe.pod_choice is not None and not quiet:
        from podiff.latent.pod_selection import describe

        print(describe(pipe.pod_choice))
    spread = None
    if n_val and options.calibrate:
        spread = calibrate_spread(pipe, lr_val, hr_val, seed=config.seed, method=options.spread_calibration,
                                  shape=options.error_shape, bands=options.error_bands)
        if not quiet:
            print(f"spread calibrated on the validation fields ({options.spread_calibration}): ×{spread:.3f} "
                  f"(--no-calibrate to keep ×1)")
            if pipe.calibration.error_quantiles is not None:
                _print_error_shape(pipe.calibration)
    pipe.save(out / "model")
    if world > 1:  # rank 0 holds only its shard of the training fields: no baselines from it
        baseline_info = {"skipped": "under torchrun; evaluate fits a ridge on the data's train split"}
    else:
        baseline_info = train_baselines(pipe, options, lr, hr, (lr_val, hr_val) if n_val else None, out / "model",
                                        progress=not quiet)
    scores = validation_scores(pipe, lr_val, hr_val, scale, config.seed, out / "model") if n_val else None
    calibration, record = pipe.calibration, pipe.training
    info = {"data": source.data, "scale": scale, "split": request.split, "streamed": stream_info,
            "train_indices": [int(train_idx[0]), int(train_idx[-1])],
            "val_indices": [int(val_idx[0]), int(val_idx[-1])] if n_val else None,
            "train_seconds": seconds, "steps": record.step, "best_step": record.best_step,
            "parameters": pipe.num_parameters(), "world_size": world,
            "final_loss": float(np.mean(record.history[-50:])) if record.history else None,
            "val_loss": [list(v) for v in record.val_history], "pod": pipe.pod_choice, "validation": scores,
            "spread": spread, "spread_calibration": options.spread_calibration if spread is not None else None,
            "error_shape": (options.error_shape if calibration.error_quantiles is not None else "gaussian")
            if spread is not None else None,
            "error_bands": len(calibration.error_band_edges[0]) + 1 if calibration.error_band_edges else (
                1 if calibration.error_quantiles is not None else None),
            "residual": config.residual, "mean_model": pipe.mean_model.choice if pipe.mean_model else None,
            "bounds": config.bounds,
            "baselines": baseline_info}
    write_json(out / "train.json", info)
    if not quiet:
        best = f", best validation loss at step {record.best_step}" if record.best_step is not None else ""
        print(f"{pipe.describe()}\ntrained {record.step} steps in {seconds:.1f} s{best} -> {out}")
        if scores:
            print(f"validation: RMSE {scores['rmse']:.4g} (bicubic {scores['bicubic_rmse']:.4g}), "
                  f"CRPS {scores['crps']:.4g}, {scores['members']} members")
    if scores and scores["rmse"] > scores["bicubic_rmse"]:
        warnings.warn(f"the model's validation RMSE {scores['rmse']:.4g} is worse than bicubic's "
                      f"{scores['bicubic_rmse']:.4g}: more fields, a lower --rank or more --steps may help",
                      RuntimeWarning, stacklevel=2)
        print(f"warning: validation RMSE {scores['rmse']:.4g} is worse than bicubic {scores['bicubic_rmse']:.4g}",
              file=sys.stderr)
    return pipe


def _print_error_shape(calibration) -> None:
    from podiff.evaluation.error_shape import quantile

    shapes = (calibration.error_quantiles if calibration.error_band_edges is not None
              else [calibration.error_quantiles])
    halves = [(quantile(q, 0.975) - quantile(q, 0.025)) / 2 for q in shapes]
    spans = f"{halves[0]:.2f}" if len(halves) == 1 else f"{min(halves):.2f}–{max(halves):.2f}"
    print(f"error shape from the validation fields ({len(shapes)} band(s) of the predicted mean): the 95 % "
          f"interval spans {spans} std each side on average (Gaussian 1.96; --error-shape gaussian to keep it)")


def train_baselines(pipe, options: TrainOptions, lr, hr, validation, model_dir: Path, progress: bool = True) -> dict:
    """The baselines every report compares with (``podiff.baselines.BASELINES`` with a ``fit``),
    fitted on the model's training fields and tuned on its validation fields, saved in
    ``model_dir/baselines``; returns what each took."""
    from podiff.baselines import BASELINES

    folder = model_dir / "baselines"
    info: dict = {}
    for name, entry in BASELINES.items():
        if entry.fit is None:
            continue
        baseline, about = entry.fit(pipe, lr, hr, validation, options, progress)
        if baseline is None:
            continue
        entry.save(baseline, folder / entry.file, about)
        info[name] = about
    return info


def validation_scores(pipe, lr_val, hr_val, scale: int, seed: int, model_dir: Path | None = None,
                      members: int = 8) -> dict:
    """A cheap check of the trained model on the validation fields: ensemble-mean RMSE and CRPS of
    ``members`` members beside the RMSE of bicubic and of the saved baselines."""
    from podiff.baselines import bicubic
    from podiff.evaluation import metrics

    out = pipe.sample(lr_val, num_samples=members, seed=seed, return_samples=True)
    samples, mean = out.samples.cpu(), out.mean.cpu()
    scores = {"rmse": metrics.rmse(mean, hr_val), "crps": metrics.crps_ensemble(samples, hr_val, fair=True),
              "bicubic_rmse": metrics.rmse(bicubic(lr_val, scale), hr_val), "members": members}
    for name, baseline in (load_baselines(pipe, model_dir) if model_dir else {}).items():
        scores[f"{name}_rmse"] = metrics.rmse(baseline.predict(lr_val).cpu(), hr_val)
    return scores


__all__ = ["TrainRequest", "resolve_bounds", "train", "train_baselines", "training_stream", "validation_count",
           "validation_scores"]
