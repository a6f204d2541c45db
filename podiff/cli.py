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
import math
import os
import platform
import sys

import torch

from podiff.config import (
    BASES,
    CONDITIONS,
    DOMAINS,
    MEMBER_GRIDS,
    PREDICTION_TYPES,
    PRESETS,
    RESIDUALS,
    SPREAD_CALIBRATIONS,
    PipelineConfig,
    TrainOptions,
)
from podiff.core import distributed
from podiff.core.devices import CHOICES as DEVICE_CHOICES
from podiff.core.devices import resolve_device
from podiff.core.version import __version__
from podiff.data.fields import one_line
from podiff.diffusion.denoiser import POSITION_EMBEDDINGS
from podiff.diffusion.samplers import SAMPLERS
from podiff.diffusion.schedules import SCHEDULES
from podiff.evaluation.error_shape import ERROR_SHAPES
from podiff.workflows import DataSource, WorkflowError
from podiff.workflows import demo as demo_workflow
from podiff.workflows import evaluate as evaluate_workflow
from podiff.workflows import fit_pod as fit_pod_workflow
from podiff.workflows import sample as sample_workflow
from podiff.workflows import train as train_workflow
from podiff.workflows.demo import DemoRequest, demo_config
from podiff.workflows.evaluate import EvaluateRequest
from podiff.workflows.sample import SampleRequest
from podiff.workflows.train import TrainRequest

CONFIG, OPTIONS = PipelineConfig(), TrainOptions()  # the defaults every option reads
#: The options that set a ``PipelineConfig`` field: option destination -> field.
CONFIG_OPTIONS = {
    "patch_size": "patch_size", "stride": "stride", "rank": "rank", "energy": "energy", "basis": "basis",
    "preset": "preset", "antithetic": "antithetic", "correlated_noise": "correlated_noise",
    "grid_shifts": "grid_shifts", "member_grids": "member_grids", "crop": "crop", "residual": "residual",
    "condition": "condition", "schedule": "schedule", "prediction_type": "prediction_type", "steps": "train_steps",
    "batch_size": "batch_size", "learning_rate": "learning_rate", "sample_steps": "sample_steps",
    "sampler": "sampler", "seed": "seed", "domain": "domain",
}
#: The options that set a ``TrainOptions`` field.
TRAIN_OPTIONS = ("val_fraction", "eval_every", "patience", "checkpoint_every", "calibrate", "spread_calibration",
                 "error_shape", "error_bands", "regression_baseline", "unet_baseline", "memory_mb", "refit")


def _source(args) -> DataSource:
    """``--data`` and what of it is read (``--scale``, ``--var``, ``--channels``, ``--dims``, ``--time``)."""
    def split(text):
        return text.split(",") if text else None

    from podiff.data.covariates import CovariateSpec

    def file_and_vars(values, option):
        if not values:
            return None
        if len(values) < 2:
            raise WorkflowError(f"{option} takes a file and at least one variable name; got {' '.join(values)}")
        return values[0], values[1:]

    covariates = CovariateSpec(file_and_vars(args.predictors, "--predictors"), file_and_vars(args.static, "--static"),
                               args.position, args.season)
    return DataSource(args.data, args.scale, args.var, split(args.channels), split(args.dims), args.time,
                      covariates)


def _config(args, base: PipelineConfig | None = None) -> PipelineConfig:
    """The config the model options give (an option left at None keeps ``base``'s value)."""
    from dataclasses import replace

    values = {name: getattr(args, dest) for dest, name in CONFIG_OPTIONS.items() if getattr(args, dest) is not None}
    if values.get("rank") is not None:
        values["energy"] = None
    base = base or PipelineConfig()
    denoiser = {key: getattr(args, dest) for dest, key in (("attention_window", "window"),
                                                           ("position_embedding", "position_embedding"))
                if getattr(args, dest, None) is not None}
    if denoiser:
        values["denoiser"] = {**base.denoiser, **denoiser}
    return replace(base, **values)


def _options(args) -> TrainOptions:
    return TrainOptions(**{name: getattr(args, name) for name in TRAIN_OPTIONS if hasattr(args, name)})


