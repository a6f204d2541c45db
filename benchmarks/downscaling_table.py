"""The table of issue-style comparisons from ``podiff evaluate`` reports: podiff beside every baseline
scored as a calibrated forecast.

    python benchmarks/downscaling_table.py RUN.report [RUN2.report ...]

Each argument is a report folder (``metrics.json``). Per report: one row for the model (ensemble-mean
RMSE, the members' fair CRPS, the closed-form predictive's CRPS and MACE) and one per baseline
(RMSE, CRPS with its held-out error shape and Gaussian, MACE), then ``comparison``'s ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from podiff.evaluation.report import methods


def _f(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def rows(report: Path) -> list[str]:
    result = json.loads((report / "metrics.json").read_text())
    name = report.name.removesuffix(".report")
    m = result["model"]
    out = [f"| {name} | podiff | {_f(m['rmse'])} | {_f(m.get('crps_ensemble_fair'))} | {_f(m.get('crps'))} | "
           f"{_f(m.get('crps_gaussian'))} | {_f(m.get('mace'), 2)} |"]
    for key, entry in methods(result).items():
        if key == "model":
            continue
        out.append(f"| {name} | {key} | {_f(entry['rmse'])} | — | {_f(entry.get('crps'))} | "
                   f"{_f(entry.get('crps_gaussian'))} | {_f(entry.get('mace'), 2)} |")
    c = result.get("comparison")
    if c:
        out.append(f"| {name} | **podiff / best** | {c['rmse_ratio']:.3f} ({c['best_rmse_baseline']}) | "
                   f"{c['crps_ratio']:.3f} ({c['best_calibrated']}) | | | |")
    return out


def main(argv=None) -> None:
    reports = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    print("| case | method | RMSE | members' fair CRPS | CRPS (shaped) | CRPS (Gaussian) | MACE |")
    print("|---|---|---|---|---|---|---|")
    for report in reports:
        print("\n".join(rows(report)))


if __name__ == "__main__":
    main()
