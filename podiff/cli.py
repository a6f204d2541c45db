"""The ``podiff`` command: ``demo | fit-pod | train | sample | evaluate | info``.

    podiff train --data FILE --out RUN_DIR [--scale S] [--steps N] [--patch-size P] [--rank R] [--pod POD]
    podiff sample --model RUN_DIR --data FILE --num-samples M --out PRED.nc [--split train|val|test|all]
    podiff evaluate --pred PRED.nc --data FILE --out REPORT_DIR
    podiff demo [--dataset sst|mri|images] [--out DIR]

``--data`` is a packaged dataset (``sst``, ``mri``, ``images``), a netCDF file (3 or 4), a Zarr
store, a quoted glob of netCDF files, or an ``.npz``, recognised by content; ``--var`` /
``--channels`` / ``--dims`` / ``--time`` choose what of a netCDF/Zarr dataset is read.
``sample`` and ``evaluate`` take the scale and grid from the model (``--scale`` there is a check);
``sample`` also takes fields on the model's low-resolution grid (no truth then).
``--device auto|cpu|cuda|cuda:N`` (train, sample, demo, fit-pod; ``auto``: CUDA when torch has
it) places all the work; data are read on the CPU and moved there, outputs come back to the CPU.
Errors are one line on stderr with exit status 1 (2 for bad usage). The entry point is ``main``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import __version__, distributed
from .config import PipelineConfig as _Config
from .devices import CHOICES as DEVICE_CHOICES
from .devices import resolve_device
from .error_shape import ERROR_BANDS
from .fields import netcdf_available, one_line
from .sampling import SAMPLERS

DEFAULT_SAMPLE_STEPS = _Config.sample_steps  # one default for train --sample-steps and PipelineConfig


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


@contextlib.contextmanager
def naming(source):
    """Errors raised by what the data holds (too few fields, nothing valid) name the data."""
    try:
        yield
    except (ValueError, CommandError) as exc:
        text = str(exc)
        if Path(str(source)).name not in text:
            raise type(exc)(f"{source}: {text}") from None
        raise


def _selection(args) -> dict:
    """``--dims`` / ``--channels`` / ``--time`` as ``data.load``'s keyword arguments."""
    dims, channels = getattr(args, "dims", None), getattr(args, "channels", None)
    return {"dims": dims.split(",") if dims else None, "channels": channels.split(",") if channels else None,
            "time": getattr(args, "time", None)}


def _data(args, scale=None):
    from . import data

    return data.load(args.data, scale if scale is not None else getattr(args, "scale", None),
                     getattr(args, "var", None), **_selection(args))


def _npz_has(path, key: str) -> bool:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return key in archive.files
    except Exception:  # unreadable: load_npz says so, naming the file
        return False


def _data_for_model(args, pipe):
    """The data at the model's scale and grid: high-resolution fields (truth; the input made by
    block averages, or the file's own ``lr``) or fields on the model's low-resolution grid (input
    only). Anything else is a one-line error naming the expected and the actual."""
    from . import data
    from .fields import sniff

    scale = pipe.config.scale
    if getattr(args, "scale", None) is not None and args.scale != scale:
        raise CommandError(f"--scale {args.scale} does not match the model's scale {scale} "
                           f"(sample and evaluate take it from the model; --scale there is only a check)")
    C = pipe.offset.numel()
    H, W = pipe.image_size
    h, w = H // scale, W // scale
    if args.data in data.DATASETS or (sniff(args.data) == "npz" and _npz_has(args.data, "lr")):
        ds = _data(args, scale)
    else:
        raw = _data(args, 1)
        size = tuple(raw.hr.shape[-2:])
        if raw.hr.shape[1] == C and size == (H, W):
            ds = data.Dataset(raw.hr, data.block_average(raw.hr, scale), scale, raw.name, raw.meta, raw.grid)
        elif raw.hr.shape[1] == C and size == (h, w):
            ds = data.as_low_resolution(raw, scale)
        else:
            raise CommandError(f"{args.data}: fields [{raw.hr.shape[1]}, {size[0]}, {size[1]}] fit neither the "
                               f"model's high-resolution grid [{C}, {H}, {W}] nor its input grid [{C}, {h}, {w}]")
    if tuple(ds.lr.shape[1:]) != (C, h, w):
        raise CommandError(f"{args.data}: input [{', '.join(map(str, ds.lr.shape[1:]))}] does not fit the model's "
                           f"input grid [{C}, {h}, {w}]")
    return ds


def _refuse_existing(path: Path, overwrite: bool, resume_hint: bool = False) -> None:
    """An output that exists and is not empty is an error unless ``--overwrite``."""
    if path.exists() and any(path.iterdir() if path.is_dir() else [path]) and not overwrite:
        raise CommandError(f"{path} exists and is not empty; pass --overwrite to replace it"
                           + (" or --resume to continue" if resume_hint else ""))