def cmd_info(args) -> int:
    from podiff_kernels import info

    print(f"podiff {__version__}, Python {platform.python_version()}, torch {torch.__version__}")
    info.main([])
    return 0


def cmd_fit_pod(args) -> int:
    pod = fit_pod_workflow(_source(args), args.out, patch_size=args.patch_size, stride=args.stride, rank=args.rank,
                           energy=args.energy, basis=args.basis, split=args.split, chunk_mb=args.chunk_mb,
                           device=args.device, overwrite=args.overwrite, quiet=args.quiet)
    print(f"{pod} -> {args.out}")
    return 0


def cmd_train(args) -> int:
    train_workflow(TrainRequest(_source(args), args.out, _config(args), _options(args), split=args.split,
                                pod=args.pod, bounds=args.bounds, device=args.device, resume=args.resume,
                                overwrite=args.overwrite, quiet=args.quiet))
    return 0


def cmd_sample(args) -> int:
    sample_workflow(SampleRequest(_source(args), args.model, args.out, num_samples=args.num_samples, split=args.split,
                                  sample_steps=args.sample_steps, sampler=args.sampler,
                                  member_grids=args.member_grids, members=args.members,
                                  variance=args.variance, seed=args.seed, device=args.device,
                                  overwrite=args.overwrite, quiet=args.quiet))
    return 0


def cmd_evaluate(args) -> int:
    evaluate_workflow(EvaluateRequest(_source(args), args.pred, args.out, overwrite=args.overwrite, quiet=args.quiet))
    return 0


def cmd_demo(args) -> int:
    config = _config(args, demo_config(args.dataset))
    demo_workflow(DemoRequest(args.dataset, args.out, config, _options(args), num_samples=args.num_samples,
                              sample_steps=None, sampler=None, bounds=args.bounds, device=args.device,
                              overwrite=args.overwrite, quiet=args.quiet))
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


