"""Reliability: bad input fails early with a message naming the argument, the expected and the
actual value; a killed training run resumes bit-exactly from its last checkpoint; output files are
written atomically; the streaming POD fit and chunked sampling keep to their memory budgets; the
same seed gives the same POD, weights and samples."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from podiff import PipelineConfig, PODiffPipeline
from podiff.cli import main
from podiff.fitting import fit
from podiff.latent.pod import PatchPOD, atomic_write

S = 4


def fields(n, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, 1, size + 6, size + 6, generator=g), 7, stride=1) * 3


def config(**kw):
    base = dict(residual="none", antithetic=False, scale=S, patch_size=4, rank=6, train_steps=4, batch_size=4, warmup=2,
                denoiser=dict(width=32, depth=1, heads=2), sample_steps=2)
    return PipelineConfig(**{**base, **kw})


# ---------------------------------------------------------------------- bad input


def test_infinite_values_outside_the_mask_are_refused():
    hr = fields(6, 0)
    hr[3, 0, 2, 5] = float("inf")
    with pytest.raises(ValueError, match=r"hr has an infinite value at \(3, 0, 2, 5\); mark masked pixels with NaN"):
        fit(PODiffPipeline(config()), F.avg_pool2d(fields(6, 0), S), hr, progress=False)
    lr = F.avg_pool2d(fields(6, 0), S)
    lr[1, 0, 0, 1] = -float("inf")
    with pytest.raises(ValueError, match=r"lr has an infinite value at \(1, 0, 0, 1\)"):
        fit(PODiffPipeline(config()), lr, fields(6, 0), progress=False)
    with pytest.raises(ValueError, match=r"infinite value at \(3, 0, 2, 5\) outside the mask"):
        PatchPOD(4, rank=3).fit(hr, progress=False)
    # The same value under the mask is fine: it never enters.
    mask = torch.ones_like(hr, dtype=torch.bool)
    mask[3, 0, 2, 5] = False
    pod = PatchPOD(4, rank=3).fit(hr, mask=mask, progress=False)
    assert torch.isfinite(pod.basis).all()


def test_all_masked_data_locations_and_images():
    x = fields(8, 1)
    with pytest.raises(ValueError, match="data holds no valid pixel: all 8 image"):
        PatchPOD(4, rank=3).fit(torch.full_like(x, float("nan")), progress=False)
    # One location masked in every image (land): fitted from the rest, NaN there on decode.
    land = x.clone()
    land[:, :, :4, 4:8] = float("nan")
    land[2] = float("nan")  # and one image entirely masked
    pod = PatchPOD(4, rank=3, basis="local").fit(land, progress=False)
    assert pod.report["empty_locations"] == [1] and pod.report["images"] == 8
    back = pod.decode(pod.encode(land))
    assert torch.isnan(back[:, :, :4, 4:8]).all() and torch.isfinite(back[:, :, 4:, :]).all()
    pipe = PODiffPipeline(config(basis="local"))
    fit(pipe, F.avg_pool2d(land, S), land, progress=False)
    out = pipe.sample(F.avg_pool2d(land[:2], S), num_samples=2)
    assert torch.isnan(out.variance[:, :, :4, 4:8]).all() and (out.variance[:, :, 4:, :] >= 0).all()


def test_constant_fields_work_with_a_warning():
    c = torch.full((6, 1, 16, 16), 3.5)
    with pytest.warns(RuntimeWarning, match="data is constant"):
        pod = PatchPOD(4, energy=0.99).fit(c, progress=False)
    tokens = pod.encode(c)
    assert torch.isfinite(tokens).all() and tokens.abs().max() == 0
    torch.testing.assert_close(pod.decode(tokens), c)
    # A constant channel in the pipeline: finite, the constant back, zero variance.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pipe = PODiffPipeline(config(rank=None, energy=0.99))
        fit(pipe, F.avg_pool2d(c, S), c, progress=False)
    out = pipe.sample(F.avg_pool2d(c[:2], S), num_samples=2)
    torch.testing.assert_close(out.mean, c[:2])
    assert torch.isfinite(out.variance).all() and out.variance.abs().max() < 1e-6


def test_sizes_channels_and_empty_data():
    x = fields(6, 2)
    # Smaller than a patch: the ops refuse it, naming the sizes; PatchPOD pads it (replicate), as it
    # pads any size the stride does not cover (the global-POD baseline relies on this).
    import podiff_kernels as pk

    with pytest.raises(ValueError, match="smaller than"):
        pk.patch_encode(torch.randn(4, 1, 5, 5), torch.eye(64), None, 8)
    small = PatchPOD(8, rank=3).fit(torch.randn(4, 1, 5, 5), progress=False)
    assert small.decode(small.encode(torch.randn(2, 1, 5, 5))).shape == (2, 1, 5, 5)
    pod = PatchPOD(4, rank=3).fit(x, progress=False)  # 16 is covered by p = s = 4; 18 is padded
    assert pod.decode(pod.encode(fields(2, 3, size=18)), image_size=(18, 18)).shape == (2, 1, 18, 18)
    with pytest.raises(ValueError, match="x has 3 channels; this POD was fitted on 1"):
        pod.encode(x.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="training needs at least two samples; got 0"):
        fit(PODiffPipeline(config()), torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 16, 16), progress=False)
    pipe = PODiffPipeline(config())
    fit(pipe, F.avg_pool2d(x, S), x, progress=False)
    with pytest.raises(ValueError, match=r"lr must be \[B, 1, 4, 4\] \(the trained size\); got \(2, 3, 4, 4\)"):
        pipe.sample(F.avg_pool2d(x[:2], S).expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"image_ids must hold one id per image \(2\); got shape \(3,\)"):
        pipe.sample(F.avg_pool2d(x[:2], S), image_ids=[0, 1, 2])


def test_npz_without_samples_or_numbers(tmp_path):
    from podiff.data.datasets import load_npz

    np.savez(tmp_path / "empty.npz", hr=np.zeros((0, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"'hr' holds no data; got shape \(0, 1, 16, 16\)"):
        load_npz(tmp_path / "empty.npz", 4)
    np.savez(tmp_path / "text.npz", hr=np.array([[["a", "b"]]]))
    with pytest.raises(ValueError, match="'hr' must hold numbers; got dtype <U1"):
        load_npz(tmp_path / "text.npz", 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """Low-precision images work: POD statistics in float64 whatever comes in, tokens in the
    input's dtype, as close to the float64 result as plain PyTorch rounding allows."""
    x = fields(12, 4)
    pod64 = PatchPOD(4, rank=4).fit(x.double(), progress=False)
    pod = PatchPOD(4, rank=4).fit(x.to(dtype), progress=False)
    torch.testing.assert_close(pod.eigenvalues.double(), pod64.eigenvalues.double(), rtol=0.05, atol=1e-3)
    tokens = pod64.encode(x.to(dtype))
    assert tokens.dtype == dtype
    exact = pod64.encode(x.double())
    rounding = (x.to(dtype).double() - x.double()).abs().max()  # what the input dtype alone costs
    assert float((tokens.double() - exact).abs().max()) < 50 * float(rounding) / float(pod64.eigenvalues.min().sqrt())
    pipe = PODiffPipeline(config())
    fit(pipe, F.avg_pool2d(x, S).to(dtype), x.to(dtype), progress=False)
    out = pipe.sample(F.avg_pool2d(x[:2], S).to(dtype), num_samples=2)
    assert torch.isfinite(out.mean).all()