def _prepare_out(path: Path, overwrite: bool, resume: bool = False) -> None:
    if not resume:
        _refuse_existing(path, overwrite, resume_hint=path.is_dir())
    if path.exists() and overwrite and not resume:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _config(args, scale: int):
    from .pipeline import PipelineConfig

    kw = dict(scale=scale, patch_size=args.patch_size, basis=args.basis, preset=args.preset, seed=args.seed,
              schedule=args.schedule, prediction=args.prediction, sample_steps=args.sample_steps,
              sampler=args.sampler,
              batch_size=args.batch_size, lr=args.learning_rate, residual=args.residual,
              antithetic=args.antithetic, correlated_noise=args.correlated_noise,
              condition=args.condition, bounds=getattr(args, "resolved_bounds", None))
    if args.steps is not None:
        kw["train_steps"] = args.steps
    if args.stride is not None:
        kw["stride"] = args.stride
    if args.rank is not None:
        kw["rank"] = args.rank
    elif args.energy is not None:
        kw["energy"] = args.energy
    return PipelineConfig(**kw)


def cmd_info(args) -> int:
    from podiff_kernels import info

    print(f"podiff {__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    info.main([])
    return 0


def cmd_fit_pod(args) -> int:
    with naming(args.data):
        return _fit_pod(args)


def _fit_pod(args) -> int:
    from .data import DATASETS
    from .fields import sniff
    from .pod import PatchPOD

    out = Path(args.out)
    _prepare_out(out, args.overwrite)
    pod = PatchPOD(args.patch_size, args.stride, rank=args.rank, energy=None if args.rank else args.energy,
                   basis="shared" if args.basis == "auto" else args.basis)  # auto needs validation fields
    device = resolve_device(args.device)
    if args.data not in DATASETS and sniff(args.data) in ("netcdf3", "netcdf4", "zarr", "glob"):
        from .streaming import fit_pod_streaming

        if args.scale is None:
            raise CommandError(f"{args.data}: give --scale (the POD's patches tile a grid that --scale divides)")
        fit_pod_streaming(pod, args.data, args.var, args.scale, split=args.split, **_selection(args),
                          budget_bytes=int(args.chunk_mb * 2**20), device=device, progress=not args.quiet)
    else:
        # Standardised as the pipeline standardises its fields before fitting its own POD.
        from .standardise import fit_scaling, standardise

        ds = _data(args)
        _, hr, _ = ds.split(args.split)
        hr = hr.to(device)
        pod.fit(standardise(hr, *fit_scaling(hr, ~torch.isnan(hr))), progress=not args.quiet)
    pod.save(out)
    print(f"{pod} -> {out}")
    return 0


def _validation_count(args, idx) -> int:
    """How many of the fields ``idx`` are held out for validation (the last ones)."""
    n_val = getattr(args, "val_count", None)
    if n_val is None:
        n_val = math.ceil(args.val_fraction * len(idx)) if args.val_fraction > 0 else 0
    if len(idx) - n_val < 2:
        raise CommandError(f"--split {args.split} holds {len(idx)} fields; holding out {n_val} for validation "
                           f"leaves {len(idx) - n_val} to train on (at least 2 needed; lower --val-fraction)")
    return n_val


def _training_stream(args):
    """netCDF/Zarr training fields larger than ``--memory-mb``: ``(stream, lr_val, hr_val, idx, n, bounds)``
    with the validation fields read (an evenly spaced subsample of them if they too exceed the
    budget); ``None`` when the data fit (or are not netCDF/Zarr): the fields are then loaded."""
    from .data import DATASETS, split_indices
    from .fields import open_field, sniff
    from .streaming import FieldStream

    budget = getattr(args, "memory_mb", None)
    if (budget is None or args.scale is None or args.data in DATASETS
            or sniff(args.data) not in ("netcdf3", "netcdf4", "zarr", "glob")):
        return None
    field_, grid = open_field(args.data, args.var, **_selection(args))
    n = field_.sizes[field_.dims[0]]
    idx = split_indices(n, args.split)
    n_val = _validation_count(args, idx)
    label = f"{args.data}: variable {grid.var!r}"
    stream = FieldStream(field_, idx[: len(idx) - n_val], args.scale, label)
    budget_bytes = int(budget * 2**20)
    if stream.nbytes <= budget_bytes:
        return None
    lr_val = hr_val = None
    if n_val:
        held = FieldStream(field_, idx[len(idx) - n_val :], args.scale, label)
        lr_val, hr_val = held.read(held.subsample(budget_bytes))
    return stream, lr_val, hr_val, idx, n, grid.bounds


def train(args, ds=None) -> "object":
    from .pipeline import PODiffPipeline
    from .io import write_json
    from .pod import PatchPOD

    streamed = None if ds is not None else _training_stream(args)
    if streamed is None:
        ds = ds or _data(args)
        scale, n_fields = ds.scale, len(ds)
        lr, hr, idx = ds.split(args.split)
    else:
        stream, lr_val, hr_val, idx, n_fields, streamed_bounds = streamed
        scale = args.scale
    out = Path(args.out)
    rank, world = distributed.rank_world()
    if streamed is not None and world > 1:
        raise CommandError(f"{args.data}: training fields larger than --memory-mb stream in one process; "
                           f"raise --memory-mb above {stream.nbytes / 2**20:.0f} to train under torchrun")
    if rank == 0:
        _prepare_out(out, args.overwrite, resume=args.resume)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    n_val = _validation_count(args, idx)
    train_idx, val_idx = idx[: len(idx) - n_val], idx[len(idx) - n_val :]
    if streamed is None:
        lr_val, hr_val = lr[len(train_idx) :], hr[len(train_idx) :]
        lr, hr = lr[: len(train_idx)], hr[: len(train_idx)]
    if rank == 0 and not args.quiet:
        held = (f"validating on the last {n_val} (fields {int(val_idx[0])}-{int(val_idx[-1])}, --val-fraction "
                f"{args.val_fraction})" if n_val else "no validation (--val-fraction 0)")
        print(f"training on {len(train_idx)} of the {n_fields} fields of {args.data} (--split {args.split}), {held}")
    stream_info = None
    if streamed is not None:
        budget_bytes = int(args.memory_mb * 2**20)
        fitted = stream.subsample(budget_bytes)
        stream_info = {"memory_mb": args.memory_mb, "train_mib": stream.nbytes / 2**20,
                       "fit_fields": len(fitted), "val_fields": 0 if hr_val is None else hr_val.shape[0]}
        if not args.quiet:
            print(f"streaming: the {len(stream)} training fields ({stream.nbytes / 2**20:.0f} MiB) exceed --memory-mb "
                  f"{args.memory_mb:g}; scaling, ridge and POD are fitted on {len(fitted)} evenly spaced fields, "
                  f"validation uses {stream_info['val_fields']} of {n_val}, and each step reads its batch from the file")
    if world > 1:  # each rank reads its contiguous shard; the pipeline reduces and gathers exactly
        rows = distributed.shard(len(train_idx), rank, world)
        lr, hr = lr[rows], hr[rows]
    device = resolve_device(args.device)
    if args.pod and args.residual != "none":
        raise CommandError("--pod gives a POD of the fields themselves; use it with --residual none "
                           "(a residual model fits its POD to what the ridge misses)")
    pod = PatchPOD.load(args.pod) if args.pod else None
    declared = ds.meta.get("bounds") if streamed is None else streamed_bounds
    # every field of the data (the same decision on every rank), or the validation fields when streamed
    args.resolved_bounds = _resolve_bounds(args, declared, lr_val if streamed is not None else ds.lr,
                                           hr_val if streamed is not None else ds.hr, scale)
    if args.resolved_bounds is not None and rank == 0 and not args.quiet:
        print(f"bounds {args.resolved_bounds}: blocks whose input sits at a bound are certain (--bounds none to drop)")
    pipe = PODiffPipeline(_config(args, scale), pod=pod, device=device)  # fit moves the data there
    t0 = time.perf_counter()
    fit_options = dict(progress=not args.quiet, checkpoint=out / "checkpoint.pt", resume=args.resume,
                       checkpoint_every=args.checkpoint_every, validation=(lr_val, hr_val) if n_val else None,
                       eval_every=args.eval_every, patience=args.patience or None)
    if streamed is None:
        pipe.fit(lr, hr, **fit_options)
    else:
        pipe.fit_streamed(stream, memory_bytes=budget_bytes, **fit_options)
        lr, hr = stream.read(fitted)  # the baselines are fitted on the same fields as the ridge and POD
    seconds = time.perf_counter() - t0
    if rank != 0:
        return pipe
    if pipe.pod_choice is not None and not args.quiet:
        from .pod_selection import describe

        print(describe(pipe.pod_choice))
    spread = None
    spread_method = getattr(args, "spread_calibration", "members")
    shape = getattr(args, "error_shape", "validation")
    if n_val and getattr(args, "calibrate", True):
        bands = getattr(args, "error_bands", ERROR_BANDS)
        spread = pipe.calibrate_spread(lr_val, hr_val, seed=args.seed, method=spread_method, shape=shape, bands=bands)
        if not args.quiet:
            print(f"spread calibrated on the validation fields ({spread_method}): ×{spread:.3f} (--no-calibrate to keep ×1)")
            if pipe.config.error_quantiles is not None:
                from .error_shape import quantile

                shapes = (pipe.config.error_quantiles if pipe.config.error_band_edges is not None
                          else [pipe.config.error_quantiles])
                halves = [(quantile(q, 0.975) - quantile(q, 0.025)) / 2 for q in shapes]
                spans = f"{halves[0]:.2f}" if len(halves) == 1 else f"{min(halves):.2f}–{max(halves):.2f}"
                print(f"error shape from the validation fields ({len(shapes)} band(s) of the predicted mean): the 95 % "
                      f"interval spans {spans} std each side on average (Gaussian 1.96; --error-shape gaussian to keep it)")
    pipe.save(out / "model")
    if world > 1:  # rank 0 holds only its shard of the training fields: no baselines from it
        baseline_info = {"skipped": "under torchrun; evaluate fits a ridge on the data's train split"}
    else:
        baseline_info = train_baselines(pipe, args, lr, hr, (lr_val, hr_val) if n_val else None, out / "model")
    scores = validation_scores(pipe, lr_val, hr_val, scale, args.seed, out / "model") if n_val else None
    info = {"data": args.data, "scale": scale, "split": args.split, "streamed": stream_info,
            "train_indices": [int(train_idx[0]), int(train_idx[-1])],
            "val_indices": [int(val_idx[0]), int(val_idx[-1])] if n_val else None,
            "train_seconds": seconds, "steps": pipe.step_count, "best_step": pipe.best_step,
            "parameters": pipe.num_parameters(), "world_size": world,
            "final_loss": float(np.mean(pipe.history[-50:])) if pipe.history else None,
            "val_loss": [list(v) for v in pipe.val_history], "pod": pipe.pod_choice, "validation": scores,
            "spread": spread, "spread_calibration": spread_method if spread is not None else None,
            "error_shape": (shape if pipe.config.error_quantiles is not None else "gaussian") if spread is not None
            else None,
            "error_bands": len(pipe.config.error_band_edges[0]) + 1 if pipe.config.error_band_edges else (
                1 if pipe.config.error_quantiles is not None else None),
            "residual": pipe.config.residual, "mean_model": pipe.mean_model.choice if pipe.mean_model else None,
            "bounds": pipe.config.bounds,
            "baselines": baseline_info}
    write_json(out / "train.json", info)
    if not args.quiet:
        best = f", best validation loss at step {pipe.best_step}" if pipe.best_step is not None else ""
        print(f"{pipe.describe()}\ntrained {pipe.step_count} steps in {seconds:.1f} s{best} -> {out}")
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


def train_baselines(pipe, args, lr, hr, validation, model_dir: Path) -> dict:
    """The baselines every report compares with, fitted on the model's training fields and tuned
    on its validation fields, saved in ``model_dir/baselines``: the tuned ridge (a residual
    model's own ``μ``) and, unless ``--no-regression-baseline``, the regression ViT."""
    from .regression import RegressionBaseline
    from .ridge import RidgeBaseline

    folder = model_dir / "baselines"
    info: dict = {}
    t0 = time.perf_counter()
    if pipe.mean_model is not None:
        ridge = pipe.mean_model.ridge
    elif validation is not None:
        ridge, _ = RidgeBaseline.tuned(pipe.config.scale, lr.cpu(), hr.cpu(), *(t.cpu() for t in validation))
    else:
        ridge = RidgeBaseline(pipe.config.scale).fit(lr.cpu(), hr.cpu())
    ridge.save(folder / "ridge.safetensors", {"tuned_on_validation": validation is not None})
    info["ridge"] = {"describe": ridge.describe(), "seconds": time.perf_counter() - t0,
                     "tuned_on_validation": validation is not None}
    if getattr(args, "regression_baseline", True):
        t0 = time.perf_counter()
        reg = RegressionBaseline(pipe).fit(lr, hr, validation, steps=pipe.config.train_steps,
                                           eval_every=args.eval_every, patience=args.patience or None,
                                           progress=not args.quiet)
        reg.save(folder / "regression.safetensors")
        info["regression"] = {"steps": reg.steps, "best_step": reg.best_step, "seconds": time.perf_counter() - t0}
    return info


def load_baselines(pipe, model_dir: Path) -> dict:
    """``{"ridge": RidgeBaseline, "regression": RegressionBaseline}``, those that ``train`` saved."""
    from .regression import RegressionBaseline
    from .ridge import RidgeBaseline

    found = {}
    folder = model_dir / "baselines"
    if (folder / "ridge.safetensors").is_file():
        found["ridge"] = RidgeBaseline.load(folder / "ridge.safetensors")[0]
    if (folder / "regression.safetensors").is_file():
        found["regression"] = RegressionBaseline.load(folder / "regression.safetensors", pipe)
    return found


def validation_scores(pipe, lr_val, hr_val, scale: int, seed: int, model_dir: Path | None = None,
                      members: int = 8) -> dict:
    """A cheap check of the trained model on the validation fields: ensemble-mean RMSE and CRPS of
    ``members`` members beside the RMSE of bicubic and of the saved baselines."""
    from . import metrics
    from .baselines import bicubic

    out = pipe.sample(lr_val, num_samples=members, seed=seed, return_samples=True)
    samples, mean = out.samples.cpu(), out.mean.cpu()
    scores = {"rmse": metrics.rmse(mean, hr_val), "crps": metrics.crps_ensemble(samples, hr_val, fair=True),
              "bicubic_rmse": metrics.rmse(bicubic(lr_val, scale), hr_val), "members": members}
    for name, baseline in (load_baselines(pipe, model_dir) if model_dir else {}).items():
        scores[f"{name}_rmse"] = metrics.rmse(baseline.predict(lr_val).cpu(), hr_val)
    return scores


def cmd_train(args) -> int:
    out = Path(args.out)
    existed = out.exists()
    try:
        with naming(args.data):
            train(args)
    except (CommandError, ValueError, RuntimeError, OSError):
        # Nothing to resume from: leave no half-made run folder (a checkpoint is kept for --resume).
        if not existed and out.is_dir() and not (out / "checkpoint.pt").exists() and distributed.rank_world()[0] == 0:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return 0


def _load_model(model: Path):
    from .pipeline import PODiffPipeline

    if not (model / "model" / "config.json").is_file() and not (model / "config.json").is_file():
        raise CommandError(f"no trained model in {model} (expected {model / 'model' / 'config.json'})")
    return PODiffPipeline.load(model / "model" if (model / "model").is_dir() else model)


def sample(args, ds=None, pipe=None):
    """Samples the ensemble and writes the prediction file; returns the ``Prediction`` (None on
    ranks other than 0 under torchrun)."""
    from .prediction_file import Prediction, output_format, write_prediction

    model = Path(args.model)
    out = Path(args.out)
    output_format(out)  # a bad suffix fails before any work
    if out.exists() and not args.overwrite:
        raise CommandError(f"{out} exists; pass --overwrite to replace it")
    pipe = pipe or _load_model(model)
    pipe.to(resolve_device(args.device))
    ds = ds or _data_for_model(args, pipe)
    lr, hr, idx = ds.split(args.split)
    t0 = time.perf_counter()
    # Under torchrun each rank samples its share of the images (seeded per image and member,
    # so the ensemble is the one-process ensemble); rank 0 writes the gathered result.
    sampler = args.sampler or pipe.config.sampler
    result = pipe.sample(lr, num_samples=args.num_samples, steps=args.sample_steps, seed=args.seed,
                         return_samples=args.members, progress=not args.quiet, image_ids=idx, sampler=sampler)
    seconds = time.perf_counter() - t0
    if distributed.rank_world()[0] != 0:
        return None
    attrs = {"model": str(model), "data": str(args.data), "split": args.split, "var": ds.grid.var if ds.grid else "",
             "scale": int(pipe.config.scale), "num_samples": int(args.num_samples),
             "steps": int(args.sample_steps or pipe.config.sample_steps), "sampler": sampler,
             "seed": int(args.seed), "model_seed": int(pipe.config.seed), "seconds": float(seconds),
             "spread_calibration": float(pipe.config.spread), "podiff_version": __version__,
             "error_quantiles": pipe.config.error_quantiles or [],
             "error_band_edges": pipe.config.error_band_edges or [],
             "torch_version": torch.__version__,
             "history": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} podiff sample --model {model} "
                        f"--data {args.data} --split {args.split} --num-samples {args.num_samples}"}
    truth = hr.cpu().numpy()
    pred = Prediction(result.mean.cpu().numpy(), result.variance.cpu().numpy(), np.asarray(idx), attrs,
                      members=result.samples.cpu().numpy() if args.members else None, lr=lr.cpu().numpy(),
                      truth=truth if np.isfinite(truth).any() else None,
                      grid=ds.grid.take(idx) if ds.grid is not None else None,
                      extra={"write_variance": getattr(args, "variance", False)})
    write_prediction(out, pred)
    if not args.quiet:
        print(f"sampled {args.num_samples} members × {len(idx)} samples ({args.split}) in {seconds:.1f} s -> {out}")
    return pred


