"""Saving and loading a trained ``PODiffPipeline``: one folder, written atomically, read on any device.

``config.json`` (the config, and the fitted state: denoiser config, image size, data scaling,
calibration, noise correlation, training record, POD class), ``pod.safetensors``,
``weights.safetensors`` (live and EMA weights) and, for a residual model,
``mean_model.safetensors``. Folders of version 1 (whose config held the calibration and the
noise correlation, and named ``prediction_type`` ``prediction``) load as they were
(``model.state.upgrade_saved``). Tensors are written
from the CPU, so a model trained on a GPU loads on a CPU machine and the other way round.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from podiff.core.io import atomic_write, write_json

FORMAT = "podiff.PODiffPipeline"
FORMAT_VERSION = 2


def save_pipeline(pipe, directory: str | Path) -> None:
    """Writes ``pipe`` to ``directory`` (created if needed); every file atomically."""
    from safetensors.torch import save_file

    if pipe.denoiser is None:
        raise RuntimeError("nothing to save: the pipeline is not trained")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "config": asdict(pipe.config),
        "denoiser": pipe.denoiser.config.to_dict(), "image_size": list(pipe.image_size),
        "offset": pipe.offset.tolist(), "data_scale": pipe.data_scale.tolist(),
        "calibration": asdict(pipe.calibration), "noise_correlation": pipe.noise_correlation,
        "step": pipe.training.step, "best_step": pipe.training.best_step, "pod_choice": pipe.pod_choice,
        "val_history": [list(v) for v in pipe.training.val_history], "pod": type(pipe.pod).__name__,
        "refit": pipe.training.refit,
        "covariate_scaling": None if pipe.covariate_offset is None else
        [pipe.covariate_offset.tolist(), pipe.covariate_scale.tolist()],
    }
    pipe.pod.save(directory / "pod.safetensors")
    if pipe.mean_model is not None:
        pipe.mean_model.save(directory / "mean_model.safetensors")
    tensors = {f"live.{k}": v for k, v in nn.ModuleList([pipe.denoiser, pipe.schedule]).state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in pipe.ema.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(directory / "weights.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(directory / "config.json", meta)


def load_pipeline(cls, directory: str | Path, device=None):
    """Reads a folder written by ``save_pipeline`` into a new ``cls`` on ``device`` (default CPU)."""
    from safetensors.torch import load_file

    from podiff.config import PipelineConfig
    from podiff.latent.global_pod import GlobalPOD
    from podiff.latent.pod import PatchPOD
    from podiff.model.state import Calibration, upgrade_saved

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no podiff model at {directory} (config.json missing)")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{config_path} is {meta.get('format')!r} version {meta.get('version')}; "
                         f"this podiff reads {FORMAT} versions 1 to {FORMAT_VERSION}")
    if meta["version"] == 1:
        meta = upgrade_saved(meta)
    pod_class = GlobalPOD if meta.get("pod", "PatchPOD") == "GlobalPOD" else PatchPOD
    pipe = cls(PipelineConfig(**meta["config"]), pod_class.load(directory / "pod.safetensors"))
    pipe.image_size = tuple(meta["image_size"])
    pipe.offset, pipe.data_scale = torch.tensor(meta["offset"]), torch.tensor(meta["data_scale"])
    pipe.build_model(denoiser_config=meta["denoiser"])
    try:
        tensors = load_file(str(directory / "weights.safetensors"))
        live = {k[5:]: v for k, v in tensors.items() if k.startswith("live.")}
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        nn.ModuleList([pipe.denoiser, pipe.schedule]).load_state_dict(live)
        pipe.ema.load_state_dict(ema)
    except Exception as exc:
        raise ValueError(f"{directory / 'weights.safetensors'} is unreadable or does not match the config: "
                         f"{exc}") from None
    pipe.calibration = Calibration(**meta.get("calibration", {}))
    pipe.noise_correlation = meta.get("noise_correlation")
    pipe.training.step = int(meta.get("step", 0))
    pipe.training.best_step = meta.get("best_step")
    pipe.training.val_history = [(int(a), float(b)) for a, b in meta.get("val_history", [])]
    pipe.training.refit = meta.get("refit")
    if meta.get("covariate_scaling"):
        pipe.covariate_offset, pipe.covariate_scale = (torch.tensor(v, dtype=torch.float32)
                                                       for v in meta["covariate_scaling"])
    pipe.pod_choice = meta.get("pod_choice")
    if pipe.config.residual != "none":
        from podiff.mean.mean_model import MeanModel

        pipe.mean_model = MeanModel.load(directory / "mean_model.safetensors")
    return pipe.to(device if device is not None else "cpu")


__all__ = ["save_pipeline", "load_pipeline", "FORMAT", "FORMAT_VERSION"]
