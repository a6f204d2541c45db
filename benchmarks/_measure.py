"""Measurement helpers shared by the benchmark suite (conftest.py) and benchmarks/end_to_end.py."""

from __future__ import annotations

import platform
import sys

import torch


def peak_memory_mb(fn) -> float:
    """Peak extra memory of one call of ``fn``: CUDA allocator peak, or the CPU profiler's allocation trace."""
    if torch.cuda.is_available() and getattr(fn, "device", "cpu") == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # An op's self memory is its allocations minus its frees (a parent may free what a child
    # allocated): count what it adds at its start and what it frees at its end, an upper bound
    # (summing self memory in start order let a parent's frees hide its children's peak).
    changes = []
    for e in prof.events():
        used = e.self_cpu_memory_usage
        if used:
            changes.append((e.time_range.start if used > 0 else e.time_range.end, used))
    current = peak = 0
    for _, used in sorted(changes, key=lambda c: (c[0], -c[1])):
        current += used
        peak = max(peak, current)
    return peak / 2**20


def peak_rss_mb(setup: str, call: str, warmup: str = "") -> float | None:
    """Growth of a fresh process's resident high-water mark over ``call``, as ``top`` shows it.

    ``setup`` builds the inputs, ``warmup`` (small inputs) gets imports and first-call set-up
    out of the way; the mark is then reset (/proc/self/clear_refs) and ``call`` runs once.
    None where the kernel cannot reset the mark.
    """
    import subprocess
    import textwrap

    code = textwrap.dedent(setup) + "\n" + textwrap.dedent(warmup) + textwrap.dedent("""
        def _rss(field):
            with open("/proc/self/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith(field)) * 1024
        _before = _rss("VmRSS:")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    """) + textwrap.dedent(call) + '\nprint("PEAK_RSS", _rss("VmHWM:") - _before)\n'
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        if "clear_refs" in done.stderr:
            return None
        raise RuntimeError(f"peak_rss_mb: the measured process failed: {done.stderr[-1500:]}")
    return int(done.stdout.split("PEAK_RSS")[-1]) / 2**20


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} threads, {gpu}; torch {torch.__version__}, Python "
            f"{sys.version.split()[0]}")
