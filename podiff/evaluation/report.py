"""Evaluation of a prediction against the truth and the baselines, and the report folder.

``evaluate(mean, variance, target, lr_test, scale=..., predictions={name: [N, C, H, W]}, ...)`` ->
the ``metrics.json`` dict (``{"model": {...}, "bicubic": {...}, "pod_projection": {...}, "ridge":
{...}, "spectra": {...}, "meta": {...}}``, one entry per baseline prediction given);
``write_report(folder, result, lr, target, mean, variance, pod, scale, comparisons=None)`` writes
``metrics.json`` (atomically), the figures and ``report.md``; ``comparisons`` (e.g. ``{"one
member": members[0], "ridge": predictions["ridge"]}``) are drawn beside the truth and the mean.
The model's probabilistic scores use its closed-form mean and variance with the predictive's
shape (``error_quantiles``, from the validation errors, ``podiff.evaluation.error_shape``; Gaussian when
None): CRPS, central-interval coverage, MACE, spread–skill; ``crps_gaussian`` and
``mace_gaussian`` give the Gaussian's beside them; with members, the ensemble CRPS too.
``high_k_power``: the prediction's power over the truth's in the upper half of the wavenumbers
(``metrics.high_wavenumber_power_ratio``; the model's ``members_high_k_power`` is its members'),
and ``spectra`` the power spectra behind it: an ensemble mean and a regression lose the small
scales, a member should keep them. ``std_seams``: how much the predicted std varies with the position
within a patch (``metrics.grid_imprint``; 0 without seams), and ``error_seams`` how much the RMS
error of the mean does (per pixel over the fields): a std that follows the error has the error's
seams (the input's coarse cells can make them real where they coincide with the patches).
With members: ``members_band_power``
(their power over the truth's in log-spaced wavenumber bands, ``metrics.band_power_ratios``),
``patch_edge_ratio`` (their jumps across patch edges over the truth's, ``metrics.patch_edge_ratio``)
and ``rank_flatness`` (``metrics.rank_histogram_flatness``). With the model's bounds
(``podiff.data.bounds``) every baseline gets the model's certain pixels, and ``meta["bounds"]``
says what fraction of the pixels they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from podiff.core.io import atomic_write, write_json
from podiff.data import bounds as bounds_
from podiff.evaluation import error_shape, metrics

#: The entries of a result that are not a method's scores.
NOT_METHODS = ("meta", "spectra", "comparison")


def methods(result: dict) -> dict:
    """The scores of each method in a result, in order: the model, then each baseline."""
    return {name: entry for name, entry in result.items() if name not in NOT_METHODS}


#: Fields with a shorter side below this get no spectrum (too few wavenumbers to split in halves).
SPECTRUM_MIN_SIZE = 8


def _data_range(hr: torch.Tensor) -> float:
    valid = hr[~torch.isnan(hr)]
    return float(valid.max() - valid.min())


def score(mean: torch.Tensor, target: torch.Tensor, variance: torch.Tensor | None = None,
          members: torch.Tensor | None = None, error_quantiles=None, band_edges=None) -> dict:
    """Deterministic scores, plus probabilistic ones when a variance is given (of the shape
    ``error_quantiles`` when given, one per band of the mean with ``band_edges``, else Gaussian)."""
    rng = _data_range(target)
    out = {"rmse": metrics.rmse(mean, target), "mae": metrics.mae(mean, target),
           "psnr": metrics.psnr(mean, target, rng)}
    filled_target = torch.nan_to_num(target, nan=float(target[~torch.isnan(target)].mean()))
    filled_mean = torch.where(torch.isnan(target), filled_target, torch.nan_to_num(mean))
    if min(target.shape[-2:]) >= 7:
        out["ssim"] = metrics.ssim(filled_mean, filled_target, rng, mask=~torch.isnan(target))
    if min(target.shape[-2:]) >= SPECTRUM_MIN_SIZE:
        out["high_k_power"] = metrics.high_wavenumber_power_ratio(mean, target)
        if members is not None:  # the members' spectrum once, for both
            spectra = metrics.paired_spectra(members, target)
            out["members_high_k_power"] = metrics.high_k_ratio(*spectra)
            try:
                out["members_band_power"] = metrics.power_in_bands(*spectra)
            except ValueError:  # too few wavenumbers for the bands: no band powers
                pass
    if variance is not None and bool((variance[~torch.isnan(variance)] > 0).any()):
        cov = metrics.coverage_gaussian(mean, variance, target)
        valid = ~torch.isnan(target) & ~torch.isnan(variance)
        out.update({
            "crps": metrics.crps_gaussian(mean, variance, target),
            "coverage": {str(k): v for k, v in cov.items()},
            "mace": metrics.mace(cov),
            "spread_skill": math.sqrt(float(variance[valid].double().mean())) / out["rmse"],
        })
        if error_quantiles:
            shaped = error_shape.coverage(mean, variance, target, error_quantiles, edges=band_edges)
            out.update({"crps_gaussian": out["crps"], "mace_gaussian": out["mace"],
                        "crps": error_shape.crps(mean, variance, target, error_quantiles, edges=band_edges),
                        "coverage": {str(k): v for k, v in shaped.items()}, "mace": metrics.mace(shaped)})
        if members is not None:
            out["crps_ensemble_fair"] = metrics.crps_ensemble(members, target, fair=True)
            ens = metrics.coverage(members, target)
            out["coverage_ensemble"] = {str(k): v for k, v in ens.items()}
            out["rank_flatness"] = metrics.rank_histogram_flatness(metrics.rank_histogram(members, target))
    return out


def evaluate(mean, variance, target, lr_test, *, scale: int, bounds=None, period: int | None = None, members=None,
             meta=None, predictions: dict | None = None, error_quantiles=None, band_edges=None,
             spectra_of=(), spreads: dict | None = None) -> dict:
    """Scores of the model and the baselines on the same pixels.

    ``predictions``: each baseline's prediction ``[N, C, H, W]`` by name (``podiff.baselines``;
    the workflow makes them), scored beside the model. With the model's ``bounds`` every
    baseline's certain pixels (``podiff.data.bounds``) are set to their bound as the model's are
    (in ``predictions`` too), so the comparison is on equal knowledge. ``period``: the POD's
    stride, for the predicted std's patch grid (``std_seams``). ``error_quantiles``: the
    predictive's shape (None: Gaussian), one per band of the mean with ``band_edges``. ``spectra_of``:
    the baselines whose power spectra go beside the truth's, the mean's and the members'.
    ``spreads``: a calibrated predictive for some baselines by name (``baselines.calibrated.ErrorSpread``:
    ``variance(prediction)``, ``error_quantiles``, ``band_edges``): those are scored as probabilistic
    forecasts too (CRPS, coverage, MACE, with ``crps_gaussian``/``mace_gaussian``), and
    ``result["comparison"]`` says how the model's CRPS stands against the best of them
    (``compare_calibrated``)."""
    result = {"model": score(mean, target, variance, members, error_quantiles, band_edges)}
    if variance is not None and period is not None and period >= 2 and min(target.shape[-2:]) > period:
        # the predicted spread's patch grid: how it varies with the position within a patch
        std = torch.where(torch.isnan(target), float("nan"), variance.double().clamp_min(0).sqrt())
        result["model"]["std_seams"] = metrics.grid_imprint(std, period)
        if mean.shape[0] > 1:  # the error's own: the RMS over the fields, per pixel
            rms = ((mean.double() - target.double()) ** 2).nanmean(0).sqrt()
            result["model"]["error_seams"] = metrics.grid_imprint(rms, period)
    if members is not None and period is not None and period >= 2 and min(target.shape[-2:]) > period:
        result["model"]["patch_edge_ratio"] = metrics.patch_edge_ratio(members, target, period)
    predictions = {} if predictions is None else predictions
    for name, prediction in predictions.items():
        predictions[name] = prediction.cpu().to(target.dtype)
        if bounds is not None:  # the model's knowledge of the bounds, given to every baseline
            predictions[name] = bounds_.apply(predictions[name], lr_test.to(predictions[name]), bounds, scale)[0]
        spread = (spreads or {}).get(name)
        if spread is None:
            result[name] = score(predictions[name], target)
            continue
        var = spread.variance(predictions[name]).to(target.dtype)
        if bounds is not None:  # certain pixels: no spread
            var = bounds_.apply(predictions[name], lr_test.to(predictions[name]), bounds, scale, var)[1]
        result[name] = score(predictions[name], target, var, error_quantiles=spread.error_quantiles,
                             band_edges=spread.band_edges)
        result[name]["calibrated_on_fields"] = spread.fields
    comparison = compare_calibrated(result)
    if comparison is not None:
        result["comparison"] = comparison
    if min(target.shape[-2:]) >= SPECTRUM_MIN_SIZE:
        result["spectra"] = _spectra(target, mean, members, {name: predictions[name] for name in spectra_of
                                                             if name in predictions})
    result["meta"] = dict(meta or {})
    if bounds is not None:
        certain = bounds_.certain_pixels(lr_test.cpu(), bounds, scale) & ~torch.isnan(target.cpu())
        result["meta"]["bounds"] = {"bounds": bounds, "certain_fraction": float(certain.float().mean())}
    return result


def compare_calibrated(result: dict) -> dict | None:
    """The model's CRPS (the members' fair CRPS where there are members, else its closed-form
    predictive's) against the best calibrated baseline's (the lower of its shaped and Gaussian
    CRPS), and the RMSE of its mean against the lowest baseline RMSE: ``{"crps", "best_calibrated",
    "best_calibrated_crps", "crps_ratio", "rmse", "best_rmse_baseline", "best_rmse", "rmse_ratio",
    "sentence"}``; None without a calibrated baseline or a model CRPS."""
    model = result.get("model", {})
    crps = model.get("crps_ensemble_fair", model.get("crps"))
    baselines = {name: entry for name, entry in methods(result).items() if name != "model"}
    peers = {name: min(entry["crps"], entry.get("crps_gaussian", entry["crps"])) for name, entry in baselines.items()
             if "crps" in entry}
    if crps is None or not peers:
        return None
    best = min(peers, key=peers.get)
    ratio = crps / peers[best]
    rmses = {name: entry["rmse"] for name, entry in baselines.items() if "rmse" in entry}
    best_rmse = min(rmses, key=rmses.get)
    how = f"{(1 - ratio) * 100:.1f} % below" if ratio < 1 else f"{(ratio - 1) * 100:.1f} % above"
    verdict = "beats" if ratio < 1 else "does not beat"
    sentence = (f"The diffusion {verdict} the best calibrated regression ({best}, CRPS {peers[best]:.4g}): its "
                f"CRPS {crps:.4g} is {how} it (ratio {ratio:.3f}); its mean's RMSE {model['rmse']:.4g} against the "
                f"best baseline's ({best_rmse}) {rmses[best_rmse]:.4g} (ratio {model['rmse'] / rmses[best_rmse]:.3f}).")
    return {"crps": crps, "best_calibrated": best, "best_calibrated_crps": peers[best], "crps_ratio": ratio,
            "rmse": model["rmse"], "best_rmse_baseline": best_rmse, "best_rmse": rmses[best_rmse],
            "rmse_ratio": model["rmse"] / rmses[best_rmse], "sentence": sentence}


def _spectra(target, mean, members, predictions: dict) -> dict:
    """Power spectra (``metrics.power_spectrum`` on the truth's valid pixels) as lists for JSON."""
    valid = ~torch.isnan(target)
    fields = {"truth": target, "ensemble mean": mean}
    if members is not None:
        fields["members"] = members
    fields.update(predictions)
    out = {}
    for name, field in fields.items():
        k, power = metrics.power_spectrum(field.double(), valid.expand_as(field))
        out.setdefault("wavenumber", k.tolist())
        out[name] = power.tolist()
    return out


def _panels(n: int, H: int, W: int):
    """``(rows, cols, figsize)`` for ``n`` field panels: stacked for wide strips (the SST's
    16×432), side by side for squarer fields."""
    aspect = W / H
    if aspect > 2:
        return n, 1, (min(12, 3 * aspect), 1.6 * n + 0.5)
    return 1, n, (3.0 * n * min(aspect, 1.5), 3.2)


def _figures(folder: Path, lr, target, mean, variance, coverage: dict | None, pod, scale: int,
             comparisons: dict | None = None, spectra: dict | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    i = 0
    std = variance[i, 0].sqrt()
    panels = [("LR input", lr[i, 0]), ("truth", target[i, 0]), ("ensemble mean", mean[i, 0]),
              ("predicted std", std), ("|error|", (mean[i, 0] - target[i, 0]).abs())]
    vmin, vmax = np.nanmin(target[i, 0].numpy()), np.nanmax(target[i, 0].numpy())

    def draw(name, panels, same_scale):
        rows, cols, figsize = _panels(len(panels), *target.shape[-2:])
        fig, axes = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
        for ax, (title, img) in zip(axes.flat, panels, strict=False):
            same = title in same_scale
            im = ax.imshow(img.numpy(), vmin=vmin if same else None, vmax=vmax if same else None,
                           cmap="viridis" if same else "magma", aspect="auto" if cols == 1 else "equal")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.02 if cols == 1 else 0.046)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        names.append(name)

    draw("fields.png", panels, ("LR input", "truth", "ensemble mean"))
    if comparisons:
        shown = [("truth", target[i, 0]), ("ensemble mean", mean[i, 0])]
        shown += [(title, field[i, 0]) for title, field in comparisons.items()]
        draw("members.png", shown, tuple(title for title, _ in shown))
    if spectra:
        fig, ax = plt.subplots(figsize=(4.6, 3.4))
        k = np.asarray(spectra["wavenumber"])
        for name, power in spectra.items():
            if name != "wavenumber":
                ax.loglog(k, np.asarray(power), "k-" if name == "truth" else "-", lw=1.6 if name == "truth" else 1,
                          label=name)
        ax.axvline(0.25, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("wavenumber (cycles per pixel)")
        ax.set_ylabel("power per pixel")
        ax.set_title("power spectra (dotted: the upper half starts)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "spectra.png", dpi=110)
        plt.close(fig)
        names.append("spectra.png")
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
        for lo, hi in zip(edges[:-1], edges[1:], strict=False):
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


def write_report(folder: str | Path, result: dict, lr, target, mean, variance, pod, scale: int,
                 comparisons: dict | None = None) -> Path:
    """``metrics.json``, the figures and ``report.md`` in ``folder``; returns the report path.
    ``comparisons``: more fields ``[N, C, H, W]`` by title (one member, the ridge) for ``members.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "metrics.json", result)
    figures = _figures(folder, lr, target, mean, variance, result["model"].get("coverage"), pod, scale,
                       comparisons, result.get("spectra"))
    rows = ["| method | RMSE | MAE | SSIM | CRPS | CRPS (Gaussian) | members' fair CRPS | MACE | spread/skill | "
            "high-k power |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods(result).items():  # the model, then each baseline
        rows.append(f"| {name} | " + " | ".join(_fmt(m[k]) if k in m else "—" for k in
                                                  ("rmse", "mae", "ssim", "crps", "crps_gaussian",
                                                   "crps_ensemble_fair", "mace", "spread_skill",
                                                   "high_k_power")) + " |")
    rows.append("")
    rows.append("A baseline's CRPS and MACE are its prediction's with a per-pixel spread from its errors on the "
                "validation fields (fitted on the training fields only), shaped as those errors are; "
                "CRPS (Gaussian): with a Gaussian of that spread.")
    model = result["model"]
    cov = model.get("coverage", {})
    shaped = "mace_gaussian" in model
    lines = ["# podiff report", "", f"Data: {result['meta'].get('data', '?')}, split "
             f"{result['meta'].get('split', '?')}, {result['meta'].get('samples', '?')} samples.", "",
             *([result["comparison"]["sentence"], ""] if "comparison" in result else []),
             *rows, "", "Coverage of the central intervals (" +
             ("closed-form mean and variance, the error shape of the validation fields" if shaped
              else "analytic Gaussian") + "): " + ", ".join(f"{float(k):.0%}: {v:.3f}" for k, v in cov.items()), ""]
    if shaped:
        lines += [f"With a Gaussian shape instead: CRPS {_fmt(model['crps_gaussian'])}, "
                  f"MACE {_fmt(model['mace_gaussian'])}.", ""]
    if "bounds" in result["meta"]:
        info = result["meta"]["bounds"]
        lines += [f"Bounds {info['bounds']}: {info['certain_fraction']:.1%} of the pixels lie in blocks whose input "
                  "sits at a bound; they are certain for the model and every baseline, and coverage leaves them out.",
                  ""]
    if "members_high_k_power" in result["model"]:
        lines += ["High-wavenumber power (upper half of the wavenumbers) over the truth's: members "
                  f"{result['model']['members_high_k_power']:.3f}, ensemble mean {result['model']['high_k_power']:.3f}"
                  + (f", ridge {result['ridge']['high_k_power']:.3f}" if "high_k_power" in result.get("ridge", {})
                     else "") + ".", ""]
    if "members_band_power" in result["model"]:
        lines += ["Members' power over the truth's, band by band of the wavenumber (cycles per pixel): " + ", ".join(
            f"{b['k_low']:.3g}–{b['k_high']:.3g}: {b['ratio']:.2f}" for b in result["model"]["members_band_power"])
            + ".", ""]
    if "patch_edge_ratio" in result["model"]:
        lines += ["Patch edges: the members' squared jumps between neighbouring pixels across patch edges, relative "
                  f"to those within patches, are {result['model']['patch_edge_ratio']:.2f}× the truth's (1: no "
                  "seams).", ""]
    if "rank_flatness" in result["model"]:
        flat = result["model"]["rank_flatness"]
        lines += [f"Rank histogram: reliability index {flat['reliability_index']:.3f} (0: flat), χ²/df "
                  f"{flat['chi2'] / flat['df']:.3g}.", ""]
    if "std_seams" in result["model"]:
        errors = result["model"].get("error_seams")
        lines += ["Patch seams: the predicted standard deviation varies by "
                  f"{result['model']['std_seams']:.1%} (std over mean) with the position within a patch "
                  "(0 without seams)" + ("." if errors is None else
                                         f"; the RMS error of the mean by {errors:.1%}."), ""]
    lines += [f"![{name}]({name})" for name in figures]
    lines += ["", "```", json.dumps(result["meta"], indent=2), "```", ""]
    report = folder / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return report
