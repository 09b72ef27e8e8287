"""alpha-Flow (FAMILY.md F2, F-3): the target on exact fields, its named limits (alpha = 1 is
trajectory flow matching, alpha -> 0 is MeanFlow), the curriculum, guidance, the weight, the
settings and a toy preset that trains end to end."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_runs import tiny
from gaussian import GaussianAverageVelocity
from test_objective import gaussian_field, random_mlp, times

from meanflow.conventions import interpolate
from meanflow.objectives import OBJECTIVES, AlphaFlow, AlphaFlowSettings, MeanFlow, build_objective
from meanflow.presets import preset
from meanflow.samplers import AverageVelocitySampler

CLASSES = 4
NULL = CLASSES


def on_the_flow(field: GaussianAverageVelocity, batch: int = 64, seed: int = 2):
    """(x, e) at their posterior means given z_t ~ p_t (so z_t = (1 - t) x + t e exactly), r, t
    with every fourth row r = t, and z_t."""
    r, t = times(batch, equal_every=4)
    a, b = field.mean_std(t)
    z = a + b * torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_mean, e_mean = field.posterior_means(z, t)
    return x_mean, e_mean, r, t, z


def data(batch: int = 16, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, batch, 3, generator=generator, dtype=torch.float64)


# ----------------------------------------------------------------------------- exact fields


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1, 1e-3, 0.0])
def test_on_a_straight_flow_the_target_is_the_exact_field_for_every_alpha(alpha):
    """F-3 composes a step of v from t to t - Delta with u over [r, t - Delta]. For the exact
    flow map that is exact when the step lands on the trajectory, i.e. when the trajectories are
    straight: point-mass data (scale 0), where u(z_t, r, t) = v(z_t, t) for every r."""
    straight = GaussianAverageVelocity(gaussian_field().mu, torch.zeros(3, dtype=torch.float64))
    x, e, r, t, z = on_the_flow(straight)
    assert torch.allclose(interpolate(x, e, t), z, atol=1e-13)
    u, u_tgt = AlphaFlow().prediction_and_target(straight, x, e, r, t, alpha=alpha)
    torch.testing.assert_close(u_tgt, straight(z, r, t), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(u, straight(z, r, t), atol=1e-13, rtol=1e-13)


def test_on_a_curved_flow_the_target_is_exact_to_second_order_in_alpha():
    """A Gaussian of non-zero spread has curved trajectories: z_t - Delta v is one Euler step off
    the trajectory by O(Delta^2), so |u_tgt - u| = O(alpha^2) (a hundredfold per decade of alpha);
    alpha = 1 regresses u onto the instantaneous velocity, far from the average one; alpha = 0 is
    MeanFlow's identity, exact."""
    field = gaussian_field()
    x, e, r, t, z = on_the_flow(field)
    exact = field(z, r, t)
    objective = AlphaFlow()
    errors = []
    for alpha in (1e-1, 1e-2, 1e-3):
        _, u_tgt = objective.prediction_and_target(field, x, e, r, t, alpha=alpha)
        errors.append(float((u_tgt - exact).abs().max()))
    for coarse, fine in zip(errors, errors[1:]):
        assert 80.0 < coarse / fine < 125.0  # second order
    _, at_one = objective.prediction_and_target(field, x, e, r, t, alpha=1.0)
    torch.testing.assert_close(at_one, field.velocity(z, t), atol=1e-13, rtol=1e-13)  # v, the posterior mean
    assert float((at_one - exact).abs().max()) > 0.1
    _, at_zero = objective.prediction_and_target(field, x, e, r, t, alpha=0.0)
    torch.testing.assert_close(at_zero, exact, atol=1e-11, rtol=1e-11)


# ----------------------------------------------------------------------------- named limits


