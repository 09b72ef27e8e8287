"""Consistency training on the flow map (FAMILY.md F5): f against the exact Gaussian flow map, the
discrete target on one exact trajectory, the continuous tangent against float64 central
differences and its named limits (flow matching, MeanFlow at r = 0), the curriculum laws of iCT /
ECT / sCT at several points, the sampler and its JSON, and a toy preset trained end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny_runs import tiny
from gaussian import GaussianAverageVelocity
from torch import nn

from meanflow.models.mlp import MLP, MLPConfig
from meanflow.objectives import OBJECTIVES, ConsistencySettings, ConsistencyTraining, MeanFlow, build_objective
from meanflow.objectives.consistency import (
    GapWeighting,
    TangentNormalisation,
    ect_previous_time,
    ect_stage,
    gap_weight,
    ict_discretisation_steps,
    ict_interval_probabilities,
    karras_sigmas,
    normalise_tangent,
    pseudo_huber,
    tangent_warmup_factor,
    time_of_sigma,
)
from meanflow.objectives.time_sampling import TimeSampler
from meanflow.presets import PRESETS, preset
from meanflow.samplers import ConsistencySampler, Renoise, derived_noise, sampler_from_dict

F64 = torch.float64
CLASSES = 3


def gaussian_model() -> GaussianAverageVelocity:
    return GaussianAverageVelocity(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.3, 2.0], dtype=F64))


def exact_flow_map(model: GaussianAverageVelocity, z, t, target_time):
    """z_s = a_s + (b_s / b_t)(z_t - a_t): the Gaussian flow map from t to s (tests/gaussian.py)."""
    a_t, b_t = model.mean_std(t)
    a_s, b_s = model.mean_std(target_time)
    return a_s + b_s / b_t * (z - a_t)


def random_mlp(num_classes=None, seed=0) -> MLP:
    """A float64 MLP whose zero-initialised output layer is made non-zero."""
    torch.manual_seed(seed)
    model = MLP(MLPConfig(data_dim=2, hidden_size=16, depth=2, num_classes=num_classes, frequency_size=8)).double()
    with torch.no_grad():
        for parameter in model.output.parameters():
            parameter.normal_(0.0, 0.5)
    return model


def batch(seed=1, size=6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 2, generator=generator, dtype=F64)
    noise = torch.randn(size, 2, generator=generator, dtype=F64)
    t = torch.tensor([0.05, 0.2, 0.45, 0.6, 0.85, 0.97], dtype=F64)[:size]
    return x, noise, t


# ------------------------------------------------------------------------------- the flow map


def test_flow_map_of_the_exact_average_velocity_is_the_exact_map_to_data():
    model = gaussian_model()
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99, 1.0], dtype=F64)
    f = ConsistencyTraining().flow_map(model, z, t, None)
    torch.testing.assert_close(f, exact_flow_map(model, z, t, torch.zeros_like(t)), rtol=1e-13, atol=1e-13)


def test_discrete_target_equals_the_prediction_on_one_exact_trajectory_only():
    """With the exact model, f(z_t, t) = f(z_t', t') iff z_t' is the flow-map image of z_t. Solving
    (1 - t) x + t e = z_t and (1 - t') x + t' e = z_t' for (x, e) puts both on one trajectory; a
    random pair (x, e) does not: the pair's straight line is not the flow's curved path."""
    model, objective = gaussian_model(), ConsistencyTraining()
    z_t = torch.randn(5, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.95], dtype=F64)
    t_prime = torch.tensor([0.02, 0.25, 0.2, 0.69, 0.5], dtype=F64)
    z_prime = exact_flow_map(model, z_t, t, t_prime)
    tt, tp = t[:, None], t_prime[:, None]
    det = (1 - tt) * tp - (1 - tp) * tt  # the 2x2 system per coordinate
    x = (z_t * tp - z_prime * tt) / det
    e = ((1 - tt) * z_prime - (1 - tp) * z_t) / det
    prediction, target = objective.discrete_prediction_and_target(model, x, e, t, t_prime=t_prime)
    torch.testing.assert_close(prediction, target, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prediction, exact_flow_map(model, z_t, t, torch.zeros_like(t)), rtol=1e-12,
                               atol=1e-12)
    x, noise, _ = batch(size=5)
    prediction, target = objective.discrete_prediction_and_target(model, x, noise, t, t_prime=t_prime)
    assert (prediction - target).abs().max() > 1e-2


def test_discrete_entry_takes_t_prime_or_the_curriculum_and_checks_it():
    model, x, noise, t = random_mlp(), *batch()
    ict = ConsistencyTraining()
    _, target = ict.discrete_prediction_and_target(model, x, noise, t, progress=0.0)
    grid = ict.grid_times(0.0)
    below = torch.stack([grid[grid < time].max() if (grid < time).any() else torch.tensor(0.0, dtype=F64)
                         for time in t])
    _, expected = ict.discrete_prediction_and_target(model, x, noise, t, t_prime=below)
    torch.testing.assert_close(target, expected)
    ect = ConsistencyTraining(ConsistencySettings(discretisation="ect"))
    _, target = ect.discrete_prediction_and_target(model, x, noise, t, progress=0.4)
    _, expected = ect.discrete_prediction_and_target(model, x, noise, t, t_prime=ect_previous_time(t, 3))
    torch.testing.assert_close(target, expected)
    with pytest.raises(ValueError, match="exactly one of t_prime"):
        ict.discrete_prediction_and_target(model, x, noise, t)
    with pytest.raises(ValueError, match="strictly below t"):
        ict.discrete_prediction_and_target(model, x, noise, t, t_prime=t)
    with pytest.raises(ValueError, match="r <= t"):
        ict.discrete_prediction_and_target(model, x, noise, t, t_prime=t + 0.01)


def test_the_teacher_draws_the_students_dropout_masks():
    """iCT / ECT evaluate student and teacher with one dropout mask: at t' = t (through the private
    terms, the entry refuses it) the two outputs then agree exactly, and differ without sharing."""

    class DroppedMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.drop = random_mlp(), nn.Dropout(0.5)

        def forward(self, z, r, t, conditions=None):
            return self.drop(self.inner(z, r, t, conditions))

    model = DroppedMLP().train()
    x, noise, t = batch()
    shared = ConsistencyTraining().discrete_terms(model, x, noise, t, t, None)
    torch.testing.assert_close(shared.prediction.detach(), shared.target, rtol=0, atol=0)
    unshared = ConsistencyTraining(ConsistencySettings(shared_dropout=False))
    separate = unshared.discrete_terms(model, x, noise, t, t, None)
    assert (separate.prediction.detach() - separate.target).abs().max() > 1e-3


# ------------------------------------------------------------------------------- continuous


@pytest.mark.parametrize("derivative", ["two_pass", "finite_difference"])
def test_flow_map_tangent_equals_float64_central_differences(derivative):
    model = random_mlp(CLASSES)
    x, noise, t = batch()
    labels = torch.tensor([0, 1, 2, 0, CLASSES, 1])
    z, v = (1 - t)[:, None] * x + t[:, None] * noise, noise - x
    objective = ConsistencyTraining(ConsistencySettings(mode="continuous", derivative=derivative,
                                                        finite_difference_step=1e-4), CLASSES)
    dfdt = objective.flow_map_derivative(model, z, t, labels, v)
    h = 1e-5
    with torch.no_grad():
        central = (objective.flow_map(model, z + h * v, t + h, labels)
                   - objective.flow_map(model, z - h * v, t - h, labels)) / (2 * h)
    tolerance = 1e-8 if derivative == "two_pass" else 1e-6
    torch.testing.assert_close(dfdt, central, rtol=tolerance, atol=tolerance)
    assert central.abs().max() > 0.1  # a random network: the tangent is far from zero


def test_continuous_limits_are_flow_matching_and_meanflow_at_r_zero():
    """Without normalisation: warm-up 0 gives the target v (flow matching at r = 0); warm-up 1
    gives MeanFlow's target v - t du/dt at r = 0 (Eq. 6), so u - u_tgt = -df/dt."""
    model, (x, noise, t) = random_mlp(), batch()
    objective = ConsistencyTraining(ConsistencySettings(mode="continuous", tangent_normalisation="none",
                                                        tangent_warmup=0.5))
    u, start = objective.continuous_prediction_and_target(model, x, noise, t, progress=0.0)
    torch.testing.assert_close(start, noise - x, rtol=1e-13, atol=1e-13)
    u, end = objective.continuous_prediction_and_target(model, x, noise, t, progress=0.5)
    u_mf, target_mf = MeanFlow(TimeSampler()).prediction_and_target(model, x, noise, torch.zeros_like(t), t)
    torch.testing.assert_close(end, target_mf, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(u, u_mf)
    z = (1 - t)[:, None] * x + t[:, None] * noise
    torch.testing.assert_close(end - u.detach(), objective.flow_map_derivative(model, z, t, None, noise - x))
    _, middle = objective.continuous_prediction_and_target(model, x, noise, t, progress=0.25)
    torch.testing.assert_close(middle, 0.5 * (start + end))  # linear in the warm-up factor


@pytest.mark.parametrize("derivative, tolerance", [("two_pass", 1e-12), ("jvp", 1e-12), ("finite_difference", 1e-6)])
def test_continuous_target_is_the_normalised_tangent_for_every_backend(derivative, tolerance):
    model, (x, noise, t) = random_mlp(), batch()
    reference = ConsistencyTraining(ConsistencySettings(mode="continuous", tangent_normalisation="none"))
    u, raw = reference.continuous_prediction_and_target(model, x, noise, t)
    g = raw - u.detach()
    objective = ConsistencyTraining(ConsistencySettings(mode="continuous", derivative=derivative,
                                                        finite_difference_step=1e-5))
    prediction, target = objective.continuous_prediction_and_target(model, x, noise, t)
    norm = g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(target, u.detach() + g / (norm + 0.1), rtol=tolerance, atol=tolerance)
    output = objective.loss_at(model, x, noise, torch.zeros_like(t), t)
    output.loss.backward()  # the gradient reaches the output layer through u
    assert model.output[1].weight.grad.abs().sum() > 0
    torch.testing.assert_close(output.per_sample, (norm.squeeze(1) / (norm.squeeze(1) + 0.1)) ** 2,
                               rtol=tolerance, atol=tolerance)


def test_tangent_normalisation_and_warmup_follow_their_formulas():
    g = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=F64)
    torch.testing.assert_close(normalise_tangent(g, TangentNormalisation.L2, 0.1),
                               g / torch.tensor([[5.1], [0.1], [2.1]], dtype=F64))
    torch.testing.assert_close(normalise_tangent(g, TangentNormalisation.RMS, 0.1),
                               g / torch.tensor([[2.6], [0.1], [1.1]], dtype=F64))  # ||g|| / sqrt(4) + c
    assert torch.equal(normalise_tangent(g, TangentNormalisation.NONE, 0.1), g)
    assert [tangent_warmup_factor(p, 0.025) for p in (0.0, 0.01, 0.025, 0.5)] == pytest.approx([0.0, 0.4, 1.0, 1.0])
    assert tangent_warmup_factor(0.0, 0.0) == 1.0


