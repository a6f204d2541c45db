"""Evaluation of a prediction against the truth and the baselines, and the report folder.

``evaluate(mean, variance, target, lr_test, lr_train, hr_train, pipeline, members=None, meta=None, baselines=None)``
-> the ``metrics.json`` dict
(``{"model": {...}, "bicubic": {...}, "pod_projection": {...}, "ridge": {...}, "meta": {...}}``);
``write_report(folder, result, lr, target, mean, variance, pod, scale)`` writes ``metrics.json``
(atomically), the figures and ``report.md``.
The model's probabilistic scores use its analytic Gaussian (mean, variance): CRPS in closed
form, central-interval coverage, MACE, spread–skill; with members, the ensemble CRPS too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from . import baselines as baselines_
from . import metrics
from .io import atomic_write, write_json


def _data_range(hr: torch.Tensor) -> float:
    valid = hr[~torch.isnan(hr)]
    return float(valid.max() - valid.min())


def score(mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor | None = None,
          members: torch.Tensor | None = None) -> dict:
    """Deterministic scores, plus probabilistic ones when a variance is given."""
    rng = _data_range(target)
    out = {"rmse": metrics.rmse(mean, target), "mae": metrics.mae(mean, target),
           "psnr": metrics.psnr(mean, target, rng)}
    filled_target = torch.nan_to_num(target, nan=float(target[~torch.isnan(target)].mean()))
    filled_mean = torch.where(torch.isnan(target), filled_target, torch.nan_to_num(mean))
    if min(target.shape[-2:]) >= 7:
        out["ssim"] = metrics.ssim(filled_mean, filled_target, rng, mask=~torch.isnan(target))
    if variance is not None and bool((variance[~torch.isnan(variance)] > 0).any()):
        cov = metrics.coverage_gaussian(mean, variance, target)
        valid = ~torch.isnan(target) & ~torch.isnan(variance)
        out.update({
            "crps": metrics.crps_gaussian(mean, variance, target),
            "coverage": {str(k): v for k, v in cov.items()},
            "mace": metrics.mace(cov),
            "spread_skill": math.sqrt(float(variance[valid].double().mean())) / out["rmse"],
        })
        if members is not None:
            out["crps_ensemble_fair"] = metrics.crps_ensemble(members, target, fair=True)
            ens = metrics.coverage(members, target)
            out["coverage_ensemble"] = {str(k): v for k, v in ens.items()}
    return out


def evaluate(mean, variance, target, lr_test, lr_train, hr_train, pipeline, members=None, meta=None,
             baselines: dict | None = None) -> dict:
    """Scores of the model and the baselines on the same pixels.

    ``baselines``: fitted ``{"ridge": ..., "regression": ...}`` (saved with the model by ``podiff
    train``); without a ridge, one is fitted on ``lr_train, hr_train`` with default settings."""
    result = {"model": score(mean, target, variance, members)}
    scale = pipeline.config.scale
    result["bicubic"] = score(baselines_.bicubic(lr_test, scale), target)
    result["pod_projection"] = score(baselines_.PODProjectionBaseline(pipeline).fit().predict(lr_test).cpu(), target)
    fitted = dict(baselines or {})
    if "ridge" not in fitted:
        fitted["ridge"] = baselines_.RidgeBaseline(scale).fit(lr_train, hr_train)
    for name, model in fitted.items():
        result[name] = score(model.predict(lr_test).cpu().to(target.dtype), target)
    result["meta"] = dict(meta or {})
    return result


def _figures(folder: Path, lr, target, mean, variance, coverage: dict | None, pod, scale: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    i = 0
    std = variance[i, 0].sqrt()
    panels = [("LR input", lr[i, 0]), ("truth", target[i, 0]), ("ensemble mean", mean[i, 0]),
              ("predicted std", std), ("|error|", (mean[i, 0] - target[i, 0]).abs())]
    aspect = target.shape[-1] / target.shape[-2]
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(12, 3 * aspect), 1.6 * len(panels) + 0.5))
    vmin, vmax = np.nanmin(target[i, 0].numpy()), np.nanmax(target[i, 0].numpy())
    for ax, (title, img) in zip(axes, panels):
        same_scale = title in ("LR input", "truth", "ensemble mean")
        im = ax.imshow(img.numpy(), vmin=vmin if same_scale else None, vmax=vmax if same_scale else None,
                       cmap="viridis" if same_scale else "magma", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(folder / "fields.png", dpi=110)
    plt.close(fig)
    names.append("fields.png")
    if coverage:
        levels = sorted(float(k) for k in coverage)
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
        ax.plot(levels, [coverage[str(k)] if str(k) in coverage else coverage[k] for k in levels], "o-",
                label="podiff")
        ax.set_xlabel("nominal central-interval level")
        ax.set_ylabel("observed coverage")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "reliability.png", dpi=110)
        plt.close(fig)
        names.append("reliability.png")
    valid = ~torch.isnan(target) & ~torch.isnan(variance)
    sd = variance[valid].sqrt().double()
    err = (mean[valid] - target[valid]).abs().double()
    if sd.numel() > 20:
        edges = torch.quantile(sd, torch.linspace(0, 1, 11, dtype=torch.float64))
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (sd >= lo) & (sd <= hi)
            if sel.any():
                xs.append(float(sd[sel].pow(2).mean().sqrt()))
                ys.append(float(err[sel].pow(2).mean().sqrt()))
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        top = max(xs + ys) * 1.05
        ax.plot([0, top], [0, top], "k--", lw=1, label="ideal")
        ax.plot(xs, ys, "o-", label="podiff")
        ax.set_xlabel("predicted std (binned RMS)")
        ax.set_ylabel("RMSE of the mean")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "spread_skill.png", dpi=110)
        plt.close(fig)
        names.append("spread_skill.png")
    ratio = pod.explained_variance_ratio.detach().cpu()  # the POD may live on a GPU
    ratio = ratio.mean(0) if ratio.dim() == 2 else ratio
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.semilogy(np.arange(1, ratio.numel() + 1), ratio.numpy(), "o-", ms=3)
    ax.set_xlabel("POD mode")
    ax.set_ylabel("explained variance ratio")
    ax.set_title(f"POD spectrum ({ratio.sum():.3f} kept)", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "pod_spectrum.png", dpi=110)
    plt.close(fig)
    names.append("pod_spectrum.png")
    return names


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(folder: str | Path, result: dict, lr, target, mean, variance, pod, scale: int) -> Path:
    """``metrics.json``, the figures and ``report.md`` in ``folder``; returns the report path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "metrics.json", result)
    figures = _figures(folder, lr, target, mean, variance, result["model"].get("coverage"), pod, scale)
    rows = ["| method | RMSE | MAE | SSIM | CRPS | MACE | spread/skill |", "|---|---|---|---|---|---|---|"]
    for name in ("model", "bicubic", "pod_projection", "ridge", "regression"):
        if name not in result:
            continue
        m = result.get(name, {})
        rows.append(f"| {name} | " + " | ".join(_fmt(m[k]) if k in m else "—" for k in
                                                  ("rmse", "mae", "ssim", "crps", "mace", "spread_skill")) + " |")
    cov = result["model"].get("coverage", {})
    lines = ["# podiff report", "", f"Data: {result['meta'].get('data', '?')}, split "
             f"{result['meta'].get('split', '?')}, {result['meta'].get('samples', '?')} samples.", "",
             *rows, "", "Coverage of the central intervals (analytic Gaussian): " +
             ", ".join(f"{float(k):.0%}: {v:.3f}" for k, v in cov.items()), ""]
    lines += [f"![{name}]({name})" for name in figures]
    lines += ["", "```", json.dumps(result["meta"], indent=2), "```", ""]
    report = folder / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return report
