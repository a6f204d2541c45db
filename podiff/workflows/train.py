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
from podiff.workflows.common import DataSource, WorkflowError, naming, prepare_out


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


def training_stream(request: TrainRequest, sharded: bool = False):
    """netCDF/Zarr training fields read lazily: ``(stream, lr_val, hr_val, idx, n, bounds,
    exceeds)`` with the validation fields read (an evenly spaced subsample of them if they too
    exceed ``memory_mb``), the covariates' channels in their input as in a loaded dataset, and
    ``exceeds``: whether the training fields exceed ``memory_mb`` (then they stream). ``None``
    when the data fit and ``sharded`` is False, or are not netCDF/Zarr: the fields are then
    loaded. ``sharded`` (under torchrun): the stream even when the fields fit, so that each rank
    reads its own share of them rather than every rank the whole file."""
    from podiff.data.datasets import DATASETS, split_indices
    from podiff.data.fields import open_field, sniff
    from podiff.data.streaming import FieldStream

    source, budget = request.source, request.options.memory_mb
    if ((budget is None and not sharded) or source.scale is None or source.data in DATASETS
            or sniff(source.data) not in ("netcdf3", "netcdf4", "zarr", "glob")):
        return None
    field_, grid = open_field(source.data, source.var, **source.selection())
    n = field_.sizes[field_.dims[0]]
    idx = split_indices(n, request.split)
    n_val = validation_count(request, idx)
    label = f"{source.data}: variable {grid.var!r}"
    stream = FieldStream(field_, idx[: len(idx) - n_val], source.scale, label)
    budget_bytes = None if budget is None else int(budget * 2**20)
    exceeds = budget_bytes is not None and stream.nbytes > budget_bytes
    if not exceeds and not sharded:
        return None
    parts = None
    if source.covariates is not None and not source.covariates.empty:  # small beside the fields: held whole
        from podiff.data.covariates import covariate_parts

        parts = covariate_parts(source.covariates, grid, source.scale)
        stream = FieldStream(field_, idx[: len(idx) - n_val], source.scale, label, parts)
    lr_val = hr_val = None
    if n_val:
        held = FieldStream(field_, idx[len(idx) - n_val :], source.scale, label, parts)
        lr_val, hr_val = held.read(held.subsample(budget_bytes) if exceeds else np.arange(len(held)))
    return stream, lr_val, hr_val, idx, n, grid.bounds, exceeds


