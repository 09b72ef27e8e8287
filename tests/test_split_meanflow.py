"""SplitMeanFlow (FAMILY.md F4, F-5): the target against the exact Gaussian flow map, the ends of
the split, MeanFlow's identity as the limit s -> t, guidance at the boundary, the laws, the
checks and a toy run."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_runs import tiny
from fields import gaussian_field, random_mlp, times

from meanflow.objectives import OBJECTIVES, MeanFlow, SplitMeanFlow, SplitMeanFlowSettings, guided_velocity
from meanflow.objectives.split_meanflow import SplitLaw
from meanflow.presets import preset
from meanflow.samplers import AverageVelocitySampler

CLASSES = 3
NULL = CLASSES








def test_the_target_of_the_exact_field_is_exact_for_any_split():
    """The exact average velocity is additive over any split (F-5 holds with equality); the
    boundary rows (r = t) see the marginal velocity through the posterior-mean inputs."""
    field = gaussian_field()
    r, t = times(64, equal_every=4)
    generator = torch.Generator().manual_seed(2)
    a, b = field.mean_std(t)
    z = a + b * torch.randn(64, 3, generator=generator, dtype=torch.float64)
    x, e = field.posterior_means(z, t)
    split = torch.rand(64, generator=generator, dtype=torch.float64)
    u, u_tgt = SplitMeanFlow().prediction_and_target(field, x, e, r, t, split=split)
    torch.testing.assert_close(u_tgt, field(z, r, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u, field(z, r, t), rtol=1e-12, atol=1e-12)


def test_the_target_is_f5_on_any_network():
    model = random_mlp()
    generator = torch.Generator().manual_seed(3)
    x, e = torch.randn(2, 8, 3, generator=generator, dtype=torch.float64)
    r, t = times(8, equal_every=3)
    split = torch.rand(8, generator=generator, dtype=torch.float64)
    _, u_tgt = SplitMeanFlow().prediction_and_target(model, x, e, r, t, split=split)
    z, s = (1 - t)[:, None] * x + t[:, None] * e, r + split * (t - r)
    with torch.no_grad():
        late = model(z, s, t)
        early = model(z - (t - s)[:, None] * late, r, s)
    expected = ((s - r)[:, None] * early + (t - s)[:, None] * late) / (t - r).clamp_min(1e-300)[:, None]
    moving = r < t
    torch.testing.assert_close(u_tgt[moving], expected[moving], rtol=1e-12, atol=1e-12)
    assert torch.equal(u_tgt[~moving], (e - x)[~moving]) and not u_tgt.requires_grad


def test_either_end_of_the_split_gives_the_prediction_itself():
    """lambda = 1 (s = t) and lambda = 0 (s = r) leave one part empty: the target is u(z_t, r, t),
    so the loss carries no signal; an interior split does."""
    model = random_mlp()
    generator = torch.Generator().manual_seed(4)
    x, e = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    r, t = times(6)
    objective = SplitMeanFlow()
    for end in (0.0, 1.0):
        u, u_tgt = objective.prediction_and_target(model, x, e, r, t, split=torch.full_like(t, end))
        torch.testing.assert_close(u_tgt, u.detach(), rtol=1e-13, atol=1e-13)
    u, u_tgt = objective.prediction_and_target(model, x, e, r, t, split=torch.full_like(t, 0.5))
    assert (u_tgt - u).abs().min() > 1e-6


def test_meanflows_identity_is_the_limit_s_to_t():
    """With s = t - h: (t - r) / h (u_tgt - u) -> v' - (t - r) du/dt - u along (v', 0, 1), v' =
    u(z_t, t, t) the network's own velocity: MeanFlow's target (Eq. 6) for inputs whose v = e - x
    is v'. The error shrinks linearly with h."""
    model = random_mlp()
    generator = torch.Generator().manual_seed(5)
    batch = 6
    r, t = times(batch, seed=6)
    t = t.clamp_min(0.2)
    r = torch.minimum(r, t - 0.1)
    z = torch.randn(batch, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        velocity = model(z, t, t)  # v'
    x, e = z - t[:, None] * velocity, z + (1 - t)[:, None] * velocity  # z_t = z and e - x = v'
    u, meanflow_target = MeanFlow(derivative="jvp").prediction_and_target(model, x, e, r, t)
    limit = (meanflow_target - u).detach()
    errors = []
    for h in (1e-2, 1e-3, 1e-4):
        split = 1 - h / (t - r)
        u, u_tgt = SplitMeanFlow().prediction_and_target(model, x, e, r, t, split=split)
        gap = t - (r + split * (t - r))  # t - s as the objective computes it
        scaled = (t - r)[:, None] / gap[:, None] * (u_tgt - u.detach())
        errors.append(float((scaled - limit).abs().max()))
    assert errors[0] < 0.1 * float(limit.abs().max())
    assert errors[1] < 0.2 * errors[0] and errors[2] < 0.2 * errors[1]  # first order in h


def test_guidance_at_the_boundary_matches_the_closed_form():
    """On the r = t rows the target is MeanFlow's v_hat = omega v + (1 - omega - kappa) v_unc +
    kappa v_cond (Eq. 10) where the label is kept and t lies in [t_min, t_max], else v; the split
    rows take no guidance of their own."""
    model = random_mlp(num_classes=CLASSES)
    settings = dict(omega=0.5, kappa=0.3, t_min=0.0, t_max=0.8)
    objective = SplitMeanFlow(SplitMeanFlowSettings(**settings), num_classes=CLASSES)
    plain = SplitMeanFlow(num_classes=CLASSES)
    generator = torch.Generator().manual_seed(7)
    x, e = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7, 0.9, 0.5, 0.6, 0.4], dtype=torch.float64)
    r = torch.tensor([0.3, 0.7, 0.9, 0.5, 0.1, 0.2], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, NULL, 1, 0])
    split = torch.full_like(t, 0.4)
    _, u_tgt = objective.prediction_and_target(model, x, e, r, t, labels, split)
    z, v = (1 - t)[:, None] * x + t[:, None] * e, e - x
    with torch.no_grad():
        v_unc, v_cond = model(z, t, t, torch.full_like(labels, NULL)), model(z, t, t, labels)
    v_hat = guided_velocity(v, v_unc, v_cond, 0.5, 0.3)
    torch.testing.assert_close(u_tgt[:2], v_hat[:2], rtol=1e-12, atol=1e-12)  # guided boundary rows
    assert torch.equal(u_tgt[2:4], v[2:4])  # t = 0.9 outside the interval; the null label
    split_rows = plain.prediction_and_target(model, x, e, r, t, labels, split)[1][4:]
    torch.testing.assert_close(u_tgt[4:], split_rows, rtol=1e-13, atol=1e-13)
    assert (u_tgt[:2] - v[:2]).abs().min() > 1e-6