def cmd_sample(args) -> int:
    sample(args)
    return 0


def evaluate(args, ds=None, pipe=None) -> dict:
    from .report import evaluate as run_evaluation
    from .report import write_report

    distributed.barrier()  # under torchrun: rank 0 wrote the prediction; it alone evaluates
    if distributed.rank_world()[0] != 0:
        return {}
    from .prediction_file import read_prediction

    pred_path = Path(args.pred)
    pred = read_prediction(pred_path)  # a missing file: "no prediction file at ..."
    model_dir = Path(str(pred.attrs["model"]))
    pipe = pipe or _load_model(model_dir)
    ds = ds or _data_for_model(args, pipe)
    split = str(pred.attrs["split"])
    lr_test, hr_test, idx = ds.split(split)
    if not np.array_equal(idx, pred.indices):
        raise CommandError(f"{pred_path} was made on other samples of the data (split {split!r}, "
                           f"{len(pred.indices)} samples) than {args.data} gives ({len(idx)})")
    if not torch.isfinite(hr_test).any():
        raise CommandError(f"{args.data} holds no truth for split {split!r} (only the low-resolution input); "
                           f"evaluate needs the high-resolution fields")
    model_dir = model_dir / "model" if (model_dir / "model").is_dir() else model_dir
    baselines = load_baselines(pipe, model_dir)
    lr_train = hr_train = None
    if "ridge" not in baselines:  # a run from before the saved baselines: fit one on this file's train split
        lr_train, hr_train, _ = ds.split("train")
    mean, variance = torch.from_numpy(pred.mean), torch.from_numpy(pred.variance)
    members = torch.from_numpy(pred.members) if pred.members is not None else None
    out = Path(args.out)
    _refuse_existing(out, args.overwrite)  # replaced only once the new report is whole
    meta = {"data": str(args.data), "split": split, "samples": int(len(idx)), "scale": ds.scale,
            "image_size": list(hr_test.shape[-2:]), "num_samples": int(pred.attrs["num_samples"]),
            "sample_seconds": float(pred.attrs.get("seconds", float("nan"))),
            "sample_steps": int(pred.attrs["steps"]),
            "seed": pipe.config.seed, "model": str(pred.attrs["model"]), "parameters": pipe.num_parameters(),
            "pod_rank": pipe.pod.rank, "versions": {"podiff": __version__, "torch": torch.__version__,
                                                     "python": platform.python_version()}}
    meta.update(getattr(args, "extra_meta", {}) or {})
    meta["baselines"] = {name: ("saved with the model: fitted on its training fields" + (
        ", tuned on its validation fields" if name == "ridge" else "")) for name in baselines}
    predictions = {}
    error_quantiles = pred.attrs.get("error_quantiles") or None  # absent in older files: Gaussian
    band_edges = pred.attrs.get("error_band_edges") or None  # absent or empty: one shape
    result = run_evaluation(mean, variance, hr_test, lr_test, lr_train, hr_train, pipe, members, meta,
                            baselines=baselines, predictions=predictions, error_quantiles=error_quantiles,
                            band_edges=band_edges)
    comparisons = {"one member": members[0]} if members is not None else {}
    comparisons.update({name: predictions[name] for name in ("ridge",) if name in predictions})
    from .io import atomic_directory
    from .metric_maps import write_metric_maps

    grid = ds.grid.take(idx) if ds.grid is not None else None
    with atomic_directory(out) as folder:  # the report is whole or absent
        report = out / write_report(folder, result, lr_test, hr_test, mean, variance, pipe.pod, ds.scale,
                                    comparisons).name
        write_metric_maps(folder / "metrics_maps.nc", mean, variance, hr_test, members, grid, error_quantiles,
                          band_edges)
    if not args.quiet:
        m = result["model"]
        others = ", ".join(f"{name} {result[name]['rmse']:.4g}" for name in ("bicubic", "pod_projection", "ridge",
                                                                             "regression") if name in result)
        print(f"model RMSE {m['rmse']:.4g} ({others}); "
              f"CRPS {m.get('crps', float('nan')):.4g}, MACE {m.get('mace', float('nan')):.3f} -> {report}")
    return result