def test_bad_model_and_checkpoint_files(tmp_path):
    x = fields(6, 5)
    pipe = PODiffPipeline(config())
    ckpt = tmp_path / "run.ckpt"
    fit(pipe, F.avg_pool2d(x, S), x, progress=False, checkpoint=ckpt)
    pipe.save(tmp_path / "model")

    def corrupt(name, data):
        d = tmp_path / f"bad_{name}_{len(data)}"
        import shutil

        shutil.copytree(tmp_path / "model", d)
        (d / name).write_bytes(data)
        return d

    weights = (tmp_path / "model" / "weights.safetensors").read_bytes()
    with pytest.raises(ValueError, match="weights.safetensors is unreadable or does not match the config"):
        PODiffPipeline.load(corrupt("weights.safetensors", weights[: len(weights) // 2]))
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        PODiffPipeline.load(corrupt("config.json", b'{"format": "podiff.PODiffPipeline", '))
    with pytest.raises(ValueError,
                       match="is 'other' version 3; this podiff reads podiff.PODiffPipeline versions 1 to 2"):
        PODiffPipeline.load(corrupt("config.json", json.dumps({"format": "other", "version": 3}).encode()))
    pod = (tmp_path / "model" / "pod.safetensors").read_bytes()
    with pytest.raises(ValueError, match="not a readable PatchPOD file"):
        PODiffPipeline.load(corrupt("pod.safetensors", pod[:100]))
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        PODiffPipeline.load(tmp_path / "nowhere")
    # A foreign torch file and a truncated checkpoint: refused, not half-loaded.
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    for bad in ("foreign.ckpt", "cut.ckpt"):
        with pytest.raises(ValueError, match="cannot resume from .*corrupted or from another model"):
            fit(PODiffPipeline(config()), F.avg_pool2d(x, S), x, progress=False, checkpoint=tmp_path / bad)


# ---------------------------------------------------------------------- faults and data safety


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old and complete")

    def failing(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old and complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # no temporary left behind


def _train_command(data, out, *extra):
    return [sys.executable, "-m", "podiff.cli", "train", "--data", str(data), "--scale", "4", "--out", str(out),
            "--steps", "300", "--batch-size", "4", "--patch-size", "4", "--rank", "6", "--checkpoint-every", "25",
            "--quiet", *extra]


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL a `podiff train` once it has checkpointed, resume it: same weights, EMA and loss
    history as an uninterrupted run, having lost less than one checkpoint interval."""
    data = tmp_path / "fields.npz"
    np.savez(data, hr=fields(24, 6).numpy())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_command(data, run), env=env, stderr=subprocess.PIPE)
    ckpt = run / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # let it run on past the checkpoint, possibly into the next write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed: make it longer"
    state = torch.load(ckpt, weights_only=True)  # whatever moment it died, the checkpoint is whole
    assert 25 <= state["step"] < 300 and state["step"] % 25 == 0 and len(state["history"]) == state["step"]
    assert not (run / "model").exists()
    done = subprocess.run(_train_command(data, run, "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    straight = tmp_path / "straight"
    done = subprocess.run(_train_command(data, straight), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = PODiffPipeline.load(run / "model"), PODiffPipeline.load(straight / "model")
    assert a.training.step == b.training.step
    assert a.training.refit["from_step"] == 300  # then continued on every field (fitting.refit), alike
    for (name, x), y in zip(a.ema.state_dict().items(), b.ema.state_dict().values(), strict=False):
        assert torch.equal(x, y), name
    for (name, x), y in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values(), strict=False):
        assert torch.equal(x, y), name
    ra, rb = (json.loads((d / "train.json").read_text()) for d in (run, straight))
    assert ra["final_loss"] == rb["final_loss"]


def test_outputs_are_not_overwritten_without_the_flag(tmp_path, capsys):
    out = tmp_path / "pod.safetensors"
    out.write_bytes(b"precious")
    data = tmp_path / "fields.npz"
    np.savez(data, hr=fields(8, 7).numpy())
    code = main(["fit-pod", "--data", str(data), "--scale", "4", "--out", str(out), "--rank", "3", "--quiet"])
    assert code == 1 and "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    code = main(["fit-pod", "--data", str(data), "--scale", "4", "--out", str(out), "--rank", "3", "--quiet",
                 "--overwrite"])
    assert code == 0 and PatchPOD.load(out).rank == 3


# ---------------------------------------------------------------------- memory budgets

_FIT_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from podiff.latent.pod import PatchPOD

    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def batches(n, size):
        g = torch.Generator().manual_seed(0)
        for _ in range(n):
            yield torch.randn(size, 1, 256, 256, generator=g)

    # Warm up (allocator, extension, one batch's strips), then the peak before the big fit.
    PatchPOD(8, 4, rank=8, budget_bytes=8 << 20).fit(batches(2, 64), progress=False)
    before = rss_mib()
    pod = PatchPOD(8, 4, rank=8, budget_bytes=8 << 20).fit(batches(24, 64), progress=False)
    print(json.dumps({"before": before, "after": rss_mib(), "images": pod.report["images"]}))
""")


@pytest.mark.slow
def test_streaming_pod_fit_stays_within_its_budget():
    """24 batches of 64 × 256² float32 (384 MiB, whose unfolded s = p/2 patches would be 1.5 GiB in
    float32) through an 8 MiB strip budget: the process's peak memory does not grow with the data."""
    done = subprocess.run([sys.executable, "-c", _FIT_SCRIPT], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["images"] == 24 * 64
    # Measured growth: 54 MiB (a 16 MiB batch in flight, its strips, the statistics); holding the
    # data would add its 384 MiB.
    assert got["after"] - got["before"] < 128, got


def test_sampling_keeps_to_its_member_budget():
    x = fields(8, 8)
    pipe = PODiffPipeline(config())
    fit(pipe, F.avg_pool2d(x, S), x, progress=False)
    seen = []
    forward = pipe.ema[0].forward

    def spy(x_t, cond, level):
        seen.append(x_t.numel())
        return forward(x_t, cond, level)

    pipe.ema[0].forward = spy
    L, r = pipe.pod.num_locations, pipe.pod.rank
    budget = 5 * L * r  # five chains per call
    out = pipe.sample(F.avg_pool2d(x[:3], S), num_samples=8, steps=2, member_budget=budget)
    assert max(seen) <= budget and len(seen) == 2 * -(-24 // 5)  # ceil(24 / 5) chunks × 2 steps
    del pipe.ema[0].forward
    whole = pipe.sample(F.avg_pool2d(x[:3], S), num_samples=8, steps=2)
    torch.testing.assert_close(out.mean, whole.mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- reproducibility


def test_same_seed_same_pod_weights_and_samples():
    x = fields(10, 9)
    lr = F.avg_pool2d(x, S)
    runs = []
    for seed in (0, 0, 1):
        pipe = PODiffPipeline(config(seed=seed, train_steps=6, schedule="learned"))
        fit(pipe, lr, x, progress=False)
        runs.append((pipe, pipe.sample(lr[:2], num_samples=3, return_samples=True)))
    (a, sa), (b, sb), (c, sc) = runs
    assert torch.equal(a.pod.basis, b.pod.basis) and torch.equal(a.pod.mean, b.pod.mean)
    for (name, u), v in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values(), strict=False):
        assert torch.equal(u, v), name
    assert a.training.history == b.training.history
    assert torch.equal(sa.samples, sb.samples)
    assert a.training.history != c.training.history and not torch.equal(sa.samples, sc.samples)
