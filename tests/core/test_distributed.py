"""Several ranks give what one process gives: DDP training with the same global batch (same loss
curve and weights), exact standardisation / POD reduction, sharded sampling, and ``podiff train``
/ ``podiff sample`` under ``torchrun`` with 2 CPU (gloo) ranks."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.core import distributed
from podiff.diffusion.training import rank_rows
from podiff.fitting import fit

S = 4


def fields(n, seed):
    g = torch.Generator().manual_seed(seed)
    hr = F.avg_pool2d(torch.randn(n, 1, 22, 22, generator=g), 7, stride=1) * 3 + 10.0
    hr[:, :, :2, :3] = float("nan")  # a masked corner
    return F.avg_pool2d(hr, S), hr


def config(**kw):
    base = dict(residual="none", antithetic=False, scale=S, patch_size=4, rank=6, train_steps=12, batch_size=8,
                warmup=3, ema_decay=0.9,
                denoiser=dict(width=32, depth=2, heads=2), sample_steps=3, schedule="learned")
    return PipelineConfig(**{**base, **kw})


def _worker(rank, world, init_file, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        lr, hr = fields(13, 0)  # 13 samples: shards of 7 and 6
        rows = distributed.shard(13, rank, world)
        pipe = PODiffPipeline(config())
        history = fit(pipe, lr[rows], hr[rows], progress=False)
        lr_test, _ = fields(5, 1)
        result = pipe.sample(lr_test, num_samples=3, return_samples=True)  # every rank passes all 5
        if rank == 0:
            torch.save({"history": history, "state": pipe.denoiser.state_dict(), "offset": pipe.offset,
                        "scale": pipe.data_scale, "basis": pipe.pod.basis, "eig": pipe.pod.eigenvalues,
                        "mean": result.mean, "variance": result.variance, "samples": result.samples}, out)
        dist.barrier()  # no rank tears gloo down while the other still talks (that aborted once)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(out)), nprocs=2, join=True)
    return torch.load(out)


def test_ddp_matches_one_process(two_ranks):
    lr, hr = fields(13, 0)
    single = PODiffPipeline(config())
    history = fit(single, lr, hr, progress=False)
    # Standardisation and the POD are reduced exactly (float64 sums), not approximately.
    torch.testing.assert_close(two_ranks["offset"], single.offset, rtol=1e-6, atol=0)
    torch.testing.assert_close(two_ranks["scale"], single.data_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(two_ranks["eig"], single.pod.eigenvalues, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(two_ranks["basis"], single.pod.basis, rtol=1e-4, atol=1e-5)
    # Same global batch, same noise: the same loss curve and weights, to float rounding
    # (the two ranks' halves reduce in another order than one batch).
    assert len(two_ranks["history"]) == len(history) == 12
    np.testing.assert_allclose(two_ranks["history"], history, rtol=1e-5, atol=1e-7)  # measured: 1.8e-7
    for name, value in single.denoiser.state_dict().items():
        torch.testing.assert_close(two_ranks["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)  # 6e-8
    # Training really moved: the curve is not trivially equal.
    assert history[0] != history[-1]


def test_sharded_sampling_matches_one_process(two_ranks):
    lr, hr = fields(13, 0)
    single = PODiffPipeline(config())
    fit(single, lr, hr, progress=False)
    lr_test, _ = fields(5, 1)
    result = single.sample(lr_test, num_samples=3, return_samples=True)
    for key in ("mean", "variance", "samples"):
        got, want = two_ranks[key], getattr(result, key)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=key)  # measured: 1e-6


def _residual_worker(rank, world, init_file, out):
    import torch.distributed as dist

    from podiff.fitting import refit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        lr, hr = fields(13, 0)
        lr_val, hr_val = fields(4, 2)
        rows = distributed.shard(13, rank, world)
        pipe = PODiffPipeline(config(residual="ridge", basis="shared"))
        history = list(fit(pipe, lr[rows], hr[rows], progress=False, validation=(lr_val, hr_val), patience=None))
        held = {"weights": pipe.mean_model.ridge.weights.clone(), "cond_mean": pipe.mean_model.cond_mean,
                "cond_scale": pipe.mean_model.cond_scale, "offset": pipe.offset, "eig": pipe.pod.eigenvalues,
                "state": {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}}
        info = refit(pipe, lr[rows], hr[rows], (lr_val, hr_val), steps=4, progress=False)
        if rank == 0:
            torch.save({"history": history, "held": held, "refit": info,
                        "refit_weights": pipe.mean_model.ridge.weights, "spread": pipe.calibration.spread,
                        "refit_state": pipe.denoiser.state_dict()}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_residual_model_and_its_refit_on_two_ranks_match_one_process(tmp_path):
    """Every rank fits the mean model on every rank's fields (gathered) and keeps the out-of-fold
    predictions of its own; the refit gathers the fields and refits as one process does."""
    import torch.multiprocessing as mp

    from podiff.fitting import refit

    out = tmp_path / "rank0.pt"
    mp.spawn(_residual_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ranks = torch.load(out)
    lr, hr = fields(13, 0)
    lr_val, hr_val = fields(4, 2)
    single = PODiffPipeline(config(residual="ridge", basis="shared"))
    history = fit(single, lr, hr, progress=False, validation=(lr_val, hr_val), patience=None)
    held = ranks["held"]
    torch.testing.assert_close(held["weights"], single.mean_model.ridge.weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(held["cond_mean"], single.mean_model.cond_mean, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(held["cond_scale"], single.mean_model.cond_scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(held["offset"], single.offset, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(held["eig"], single.pod.eigenvalues, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ranks["history"], history, rtol=1e-5, atol=1e-7)
    for name, value in single.denoiser.state_dict().items():
        torch.testing.assert_close(held["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    info = refit(single, lr, hr, (lr_val, hr_val), steps=4, progress=False)
    assert ranks["refit"]["fields"] == info["fields"] == 17 and ranks["refit"]["steps"] == 4
    assert ranks["refit"]["spread_ratio"] == pytest.approx(info["spread_ratio"], rel=1e-9)
    assert ranks["spread"] == pytest.approx(single.calibration.spread, rel=1e-9)
    torch.testing.assert_close(ranks["refit_weights"], single.mean_model.ridge.weights, rtol=1e-10, atol=1e-12)
    for name, value in single.denoiser.state_dict().items():
        torch.testing.assert_close(ranks["refit_state"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_samples_do_not_depend_on_chunks_or_batches():
    lr, hr = fields(13, 0)
    pipe = PODiffPipeline(config(train_steps=4, sampler="ancestral"))  # noise at every step
    fit(pipe, lr, hr, progress=False)
    lr_test, _ = fields(4, 2)
    whole = pipe.sample(lr_test, num_samples=3, return_samples=True)
    one_chain_at_a_time = pipe.sample(lr_test, num_samples=3, return_samples=True, member_budget=1)
    torch.testing.assert_close(one_chain_at_a_time.samples, whole.samples, rtol=1e-4, atol=1e-5, equal_nan=True)
    # Images 2 and 3 alone, named by their ids, get the members they got in the whole batch.
    part = pipe.sample(lr_test[2:], num_samples=3, return_samples=True, image_ids=[2, 3])
    torch.testing.assert_close(part.samples, whole.samples[:, 2:], rtol=1e-4, atol=1e-5, equal_nan=True)
    other_seed = pipe.sample(lr_test, num_samples=3, return_samples=True, seed=1)
    assert not torch.allclose(other_seed.samples.nan_to_num(), whole.samples.nan_to_num())


def test_shard_covers_everything_once():
    for n in (0, 1, 5, 13, 16):
        for world in (1, 2, 3, 7):
            parts = [range(n)[distributed.shard(n, r, world)] for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_batch_not_divisible_by_world_is_refused():
    with pytest.raises(ValueError, match="batch_size must be divisible by the world size 2; got 7"):
        rank_rows(7, 0, 2)
    assert rank_rows(8, 1, 2) == slice(4, 8)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_podiff_train_and_sample_under_torchrun(tmp_path):
    lr, hr = fields(16, 3)
    data = tmp_path / "fields.npz"
    np.savez(data, hr=hr.numpy())
    args = ["--data", str(data), "--scale", "4", "--quiet"]
    # A residual model (every rank fits the ridge on all fields); the held-out POD choice is one-process only.
    train = ["train", *args, "--steps", "6", "--batch-size", "4", "--patch-size", "4", "--rank", "6",
             "--residual", "ridge", "--basis", "shared", "--val-fraction", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "podiff.cli"]
    for out, cmd in ((tmp_path / "ddp", launch), (tmp_path / "one", [sys.executable, "-m", "podiff.cli"])):
        done = subprocess.run([*cmd, *train, "--out", str(out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        done = subprocess.run([*cmd, "sample", *args, "--model", str(out), "--num-samples", "3", "--sample-steps", "2",
                               "--out", str(out / "pred.npz")], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    ddp, one = (json.loads((tmp_path / d / "train.json").read_text()) for d in ("ddp", "one"))
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["steps"] == one["steps"] == 6
    np.testing.assert_allclose(ddp["final_loss"], one["final_loss"], rtol=1e-3)
    with np.load(tmp_path / "ddp" / "pred.npz") as a, np.load(tmp_path / "one" / "pred.npz") as b:
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(a["variance"], b["variance"], rtol=1e-2, atol=1e-4)


def test_shutdown_ends_a_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    distributed.shutdown()  # nothing initialised: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    assert dist.is_initialized()
    distributed.shutdown()
    assert not dist.is_initialized()