def cmd_evaluate(args) -> int:
    evaluate(args)
    return 0


# The demo runs the command's defaults (basis and rank chosen on the validation fields, early
# stopping, residual over the tuned ridge); only the patch size, energy, ensemble and the bound on the
# steps differ by domain (the images keep improving past 2000 steps: early stopping ends them near 10 000).
DEMO_DEFAULTS = {
    "sst": dict(patch_size=4, basis="auto", rank=None, energy=0.999, steps=2000, batch_size=16, num_samples=32),
    "mri": dict(patch_size=8, basis="auto", rank=None, energy=0.995, steps=2000, batch_size=16, num_samples=16),
    "images": dict(patch_size=8, basis="auto", rank=None, energy=0.99, steps=16000, batch_size=16, num_samples=16),
}


def cmd_demo(args) -> int:
    from .io import write_json

    out = Path(args.out)
    if distributed.rank_world()[0] == 0:
        _prepare_out(out, args.overwrite)
    defaults = DEMO_DEFAULTS[args.dataset]
    ns = argparse.Namespace(**vars(args))
    ns.data, ns.scale, ns.var, ns.pod, ns.resume = args.dataset, 4, None, None, False
    ns.channels = ns.dims = ns.time = None
    for key, value in defaults.items():
        if getattr(ns, key, None) is None:
            setattr(ns, key, value)
    ns.overwrite = True
    t0 = time.perf_counter()
    ds = _data(ns)
    # Train on the train split and validate on the val split; the test split stays unseen.
    from .data import split_indices

    ns.split, ns.val_count = "train+val", len(split_indices(len(ds), "val"))
    ns.out = str(out / "run")
    pipe = train(ns, ds)
    train_seconds = time.perf_counter() - t0
    prediction = out / ("prediction.nc" if netcdf_available() else "prediction.npz")
    # The members go into the prediction: the report compares one with the mean and the ridge.
    ns.model, ns.split, ns.members, ns.out = str(out / "run"), "test", True, str(prediction)
    sample(ns, ds, pipe)
    ns.pred, ns.out = str(prediction), str(out / "report")
    ns.extra_meta = {"train_seconds": train_seconds, "total_seconds": None, "dataset": args.dataset}
    result = evaluate(ns, ds, pipe)
    if not result:  # a rank other than 0 under torchrun
        return 0
    total = time.perf_counter() - t0
    result["meta"]["total_seconds"] = total
    write_json(out / "report" / "metrics.json", result)
    print(f"demo finished in {total:.0f} s; report: {out / 'report' / 'report.md'}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1); got {text}")
    return value