class CountingModel(torch.nn.Module):
    """A model that counts its forward calls (a real MLP inside)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, z, r, t, y=None):
        self.calls += 1
        return self.model(z, r, t, y)


def test_alpha_one_is_trajectory_flow_matching():
    """u_tgt = v on every row, from the one gradient forward alone (no target network call)."""
    model = CountingModel(random_mlp())
    x, e = data()
    r, t = times(16, equal_every=3)
    u, u_tgt = AlphaFlow().prediction_and_target(model, x, e, r, t, alpha=1.0)
    assert torch.equal(u_tgt, e - x) and model.calls == 1
    torch.testing.assert_close(u, model.model(interpolate(x, e, t), r, t), atol=0, rtol=0)
    assert AlphaFlow().alpha_at(0.0) == 1.0  # the curriculum starts there


def test_alpha_to_zero_recovers_meanflows_target_to_first_order():
    """u_tgt(alpha) -> sg(u_theta) as alpha -> 0, and u + (u_tgt - u) / alpha (the regression's
    pull per unit alpha) -> MeanFlow's JVP target v - (t - r) du/dt, with error O(alpha): ten
    times smaller per decade of alpha (float64, a random MLP). Rows with r = t keep v."""
    model = random_mlp()
    x, e = data(32)
    r, t = times(32, equal_every=4)
    moving = r < t
    _, meanflow = MeanFlow(derivative="jvp").prediction_and_target(model, x, e, r, t)
    errors = []
    for alpha in (1e-2, 1e-3, 1e-4):
        u, u_tgt = AlphaFlow().prediction_and_target(model, x, e, r, t, alpha=alpha)
        assert torch.equal(u_tgt[~moving], (e - x)[~moving])
        effective = u.detach() + (u_tgt - u.detach()) / alpha
        errors.append(float((effective - meanflow)[moving].abs().max()))
    for coarse, fine in zip(errors, errors[1:]):
        assert 8.0 < coarse / fine < 12.5  # first order
    assert errors[-1] < 1e-3


def test_below_the_threshold_the_target_is_meanflows():
    """alpha under alpha_threshold is 0: MeanFlow's own target and loss (Eq. 6), bit for bit."""
    settings = AlphaFlowSettings(alpha_threshold=0.005)
    objective = AlphaFlow(settings)
    raw = objective.curriculum(0.71)  # the sigmoid at 0.71 is 0.0052, at 0.72 0.0041
    assert 0.005 < raw < 0.006 and objective.alpha_at(0.71) == raw
    assert 0.0 < objective.curriculum(0.72) < 0.005 and objective.alpha_at(0.72) == 0.0
    model = random_mlp()
    x, e = data()
    r, t = times(16, equal_every=3)
    meanflow = MeanFlow.from_settings(settings.meanflow_settings(), None)
    for progress in (0.72, 1.0):
        u, u_tgt = objective.prediction_and_target(model, x, e, r, t, progress=progress)
        u_mf, u_tgt_mf = meanflow.prediction_and_target(model, x, e, r, t)
        assert torch.equal(u_tgt, u_tgt_mf) and torch.equal(u, u_mf)
        ours, theirs = objective.loss_at(model, x, e, r, t, progress=progress), meanflow.loss_at(model, x, e, r, t)
        assert torch.equal(ours.per_sample, theirs.per_sample) and float(ours.metrics["alpha"]) == 0.0


# ----------------------------------------------------------------------------- the curriculum


def official_alpha(step, init_step, end_step, start=1.0, end=0.0, gamma=25.0, clamp=0.005):
    """get_ratio of snap-research/alphaflow (src/training/loss.py), sigmoid branch, restated."""
    if step < init_step:
        value = start
    elif step > end_step:
        value = end
    else:
        middle = init_step + (end_step - init_step) / 2
        value = start + (end - start) / (1 + math.exp(-gamma * (step - middle) / (end_step - init_step)))
    return 0.0 if value < clamp else 1.0 if value > 1 - clamp else value


