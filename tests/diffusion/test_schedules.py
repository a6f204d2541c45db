"""Noise schedules: exact end points, monotonicity (learned: for random parameters), derivatives,
the ε-prediction limit, and the learned schedule never seeing the target."""

import math

import pytest
import torch

from podiff.diffusion.schedules import EPS_MIN_SNR, CosineSchedule, LearnedSchedule, LinearSchedule, make_schedule

T = torch.linspace(0, 1, 201, dtype=torch.float64)


@pytest.mark.parametrize("schedule", [CosineSchedule(), LinearSchedule()], ids=["cosine", "linear"])
def test_fixed_schedules_end_exactly_and_decrease(schedule):
    alpha, sigma = schedule.alpha_sigma(T)
    assert alpha.flatten()[0] == 1.0 and sigma.flatten()[0] == 0.0  # clean end
    assert alpha.flatten()[-1] == 0.0 and sigma.flatten()[-1] == 1.0  # zero terminal SNR
    lam = schedule.log_snr(T).flatten()
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))


def test_cosine_matches_its_formula():
    s = 0.008
    alpha_bar = torch.cos((T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    alpha, _ = CosineSchedule().alpha_sigma(T[:-1])
    torch.testing.assert_close(alpha.flatten() ** 2, alpha_bar[:-1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(5))
def test_learned_schedule_monotone_with_exact_ends_for_random_parameters(seed):
    torch.manual_seed(seed)
    sched = LearnedSchedule(rank=6, cond_rank=4).double()
    with torch.no_grad():
        for p in sched.parameters():
            p.normal_(0, 3.0)  # far from the initialisation
    cond = torch.randn(3, 5, 4, dtype=torch.float64)
    lam = torch.stack([sched.log_snr(torch.full((3,), float(t), dtype=torch.float64), cond) for t in T])
    assert lam.shape == (len(T), 3, 5, 6)
    torch.testing.assert_close(lam[0], torch.full_like(lam[0], sched.lambda_max), rtol=0, atol=1e-12)
    torch.testing.assert_close(lam[-1], torch.full_like(lam[-1], sched.lambda_min), rtol=0, atol=1e-12)
    assert (lam[1:] <= lam[:-1] + 1e-12).all(), "log-SNR must not increase in t"
    assert (sched.dlog_snr_dt(torch.rand(3, dtype=torch.float64), cond) <= 0).all()


def test_learned_schedule_derivatives_match_finite_differences():
    torch.manual_seed(0)
    sched = LearnedSchedule(rank=3).double()
    with torch.no_grad():
        for p in sched.parameters():
            p.normal_(0, 1.0)
    cond = torch.randn(2, 4, 3, dtype=torch.float64)
    t = torch.tensor([0.3, 0.71], dtype=torch.float64)
    h = 1e-6
    fd = (sched.log_snr(t + h, cond) - sched.log_snr(t - h, cond)) / (2 * h)
    torch.testing.assert_close(sched.dlog_snr_dt(t, cond), fd, rtol=1e-6, atol=1e-6)
    second = (sched.log_snr(t + 1e-4, cond) - 2 * sched.log_snr(t, cond) + sched.log_snr(t - 1e-4, cond)) / 1e-8
    torch.testing.assert_close(sched.smoothness(t, cond), second.pow(2).mean(), rtol=1e-4, atol=1e-6)


def test_learned_schedule_sees_only_the_condition():
    """λ is a function of (t, cond): the target has no path into it."""
    sched = LearnedSchedule(rank=4)
    cond = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, requires_grad=True)
    lam = sched.log_snr(torch.rand(2), cond)
    (grad_target,) = torch.autograd.grad(lam.sum() + 0 * target.sum(), target, allow_unused=True)
    assert grad_target is None or (grad_target == 0).all()
    (grad_cond,) = torch.autograd.grad(sched.log_snr(torch.rand(2), cond).sum(), cond)
    assert grad_cond.abs().sum() > 0 or all((p == 0).all() for p in sched.net[-1].parameters() if p.dim() > 1)
    with pytest.raises(ValueError, match="needs the condition tokens"):
        sched.log_snr(torch.rand(2), None)


def test_bound_learned_schedule_equals_unbound():
    sched = LearnedSchedule(rank=4)
    cond = torch.randn(2, 3, 4)
    t = torch.rand(2)
    torch.testing.assert_close(sched.bind(cond).log_snr(t), sched.log_snr(t, cond))


def test_epsilon_prediction_stops_where_snr_is_bounded():
    for sched in (CosineSchedule(), LinearSchedule()):
        t_eps = sched.t_max("epsilon")
        assert 0.5 < t_eps < 1.0 and sched.t_max("v") == 1.0
        lam = float(sched.log_snr(torch.tensor([t_eps], dtype=torch.float64)))
        assert abs(lam - math.log(EPS_MIN_SNR)) < 1e-6
    assert make_schedule("learned", rank=4, prediction_type="epsilon").t_max("epsilon") == 1.0
    with pytest.raises(ValueError, match="epsilon-prediction with a learned schedule needs lambda_min"):
        make_schedule("learned", rank=4, prediction_type="v").t_max("epsilon")


def test_make_schedule_errors():
    with pytest.raises(ValueError, match="schedule must be one of 'cosine', 'linear', 'learned'; got 'quadratic'"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="needs rank"):
        make_schedule("learned")
    with pytest.raises(ValueError, match="lambda_min must be < lambda_max"):
        LearnedSchedule(3, lambda_min=1.0, lambda_max=0.0)