def _bounds_option(text: str):
    """``auto``, ``none`` or ``LO,HI`` (either side may be empty: ``0,`` is a lower bound only)."""
    key = text.strip().lower()
    if key in ("auto", "none"):
        return key
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"must be auto, none or LO,HI (e.g. 0,1 or 0,); got {text!r}")
    try:
        from .bounds import check_bounds

        bounds = check_bounds([float(p) if p.strip() else None for p in parts])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; got {text!r}") from None
    if bounds is None:
        raise argparse.ArgumentTypeError(f"LO,HI needs at least one number; got {text!r}")
    return bounds


def _resolve_bounds(args, declared, lr, hr, scale: int):
    """The bounds the model uses: ``--bounds LO,HI`` (checked on the training fields: an error if they
    break them), none, or with ``auto`` those the data declare (the packaged MRI and images, a
    netCDF/Zarr variable's CF valid range), kept only where the training fields obey them."""
    from .bounds import check_bounds, check_pairs

    choice = getattr(args, "bounds", "auto")
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
            raise CommandError(f"--bounds {text}: {exc}") from None
        if not args.quiet:
            print(f"note: the data declare bounds {list(bounds)} but {exc}; training without bounds")
        return None
    return list(bounds)


def _energy(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0.0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def _add_model_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    none_if_demo = (lambda v: None) if demo else (lambda v: v)
    p.add_argument("--patch-size", type=_positive_int, default=none_if_demo(4), help="POD patch size p")
    p.add_argument("--stride", type=_positive_int, default=None, help="patch stride (default: p, no overlap)")
    p.add_argument("--rank", type=_positive_int, default=None, help="POD modes r (default: by --energy)")
    p.add_argument("--energy", type=_energy, default=none_if_demo(0.999),
                   help="POD energy to keep (of the validation fields' variance when validating)")
    p.add_argument("--basis", choices=("auto", "shared", "local"), default=none_if_demo("auto"),
                   help="POD basis; auto: shared or local, whichever reaches --energy of the validation "
                        "fields' variance with fewer modes (also chooses r unless --rank)")
    p.add_argument("--preset", choices=("tiny", "small", "paper"), default="tiny")
    p.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=True,
                   help="sample members in mirrored pairs (same noise, negated): a less noisy ensemble mean")
    p.add_argument("--correlated-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="diffusion noise correlated across patches as the training tokens are (default on)")
    p.add_argument("--residual", choices=("ridge", "none"), default="ridge",
                   help="ridge (default): diffuse what a ridge regression tuned on the validation fields "
                        "misses (CorrDiff-style); none: diffuse the field itself")
    p.add_argument("--condition", choices=("anomaly", "detail"), default="anomaly",
                   help="a residual model's condition: the ridge's anomaly (default) or only what it adds "
                        "below the input grid (blind to level and trend)")
    p.add_argument("--schedule", choices=("cosine", "linear", "learned"), default="cosine")
    p.add_argument("--prediction", choices=("v", "epsilon"), default="v")
    p.add_argument("--steps", type=_nonnegative_int, default=None,
                   help="most training steps (default 2000); validation stops training earlier")
    p.add_argument("--val-fraction", type=_fraction, default=0.15,
                   help="last fraction of the training fields held out for validation (default 0.15; 0: none)")
    p.add_argument("--eval-every", type=_positive_int, default=50, help="steps between validation losses")
    p.add_argument("--patience", type=_nonnegative_int, default=8,
                   help="stop after this many validations without improvement (0: never stop early)")
    p.add_argument("--batch-size", type=_positive_int, default=none_if_demo(16))
    p.add_argument("--learning-rate", type=_positive_float, default=1e-3)
    p.add_argument("--sample-steps", type=_positive_int, default=DEFAULT_SAMPLE_STEPS,
                   help=f"the model's sampler steps (default {DEFAULT_SAMPLE_STEPS}; sample --sample-steps overrides)")
    p.add_argument("--sampler", choices=SAMPLERS, default=_Config.sampler,
                   help=f"the model's sampler (default {_Config.sampler}; dpmsolver++ needs fewer steps; "
                        "sample --sampler overrides)")
    p.add_argument("--bounds", type=_bounds_option, default="auto",
                   help="the field's physical bounds LO,HI (either may be empty: 0, for >= 0): where the input "
                        "block mean sits at a bound the block is certain; auto (default): those the data declare "
                        "(packaged MRI and images [0, 1], a variable's CF valid_range/valid_min/valid_max), "
                        "if the training fields obey them; none: no bounds")
    p.add_argument("--checkpoint-every", type=_positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)


def _add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: CUDA when torch has it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="podiff", description="Patch-POD latent diffusion: super-resolution "
                                     "with calibrated, closed-form uncertainty.")
    parser.add_argument("--version", action="version", version=f"podiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, data=True):
        if data:
            p.add_argument("--data", required=True,
                           help="sst | mri | images | a netCDF file | a Zarr store | 'files*.nc' | FILE.npz")
            p.add_argument("--scale", type=_positive_int, default=None, help="downscaling factor (makes LR when absent)")
            p.add_argument("--var", default=None, help="the netCDF/Zarr variable (default: the only gridded one)")
            p.add_argument("--channels", default=None, help="VAR1,VAR2,...: variables stacked as channels")
            p.add_argument("--dims", default=None, help="Y,X: the grid's dimension names (default: lat/lon, "
                                                        "y/x or the last two)")
            p.add_argument("--time", default=None, help="START:STOP (labels, e.g. 2006-04:2009-12) of the sample axis")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    p = sub.add_parser("info", help="versions, devices, kernel backends")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("fit-pod", help="fit a patch POD and save it")
    common(p)
    p.add_argument("--out", required=True, help="POD file (.safetensors)")
    p.add_argument("--split", choices=("train", "val", "test", "all"), default="train")
    p.add_argument("--chunk-mb", type=_positive_float, default=256.0,
                   help="netCDF/Zarr: read at most this many MiB of samples at a time (default 256)")
    _add_model_options(p)
    _add_device_option(p)
    p.set_defaults(func=cmd_fit_pod)

    p = sub.add_parser("train", help="fit the POD (unless --pod) and train the denoiser")
    common(p)
    p.add_argument("--out", required=True, help="run folder (checkpoint, model, train.json)")
    p.add_argument("--pod", default=None, help="a POD file from fit-pod")
    p.add_argument("--split", choices=("all", "train", "val", "test", "train+val"), default="all",
                   help="fields of the file to use (default all; the last --val-fraction of them validate)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="keep the ensemble's spread as sampled (default: scaled on the validation fields)")
    p.add_argument("--spread-calibration", choices=("members", "crps", "modes", "moments"), default="members",
                   help="how the spread is scaled: minimise the members' fair CRPS on the validation fields "
                        "(members, the default), or the CRPS of the Gaussian N(mean, variance) (crps), first per "
                        "POD mode then overall (modes), or match the validation mean squared error (moments)")
    p.add_argument("--error-shape", choices=("validation", "gaussian"), default="validation",
                   help="the predictive's shape for intervals and CRPS: the validation errors' quantiles over the "
                        "calibrated std (validation, the default: heavier tails where edges make them), or Gaussian")
    p.add_argument("--error-bands", type=_positive_int, default=ERROR_BANDS,
                   help=f"with --error-shape validation: one shape per equal-count band of the predicted mean "
                        f"(default {ERROR_BANDS}; errors are often larger for their std at some levels, e.g. the "
                        f"dark edge of a head; 1: one shape)")
    p.add_argument("--no-regression-baseline", dest="regression_baseline", action="store_false",
                   help="skip training the regression ViT baseline (the ridge baseline is always fitted)")
    p.add_argument("--memory-mb", type=_positive_float, default=2048.0,
                   help="netCDF/Zarr training fields larger than this many MiB stream: scaling, ridge, POD and "
                        "baselines are fitted on an evenly spaced subsample of this size, and each step reads "
                        "its batch from the file (default 2048)")
    _add_model_options(p)
    _add_device_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample an ensemble: mean and std (and members) to .nc, .zarr or .npz")
    common(p)
    p.add_argument("--model", required=True, help="run folder from train")
    p.add_argument("--out", required=True, help="prediction file: .nc (netCDF-4), .zarr or .npz")
    p.add_argument("--variance", action="store_true", help="also store the variance (std is always stored)")
    p.add_argument("--num-samples", type=_positive_int, default=16)
    p.add_argument("--sample-steps", type=_positive_int, default=None,
                   help=f"sampler steps (default: the model's, set by train --sample-steps, {DEFAULT_SAMPLE_STEPS})")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="sampler (default: the model's, set by train --sampler): ddim, ancestral, dpmsolver++ "
                        "(DPM-Solver++ (2M): about 10 steps do what 50 DDIM steps do) or sde-dpmsolver++")
    p.add_argument("--split", choices=("train", "val", "test", "all"), default="test")
    p.add_argument("--members", action="store_true", help="also store the decoded members")
    p.add_argument("--seed", type=int, default=0)
    _add_device_option(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="score a prediction against the truth and the baselines")
    common(p)
    p.add_argument("--pred", required=True, help="prediction file from sample")
    p.add_argument("--out", required=True, help="report folder")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="end to end on packaged data: train, sample, evaluate, report")
    common(p, data=False)
    p.add_argument("--dataset", choices=("sst", "mri", "images"), default="sst")
    p.add_argument("--out", default="podiff-demo", help="output folder")
    p.add_argument("--num-samples", type=_positive_int, default=None)
    _add_model_options(p, demo=True)
    _add_device_option(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    created_group = succeeded = False
    try:
        if hasattr(args, "device"):  # before any output is written: a missing GPU is a one-line error
            args.device = resolve_device(args.device)
        # under torchrun: one process group for train and sample
        created_group = not distributed.is_active() and distributed.init_from_env()
        if getattr(args, "device", None) is not None and args.device.type == "cuda" and args.device.index is None:
            args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
        code = args.func(args)
        succeeded = True
        return code
    except KeyboardInterrupt:
        print(f"podiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as exc:
        message = one_line(exc)
        print(f"podiff {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        if created_group:  # ours to end: left to the interpreter's exit, gloo can abort the process
            distributed.shutdown(wait=succeeded)


if __name__ == "__main__":
    sys.exit(main())