@pytest.mark.parametrize("window, total", [((0, 400_000), 400_000), ((600_000, 1_000_000), 1_200_000)])
def test_the_curriculum_follows_the_official_formula(window, total):
    """The B/2 recipe (sigmoid over the whole run) and the XL/2 one (over steps 600k-1M of 1.2M)."""
    init_step, end_step = window
    objective = AlphaFlow(AlphaFlowSettings(alpha_begin=init_step / total, alpha_finish=end_step / total))
    for step in (0, 100_000, 390_000, 500_000, 650_000, 780_000, 800_000, 830_000, 900_000, 1_100_000, total):
        step = min(step, total)
        assert objective.alpha_at(step / total) == pytest.approx(official_alpha(step, *window), rel=1e-12, abs=1e-15)
    assert objective.alpha_at((init_step + end_step) / 2 / total) == pytest.approx(0.5, abs=1e-12)


def test_other_curriculum_shapes_and_the_metric():
    linear = AlphaFlow(AlphaFlowSettings(alpha_schedule="linear", alpha_start=0.9, alpha_end=0.1))
    assert [linear.alpha_at(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.9, 0.5, 0.1], abs=1e-15)
    constant = AlphaFlow(AlphaFlowSettings(alpha_schedule="constant", alpha_start=0.3))
    assert constant.alpha_at(0.0) == constant.alpha_at(1.0) == 0.3
    x, e = data()
    out = linear.loss(random_mlp(), x, generator=torch.Generator().manual_seed(0), progress=0.5)
    assert float(out.metrics["alpha"]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- guidance and weight


def test_guidance_in_the_target_matches_meanflows():
    """The same guided velocity v_hat as MeanFlow's (spec section 5) as the target at alpha = 1, in
    F-3 at alpha = 1/2, and MeanFlow's whole target at alpha = 0."""
    model = random_mlp(num_classes=CLASSES)
    settings = AlphaFlowSettings(omega=0.6, kappa=0.3, t_min=0.1, t_max=0.8)
    objective = AlphaFlow(settings, CLASSES)
    meanflow = MeanFlow.from_settings(settings.meanflow_settings(), CLASSES)
    x, e = data(8)
    r, t = times(8, equal_every=3)
    labels = torch.tensor([0, 1, NULL, 2, 3, 0, NULL, 1])
    z = interpolate(x, e, t)
    v_hat = meanflow.guided_target_velocity(model, z, t, e - x, labels)
    assert not torch.allclose(v_hat, e - x)  # guidance is on for some rows
    _, at_one = objective.prediction_and_target(model, x, e, r, t, labels, alpha=1.0)
    assert torch.equal(at_one, v_hat)
    _, at_half = objective.prediction_and_target(model, x, e, r, t, labels, alpha=0.5)
    delta = 0.5 * (t - r)
    with torch.no_grad():
        composed = 0.5 * v_hat + 0.5 * model(z - delta[:, None] * v_hat, r, t - delta, labels)  # F-3
    torch.testing.assert_close(at_half, torch.where((r < t)[:, None], composed, v_hat), atol=1e-14, rtol=1e-14)
    _, at_zero = objective.prediction_and_target(model, x, e, r, t, labels, alpha=0.0)
    assert torch.equal(at_zero, meanflow.prediction_and_target(model, x, e, r, t, labels)[1])


def test_the_weight_is_scaled_by_alpha_on_the_rows_with_r_below_t_and_the_target_clamped():
    model = random_mlp()
    x, e = data()
    r, t = times(16, equal_every=3)
    objective = AlphaFlow(AlphaFlowSettings(p=1.0, c=0.01, target_clamp=0.5))
    out = objective.loss_at(model, x, e, r, t, alpha=0.25)
    u, u_tgt = objective.prediction_and_target(model, x, e, r, t, alpha=0.25)
    moving = r < t
    assert float(u_tgt[moving].abs().max()) <= 0.5 and float((e - x)[~moving].abs().max()) > 0.5
    assert torch.equal(u_tgt[~moving], (e - x)[~moving])  # the clamp is on the discrete target alone
    error = ((u - u_tgt) ** 2).sum(dim=1)
    expected = error / (error + 0.01) * torch.where(moving, 0.25, 1.0).double()
    torch.testing.assert_close(out.per_sample, expected, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(out.loss, expected.mean(), atol=1e-14, rtol=1e-14)
    assert float(out.metrics["loss"]) == pytest.approx(float(expected.detach().mean()), rel=1e-14)


def test_the_gradient_flows_through_the_prediction_only():
    model = random_mlp()
    x, e = data(8)
    r, t = times(8)
    objective = AlphaFlow(AlphaFlowSettings(p=0.0))
    objective.loss_at(model, x, e, r, t, alpha=0.4).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    u, u_tgt = objective.prediction_and_target(model, x, e, r, t, alpha=0.4)
    (0.4 * ((u - u_tgt) ** 2).sum(dim=1)).mean().backward()  # every row has r < t here
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-11)


# ----------------------------------------------------------------------------- settings and runs


@pytest.mark.parametrize("settings, message", [
    (dict(alpha_start=1.5), "alpha"),
    (dict(alpha_schedule="step"), "'constant', 'linear', 'cosine', 'sigmoid'"),
    (dict(alpha_threshold=0.5), "alpha_threshold"),
    (dict(target_clamp=0.0), "target_clamp"),
    (dict(alpha_begin=0.8, alpha_finish=0.2), "ramp finish"),
    (dict(derivative="backprop"), "'jvp', 'two_pass', 'finite_difference'"),
    (dict(fraction_r_neq_t=2.0), "fraction_r_neq_t"),
])
def test_invalid_settings_are_refused_with_the_valid_values(settings, message):
    with pytest.raises(ValueError, match=message):
        AlphaFlow.parse_settings(settings)


def test_explicit_inputs_are_checked():
    objective, model = AlphaFlow(), random_mlp()
    x, e = data(4)
    r, t = times(4)
    with pytest.raises(ValueError, match="not both"):
        objective.prediction_and_target(model, x, e, r, t, alpha=0.5, progress=0.5)
    with pytest.raises(ValueError, match="alpha must be"):
        objective.prediction_and_target(model, x, e, r, t, alpha=1.5)
    with pytest.raises(ValueError, match="r <= t"):
        objective.prediction_and_target(model, x, e, t, r, alpha=0.5)
    with pytest.raises(ValueError, match="two_pass"):
        build_objective("alpha_flow", dict(derivative="jvp"), None, data_parallel=True)


def test_registered_with_its_sampler_and_presets():
    assert OBJECTIVES["alpha_flow"] is AlphaFlow and AlphaFlow().sampler == AverageVelocitySampler()
    for name, base in (("alpha-flow-digits", "digits"), ("alpha-flow-mnist", "mnist"),
                       ("toy-checkerboard-alpha-flow", "toy-checkerboard")):
        config, reference = preset(name), preset(base)
        assert config.objective.method == "alpha_flow"
        assert (config.data, config.model, config.optim, config.training) == \
               (reference.data, reference.model, reference.optim, reference.training)
        shared = reference.objective.settings
        assert (config.objective.settings.fraction_r_neq_t, config.objective.settings.p) == \
               (shared.fraction_r_neq_t, shared.p)
    xl = preset("imagenet256-alpha-flow-xl2-cfg").objective.settings
    assert (xl.omega, xl.kappa, xl.t_max, xl.fraction_r_neq_t, xl.target_clamp) == (0.2, 0.92, 0.75, 0.5, 4.0)
    assert (xl.alpha_begin, xl.alpha_finish, xl.c) == (0.5, pytest.approx(5 / 6), pytest.approx(4.096))
    assert preset("imagenet256-alpha-flow-b2").training.steps == 400_000



def test_toy_preset_trains_through_the_registry_and_samples_with_its_own_sampler(tmp_path):
    from meanflow.inference import load_model
    from meanflow.train import train

    result = train(tiny(preset("toy-checkerboard-alpha-flow")), tmp_path / "run", progress=False)
    assert result.step == 6 and math.isfinite(result.metrics["loss"])
    assert 0.0 <= result.metrics["alpha"] <= 1.0  # the curriculum is logged
    loaded = load_model(tmp_path / "run")
    assert loaded.record.method == "alpha_flow" and loaded.sampler == AverageVelocitySampler()
    samples = loaded.sampler(loaded.model, torch.randn(5, 2), num_steps=2)
    assert samples.shape == (5, 2) and torch.isfinite(samples).all()
