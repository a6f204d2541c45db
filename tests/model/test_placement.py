"""Placement without a GPU: the model layer and every op with every tensor on CUDA (fake) or meta.

Fake CUDA (``FakeTensorMode``): every registered op; the pipeline moved with ``to("cuda")``;
one training step (forward, loss, gradient clipping, AdamW in its capturable CUDA form, EMA)
and one whole sampling chain through the ensemble moments and the closed-form pixel moments,
for shared and local POD (with overlap), fixed and learned schedules, v and ε; the physical
bounds' certain pixels. Any CPU tensor
meeting a CUDA one raises ``FakeTensorDeviceMismatchError``. The meta device runs the complete
training step, backward included (see ``fake_cuda.py`` for why backward cannot run on fake
CUDA here). A planted CPU tensor inside a step makes both checks fail.
"""

import pytest
import torch
from fake_cuda import FakeTensorDeviceMismatchError, devices_of, fake_cuda
from kernels.test_drop_in import CASES, IDS, _inputs

import podiff.diffusion.schedules
from podiff import PipelineConfig, PODiffPipeline
from podiff.diffusion.training import Trainer
from podiff.fitting import build
from podiff.model.state import Calibration

CONFIGS = [  # basis, stride, schedule, prediction, sampler
    ("shared", None, "cosine", "v", "ddim"),
    ("local", 2, "learned", "v", "ancestral"),
    ("shared", 2, "learned", "epsilon", "ddim"),
    ("local", None, "linear", "epsilon", "ancestral"),
]
CONFIG_IDS = ["-".join(str(v) for v in c) for c in CONFIGS]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.randn(6, 1, 16, 24, generator=g).cumsum(-1) / 4
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    return lr, hr


def _built(basis, stride, schedule, prediction, sampler) -> PODiffPipeline:
    cfg = PipelineConfig(residual="none", antithetic=False, scale=4, patch_size=4, stride=stride, rank=3, basis=basis,
                         schedule=schedule,
                         prediction_type=prediction, sampler=sampler, eta=0.0,
                         denoiser=dict(width=16, depth=1, heads=2),
                         batch_size=4, sample_steps=2)
    lr, hr = _data()
    pipe = build(PODiffPipeline(cfg), lr, hr)  # real, on the CPU: the fits read data
    pipe.calibration = Calibration(mode_spread=[1.1, 0.9, 1.2])  # per-mode spread on the device too
    assert pipe.token_noise is not None  # the chain's noise is coloured on the device too
    return pipe


def _fake_cuda_run(pipe: PODiffPipeline):
    """Moves ``pipe`` to (fake) CUDA, runs one training step and one sampling chain; returns what to check."""
    lr, hr = _data(1)
    with fake_cuda(), torch.no_grad():  # no_grad: see fake_cuda.py (autograd on CUDA leaves aborts here)
        pipe.to("cuda")
        trainer = Trainer(pipe)
        trainer.backward = lambda loss: [setattr(p, "grad", torch.zeros_like(p)) for p in trainer.params]
        x0_all, cond_all = pipe.target_tokens(hr.to("cuda")), pipe.condition_tokens(lr.to("cuda"))
        loss = trainer.step(*trainer.batch(x0_all, cond_all, 4))
        out = pipe.ensemble(cond_all[:2], num_samples=3, steps=2, return_samples=True)
        return {"loss": loss, "trainer": trainer, "out": out}


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_training_step_and_sampling_chain_on_fake_cuda(config):
    pipe = _built(*config)
    got = _fake_cuda_run(pipe)
    trainer, out = got["trainer"], got["out"]
    assert trainer.optimizer.defaults["capturable"], "on CUDA Adam's step count stays on the device"
    assert devices_of(got["loss"], pipe.denoiser, pipe.schedule, pipe.ema, trainer.optimizer) == {"cuda"}
    assert devices_of(pipe.offset, pipe.data_scale, pipe.pod.basis, pipe.pod.mean, pipe.pod.valid_pixels) == {"cuda"}
    assert devices_of(out.mean, out.variance, out.samples, out.tokens) == {"cuda"}
    assert out.mean.shape == (2, 1, 16, 24) and out.samples.shape == (3, 2, 1, 16, 24)
    assert len(trainer.optimizer.state) == len(trainer.params)  # the step reached the optimiser


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_registered_op_on_fake_cuda(case):
    inputs = _inputs()
    with fake_cuda(), torch.no_grad():
        moved = {k: v.to("cuda") for k, v in inputs.items()}
        outputs = case.function(moved)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        assert outputs and devices_of(outputs) == {"cuda"}


def test_bounds_run_as_placed_on_fake_cuda():
    """The certain pixels (``podiff.data.bounds.apply``) take no host copy: a CUDA prediction stays on CUDA."""
    from podiff.data import bounds

    hr = torch.randn(2, 1, 8, 8).clamp_min(0)
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    with fake_cuda(), torch.no_grad():
        mean, var, lr_c = hr.to("cuda"), torch.ones(2, 1, 8, 8).to("cuda"), lr.to("cuda")
        members = torch.randn(3, 2, 1, 8, 8).to("cuda")
        out = bounds.apply(mean, lr_c, (0.0, 1.0), 4, var, members)
        assert devices_of(out) == {"cuda"} and out[2].shape == (3, 2, 1, 8, 8)


def test_full_training_step_with_backward_on_meta():
    pipe = _built("local", 2, "learned", "v", "ddim")
    lr, hr = _data(1)
    pipe.to("meta")
    trainer = Trainer(pipe)
    x0_all, cond_all = pipe.target_tokens(hr.to("meta")), pipe.condition_tokens(lr.to("meta"))
    loss = trainer.step(*trainer.batch(x0_all, cond_all, 4))
    assert loss.device.type == "meta"
    assert devices_of([p.grad for p in trainer.params]) == {"meta"}
    # Without capturable (CPU and meta) Adam keeps its step count as a CPU scalar, by design.
    moments = [{k: v for k, v in s.items() if k != "step"} for s in trainer.optimizer.state.values()]
    assert devices_of(moments, pipe.ema) == {"meta"}


@pytest.fixture
def cpu_tensor_in_a_step(monkeypatch):
    """Plants the bug these tests exist for: a CPU tensor created inside a step (in the schedule)."""
    for cls in (podiff.diffusion.schedules.CosineSchedule, podiff.diffusion.schedules.LearnedSchedule):
        original = cls.log_snr
        monkeypatch.setattr(cls, "log_snr", lambda self, t, cond=None, _f=original: _f(self, t, cond) + torch.zeros(1))


def test_a_planted_cpu_tensor_fails_the_fake_cuda_check(cpu_tensor_in_a_step):
    with pytest.raises(FakeTensorDeviceMismatchError):
        _fake_cuda_run(_built("shared", None, "cosine", "v", "ddim"))


def test_a_planted_cpu_tensor_fails_the_meta_check(cpu_tensor_in_a_step):
    pipe = _built("shared", None, "cosine", "v", "ddim").to("meta")
    lr, hr = _data(1)
    trainer = Trainer(pipe)
    batch = trainer.batch(pipe.target_tokens(hr.to("meta")), pipe.condition_tokens(lr.to("meta")), 4)
    with pytest.raises(RuntimeError, match="device"):
        trainer.step(*batch)
