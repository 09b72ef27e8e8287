"""The curricula of FAMILY.md F6 on MeanFlow: the ramp shapes, Modular MeanFlow's SG_lambda
(its gradient against a double-backward reference and the closed-form mix), the share and gap
schedules of r != t, and that the defaults leave MeanFlow bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from test_objective import random_mlp, times

from meanflow.conventions import interpolate
from meanflow.objectives import AdaptiveWeighting, MeanFlow, MeanFlowSettings, TimeSampler, build_objective
from meanflow.objectives.schedules import Ramp


def data(batch: int = 12, seed: int = 3):
    return torch.randn(2, batch, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- the ramps


def test_ramp_shapes_follow_their_formulas():
    window = dict(start=2.0, end=-1.0, begin=0.2, finish=0.6)
    for progress in (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0):
        fraction = min(max((progress - 0.2) / 0.4, 0.0), 1.0)
        assert Ramp(shape="constant", **window)(progress) == 2.0
        assert Ramp(shape="linear", **window)(progress) == pytest.approx(2.0 - 3.0 * fraction, abs=1e-15)
        cosine = 2.0 - 3.0 * (1 - math.cos(math.pi * fraction)) / 2
        assert Ramp(shape="cosine", **window)(progress) == pytest.approx(cosine, abs=1e-15)
        inside = 0.2 <= progress <= 0.6
        sigmoid = 2.0 - 3.0 / (1 + math.exp(-9.0 * (fraction - 0.5))) if inside else (2.0 if progress < 0.2 else -1.0)
        assert Ramp(shape="sigmoid", steepness=9.0, **window)(progress) == pytest.approx(sigmoid, abs=1e-15)
    step = Ramp(shape="linear", start=0.0, end=1.0, begin=0.5, finish=0.5)  # an empty window is a step
    assert (step(0.49), step(0.5), step(1.0)) == (0.0, 1.0, 1.0)
    assert Ramp(shape="sigmoid", start=1.0, end=0.0, steepness=1e4)(0.0) == 1.0  # no overflow


@pytest.mark.parametrize("build, message", [
    (lambda: Ramp(shape="exponential"), "'constant', 'linear', 'cosine', 'sigmoid'"),
    (lambda: Ramp(begin=0.7, finish=0.3), "ramp finish"),
    (lambda: Ramp(start=math.nan), "ramp start"),
    (lambda: Ramp(steepness=0.0), "steepness"),
    (lambda: Ramp(shape="linear")(1.5), "progress"),
    (lambda: MeanFlowSettings(fraction_r_neq_t_start=1.2), "fraction_r_neq_t_start"),
    (lambda: MeanFlowSettings(gap_scale_start=0.0), "gap_scale_start"),
    (lambda: MeanFlowSettings(sg_lambda=1.5, derivative="jvp"), "sg_lambda"),
    (lambda: MeanFlowSettings(sg_lambda_warmup=2.0), "sg_lambda_warmup"),
    (lambda: TimeSampler(gap_ramp=Ramp(shape="linear", start=0.5, end=2.0)), "gap scale"),
])
def test_invalid_schedules_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# ----------------------------------------------------------------------------- defaults unchanged


def test_the_defaults_leave_meanflow_bit_for_bit():
    """No curriculum by default: the draws and the loss do not depend on progress at all."""
    settings = MeanFlowSettings()
    assert settings.share_ramp() is None and settings.gap_ramp() is None and settings.modulation() is None
    objective = MeanFlow.from_settings(settings, None)
    model = random_mlp()
    x = data(64)[0]
    losses = []
    for progress in (0.0, 0.7):
        out = objective.loss(model, x, generator=torch.Generator().manual_seed(5), progress=progress)
        losses.append((out.loss, out.per_sample, sorted(out.metrics)))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])
    assert losses[0][2] == ["fraction_r_neq_t", "loss", "unweighted_error", "velocity_error"]
    sampler = TimeSampler()
    first = sampler.sample(256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    later = sampler.sample(256, generator=torch.Generator().manual_seed(1), dtype=torch.float64, progress=0.9)
    assert torch.equal(first[0], later[0]) and torch.equal(first[1], later[1])


# ----------------------------------------------------------------------------- the r != t schedules


def test_the_share_of_r_neq_t_follows_its_schedule():
    """Learn the instantaneous velocity first: the share ramps from 0 to fraction_r_neq_t."""
    settings = MeanFlowSettings(fraction_r_neq_t=0.5, fraction_r_neq_t_start=0.0, share_schedule="linear",
                                share_begin=0.0, share_finish=0.5)
    sampler = settings.time_sampler()
    n = 100_000
    for progress, share in ((0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (1.0, 0.5)):
        assert sampler.fraction_at(progress) == pytest.approx(share, abs=1e-15)
        r, t = sampler.sample(n, generator=torch.Generator().manual_seed(2), progress=progress)
        assert abs((r != t).float().mean().item() - share) <= 4 * math.sqrt(0.25 / n)
    exact = MeanFlowSettings(fraction_r_neq_t=0.5, fraction_r_neq_t_start=0.0, mask_mode="prefix").time_sampler()
    r, t = exact.sample(40, generator=torch.Generator().manual_seed(3), progress=0.5)  # share 0.25: 10 rows
    assert (r == t).tolist() == [True] * 30 + [False] * 10


def test_the_gap_schedule_shrinks_the_gaps_then_releases_them():
    """Gaps short to long: r = t - g (t - r) with g from gap_scale_start to 1; t is untouched."""
    settings = MeanFlowSettings(fraction_r_neq_t=1.0, gap_scale_start=0.1, gap_schedule="cosine", gap_begin=0.2,
                                gap_finish=0.8)
    scheduled, base = settings.time_sampler(), MeanFlowSettings(fraction_r_neq_t=1.0).time_sampler()
    for progress, scale in ((0.0, 0.1), (0.5, 0.55), (0.8, 1.0), (1.0, 1.0)):
        assert scheduled.gap_scale_at(progress) == pytest.approx(scale, abs=1e-15)
        r, t = scheduled.sample(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64,
                                progress=progress)
        r0, t0 = base.sample(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        assert torch.equal(t, t0) and bool((r >= 0).all()) and bool((r <= t).all())
        torch.testing.assert_close(t - r, scale * (t0 - r0), atol=1e-15, rtol=1e-14)
    assert torch.equal(r, r0)  # g = 1: the base law itself
    out = MeanFlow.from_settings(settings, None).loss(random_mlp(), data(16)[0],
                                                      generator=torch.Generator().manual_seed(0), progress=0.5)
    assert float(out.metrics["gap_scale"]) == pytest.approx(0.55)


# ----------------------------------------------------------------------------- Modular MeanFlow


def gradients(objective, model, x, e, r, t, progress):
    model.zero_grad()
    objective.loss_at(model, x, e, r, t, progress=progress).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def constant_lambda(value):
    return MeanFlow(derivative="jvp", weighting=AdaptiveWeighting(p=1.0, c=0.01),
                    modulation=Ramp(shape="constant", start=value, end=value))


def test_full_gradient_is_the_gradient_through_du_dt():
    """lambda = 1: the gradient of ||u - (v - (t - r) du/dt)||^2 with nothing stopped, against a
    reference whose du/dt is a double-backward JVP (torch.autograd.functional.jvp, create_graph)."""
    model = random_mlp()
    x, e = data()
    r, t = times(12, equal_every=3)
    got = gradients(constant_lambda(1.0), model, x, e, r, t, 0.5)
    z, v = interpolate(x, e, t), e - x
    _, dudt = torch.autograd.functional.jvp(lambda z_, t_: model(z_, r, t_), (z, t), (v, torch.ones_like(t)),
                                            create_graph=True)
    model.zero_grad()
    error = ((model(z, r, t) - (v - (t - r)[:, None] * dudt)) ** 2).sum(dim=1)
    (error / (error.detach() + 0.01)).mean().backward()
    for mine, reference in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, reference, atol=1e-12, rtol=1e-10)
    assert max(float((a - b).abs().max()) for a, b in zip(got, gradients(constant_lambda(0.0), model, x, e, r, t, 0.5)
                                                          )) > 1e-3  # the derivative's gradient matters


@pytest.mark.parametrize("value", [0.3, 0.75])
def test_the_gradient_at_lambda_is_the_closed_form_mix(value):
    """grad(lambda) = lambda grad(full) + (1 - lambda) grad(stop-gradient), and the target's value
    does not depend on lambda."""
    model = random_mlp()
    x, e = data()
    r, t = times(12, equal_every=3)
    full, stopped = (gradients(constant_lambda(v), model, x, e, r, t, 0.5) for v in (1.0, 0.0))
    mixed = gradients(constant_lambda(value), model, x, e, r, t, 0.5)
    for got, a, b in zip(mixed, full, stopped):
        torch.testing.assert_close(got, value * a + (1 - value) * b, atol=1e-13, rtol=1e-11)
    _, target = constant_lambda(value).prediction_and_target(model, x, e, r, t)
    _, plain = MeanFlow(derivative="jvp").prediction_and_target(model, x, e, r, t)
    torch.testing.assert_close(target, plain, atol=1e-15, rtol=1e-15)


def test_lambda_zero_is_exactly_todays_meanflow():
    """The warm-up starts at lambda = 0: the same loss and gradients, bit for bit."""
    settings = MeanFlowSettings(derivative="jvp", sg_lambda=0.8, sg_lambda_warmup=0.5)
    warmed, plain = MeanFlow.from_settings(settings, None), MeanFlow(derivative="jvp")
    assert [warmed.modulation_at(p) for p in (0.0, 0.25, 0.5, 1.0)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    model = random_mlp()
    x, e = data()
    r, t = times(12, equal_every=3)
    ours, theirs = warmed.loss_at(model, x, e, r, t, progress=0.0), plain.loss_at(model, x, e, r, t)
    assert torch.equal(ours.per_sample, theirs.per_sample) and float(ours.metrics["sg_lambda"]) == 0.0
    for a, b in zip(gradients(warmed, model, x, e, r, t, 0.0), gradients(plain, model, x, e, r, t, 0.0)):
        assert torch.equal(a, b)
    constant = MeanFlowSettings(derivative="jvp", sg_lambda=0.8, sg_lambda_schedule="constant").modulation()
    assert constant(0.0) == constant(1.0) == 0.8


def test_lambda_above_zero_refuses_what_cannot_carry_its_gradient():
    for derivative in ("two_pass", "finite_difference"):
        with pytest.raises(ValueError, match="derivative='jvp'"):
            MeanFlowSettings(sg_lambda=0.5, derivative=derivative)
    with pytest.raises(ValueError, match="sg_lambda > 0"):
        build_objective("meanflow", dict(sg_lambda=0.5, derivative="jvp"), None, data_parallel=True, sharded=True)
    build_objective("meanflow", dict(sg_lambda=0.5, derivative="jvp"), None)  # one process: fine
