"""The sampling workflow (``podiff sample``): a saved model's ensemble for a split of the fields,
written as a prediction file (``data.prediction_file``: mean, std, members, the input, the truth).

Example::

    from podiff.workflows import DataSource, SampleRequest, sample
    sample(SampleRequest(DataSource("sst.nc"), model="run", out="pred.nc", num_samples=32))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from podiff.core import distributed
from podiff.core.devices import resolve_device
from podiff.core.version import __version__
from podiff.workflows.common import DataSource, WorkflowError, data_for_model, load_model


@dataclass
class SampleRequest:
    """``num_samples`` members of the model in ``model`` (a run folder) for the ``split`` of
    ``source``, written to ``out`` (``.nc``, ``.zarr`` or ``.npz``); ``members``: store the decoded
    members; ``variance``: store the variance beside the std; ``sample_steps`` / ``sampler`` /
    ``member_grids``: None for the model's own (its spread was calibrated on its own)."""

    source: DataSource
    model: str | Path
    out: str | Path
    num_samples: int = 16
    split: str = "test"
    sample_steps: int | None = None
    sampler: str | None = None
    member_grids: int | None = None
    members: bool = False
    variance: bool = False
    seed: int = 0
    device: object = "auto"
    overwrite: bool = False
    quiet: bool = False


def sample(request: SampleRequest, ds=None, pipe=None):
    """Samples the ensemble and writes the prediction file; returns the ``Prediction`` (None on
    ranks other than 0 under torchrun)."""
    from podiff.data.prediction_file import Prediction, output_format, write_prediction

    model = Path(request.model)
    out = Path(request.out)
    output_format(out)  # a bad suffix fails before any work
    if out.exists() and not request.overwrite:
        raise WorkflowError(f"{out} exists; pass --overwrite to replace it")
    pipe = pipe or load_model(model)
    pipe.to(resolve_device(request.device))
    if request.member_grids is not None and request.member_grids != pipe.config.member_grids:
        pipe.config = replace(pipe.config, member_grids=int(request.member_grids))  # checked by the config
    ds = ds or data_for_model(request.source, pipe)
    lr, hr, idx = ds.split(request.split)
    t0 = time.perf_counter()
    # Under torchrun each rank samples its share of the images (seeded per image and member,
    # so the ensemble is the one-process ensemble); rank 0 writes the gathered result.
    sampler = request.sampler or pipe.config.sampler
    result = pipe.sample(lr, num_samples=request.num_samples, steps=request.sample_steps, seed=request.seed,
                         return_samples=request.members, progress=not request.quiet, image_ids=idx, sampler=sampler)
    seconds = time.perf_counter() - t0
    if distributed.rank_world()[0] != 0:
        return None
    calibration = pipe.calibration
    # The rate a user pays, comparable across domains: member fields of a megapixel per second.
    megapixels = len(idx) * hr.shape[1] * hr.shape[-2] * hr.shape[-1] / 1e6
    rate = request.num_samples * megapixels / seconds if seconds > 0 else float("inf")
    attrs = {"model": str(model), "data": str(request.source.data), "split": request.split,
             "var": ds.grid.var if ds.grid else "", "scale": int(pipe.config.scale),
             "num_samples": int(request.num_samples),
             "steps": int(request.sample_steps or pipe.config.sample_steps), "sampler": sampler,
             "member_grids": int(pipe.config.member_grids),
             "seed": int(request.seed), "model_seed": int(pipe.config.seed), "seconds": float(seconds),
             "member_megapixels_per_second": float(rate),
             "spread_calibration": float(calibration.spread), "podiff_version": __version__,
             "error_quantiles": calibration.error_quantiles or [],
             "error_band_edges": calibration.error_band_edges or [],
             "torch_version": torch.__version__,
             "history": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} podiff sample --model {model} "
                        f"--data {request.source.data} --split {request.split} --num-samples {request.num_samples}"}
    truth = hr.cpu().numpy()
    pred = Prediction(result.mean.cpu().numpy(), result.variance.cpu().numpy(), np.asarray(idx), attrs,
                      members=result.samples.cpu().numpy() if request.members else None,
                      lr=pipe.target_input(lr).cpu().numpy(),
                      truth=truth if np.isfinite(truth).any() else None,
                      grid=ds.grid.take(idx) if ds.grid is not None else None,
                      extra={"write_variance": request.variance})
    write_prediction(out, pred)
    if not request.quiet:
        print(f"sampled {request.num_samples} members × {len(idx)} samples ({request.split}) in {seconds:.1f} s "
              f"({rate:.3g} member megapixels per second, {sampler} {attrs['steps']} steps) -> {out}")
    return pred


__all__ = ["SampleRequest", "sample"]
