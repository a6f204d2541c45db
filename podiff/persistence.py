"""Saving and loading a trained ``PODiffPipeline``: one folder, written atomically, read on any device.

``config.json`` (the config, denoiser config, image size, data scaling, step, POD class),
``pod.safetensors`` and ``weights.safetensors`` (live and EMA weights). Tensors are written
from the CPU, so a model trained on a GPU loads on a CPU machine and the other way round.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .io import atomic_write, write_json

FORMAT = "podiff.PODiffPipeline"
FORMAT_VERSION = 1


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
        "offset": pipe.offset.tolist(), "data_scale": pipe.data_scale.tolist(), "step": pipe.step_count,
        "best_step": pipe.best_step, "pod_choice": pipe.pod_choice, "val_history": [list(v) for v in pipe.val_history],
        "pod": type(pipe.pod).__name__,
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

    from .global_pod import GlobalPOD
    from .config import PipelineConfig
    from .pod import PatchPOD

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no podiff model at {directory} (config.json missing)")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} is {meta.get('format')!r} version {meta.get('version')}; "
                         f"this podiff reads {FORMAT} version {FORMAT_VERSION}")
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
    pipe.step_count = int(meta.get("step", 0))
    pipe.best_step = meta.get("best_step")
    pipe.val_history = [(int(a), float(b)) for a, b in meta.get("val_history", [])]
    pipe.pod_choice = meta.get("pod_choice")
    if pipe.config.residual != "none":
        from .residual import MeanModel

        pipe.mean_model = MeanModel.load(directory / "mean_model.safetensors")
    return pipe.to(device if device is not None else "cpu")


__all__ = ["save_pipeline", "load_pipeline", "FORMAT", "FORMAT_VERSION"]