def _zero_or_at_least_two(zero: str, unit: str = ""):
    """An argparse type: 0 (meaning ``zero``) or an integer >= 2 (of ``unit``)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < 0 or value == 1:
            raise argparse.ArgumentTypeError(f"must be 0 ({zero}) or an integer >= 2{unit}; got {text}")
        return value
    parse.__name__ = "int"  # argparse's message for text that is no integer: "invalid int value"
    return parse


_window = _zero_or_at_least_two("global attention")
_crop_tokens = _zero_or_at_least_two("the whole field", " (tokens a side)")


def _crop(text: str):
    """``--crop``: ``auto`` or what ``_crop_tokens`` takes."""
    return "auto" if text.strip().lower() == "auto" else _crop_tokens(text)


_crop.__name__ = "int"


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
        from podiff.data.bounds import check_bounds

        bounds = check_bounds([float(p) if p.strip() else None for p in parts])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; got {text!r}") from None
    if bounds is None:
        raise argparse.ArgumentTypeError(f"LO,HI needs at least one number; got {text!r}")
    return bounds


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
    """The options that set the model's config and its training, their defaults read from
    ``PipelineConfig`` and ``TrainOptions`` (the demo's None: the domain's demo config)."""
    none_if_demo = (lambda v: None) if demo else (lambda v: v)
    c, o = CONFIG, OPTIONS
    p.add_argument("--patch-size", type=_positive_int, default=none_if_demo(c.patch_size), help="POD patch size p")
    p.add_argument("--stride", type=_positive_int, default=c.stride, help="patch stride (default: p, no overlap)")
    p.add_argument("--rank", type=_positive_int, default=c.rank, help="POD modes r (default: by --energy)")
    p.add_argument("--energy", type=_energy, default=none_if_demo(c.energy),
                   help="POD energy to keep (of the validation fields' variance when validating)")
    p.add_argument("--basis", choices=BASES, default=c.basis,
                   help="POD basis; auto: shared or local, whichever reaches --energy of the validation "
                        "fields' variance with fewer modes (also chooses r unless --rank)")
    p.add_argument("--preset", choices=PRESETS, default=c.preset)
    p.add_argument("--attention-window", type=_window, default=None,
                   help="the denoiser attends within windows of this many tokens a side, shifted by half every "
                        "other block (cost linear in the area; 0 or unset: global attention, the default)")
    p.add_argument("--position-embedding", choices=POSITION_EMBEDDINGS, default=None,
                   help="the denoiser's position of each token on the grid: sincos (the default) or none (the "
                        "model is the same everywhere; with --attention-window it samples any domain, position "
                        "then comes from the coordinates, --position)")
    p.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=c.antithetic,
                   help="sample members in mirrored pairs (same noise, negated): a less noisy ensemble mean")
    p.add_argument("--correlated-noise", action=argparse.BooleanOptionalAction, default=c.correlated_noise,
                   help="diffusion noise correlated across patches as the training tokens are (default on)")
    p.add_argument("--grid-shifts", action=argparse.BooleanOptionalAction, default=c.grid_shifts,
                   help="train the denoiser on the patch grid shifted by every pixel offset within a patch, "
                        "one per batch, reaching past the field's edge (shared basis)")
    p.add_argument("--member-grids", type=int, choices=MEMBER_GRIDS, default=c.member_grids,
                   help="draw the members on this many patch grids shifted by half a patch, or by quarters for "
                        "16 (1: the fitted grid), "
                        "so that patch edges fall in different places from member to member (train with "
                        "--grid-shifts; exact mean and variance)")
    p.add_argument("--crop", type=_crop, default=c.crop,
                   help="train the denoiser on random crops of this many tokens a side (0: the whole field; a "
                        "step's cost is then the crop's, whatever the field's size); sampling takes the whole "
                        "field. auto (default): the whole field up to 1024 tokens, 16-token crops and 8-token "
                        "attention windows above")
    p.add_argument("--residual", choices=RESIDUALS, default=c.residual,
                   help="auto (default): diffuse what the mean model misses, the tuned ridge or a U-Net regression "
                        "where a paired t-test on the validation fields finds it better (CorrDiff-style); "
                        "ridge, unet: that one; none: diffuse the field itself")
    p.add_argument("--condition", choices=CONDITIONS, default=c.condition,
                   help="a residual model's condition: the ridge's anomaly or only what it adds below the input "
                        "grid (blind to level and trend); auto (default): the anomaly, the detail with --domain any")
    p.add_argument("--domain", choices=DOMAINS, default=c.domain,
                   help="fixed (default): the model samples the grid it was trained on; any: fields of any size "
                        "and place (a shared basis and ridge, windowed attention, no grid position: pass "
                        "coordinates with --position; with --crop it trains on crops)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default=c.schedule)
    p.add_argument("--prediction-type", "--prediction", dest="prediction_type", choices=PREDICTION_TYPES,
                   default=c.prediction_type, help="what the denoiser predicts (v or epsilon)")
    p.add_argument("--steps", type=_nonnegative_int, default=none_if_demo(c.train_steps),
                   help=f"most training steps (default {c.train_steps}); validation stops training earlier")
    p.add_argument("--val-fraction", type=_fraction, default=o.val_fraction,
                   help=f"last fraction of the training fields held out for validation (default {o.val_fraction}; "
                        f"0: none)")
    p.add_argument("--eval-every", type=_positive_int, default=o.eval_every, help="steps between validation losses")
    p.add_argument("--patience", type=_nonnegative_int, default=o.patience,
                   help="stop after this many validations without improvement (0: never stop early)")
    p.add_argument("--batch-size", type=_positive_int, default=c.batch_size)
    p.add_argument("--learning-rate", type=_positive_float, default=c.learning_rate)
    p.add_argument("--sample-steps", type=_positive_int, default=c.sample_steps,
                   help=f"the model's sampler steps (default {c.sample_steps}; sample --sample-steps overrides)")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default=c.sampler,
                   help=f"the model's sampler (default {c.sampler}; dpmsolver++ needs fewer steps; "
                        "sample --sampler overrides)")
    p.add_argument("--bounds", type=_bounds_option, default="auto",
                   help="the field's physical bounds LO,HI (either may be empty: 0, for >= 0): where the input "
                        "block mean sits at a bound the block is certain; auto (default): those the data declare "
                        "(packaged MRI and images [0, 1], a variable's CF valid_range/valid_min/valid_max), "
                        "if the training fields obey them; none: no bounds")
    p.add_argument("--checkpoint-every", type=_positive_int, default=o.checkpoint_every)
    p.add_argument("--seed", type=int, default=c.seed)


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
            p.add_argument("--scale", type=_positive_int, default=None,
                           help="downscaling factor (makes LR when absent)")
            p.add_argument("--var", default=None, help="the netCDF/Zarr variable (default: the only gridded one)")
            p.add_argument("--channels", default=None, help="VAR1,VAR2,...: variables stacked as channels")
            p.add_argument("--dims", default=None, help="Y,X: the grid's dimension names (default: lat/lon, "
                                                        "y/x or the last two)")
            p.add_argument("--time", default=None, help="START:STOP (labels, e.g. 2006-04:2009-12) of the sample axis")
            p.add_argument("--predictors", nargs="+", metavar=("FILE", "VAR"), default=None,
                           help="coarse predictors: a netCDF/Zarr file and its variables (on their own grid, at the "
                                "data's times; interpolated to the input grid)")
            p.add_argument("--static", nargs="+", metavar=("FILE", "VAR"), default=None,
                           help="high-resolution static fields on the data's grid: a netCDF/Zarr file and its "
                                "variables (elevation, land-sea mask)")
            p.add_argument("--position", action="store_true",
                           help="latitude and longitude (from the coordinates) as inputs")
            p.add_argument("--season", action="store_true", help="the time of year (from the time coordinate) as input")
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
    p.add_argument("--spread-calibration", choices=SPREAD_CALIBRATIONS, default=OPTIONS.spread_calibration,
                   help="how the spread is scaled: minimise the members' fair CRPS on the validation fields "
                        "(members, the default), or the CRPS of the Gaussian N(mean, variance) (crps), first per "
                        "POD mode then overall (modes), or match the validation mean squared error (moments)")
    p.add_argument("--error-shape", choices=ERROR_SHAPES, default=OPTIONS.error_shape,
                   help="the predictive's shape for intervals and CRPS: the validation errors' quantiles over the "
                        "calibrated std (validation, the default: heavier tails where edges make them), or Gaussian")
    p.add_argument("--error-bands", type=_positive_int, default=OPTIONS.error_bands,
                   help=f"with --error-shape validation: one shape per equal-count band of the predicted mean "
                        f"(default {OPTIONS.error_bands}; errors are often larger for their std at some levels, e.g. "
                        f"the "
                        f"dark edge of a head; 1: one shape)")
    p.add_argument("--no-regression-baseline", dest="regression_baseline", action="store_false",
                   help="skip training the regression ViT baseline (the ridge baseline is always fitted)")
    p.add_argument("--no-unet-baseline", dest="unet_baseline", action="store_false",
                   help="skip training the U-Net regression baseline")
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="keep the model and baselines fitted on the training fields only (by default, once the "
                        "validation fields have chosen the settings and steps, they are refitted on every field; "
                        "the spread stays calibrated on the held-out errors)")
    p.add_argument("--memory-mb", type=_positive_float, default=OPTIONS.memory_mb,
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
                   help=f"sampler steps (default: the model's, set by train --sample-steps, {CONFIG.sample_steps})")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default=None,
                   help="sampler (default: the model's, set by train --sampler): ddim, ancestral, dpmsolver++ "
                        "(DPM-Solver++ (2M): about 10 steps do what 50 DDIM steps do) or sde-dpmsolver++")
    p.add_argument("--member-grids", type=int, choices=MEMBER_GRIDS, default=None,
                   help="patch grids the members are drawn on (default: the model's, set by train "
                        "--member-grids; its spread was calibrated on those)")
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
    except (WorkflowError, FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as exc:
        message = one_line(exc)
        print(f"podiff {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        if created_group:  # ours to end: left to the interpreter's exit, gloo can abort the process
            distributed.shutdown(wait=succeeded)


if __name__ == "__main__":
    sys.exit(main())
