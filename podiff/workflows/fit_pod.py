"""The POD-fitting workflow (``podiff fit-pod``): a ``PatchPOD`` of a split of the fields, standardised
as the pipeline standardises its own, saved to a file; netCDF/Zarr data stream in chunks."""

from __future__ import annotations

from pathlib import Path

import torch

from podiff.core.devices import resolve_device
from podiff.workflows.common import DataSource, WorkflowError, naming, prepare_out


def fit_pod(source: DataSource, out: str | Path, *, patch_size: int, stride: int | None = None,
            rank: int | None = None, energy: float | None = 0.999, basis: str = "auto", split: str = "train",
            chunk_mb: float = 256.0, device="auto", overwrite: bool = False, quiet: bool = False):
    """Fits and saves the POD; returns it. ``basis="auto"`` is shared here (choosing needs
    validation fields)."""
    from podiff.data.datasets import DATASETS
    from podiff.data.fields import sniff
    from podiff.latent.pod import PatchPOD

    with naming(source.data):
        out = Path(out)
        prepare_out(out, overwrite)
        pod = PatchPOD(patch_size, stride, rank=rank, energy=None if rank else energy,
                       basis="shared" if basis == "auto" else basis)
        device = resolve_device(device)
        if source.data not in DATASETS and sniff(source.data) in ("netcdf3", "netcdf4", "zarr", "glob"):
            from podiff.data.streaming import fit_pod_streaming

            if source.scale is None:
                raise WorkflowError(f"{source.data}: give --scale (the POD's patches tile a grid that --scale divides)")
            fit_pod_streaming(pod, source.data, source.var, source.scale, split=split, **source.selection(),
                              budget_bytes=int(chunk_mb * 2**20), device=device, progress=not quiet)
        else:
            from podiff.data.standardise import fit_scaling, standardise

            _, hr, _ = source.load().split(split)
            hr = hr.to(device)
            pod.fit(standardise(hr, *fit_scaling(hr, ~torch.isnan(hr))), progress=not quiet)
        pod.save(out)
    return pod


__all__ = ["fit_pod"]
