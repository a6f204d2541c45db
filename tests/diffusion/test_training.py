"""The Trainer and the device: bfloat16 autocast through the training and sampling steps (CPU
autocast runs the code path CUDA uses), device choice and its errors, ``build`` without training,
and the model's device after fit, to and load."""

import pytest
import torch

from podiff import PipelineConfig, PODiffPipeline, cli
from podiff.core.devices import resolve_device
from podiff.diffusion.training import Trainer
from podiff.fitting import build, fit


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.randn(n, 1, 16, 16, generator=g).cumsum(-1) / 4
    return torch.nn.functional.avg_pool2d(hr, 4), hr


def _config(**kw):
    return PipelineConfig(**{**dict(residual="none", antithetic=False, scale=4, patch_size=4, rank=4,
                                    denoiser=dict(width=16, depth=1, heads=2),
                                    batch_size=4, sample_steps=3, train_steps=6), **kw})


@pytest.fixture
def linear_dtypes():
    """Output dtypes of every ``nn.Linear`` call while the fixture is active."""
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(out.dtype) if isinstance(module, torch.nn.Linear) else None)
    yield seen
    handle.remove()


@pytest.mark.parametrize("schedule", ["cosine", "learned"])
def test_training_and_sampling_steps_run_under_bfloat16_autocast(schedule, linear_dtypes):
    lr, hr = _data()
    pipe = PODiffPipeline(_config(schedule=schedule))
    history = fit(pipe, lr, hr, progress=False, amp=True)
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(history)))
    assert set(linear_dtypes) == {torch.bfloat16}, "the denoiser ran in bfloat16"
    linear_dtypes.clear()
    out = pipe.sample(lr[:2], num_samples=4, amp=True, return_samples=True)
    assert set(linear_dtypes) == {torch.bfloat16}
    assert out.mean.dtype == torch.float32 and out.samples.dtype == torch.float32  # updates stay float32
    assert torch.isfinite(out.mean).all() and (out.variance >= 0).all()
    # Autocast changes the arithmetic, not the algorithm: close to the float32 ensemble mean.
    plain = pipe.sample(lr[:2], num_samples=4, amp=False)
    assert (out.mean - plain.mean).abs().max() < 0.25 * hr.std()


def test_amp_is_off_on_cpu_by_default():
    pipe = build(PODiffPipeline(_config()), *_data())
    assert Trainer(pipe).amp is False and pipe.config.amp is True  # config.amp means "on CUDA"


def test_build_makes_the_model_without_training():
    lr, hr = _data()
    pipe = build(PODiffPipeline(_config()), lr, hr)
    assert pipe.denoiser is not None and pipe.training.step == 0 and pipe.training.history == []
    assert pipe.pod.fitted and pipe.offset.shape == (1,)
    # Weights come from config.seed on the CPU: two builds give the same initial weights.
    other = build(PODiffPipeline(_config()), lr, hr)
    for a, b in zip(pipe.denoiser.parameters(), other.denoiser.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fit_device_and_load_device_place_everything(tmp_path):
    lr, hr = _data()
    pipe = PODiffPipeline(_config(train_steps=2))
    fit(pipe, lr, hr, progress=False, device="cpu")
    assert pipe.device == torch.device("cpu")
    pipe.save(tmp_path / "m")
    loaded = PODiffPipeline.load(tmp_path / "m", device="meta")  # any device: placement only
    tensors = (list(loaded.denoiser.parameters()) + list(loaded.ema.parameters())
               + [loaded.offset, loaded.data_scale, loaded.pod.basis, loaded.pod.mean])
    assert {t.device.type for t in tensors} == {"meta"} and loaded.device == torch.device("meta")


def test_resolve_device():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device must be auto \| cpu \| cuda \| cuda:N; got 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' asked for, but torch .* use --device cpu"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
@pytest.mark.parametrize("command", ["train", "sample", "demo", "fit-pod"])
def test_cli_cuda_without_cuda_is_one_line_and_writes_nothing(command, tmp_path, capsys):
    argv = {"train": ["train", "--data", "sst", "--out", str(tmp_path / "run")],
            "sample": ["sample", "--data", "sst", "--model", str(tmp_path), "--out", str(tmp_path / "p.npz")],
            "demo": ["demo", "--out", str(tmp_path / "demo")],
            "fit-pod": ["fit-pod", "--data", "sst", "--out", str(tmp_path / "pod.safetensors")]}[command]
    code = cli.main(argv + ["--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith(f"podiff {command}: error: device 'cuda' asked for")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_moving_a_built_pipeline_twice_is_harmless():
    pipe = build(PODiffPipeline(_config()), *_data())
    pipe.to("meta").to("meta")
    assert pipe.pod.basis.device.type == "meta" and pipe.offset.device.type == "meta"
    assert {p.device.type for p in list(pipe.denoiser.parameters()) + list(pipe.ema.parameters())} == {"meta"}