# ------------------------------------------------------------------------------- the curriculum laws


def test_ict_discretisation_steps_double_as_the_paper_says():
    """N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (floor(log2 floor(s1/s0)) + 1)), here K = 400k."""
    total = 400_000
    stages = math.floor(math.log2(1280 // 10)) + 1
    per_stage = total // stages
    for k in (0, 1, 49_999, 50_000, 123_456, 250_000, 349_999, 350_000, 399_999):
        assert ict_discretisation_steps(k / total) == min(10 * 2 ** (k // per_stage), 1280) + 1
    assert ict_discretisation_steps(1.0) == 1281
    assert ict_discretisation_steps(0.5, 2, 150) == 17  # 7 stages: 2 * 2^3 + 1


def test_karras_grid_and_the_discrete_lognormal_law_follow_their_formulas():
    sigmas = karras_sigmas(11)
    for i in (0, 3, 10):
        expected = (0.002 ** (1 / 7) + i / 10 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
        assert float(sigmas[i]) == pytest.approx(expected, rel=1e-12)
    probabilities = ict_interval_probabilities(sigmas, -1.1, 2.0)
    mass = [math.erf((math.log(sigmas[i + 1]) + 1.1) / (math.sqrt(2) * 2.0))
            - math.erf((math.log(sigmas[i]) + 1.1) / (math.sqrt(2) * 2.0)) for i in range(10)]
    for i in (0, 4, 9):
        assert float(probabilities[i]) == pytest.approx(mass[i] / sum(mass), rel=1e-12)
    # The draws are adjacent grid points (t_i, t_{i+1}) with those frequencies.
    objective = ConsistencyTraining()
    t_prime, t = objective.sample_times(200_000, torch.zeros(1, dtype=F64), torch.Generator().manual_seed(0))
    times = time_of_sigma(sigmas)
    index = torch.searchsorted(times, t)
    assert torch.equal(t, times[index]) and torch.equal(t_prime, times[index - 1])
    frequencies = torch.bincount(index - 1, minlength=10).double() / 200_000
    torch.testing.assert_close(frequencies, probabilities, rtol=0, atol=4e-3)


def test_ect_mapping_follows_its_formula_on_sigma():
    t = torch.tensor([0.001, 0.05, 0.3, 0.5, 0.9, 0.99], dtype=F64)
    for stage in (0, 2, 7):
        mapped = ect_previous_time(t, stage)
        for time, result in zip(t.tolist(), mapped.tolist()):
            sigma = time / (1 - time)
            ratio = 1 - (1 + 8 / (1 + math.exp(sigma))) / 2 ** (stage + 1)
            r = max(0.0, sigma * ratio)
            assert result == pytest.approx(r / (1 + r), rel=1e-12, abs=1e-15)
    assert float(ect_previous_time(t, 0)[0]) == 0.0  # stage 0, small sigma: r clamps to 0
    assert [ect_stage(p, 8) for p in (0.0, 0.124, 0.125, 0.99, 1.0)] == [0, 0, 1, 7, 7]
    assert float(ect_previous_time(torch.ones(1, dtype=F64), 3)) == 1.0  # no infinity at t = 1


def test_pseudo_huber_and_the_gap_weights_follow_their_formulas():
    squared = torch.tensor([0.0, 1e-4, 1.0, 25.0], dtype=F64)
    for c in (0.0, 0.03, 1.0):
        expected = torch.tensor([math.sqrt(value + c * c) - c for value in squared.tolist()], dtype=F64)
        torch.testing.assert_close(pseudo_huber(squared, c), expected, rtol=1e-12, atol=1e-150)
    t, t_prime = torch.tensor([0.5, 0.9, 0.1], dtype=F64), torch.tensor([0.25, 0.0, 0.05], dtype=F64)
    sigma = lambda time: time / (1 - time)  # noqa: E731
    torch.testing.assert_close(gap_weight(t, t_prime, GapWeighting.SIGMA_GAP), 1 / (sigma(t) - sigma(t_prime)))
    torch.testing.assert_close(gap_weight(t, t_prime, GapWeighting.TIME_GAP), 1 / (t - t_prime))
    assert torch.equal(gap_weight(t, t_prime, GapWeighting.UNIFORM), torch.ones(3, dtype=F64))


def test_discrete_loss_is_lambda_times_the_pseudo_huber_distance_with_icts_c():
    model, (x, noise, t) = random_mlp(), batch()
    t_prime = 0.5 * t
    objective = ConsistencyTraining()
    prediction, target = objective.discrete_prediction_and_target(model, x, noise, t, t_prime=t_prime)
    output = objective.loss_at(model, x, noise, t_prime, t, progress=0.3)
    c = 0.00054 * math.sqrt(2)
    squared = ((prediction - target) ** 2).sum(1)
    lam = (1 - t) * (1 - t_prime) / (t - t_prime)
    torch.testing.assert_close(output.per_sample, (lam * (torch.sqrt(squared + c * c) - c)).detach())
    assert float(output.metrics["discretisation_steps"]) == 41.0  # 10 * 2^2 + 1 at 30% of training
    assert float(output.metrics["time_gap"]) == pytest.approx(float((t - t_prime).mean()))
    output.loss.backward()
    assert model.output[1].weight.grad.abs().sum() > 0


def test_loss_draws_the_curriculum_and_logs_where_it_stands():
    model = random_mlp(CLASSES).float()
    x, labels = torch.randn(64, 2), torch.randint(0, CLASSES, (64,))
    cases = [({}, "discretisation_steps", 0.7, 321.0), ({"discretisation": "ect"}, "ect_stage", 0.9, 7.0),
             ({"mode": "continuous"}, "tangent_warmup", 0.01, 0.4)]
    for settings, key, progress, value in cases:
        objective = build_objective("consistency", settings, CLASSES, model)
        output = objective.loss(model, x, labels, generator=torch.Generator().manual_seed(0), progress=progress)
        assert torch.isfinite(output.loss) and float(output.metrics[key]) == pytest.approx(value)
        output.loss.backward()
    assert OBJECTIVES["consistency"] is ConsistencyTraining


@pytest.mark.parametrize("field, value, message", [
    ("mode", "both", "mode"), ("discretisation", "cm", "discretisation"), ("p_std", 0.0, "p_std"),
    ("sigma_max", 0.001, "sigma_max"), ("final_steps", 5, "final_steps"), ("ect_q", 1.0, "ect_q"),
    ("ect_stages", 0, "ect_stages"), ("huber_c", -1.0, "huber_c"), ("distance", "l1", "distance"),
    ("shared_dropout", "yes", "shared_dropout"), ("tangent_warmup", 1.5, "tangent_warmup"),
    ("tangent_normalisation", "l1", "tangent_normalisation"), ("sample_two_step_time", 1.0, "two_step_time"),
    ("sample_renoise", "fresh", "renoise"), ("class_dropout", 1.0, "class_dropout"), ("derivative", "ad", "derivative"),
])
def test_settings_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        ConsistencySettings(**{field: value})
    with pytest.raises(ValueError, match="objective.consistency"):
        ConsistencyTraining.parse_settings({field: value})


def test_jvp_derivative_refuses_data_parallelism():
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        build_objective("consistency", {"mode": "continuous", "derivative": "jvp"}, None, data_parallel=True)
    build_objective("consistency", {"mode": "discrete", "derivative": "jvp"}, None, data_parallel=True)


# ------------------------------------------------------------------------------- the sampler


def test_sampler_one_step_is_the_flow_map_at_one_and_two_steps_match_a_hand_computation():
    model = random_mlp()
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    ones, zeros = torch.ones(5, dtype=F64), torch.zeros(5, dtype=F64)
    with torch.no_grad():
        one = noise - model(noise, zeros, ones)
    torch.testing.assert_close(ConsistencySampler()(model, noise, num_steps=1), one, rtol=0, atol=0)
    for renoise, fresh in ((Renoise.INITIAL, noise), (Renoise.DERIVED, derived_noise(noise, 1))):
        tau = 0.4
        with torch.no_grad():
            z = (1 - tau) * one + tau * fresh
            two = z - tau * model(z, zeros, torch.full((5,), tau, dtype=F64))
        torch.testing.assert_close(ConsistencySampler(tau, renoise)(model, noise, num_steps=2), two)
    assert not torch.allclose(derived_noise(noise, 1), noise)


def test_two_step_sampling_of_the_exact_model_keeps_the_data_law_only_with_fresh_noise():
    """x = mu + s e after one step; with the same e the second step gives mu + s ((1 - t) s + t)/b_t e
    (too wide); with fresh e' it gives mu + (s / b_t)((1 - t) s e + t e'), of std s when e' is independent."""
    model, tau = gaussian_model(), 0.45
    noise = torch.randn(8_000, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    mu, s = model.mu, model.scale
    b = torch.sqrt((1 - tau) ** 2 * s**2 + tau**2)
    same = ConsistencySampler(tau, "initial")(model, noise, num_steps=2)
    torch.testing.assert_close(same, mu + s * ((1 - tau) * s + tau) / b * noise)
    fresh_noise = derived_noise(noise, 1)
    fresh = ConsistencySampler(tau, "derived")(model, noise, num_steps=2)
    torch.testing.assert_close(fresh, mu + s / b * ((1 - tau) * s * noise + tau * fresh_noise))
    # The derived noise is standard normal and uncorrelated with the sample's own (8k draws: ~4 sigma bounds).
    assert fresh_noise.mean().abs() < 0.035 and (fresh_noise.std() - 1).abs() < 0.03
    correlation = (fresh_noise * noise).mean(0) / (fresh_noise.std(0) * noise.std(0))
    assert correlation.abs().max() < 0.045
    torch.testing.assert_close(fresh.std(0), s, rtol=0.03, atol=0)
    assert bool((same.std(0) > 1.05 * s).all())


def test_derived_noise_depends_on_each_row_and_step_alone():
    noise = torch.randn(6, 3, 2, generator=torch.Generator().manual_seed(0))
    full = derived_noise(noise, 2)
    assert full.shape == noise.shape and full.dtype == torch.float32
    torch.testing.assert_close(derived_noise(noise[3:5], 2), full[3:5], rtol=0, atol=0)
    assert not torch.allclose(derived_noise(noise, 3), full)


def test_sampler_times_nfe_and_json_round_trip():
    sampler = ConsistencySampler()
    assert sampler.times(1) == [1.0] and sampler.times(2) == [1.0, 0.5] and sampler.times(2, 0.3) == [1.0, 0.3]
    assert sampler.times(4) == [1.0, 0.75, 0.5, 0.25]
    calls = []

    def network(z, r, t, conditions=None):
        calls.append(float(t[0]))
        assert bool((r == 0).all())
        return torch.zeros_like(z)

    sampler(network, torch.randn(2, 2), num_steps=3)
    assert calls == pytest.approx([1.0, 2 / 3, 1 / 3]) and sampler.nfe(3) == 3 and sampler.nfe(3, 2.0) == 6
    for record in (ConsistencySampler(), ConsistencySampler(0.45, "initial")):
        assert sampler_from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert ConsistencySampler(0.45, "initial").to_dict() == {"name": "consistency", "two_step_time": 0.45,
                                                             "renoise": "initial"}
    assert ConsistencySampler().describe(2) == "cm2_t0.5" and ConsistencySampler().describe(1) == "cm1"
    with pytest.raises(ValueError, match="2-step"):
        sampler.times(3, 0.4)
    for bad in (0.0, 1.0, math.nan):
        with pytest.raises(ValueError, match="two_step_time"):
            ConsistencySampler(bad)
    with pytest.raises(ValueError, match="renoise"):
        ConsistencySampler(0.5, "fresh")
    with pytest.raises(ValueError, match="unknown settings"):
        sampler_from_dict({"name": "consistency", "steps": 2})


def test_the_objective_declares_its_sampler_from_its_settings():
    objective = ConsistencyTraining(ConsistencySettings(sample_two_step_time=0.3, sample_renoise="initial"))
    assert objective.sampler == ConsistencySampler(0.3, "initial")
    assert ConsistencyTraining().sampler == ConsistencySampler(0.821 / 1.821)


# ------------------------------------------------------------------------------- presets and training


def test_presets_carry_the_papers_recipes():
    assert all(f"toy-{name}-consistency" in PRESETS for name in ("checkerboard", "eight-gaussians", "two-moons"))
    for name, base in (("consistency-digits", "digits"), ("consistency-mnist", "mnist")):
        config, reference = preset(name), preset(base)
        assert config.objective.method == "consistency"
        assert (config.model, config.optim, config.training, config.data) == \
               (reference.model, reference.optim, reference.training, reference.data)
    ict, ect, sct = preset("cifar10-ict"), preset("cifar10-ect"), preset("cifar10-sct")
    assert (ict.objective.settings.initial_steps, ict.objective.settings.final_steps) == (10, 1280)
    assert (ict.training.batch_size, ict.training.steps, ict.model.options["dropout"]) == (1024, 400_000, 0.3)
    assert ect.objective.settings.discretisation == "ect" and ect.objective.settings.huber_c == 0.0
    assert (ect.training.batch_size, ect.training.steps) == (128, 200_000)
    assert sct.objective.settings.mode == "continuous" and sct.objective.settings.tangent_c == 0.1
    assert sct.objective.settings.tangent_warmup * sct.training.steps == pytest.approx(10_000)
    assert "2.83" in ict.note and "3.60" in ect.note and "2.11" in ect.note and "2.97" in sct.note
    assert "2.06" in sct.note
    assert ict.objective.settings.sample_two_step_time == pytest.approx(0.821 / 1.821)



@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The discrete (iCT) toy preset trained for 6 real steps, 1- and 2-step grids included."""
    from meanflow.train import train

    folder = tmp_path_factory.mktemp("consistency") / "run"
    result = train(tiny(preset("toy-checkerboard-consistency"), grid_steps="[1, 2]"), folder, progress=False)
    assert result.step == 6 and math.isfinite(result.metrics["loss"])
    return folder


def logged_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_toy_preset_trains_through_the_registry_and_samples_with_its_own_sampler(toy_run):
    from meanflow.inference import generate, load_model

    assert any("discretisation_steps" in line for line in logged_metrics(toy_run))
    loaded = load_model(toy_run)
    assert loaded.record.method == "consistency" and loaded.sampler == ConsistencySampler(0.821 / 1.821)
    first = generate(loaded.model, 40, (2,), 2, seed=3, batch_size=40, sampler=loaded.sampler)
    again = generate(loaded.model, 40, (2,), 2, seed=3, batch_size=7, sampler=loaded.sampler)
    assert torch.isfinite(first).all() and torch.equal(first, again)  # deterministic whatever the batch


def test_continuous_mode_trains_end_to_end(tmp_path):
    from meanflow.train import train

    config = tiny(preset("toy-checkerboard-consistency"), steps=3, grid_steps="[1]").with_overrides(
        ["objective.consistency.mode=continuous", "objective.consistency.tangent_warmup=0.5"])
    result = train(config, tmp_path / "run", progress=False)
    assert result.step == 3 and math.isfinite(result.metrics["loss"])
    warmup = [line["tangent_warmup"] for line in logged_metrics(tmp_path / "run") if "tangent_warmup" in line]
    assert warmup and 0.0 <= warmup[0] < 1.0  # logged while it still rises


def test_meanflow_sample_uses_the_runs_consistency_sampler(toy_run, tmp_path, capsys):
    from meanflow.cli import main
    from meanflow.inference import generate, load_model
    from meanflow.sample_files import read_sample_file

    output = tmp_path / "sampled.npz"
    assert main(["sample", "--no-progress", "--checkpoint", str(toy_run), "--num-samples", "30",
                 "--steps", "2", "--seed", "4", "--batch-size", "8", "--output", str(output)]) == 0
    assert "consistency sampler, 2 steps = 2 NFE" in capsys.readouterr().out
    points, _ = read_sample_file(output)
    loaded = load_model(toy_run)
    expected = generate(loaded.model, 30, (2,), 2, seed=4, batch_size=30, sampler=loaded.sampler)
    assert np.array_equal(points, expected.numpy())


def test_meanflow_eval_scores_the_runs_consistency_sampler_on_the_same_points(toy_run, tmp_path):
    pytest.importorskip("scipy")
    from meanflow.cli import main
    from meanflow.inference import generate, load_model
    from meanflow.sample_files import read_sample_file

    report_file = tmp_path / "report.json"
    assert main(["eval", "--checkpoint", str(toy_run), "--num-samples", "60", "--steps", "1", "2", "--seed", "4",
                 "--batch-size", "25", "--save-samples", str(tmp_path / "samples"), "--json", str(report_file),
                 "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(report_file.read_text())
    assert report["sampler"]["name"] == "consistency" and report["sampler"]["source"] == "run record"
    assert [(entry["steps"], entry["nfe"]) for entry in report["scores"]] == [(1, 1), (2, 2)]
    loaded = load_model(toy_run)
    for entry in report["scores"]:
        saved, _ = read_sample_file(entry["samples_file"])
        points = generate(loaded.model, 60, (2,), entry["steps"], seed=4, batch_size=60, sampler=loaded.sampler)
        assert np.array_equal(saved, points.numpy())