def test_the_training_path_is_the_deterministic_core_on_its_own_draws():
    """loss() draws noise, (r, t) from the TimeSampler and lambda from the split law, in that
    order; replaying the draws through loss_at gives the same loss."""
    model = random_mlp()
    objective = SplitMeanFlow(SplitMeanFlowSettings(split_low=0.2, split_high=0.6, fraction_r_neq_t=0.5))
    x = torch.randn(32, 3, dtype=torch.float64)
    out = objective.loss(model, x, generator=torch.Generator().manual_seed(8))
    generator = torch.Generator().manual_seed(8)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    r, t = objective.time_sampler.sample(32, "cpu", x.dtype, generator)
    split = objective.split_law.sample(32, t, generator)
    assert 0.2 <= float(split.min()) and float(split.max()) <= 0.6
    again = objective.loss_at(model, x, noise, r, t, split=split)
    torch.testing.assert_close(out.per_sample, again.per_sample, rtol=1e-13, atol=1e-13)
    out.loss.backward()
    assert model.output[1].weight.grad.abs().sum() > 0


def test_the_laws_follow_the_settings():
    objective = SplitMeanFlow(SplitMeanFlowSettings(fraction_r_neq_t=0.6))
    r, t = objective.sample_times(20_000, torch.zeros(1), torch.Generator().manual_seed(9))
    assert float((r < t).float().mean()) == pytest.approx(0.6, abs=0.015)  # the rest is the boundary term
    assert SplitMeanFlow().time_sampler.fraction_r_neq_t == 0.25  # MeanFlow's default
    generator = torch.Generator().manual_seed(10)
    uniform = SplitLaw().sample(20_000, torch.zeros(1), generator)
    assert 0 <= float(uniform.min()) and float(uniform.max()) <= 1
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.01) and float(uniform.var()) == pytest.approx(1 / 12, abs=0.003)
    assert torch.equal(SplitLaw(low=0.5, high=0.5).sample(4, torch.zeros(1), generator), torch.full((4,), 0.5))


