"""End-to-end cost comparison: POD-ViT vs pixel-space ViT diffusion vs the global-POD MLP.

Same data, same ViT (the ``tiny`` preset: width 96, depth 4), same optimiser, steps, batch,
sampler (DDIM, 20 steps) and ensemble size, in one run. For each method: parameters, peak
memory of one training step and of one sampling step for a fixed batch of chains, training time
per step, sampling time per ensemble member, and the test RMSE and CRPS of the ensemble.

    python benchmarks/end_to_end.py                      # both datasets, writes benchmarks/end_to_end.md
    python benchmarks/end_to_end.py --dataset sst --steps 50 --out /tmp/e2e.md    # quicker

Methods: ``pod-vit pP`` (patch POD, energy-truncated rank), ``pixel pP`` (the identity basis:
the same ViT on raw pixel patches, r = C·p², i.e. pixel-space diffusion with patchify P),
``global-pod mlp`` (one basis over the whole field by snapshots, ``GlobalPOD``, and an MLP
denoiser on its single token; width 96 × 2, depth 4). Rows marked "cost only"
are too slow to train here; their costs are measured, their accuracy is not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from podiff import PipelineConfig, PODiffPipeline
from podiff.baselines import global_pod_pipeline, pixel_space_pipeline
from podiff.data import datasets as data
from podiff.evaluation import metrics
from podiff.fitting import build, fit, loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine, peak_memory_mb  # noqa: E402


@dataclass
class Method:
    name: str
    kind: str  # "pod", "pixel" or "global"
    patch_size: int | None = None
    train: bool = True  # False: cost only


PLANS = {
    # SST 16×432 (local POD, as in the demo); pixel p2 has 1728 tokens: cost only on 2 cores.
    "sst": dict(load=lambda: data.load("sst", 4), basis="local", energy=0.999, steps=600, batch=8, members=32,
                methods=[Method("pod-vit p4", "pod", 4), Method("pod-vit p8", "pod", 8),
                         Method("pixel p8", "pixel", 8), Method("pixel p4", "pixel", 4),
                         Method("pixel p2", "pixel", 2, train=False), Method("global-pod mlp", "global")]),
    # 22 crops of 256² from scikit-image's images (shared POD); pixel p4 has 4096 tokens: cost only.
    "images256": dict(load=lambda: data.load_images(4, size=256, by_position=False), basis="shared", energy=0.99,
                      steps=300, batch=8,
                      members=16,
                      methods=[Method("pod-vit p16", "pod", 16), Method("pod-vit p8", "pod", 8),
                               Method("pixel p16", "pixel", 16), Method("pixel p8", "pixel", 8),
                               Method("pixel p4", "pixel", 4, train=False), Method("global-pod mlp", "global")]),
}


def make_pipeline(method: Method, plan: dict, image_size, channels: int, steps: int, batch: int) -> PODiffPipeline:
    # the diffusion itself, as compared since this benchmark began: no mean model, independent members
    cfg = PipelineConfig(residual="none", antithetic=False, scale=4, patch_size=method.patch_size or 4,
                         basis=plan["basis"], energy=plan["energy"], preset="tiny", train_steps=steps,
                         batch_size=batch, sample_steps=20, warmup=50)
    if method.kind == "pod":
        return PODiffPipeline(cfg)
    if method.kind == "pixel":
        return pixel_space_pipeline(cfg, image_size, channels)
    return global_pod_pipeline(cfg)


def _on(device: str, fn):
    """Tags ``fn`` so that ``peak_memory_mb`` reads the CUDA allocator for GPU work."""
    fn.device = device
    return fn


def measure(method: Method, plan: dict, ds, steps: int, members: int, chains: int = 8) -> dict:
    lr, hr, _ = ds.split("train")
    lr_test, hr_test, _ = ds.split("test")
    device = hr.device.type
    row = {"method": method.name, "trained": method.train}
    pipe = make_pipeline(method, plan, tuple(hr.shape[-2:]), hr.shape[1], steps, plan["batch"])
    t0 = time.perf_counter()
    build(pipe.to(hr.device), lr, hr)  # POD fit and model construction, on the data's device
    row["pod_fit_s"] = time.perf_counter() - t0
    row.update(parameters=pipe.num_parameters(), tokens=pipe.pod.num_locations, rank=pipe.pod.rank)
    x0 = pipe.target_tokens(hr[: plan["batch"]]).float()
    cond = pipe.condition_tokens(lr[: plan["batch"]]).float()

    def train_step():
        value = loss(pipe, x0, cond, torch.Generator().manual_seed(0))
        value.backward()
        pipe.denoiser.zero_grad(set_to_none=True)

    row["train_peak_mib"] = peak_memory_mb(_on(device, train_step))
    c = pipe.condition_tokens(lr_test[:1]).float().expand(chains, -1, -1).contiguous()
    net = pipe.ema[0].eval()
    t = torch.full((chains,), 0.5)
    with torch.no_grad():
        row["sample_peak_mib"] = peak_memory_mb(_on(device, lambda: net(torch.randn_like(c[..., : pipe.pod.rank]), c,
                                                                         t.to(c.device))))
    n_train = steps if method.train else 3
    t0 = time.perf_counter()
    fit(pipe, lr, hr, steps=n_train, progress=False)
    row["train_s_per_step"] = (time.perf_counter() - t0) / n_train
    if method.train:
        t0 = time.perf_counter()
        out = pipe.sample(lr_test, num_samples=members, return_samples=True)
        seconds = time.perf_counter() - t0
        valid = torch.isfinite(hr_test)
        row["rmse"] = metrics.rmse(out.mean, hr_test, mask=valid)
        row["crps"] = metrics.crps_ensemble(out.samples, hr_test, mask=valid)
        row["sample_s_per_member"] = seconds / (members * lr_test.shape[0])
    else:  # two members of one image: the cost per member
        t0 = time.perf_counter()
        pipe.sample(lr_test[:1], num_samples=2)
        row["sample_s_per_member"] = (time.perf_counter() - t0) / 2
    return row


def _fmt(v, spec):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(name: str, rows: list[dict]) -> list[str]:
    """Markdown rows; ratios are relative to the first POD-ViT row (higher = that method costs more)."""
    ref = rows[0]
    lines = [f"### {name}", "",
             "| method | tokens × r | parameters | train peak (MiB) | sample peak (MiB) | train (ms/step) | "
             "sample (ms/member) | RMSE | CRPS | sample time vs POD-ViT | sample memory vs POD-ViT |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = "" if r["trained"] else " (cost only)"
        lines.append(
            f"| {r['method']}{note} | {r['tokens']} × {r['rank']} | {r['parameters']:,} | {r['train_peak_mib']:.1f} | "
            f"{r['sample_peak_mib']:.1f} | {r['train_s_per_step'] * 1e3:.0f} | {r['sample_s_per_member'] * 1e3:.0f} | "
            f"{_fmt(r.get('rmse'), '.4g')} | {_fmt(r.get('crps'), '.4g')} | "
            f"{r['sample_s_per_member'] / ref['sample_s_per_member']:.2f}× | "
            f"{r['sample_peak_mib'] / ref['sample_peak_mib']:.2f}× |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=[*PLANS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the plan's)")
    parser.add_argument("--members", type=int, default=None, help="ensemble members (default: the plan's)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples (quick runs)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("end_to_end.md")))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where data and models live (default: cuda when available; measured here on cpu)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    names = list(PLANS) if args.dataset == "all" else [args.dataset]
    lines = [f"Machine: {machine()}", "",
             f"Reproduce: `{' '.join(['python benchmarks/end_to_end.py', *(argv or sys.argv[1:])])}`", ""]
    results = {}
    for name in names:
        plan = PLANS[name]
        ds = plan["load"]()
        n = args.limit or len(ds.hr)
        ds = data.Dataset(ds.hr[:n].to(args.device), ds.lr[:n].to(args.device), ds.scale, ds.name, ds.meta)
        steps, members = args.steps or plan["steps"], args.members or plan["members"]
        wanted = None if args.methods is None else set(args.methods.split(","))
        rows = []
        for method in plan["methods"]:
            if wanted is not None and method.name not in wanted:
                continue
            print(f"[{name}] {method.name} ...", flush=True)
            rows.append(measure(method, plan, ds, steps, members))
            print(f"  {json.dumps(rows[-1])}", flush=True)
        results[name] = rows
        lines += table(f"{name}: {tuple(ds.hr.shape)}, {steps} training steps, batch {plan['batch']}, "
                       f"{members} members, DDIM 20 steps", rows) + [""]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
