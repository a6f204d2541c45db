"""The demo workflow (``podiff demo``): train on a packaged dataset's train split, validate on its
val split, sample its test split and write the report, end to end.

The demo runs the library's defaults (``PipelineConfig()``, ``TrainOptions()``); only the patch
size, the energy, the bound on the steps and the ensemble differ by domain (the images keep
improving past 2000 steps: early stopping ends them near 10 000).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from podiff.config import PipelineConfig, TrainOptions
from podiff.core import distributed
from podiff.workflows.common import DataSource, prepare_out
from podiff.workflows.evaluate import EvaluateRequest, evaluate
from podiff.workflows.sample import SampleRequest, sample
from podiff.workflows.train import TrainRequest, train

DEMO_DEFAULTS = {
    "sst": dict(patch_size=4, energy=0.999, train_steps=2000),
    "mri": dict(patch_size=8, energy=0.995, train_steps=2000),
    "images": dict(patch_size=8, energy=0.99, train_steps=16000),
}
DEMO_MEMBERS = {"sst": 32, "mri": 16, "images": 16}


def demo_config(dataset: str, **overrides) -> PipelineConfig:
    """The demo's config for ``dataset``: the defaults with the domain's patch size, energy and
    steps, then ``overrides``."""
    if dataset not in DEMO_DEFAULTS:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, DEMO_DEFAULTS))}; got {dataset!r}")
    return PipelineConfig(**{**DEMO_DEFAULTS[dataset], **overrides})


@dataclass
class DemoRequest:
    """The demo on ``dataset`` into ``out``; ``config`` None: ``demo_config(dataset)``;
    ``num_samples`` None: the domain's ensemble size."""

    dataset: str = "sst"
    out: str | Path = "podiff-demo"
    config: PipelineConfig | None = None
    options: TrainOptions = field(default_factory=TrainOptions)
    num_samples: int | None = None
    sample_steps: int | None = None
    sampler: str | None = None
    bounds: object = "auto"
    device: object = "auto"
    overwrite: bool = False
    quiet: bool = False


def demo(request: DemoRequest) -> dict:
    """Runs the demo; returns the report's ``metrics.json`` dict (empty on ranks other than 0)."""
    from podiff.core.io import write_json
    from podiff.data.datasets import split_indices
    from podiff.data.fields import netcdf_available

    out = Path(request.out)
    if distributed.rank_world()[0] == 0:
        prepare_out(out, request.overwrite)
    config = request.config or demo_config(request.dataset)
    source = DataSource(request.dataset, scale=config.scale)
    t0 = time.perf_counter()
    ds = source.load()
    # Train on the train split and validate on the val split; the test split stays unseen.
    pipe = train(TrainRequest(source, out / "run", config, request.options, split="train+val",
                              val_count=len(split_indices(len(ds), "val")), bounds=request.bounds,
                              device=request.device, overwrite=True, quiet=request.quiet), ds)
    train_seconds = time.perf_counter() - t0
    prediction = out / ("prediction.nc" if netcdf_available() else "prediction.npz")
    # The members go into the prediction: the report compares one with the mean and the ridge.
    members = request.num_samples or DEMO_MEMBERS[request.dataset]
    sample(SampleRequest(replace(source, scale=None), out / "run", prediction, num_samples=members, split="test",
                         sample_steps=request.sample_steps, sampler=request.sampler, members=True, seed=config.seed,
                         device=request.device, overwrite=True, quiet=request.quiet), ds, pipe)
    result = evaluate(EvaluateRequest(source, prediction, out / "report", overwrite=True, quiet=request.quiet,
                                      extra_meta={"train_seconds": train_seconds, "total_seconds": None,
                                                  "dataset": request.dataset}), ds, pipe)
    if not result:  # a rank other than 0 under torchrun
        return result
    total = time.perf_counter() - t0
    result["meta"]["total_seconds"] = total
    write_json(out / "report" / "metrics.json", result)
    print(f"demo finished in {total:.0f} s; report: {out / 'report' / 'report.md'}")
    return result


__all__ = ["DEMO_DEFAULTS", "DEMO_MEMBERS", "DemoRequest", "demo", "demo_config"]
