"""The evaluation workflow (``podiff evaluate``): a prediction file scored against the truth and
every baseline (``podiff.baselines.BASELINES``), written as a report folder (``metrics.json``,
``report.md``, figures, ``metrics_maps.nc``), whole or not at all.

Example::

    from podiff.workflows import DataSource, EvaluateRequest, evaluate
    result = evaluate(EvaluateRequest(DataSource("sst.nc"), pred="pred.nc", out="report"))
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from podiff.core import distributed
from podiff.core.version import __version__
from podiff.workflows.common import (
    DataSource,
    WorkflowError,
    data_for_model,
    load_baselines,
    load_model,
    load_spreads,
    refuse_existing,
)


@dataclass
class EvaluateRequest:
    """Score the prediction file ``pred`` against ``source``'s truth; the report goes to ``out``.
    ``extra_meta``: more entries for ``metrics.json``'s ``meta``."""

    source: DataSource
    pred: str | Path
    out: str | Path
    overwrite: bool = False
    quiet: bool = False
    extra_meta: dict = field(default_factory=dict)


def baseline_predictions(pipe, model_dir: Path, ds, lr_test) -> tuple[dict, dict]:
    """Every baseline's prediction of ``lr_test`` by name, in ``BASELINES`` order, and how each was
    had: saved with the model, made from it, or (a model saved without it) fitted on the data's
    train split."""
    from podiff.baselines import BASELINES

    saved = load_baselines(pipe, model_dir)
    predictions, about = {}, {}
    for name, entry in BASELINES.items():
        if name in saved:
            baseline = saved[name]
            about[name] = "saved with the model" + (", tuned on its validation fields" if name == "ridge" else "") + (
                "; fitted on the fields train.json's fitted_on names")
        elif entry.make is not None:
            baseline = entry.make(pipe)
        elif entry.refit is not None:  # a run from before the saved baselines
            lr_train, hr_train, _ = ds.split("train")
            baseline = entry.refit(pipe, lr_train, hr_train)
        else:
            continue
        predictions[name] = baseline.predict(lr_test).cpu()
    return predictions, about


def evaluate(request: EvaluateRequest, ds=None, pipe=None) -> dict:
    """Runs the evaluation workflow; returns the ``metrics.json`` dict (empty on ranks other than 0)."""
    from podiff.baselines import BASELINES
    from podiff.core.io import atomic_directory
    from podiff.data.prediction_file import read_prediction
    from podiff.evaluation.metric_maps import write_metric_maps
    from podiff.evaluation.report import evaluate as score_all
    from podiff.evaluation.report import write_report

    distributed.barrier()  # under torchrun: rank 0 wrote the prediction; it alone evaluates
    if distributed.rank_world()[0] != 0:
        return {}
    pred_path = Path(request.pred)
    pred = read_prediction(pred_path)  # a missing file: "no prediction file at ..."
    model_dir = Path(str(pred.attrs["model"]))
    pipe = pipe or load_model(model_dir)
    ds = ds or data_for_model(request.source, pipe)
    split = str(pred.attrs["split"])
    lr_test, hr_test, idx = ds.split(split)
    if not np.array_equal(idx, pred.indices):
        raise WorkflowError(f"{pred_path} was made on other samples of the data (split {split!r}, "
                            f"{len(pred.indices)} samples) than {request.source.data} gives ({len(idx)})")
    if not torch.isfinite(hr_test).any():
        raise WorkflowError(f"{request.source.data} holds no truth for split {split!r} (only the low-resolution "
                            f"input); evaluate needs the high-resolution fields")
    model_dir = model_dir / "model" if (model_dir / "model").is_dir() else model_dir
    mean, variance = torch.from_numpy(pred.mean), torch.from_numpy(pred.variance)
    members = torch.from_numpy(pred.members) if pred.members is not None else None
    out = Path(request.out)
    refuse_existing(out, request.overwrite)  # replaced only once the new report is whole
    meta = {"data": str(request.source.data), "split": split, "samples": int(len(idx)), "scale": ds.scale,
            "image_size": list(hr_test.shape[-2:]), "num_samples": int(pred.attrs["num_samples"]),
            "sample_seconds": float(pred.attrs.get("seconds", float("nan"))),
            "sample_steps": int(pred.attrs["steps"]),
            "seed": pipe.config.seed, "model": str(pred.attrs["model"]), "parameters": pipe.num_parameters(),
            "pod_rank": pipe.pod.rank, "versions": {"podiff": __version__, "torch": torch.__version__,
                                                     "python": platform.python_version()}}
    meta.update(request.extra_meta or {})
    predictions, meta["baselines"] = baseline_predictions(pipe, model_dir, ds, lr_test)
    spreads = {name: s for name, s in load_spreads(model_dir).items() if name in predictions
               and tuple(s.std.shape) == tuple(hr_test.shape[-3:])}  # a spread holds for its own grid only
    error_quantiles = pred.attrs.get("error_quantiles") or None  # absent in older files: Gaussian
    band_edges = pred.attrs.get("error_band_edges") or None  # absent or empty: one shape
    lr_test = pipe.target_input(lr_test)  # the report needs the target's coarse field only, not the covariates
    result = score_all(mean, variance, hr_test, lr_test, scale=pipe.config.scale, bounds=pipe.config.bounds,
                       period=getattr(pipe.pod, "stride", None), members=members, meta=meta,
                       predictions=predictions, error_quantiles=error_quantiles, band_edges=band_edges,
                       spectra_of=[name for name, entry in BASELINES.items() if entry.fit is not None],
                       spreads=spreads)
    comparisons = {"one member": members[0]} if members is not None else {}
    comparisons.update({name: predictions[name] for name in ("ridge",) if name in predictions})
    grid = ds.grid.take(idx) if ds.grid is not None else None
    with atomic_directory(out) as folder:  # the report is whole or absent
        report = out / write_report(folder, result, lr_test, hr_test, mean, variance, pipe.pod, ds.scale,
                                    comparisons).name
        write_metric_maps(folder / "metrics_maps.nc", mean, variance, hr_test, members, grid, error_quantiles,
                          band_edges)
    if not request.quiet:
        m = result["model"]
        others = ", ".join(f"{name} {result[name]['rmse']:.4g}" for name in predictions)
        print(f"model RMSE {m['rmse']:.4g} ({others}); "
              f"CRPS {m.get('crps', float('nan')):.4g}, MACE {m.get('mace', float('nan')):.3f} -> {report}")
        if "comparison" in result:
            print(result["comparison"]["sentence"])
    return result


__all__ = ["EvaluateRequest", "baseline_predictions", "evaluate"]
