"""Benchmark helpers: peak memory per call, and a ratio table of ours vs the baseline.

Each benchmark calls ``compare(group, provider, fn, baseline=...)``. At the end of the
session the table of time and peak-memory ratios (baseline / ours, higher is better for
us) is printed and, with ``--results-md PATH``, written as markdown with the machine.
"""

from __future__ import annotations

import pytest
import torch
from _measure import machine, peak_memory_mb  # noqa: F401  (re-exported for the benchmark files)

_RESULTS: dict[str, dict[str, dict]] = {}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    parser.addoption("--results-md", default=None, help="write the ratio table as markdown to this path")


def on_device(fn):
    """Wraps ``fn`` so that a timing includes the GPU work it queued (and tags the device)."""

    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    run.device = DEVICE
    return run


@pytest.fixture
def compare(benchmark):
    """``compare(group, provider, fn, baseline=False, rounds=5)``: time and peak memory of one provider."""

    def run(group: str, provider: str, fn, baseline: bool = False, rounds: int = 5):
        benchmark.group = group
        fn = on_device(fn)
        mem = peak_memory_mb(fn)
        benchmark.extra_info.update(provider=provider, baseline=baseline, peak_mem_mb=round(mem, 2))
        result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        stats = benchmark.stats.stats
        _RESULTS.setdefault(group, {})[provider] = {"median_s": stats.median, "mem_mb": mem, "baseline": baseline}
        return result

    return run


def _table() -> list[str]:
    lines = [
        "| benchmark | ours | baseline | ours (ms) | baseline (ms) | speed-up | ours peak (MiB) | baseline peak (MiB) "
        "| memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group, providers in _RESULTS.items():
        base = [(n, r) for n, r in providers.items() if r["baseline"]]
        ours = [(n, r) for n, r in providers.items() if not r["baseline"]]
        for bn, b in base:
            for on, o in ours:
                mem_ratio = b["mem_mb"] / o["mem_mb"] if o["mem_mb"] > 0 else float("inf")
                lines.append(
                    f"| {group} | {on} | {bn} | {o['median_s'] * 1e3:.2f} | {b['median_s'] * 1e3:.2f} | "
                    f"{b['median_s'] / o['median_s']:.1f}x | {o['mem_mb']:.1f} | {b['mem_mb']:.1f} | {mem_ratio:.1f}x |"
                )
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    lines = _table()
    terminalreporter.write_sep("=", "podiff: ours vs baseline (median time, peak memory)")
    terminalreporter.write_line(f"machine: {machine()}")
    for ln in lines:
        terminalreporter.write_line(ln)
    path = config.getoption("--results-md")
    if path:
        with open(path, "w") as f:
            f.write(f"Machine: {machine()}\n\n" + "\n".join(lines) + "\n")
        terminalreporter.write_line(f"written to {path}")