def resolve_bounds(request: TrainRequest, declared, lr, hr, scale: int, agree: bool = False):
    """The bounds the model uses: ``[lo, hi]`` (checked on the training fields: an error if they
    break them), none, or with ``auto`` those the data declare (the packaged MRI and images, a
    netCDF/Zarr variable's CF valid range), kept only where the training fields obey them.
    ``agree``: ``lr, hr`` are this rank's share; the ranks decide together (any rank's fields
    breaking the bounds decide for all)."""
    from podiff.data.bounds import check_bounds, check_pairs

    choice = request.bounds
    if choice == "none":
        return None
    bounds = check_bounds(declared) if choice == "auto" else choice
    if bounds is None:
        return None
    broken = None
    if hr is not None:
        try:
            check_pairs(lr, hr, bounds, scale)
        except ValueError as exc:
            broken = exc
    if agree:  # every rank learns whether any rank's fields break them
        import torch

        if distributed.all_sum(torch.tensor(float(broken is not None))).item() and broken is None:
            broken = ValueError("the training fields of another rank break them")
    if broken is not None:
        if choice != "auto":
            text = ",".join("" if b is None else f"{b:g}" for b in choice)
            raise WorkflowError(f"--bounds {text}: {broken}") from None
        if not request.quiet and distributed.rank_world()[0] == 0:
            print(f"note: the data declare bounds {list(bounds)} but {broken}; training without bounds")
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
    rank, world = distributed.rank_world()
    # under torchrun a netCDF/Zarr file is read lazily: each rank its share of the training fields
    streamed = None if ds is not None else training_stream(request, sharded=world > 1)
    shared = streamed is not None and not streamed[-1]  # in memory, each rank its share
    if streamed is None:
        ds = ds or source.load()
        scale, n_fields = ds.scale, len(ds)
        lr, hr, idx = ds.split(request.split)
    else:
        stream, lr_val, hr_val, idx, n_fields, streamed_bounds, _ = streamed
        scale = source.scale
        if shared:
            rows = distributed.shard(len(stream), rank, world)
            lr, hr = stream.read(np.arange(rows.start, rows.stop))
            streamed = None
    out = Path(request.out)
    if rank == 0:
        prepare_out(out, request.overwrite, resume=request.resume)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    n_val = validation_count(request, idx)
    train_idx, val_idx = idx[: len(idx) - n_val], idx[len(idx) - n_val :]
    if ds is not None:
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
        if rank == 0 and not quiet:
            print(f"streaming: the {len(stream)} training fields ({stream.nbytes / 2**20:.0f} MiB) exceed --memory-mb "
                  f"{options.memory_mb:g}; scaling, ridge and POD are fitted on {len(fitted)} evenly spaced fields, "
                  f"validation uses {stream_info['val_fields']} of {n_val}, and each step reads its batch from the "
                  f"file")
    if world > 1 and ds is not None:  # each rank keeps its contiguous shard; the pipeline reduces and gathers
        rows = distributed.shard(len(train_idx), rank, world)
        lr, hr = lr[rows], hr[rows]
    device = resolve_device(request.device)
    if request.pod and request.config.residual != "none":
        raise WorkflowError("--pod gives a POD of the fields themselves; use it with --residual none "
                            "(a residual model fits its POD to what the ridge misses)")
    pod = PatchPOD.load(request.pod) if request.pod else None
    declared = ds.meta.get("bounds") if ds is not None else streamed_bounds
    # every field of the data (the same decision on every rank), each rank's share and the
    # validation fields (the ranks agreeing), or the validation fields when streamed
    covariates = list(ds.meta.get("covariates", [])) if ds is not None else stream.covariate_names
    if ds is not None:  # the target's own input channels, without the covariates
        checked = ds.lr[:, : ds.hr.shape[1]], ds.hr
    elif shared:
        import torch

        both = (lr, hr) if hr_val is None else (torch.cat([lr, lr_val]), torch.cat([hr, hr_val]))
        checked = both[0][:, : hr.shape[1]], both[1]
    else:
        checked = (None, None) if hr_val is None else (lr_val[:, : hr_val.shape[1]], hr_val)
    bounds = resolve_bounds(request, declared, *checked, scale, agree=shared)
    if bounds is not None and rank == 0 and not quiet:
        print(f"bounds {bounds}: blocks whose input sits at a bound are certain (--bounds none to drop)")
    config = replace(request.config, scale=scale, bounds=bounds, covariates=covariates)
    if covariates and rank == 0 and not quiet:
        print(f"covariates: {len(covariates)} input channels beside the target's ({_names(covariates)})")
    pipe = PODiffPipeline(config, pod=pod, device=device)  # fit moves the data there
    t0 = time.perf_counter()
    fit_options = dict(progress=not quiet, checkpoint=out / "checkpoint.pt", resume=request.resume,
                       checkpoint_every=options.checkpoint_every, validation=(lr_val, hr_val) if n_val else None,
                       eval_every=options.eval_every, patience=options.patience or None)
    if streamed is None:
        fit(pipe, lr, hr, **fit_options)
    else:
        fit_streamed(pipe, stream, memory_bytes=budget_bytes, **fit_options)  # under torchrun: each rank its share
        # the baselines are fitted on the same fields as the ridge and POD (in one process: under torchrun none)
        lr, hr = stream.read(fitted) if world == 1 else (None, None)
    seconds = time.perf_counter() - t0
    spread = scores = ensemble = None
    fitted: dict = {}
    spreads: dict = {}
    if rank == 0:
        if pipe.pod_choice is not None and not quiet:
            from podiff.latent.pod_selection import describe

            print(describe(pipe.pod_choice))
        if pipe.mean_model is not None and "unet_val_rmse" in pipe.mean_model.choice and not quiet:
            choice = pipe.mean_model.choice
            print(f"mean model: {'U-Net' if choice['regressor'] == 'unet' else 'ridge'} (validation RMSE: ridge "
                  f"{choice['ridge_val_rmse']:.4g}, U-Net {choice['unet_val_rmse']:.4g}; --residual ridge/unet to "
                  f"choose)")
        if n_val and options.calibrate:
            spread, ensemble = calibrate_spread(pipe, lr_val, hr_val, seed=config.seed,
                                                method=options.spread_calibration, shape=options.error_shape,
                                                bands=options.error_bands, return_ensemble=True,
                                                distributed=False)  # rank 0 alone
            if not quiet:
                print(f"spread calibrated on the validation fields ({options.spread_calibration}): ×{spread:.3f} "
                      f"(--no-calibrate to keep ×1)")
                if pipe.calibration.error_quantiles is not None:
                    _print_error_shape(pipe.calibration)
        if world == 1:  # under torchrun rank 0 holds only its shard of the training fields: no baselines
            fitted = fit_baselines(pipe, options, lr, hr, (lr_val, hr_val) if n_val else None, progress=not quiet)
        if n_val:  # the held-out model and baselines: out-of-sample scores and spreads, before any refit
            scores, spreads = held_out_scores(pipe, fitted, lr_val, hr_val, config.seed, options.error_bands,
                                              ensemble=ensemble)
            for name, (_, about) in fitted.items():
                if name in spreads:
                    about["spread_fields"] = spreads[name].fields
    refit_info = _refit(pipe, request, lr, hr, lr_val, hr_val, n_val, streamed is not None, out)
    if rank != 0:
        return pipe
    if refit_info.get("steps") is not None and fitted:
        refit_baselines(pipe, fitted, lr, hr, (lr_val, hr_val), options, progress=not quiet)
        ratio = refit_info.get("spread_ratio", 1.0)
        for name, (_, about) in fitted.items():  # a refitted baseline errs less, as the refitted model does
            if "refit" in about and name in spreads:
                spreads[name] = spreads[name].scaled(ratio)
                about["spread_factor"] = ratio
    pipe.save(out / "model")
    baseline_info = (save_baselines(fitted, out / "model") if world == 1 else
                     {"skipped": "under torchrun; evaluate fits a ridge on the data's train split"})
    save_spreads(spreads, out / "model")
    calibration, record = pipe.calibration, pipe.training
    info = {"data": source.data, "scale": scale, "split": request.split, "streamed": stream_info,
            "train_indices": [int(train_idx[0]), int(train_idx[-1])],
            "val_indices": [int(val_idx[0]), int(val_idx[-1])] if n_val else None,
            "train_seconds": seconds,
            "steps": record.refit["from_step"] if record.refit else record.step,  # before the refit's continuation
            "best_step": record.best_step,
            "parameters": pipe.num_parameters(), "world_size": world,
            "final_loss": float(np.mean(record.history[-50:])) if record.history else None,
            "val_loss": [list(v) for v in record.val_history], "pod": pipe.pod_choice, "validation": scores,
            "spread": spread, "spread_calibration": options.spread_calibration if spread is not None else None,
            "error_shape": (options.error_shape if calibration.error_quantiles is not None else "gaussian")
            if spread is not None else None,
            "error_bands": len(calibration.error_band_edges[0]) + 1 if calibration.error_band_edges else (
                1 if calibration.error_quantiles is not None else None),
            "residual": config.residual, "mean_model": pipe.mean_model.choice if pipe.mean_model else None,
            "fitted_on": _fitted_on(train_idx, val_idx, refit_info, config.residual),
            "bounds": config.bounds, "covariates": config.covariates,
            "training_windows": pipe.training_windows().describe(),  # shifted grids, crops (1 window: none)
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


def _names(names: list[str]) -> str:
    """``elevation[0,0]``… ``elevation[3,3]`` shown once as ``elevation (16 block channels)``."""
    from collections import Counter

    groups = Counter(name.split("[")[0] for name in names)
    return ", ".join(f"{g} ({n} block channels)" if n > 1 else g for g, n in groups.items())


def _refit(pipe, request: TrainRequest, lr, hr, lr_val, hr_val, n_val: int, streamed: bool, out: Path) -> dict:
    """Refits the model on every field (``fitting.refit``) after the held-out choices; what was done."""
    from podiff.fitting import refit

    if not request.options.refit:
        return {"skipped": "--no-refit"}
    if not n_val:
        return {"skipped": "no validation fields"}
    if streamed:
        return {"skipped": "streamed training: the held-out model is kept"}
    if not request.quiet and distributed.rank_world()[0] == 0:
        print("refitting on every field: the mean model on all of them, the denoiser continued on all of them")
    info = refit(pipe, lr, hr, (lr_val, hr_val), progress=not request.quiet, checkpoint=out / "refit_checkpoint.pt",
                 resume=request.resume)
    if not request.quiet and distributed.rank_world()[0] == 0 and "ratio" in info["error_ratio"]:
        about = info["error_ratio"]
        print(f"spread ×{info['spread_ratio']:.3f} for the refitted model and baselines: the mean model's RMSE on the "
              f"validation fields, fitted without the last {n_val} training fields and with them, went "
              f"{about['rmse_older']:.4g} -> {about['rmse_recent']:.4g}")
    return info


def _fitted_on(train_idx, val_idx, refit_info: dict, residual: str) -> dict:
    """``train.json``'s account of what was fitted on which fields (indices into the data)."""
    train = [int(train_idx[0]), int(train_idx[-1])]
    held = [int(val_idx[0]), int(val_idx[-1])] if len(val_idx) else None
    refitted = refit_info.get("steps") is not None
    final = [train[0], held[1]] if refitted else train  # what the saved model and baselines learnt from
    continued = {"continued_steps": refit_info["steps"], "from_step": refit_info["from_step"]} if refitted else {}
    out = {"choices": {"fields": train, "chosen_on": held,
                       "what": "data scaling, POD basis and rank, ridge settings, training steps (early stopping)"},
           "spread_and_error_shape": {"from_errors_on": held, "of_model_fitted_on": train,
                                      "times_refit_error_ratio": refit_info.get("spread_ratio")},
           "denoiser": {"fields": final, **continued}, "baselines": {"fields": final}}
    if residual != "none":
        out["mean_model"] = {"fields": final}
    if not refitted:
        out["refit"] = refit_info.get("skipped")
    return out


def _print_error_shape(calibration) -> None:
    from podiff.evaluation.error_shape import quantile

    shapes = (calibration.error_quantiles if calibration.error_band_edges is not None
              else [calibration.error_quantiles])
    halves = [(quantile(q, 0.975) - quantile(q, 0.025)) / 2 for q in shapes]
    spans = f"{halves[0]:.2f}" if len(halves) == 1 else f"{min(halves):.2f}–{max(halves):.2f}"
    print(f"error shape from the validation fields ({len(shapes)} band(s) of the predicted mean): the 95 % "
          f"interval spans {spans} std each side on average (Gaussian 1.96; --error-shape gaussian to keep it)")


def fit_baselines(pipe, options: TrainOptions, lr, hr, validation, progress: bool = True) -> dict:
    """The baselines every report compares with (``podiff.baselines.BASELINES`` with a ``fit``),
    fitted on the model's training fields and tuned on its validation fields: ``{name: (baseline,
    info)}`` in ``BASELINES`` order."""
    from podiff.baselines import BASELINES

    fitted: dict = {}
    for name, entry in BASELINES.items():
        if entry.fit is None:
            continue
        baseline, about = entry.fit(pipe, lr, hr, validation, options, progress)
        if baseline is not None:
            fitted[name] = (baseline, about)
    return fitted


def held_out_scores(pipe, fitted: dict, lr_val, hr_val, seed: int, bands: int,
                    members: int = 8, ensemble=None) -> tuple[dict, dict]:
    """The held-out model's check on the validation fields (``validation_scores``; from
    ``ensemble``, the calibration's members, where given) and each baseline's error spread there
    (``baselines.calibrated.ErrorSpread``; those made from the model, such as bicubic, too),
    before anything is refitted on those fields."""
    from podiff.baselines import BASELINES, ErrorSpread

    predictions = {}
    for name, entry in BASELINES.items():
        if name in fitted:
            predictions[name] = fitted[name][0].predict(lr_val).cpu()
        elif entry.make is not None:
            predictions[name] = entry.make(pipe).predict(lr_val).cpu()
    scores = validation_scores(pipe, lr_val, hr_val, seed, {n: p for n, p in predictions.items()
                                                            if n in fitted or n == "bicubic"}, members,
                                ensemble=ensemble)
    spreads = {}
    if hr_val.shape[0] >= 2:
        for name, prediction in predictions.items():
            spreads[name] = ErrorSpread.fit(prediction, hr_val.cpu(), bands)
    return scores, spreads


def refit_baselines(pipe, fitted: dict, lr, hr, held_out, options: TrainOptions, progress: bool = True) -> None:
    """Each fitted baseline with a ``refit_on_all`` refitted on the training and held-out fields
    (after the model's own refit: a residual model's refitted mean model is theirs)."""
    from podiff.baselines import BASELINES

    for name, (baseline, about) in list(fitted.items()):
        entry = BASELINES[name]
        if entry.refit_on_all is None:
            continue
        refitted, more = entry.refit_on_all(baseline, pipe, lr, hr, held_out, options, progress)
        fitted[name] = (refitted, {**about, "refit": more})


def save_baselines(fitted: dict, model_dir: Path) -> dict:
    """Saves the fitted baselines in ``model_dir/baselines``; returns what each took, for ``train.json``."""
    from podiff.baselines import BASELINES

    folder = model_dir / "baselines"
    for name, (baseline, about) in fitted.items():
        BASELINES[name].save(baseline, folder / BASELINES[name].file, about)
    return {name: about for name, (_, about) in fitted.items()}


def save_spreads(spreads: dict, model_dir: Path) -> None:
    """Every baseline's error spread, beside the baselines (``baselines.calibrated.spread_file``)."""
    from podiff.baselines.calibrated import spread_file

    for name, spread in spreads.items():
        spread.save(model_dir / "baselines" / spread_file(name))


def validation_scores(pipe, lr_val, hr_val, seed: int, predictions: dict, members: int = 8, ensemble=None) -> dict:
    """A cheap check of the trained model on the validation fields: ensemble-mean RMSE and CRPS of
    ``members`` members (or of ``ensemble``, members already drawn for ``lr_val``) beside the RMSE
    of each baseline's prediction of ``lr_val`` (``predictions`` by name: ``<name>_rmse``)."""
    from podiff.evaluation import metrics

    out = ensemble if ensemble is not None else pipe.sample(lr_val, num_samples=members, seed=seed,
                                                            return_samples=True, distributed=False)
    members = out.samples.shape[0]
    samples, mean = out.samples.cpu(), out.mean.cpu()
    scores = {"rmse": metrics.rmse(mean, hr_val), "crps": metrics.crps_ensemble(samples, hr_val, fair=True),
              "members": members}
    for name, prediction in predictions.items():
        scores[f"{name}_rmse"] = metrics.rmse(prediction, hr_val)
    return scores


__all__ = ["TrainRequest", "fit_baselines", "held_out_scores", "refit_baselines", "resolve_bounds", "save_baselines",
           "train", "training_stream", "validation_count", "validation_scores"]