def test_explicit_inputs_are_checked():
    model, objective = random_mlp(), SplitMeanFlow()
    x = torch.zeros(2, 3, dtype=torch.float64)
    r, t = torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.6, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="need the split fraction"):
        objective.prediction_and_target(model, x, x, r, t)
    with pytest.raises(ValueError, match=r"split must be a \(2,\) tensor"):
        objective.prediction_and_target(model, x, x, r, t, split=torch.tensor([1.5, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"split must be a \(2,\) tensor"):
        objective.prediction_and_target(model, x, x, r, t, split=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="r <= t"):
        objective.prediction_and_target(model, x, x, t, r, split=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="labels are required"):
        SplitMeanFlow(num_classes=CLASSES).prediction_and_target(random_mlp(CLASSES), x, x, t, t)
    objective.prediction_and_target(model, x, x, t, t)  # no r < t row: no split needed


@pytest.mark.parametrize("field, value, message", [
    ("split_low", -0.1, "split_low"), ("split_high", 1.5, "split_high"), ("fraction_r_neq_t", 1.5, "fraction_r_neq_t"),
    ("distribution", "beta", "distribution"), ("sigma", 0.0, "sigma"), ("p", -1.0, "p"), ("omega", -1.0, "omega"),
    ("kappa", 1.0, "kappa"), ("t_min", 2.0, "t_min"), ("class_dropout", 1.5, "class_dropout"),
])
def test_settings_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SplitMeanFlowSettings(**{field: value})
    with pytest.raises(ValueError, match="objective.split_meanflow"):
        SplitMeanFlow.parse_settings({field: value})
    with pytest.raises(ValueError, match=r"split_high must be a finite number in \[0.7, 1\]"):
        SplitMeanFlowSettings(split_low=0.7, split_high=0.3)
    with pytest.raises(ValueError, match="valid"):
        SplitMeanFlow.parse_settings({"lam": 0.5})



def test_toy_preset_trains_through_the_registry_and_samples_with_its_own_sampler(tmp_path):
    from meanflow.inference import load_model
    from meanflow.train import train

    assert OBJECTIVES["split_meanflow"] is SplitMeanFlow
    result = train(tiny(preset("toy-checkerboard-split-meanflow")), tmp_path / "run", progress=False)
    assert result.step == 6 and math.isfinite(result.metrics["loss"])
    loaded = load_model(tmp_path / "run")
    assert loaded.record.method == "split_meanflow" and loaded.sampler == AverageVelocitySampler()
    for steps in (1, 2):
        samples = loaded.sampler(loaded.model, torch.randn(5, 2), num_steps=steps)
        assert samples.shape == (5, 2) and torch.isfinite(samples).all()


def test_the_image_presets_share_the_meanflow_presets_runs():
    for name, base in (("split-meanflow-digits", "digits"), ("split-meanflow-mnist", "mnist")):
        config, reference = preset(name), preset(base)
        assert config.objective.method == "split_meanflow"
        o, m = config.objective.settings, reference.objective.settings
        assert (o.fraction_r_neq_t, o.omega, o.kappa, o.class_dropout) == (m.fraction_r_neq_t, m.omega, m.kappa,
                                                                          m.class_dropout)
        for section in ("data", "model", "optim", "training"):
            assert getattr(config, section) == getattr(reference, section)
