"""Improved MeanFlow (FAMILY.md F1): the target against an independent float64 computation, the
named limits, the derivative backends, the sampler and the training path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_runs import tiny

from meanflow.conditions import Conditions
from meanflow.models.mlp import MLP, MLPConfig
from meanflow.objectives import OBJECTIVES, ImfSettings, ImprovedMeanFlow, build_objective
from meanflow.presets import preset
from meanflow.samplers import ImfSampler, sampler_from_dict

CLASSES = 3
NULL = CLASSES


def two_head_mlp(num_classes=CLASSES, seed=0) -> MLP:
    """A float64 two-head MLP whose zero-initialised output layers are made non-zero, so that
    v_c, v_u and du/dt are all non-trivial."""
    torch.manual_seed(seed)
    model = MLP(MLPConfig(data_dim=2, hidden_size=16, depth=2, num_classes=num_classes, frequency_size=8,
                          guidance_conditions=True, auxiliary_velocity=True)).double()
    with torch.no_grad():
        for parameter in (*model.output.parameters(), *model.velocity_head.parameters()):
            parameter.normal_(0.0, 0.5)
    return model


def batch_inputs():
    """Eight rows covering every case of F1 (the comments name them)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    noise = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.5, 0.5, 0.9, 0.3, 0.6, 0.7, 0.45, 0.8], dtype=torch.float64)
    r = torch.tensor([0.2, 0.5, 0.1, 0.3, 0.0, 0.7, 0.1, 0.4], dtype=torch.float64)
    omega = torch.tensor([3.0, 5.0, 2.0, 1.0, 4.0, 6.0, 8.0, 2.5], dtype=torch.float64)
    interval = torch.tensor([[0.2, 0.8],   # guided, r != t
                             [0.0, 1.0],   # guided, r = t
                             [0.1, 0.6],   # t = 0.9 outside: omega acts as 1
                             [0.0, 1.0],   # omega = 1, r = t
                             [0.3, 0.9],   # dropped label (guided before dropout)
                             [0.0, 1.0],   # dropped label, r = t
                             [0.45, 0.7],  # t on the interval's edge: guided
                             [0.2, 0.9]],  # null label: no class at all
                            dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, NULL])
    dropped = torch.tensor([False, False, False, False, True, True, False, False])
    return x, noise, r, t, labels, omega, interval, dropped


def reference_terms(model, x, noise, r, t, labels, omega, interval, dropped, derivative_step=None):
    """F-1 and F-2 written out row by row in float64: (V, v_theta, v_g)."""
    z = (1 - t)[:, None] * x + t[:, None] * noise
    v = noise - x
    full = torch.tensor([[0.0, 1.0]], dtype=torch.float64).expand(x.shape[0], 2)
    inside = (t >= interval[:, 0]) & (t <= interval[:, 1])
    w = torch.where(inside, omega, torch.ones_like(omega))
    with torch.no_grad():
        v_c = model(z, t, t, Conditions(labels, w, full)).v
        v_u = model(z, t, t, Conditions(torch.full_like(labels, NULL), torch.ones_like(w), full)).v
    v_g = v + (1 - 1 / w)[:, None] * (v_c - v_u)
    unguided = dropped | (labels == NULL)
    v_g = torch.where(unguided[:, None], v, v_g)
    inputs = Conditions(torch.where(dropped, torch.full_like(labels, NULL), labels), omega, interval)

    def u_of(z_, t_):
        return model(z_, r, t_, inputs).u

    if derivative_step is None:
        _, dudt = torch.autograd.functional.jvp(u_of, (z, t), (v_c, torch.ones_like(t)))
    else:
        h = derivative_step
        dudt = (u_of(z + h * v_c, t + h) - u_of(z - h * v_c, t - h)) / (2 * h)
    out = model(z, r, t, inputs)
    return out.u + (t - r)[:, None] * dudt, out.v, v_g


def test_target_matches_an_independent_float64_computation():
    model = two_head_mlp()
    inputs = batch_inputs()
    objective = ImprovedMeanFlow(num_classes=CLASSES)
    terms = objective.prediction_and_target(model, *inputs)
    V, v_theta, v_g = reference_terms(model, *inputs)
    torch.testing.assert_close(terms.target, v_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.V, V.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.v, v_theta, rtol=1e-12, atol=1e-12)
    x, noise, r, t, labels, omega, interval, dropped = inputs
    v = noise - x
    # The named cases: unguided rows regress onto v; the guided ones do not.
    for row in (2, 3, 4, 5, 7):
        torch.testing.assert_close(terms.target[row], v[row])
    for row in (0, 1, 6):
        assert not torch.allclose(terms.target[row], v[row])
    # r = t rows: V is u itself.
    for row in (1, 3, 5):
        torch.testing.assert_close(terms.V[row], terms.u[row])


def test_tangent_keeps_the_label_before_dropout():
    """A dropped row's derivative runs along v_theta(z, t | y, omega) with its own label (imf.py:358-373):
    changing that label changes V, though the u call sees the null class either way."""
    model = two_head_mlp()
    x, noise, r, t, labels, omega, interval, dropped = batch_inputs()
    objective = ImprovedMeanFlow(num_classes=CLASSES)
    first = objective.prediction_and_target(model, x, noise, r, t, labels, omega, interval, dropped)
    other = labels.clone()
    other[4] = 2
    second = objective.prediction_and_target(model, x, noise, r, t, other, omega, interval, dropped)
    torch.testing.assert_close(first.u[4], second.u[4])
    torch.testing.assert_close(first.target[4], second.target[4])
    assert not torch.allclose(first.V[4], second.V[4])


def test_r_equal_t_rows_at_omega_one_reduce_to_flow_matching_on_both_heads():
    model = two_head_mlp()
    x, noise, _, t, labels, *_ = batch_inputs()
    objective = ImprovedMeanFlow(ImfSettings(p=0.0), num_classes=CLASSES)
    output = objective.loss_at(model, x, noise, t, t, labels)  # omega = 1, interval [0, 1]
    z = (1 - t)[:, None] * x + t[:, None] * noise
    out = model(z, t, t, Conditions(labels, torch.ones_like(t), torch.tensor([[0.0, 1.0]]).double().expand(8, 2)))
    v = noise - x
    expected = ((out.u - v) ** 2).sum(1) + ((out.v - v) ** 2).sum(1)
    torch.testing.assert_close(output.per_sample, expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("derivative, tolerance", [("two_pass", 1e-8), ("jvp", 1e-8), ("finite_difference", 1e-5)])
def test_every_derivative_backend_agrees_with_float64_central_differences(derivative, tolerance):
    model = two_head_mlp()
    inputs = batch_inputs()
    objective = ImprovedMeanFlow(ImfSettings(derivative=derivative), num_classes=CLASSES)
    terms = objective.prediction_and_target(model, *inputs)
    V, v_theta, v_g = reference_terms(model, *inputs, derivative_step=1e-5)
    torch.testing.assert_close(terms.V, V.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(terms.v, v_theta.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.target, v_g)
    # The gradient reaches both heads through V and v_theta.
    objective.loss_output(terms, inputs[1] - inputs[0], inputs[2], inputs[3]).loss.backward()
    assert model.output[1].weight.grad.abs().sum() > 0 and model.velocity_head[3].weight.grad.abs().sum() > 0


def test_guidance_scale_law_matches_the_official_one():
    like = torch.zeros(1)
    generator = torch.Generator().manual_seed(0)
    log_uniform = ImprovedMeanFlow().sample_guidance_scale(200_000, like, generator)
    assert float(log_uniform.min()) >= 1.0 and float(log_uniform.max()) <= 8.0
    # beta = 1: log omega ~ U(0, log 8), mean log(8) / 2.
    assert float(log_uniform.log().mean()) == pytest.approx(math.log(8.0) / 2, abs=5e-3)
    uniform = ImprovedMeanFlow(ImfSettings(beta=0.0)).sample_guidance_scale(200_000, like, generator)
    assert float(uniform.mean()) == pytest.approx(4.5, abs=0.02)  # beta = 0: U(1, 8)
    steep = ImprovedMeanFlow(ImfSettings(beta=2.0)).sample_guidance_scale(200_000, like, generator)
    # density ~ omega^-2 on [1, 8]: mean = log(8) / (1 - 1/8).
    assert float(steep.mean()) == pytest.approx(math.log(8.0) / (7 / 8), abs=0.02)


def test_intervals_and_prefix_masks():
    objective = ImprovedMeanFlow(ImfSettings(mask_mode="prefix", class_dropout=0.5), num_classes=CLASSES)
    generator = torch.Generator().manual_seed(0)
    r, t = objective.sample_times(1000, torch.zeros(1), generator)
    interval = objective.sample_interval(r, t, generator)
    resting = r == t
    assert resting[:500].all() and not resting[500:].any()
    assert (interval[resting] == torch.tensor([0.0, 1.0])).all()
    assert interval[~resting, 0].max() <= 0.5 and interval[~resting, 1].min() >= 0.5
    dropped = objective.sample_dropped(1000, "cpu", generator)
    count = int(dropped.sum())
    assert 400 < count < 600 and dropped[:count].all() and not dropped[count:].any()


def test_loss_draws_everything_and_backpropagates():
    model = two_head_mlp().float()
    objective = build_objective("imf", {"class_dropout": 0.2}, CLASSES, model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2)
    out = objective.loss(model, x, torch.randint(0, CLASSES, (64,)), generator=generator)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.metrics) == {"loss", "unweighted_error", "auxiliary_error",
                                                            "velocity_error", "fraction_r_neq_t"}
    assert 0.3 < float(out.metrics["fraction_r_neq_t"]) < 0.7


def test_check_model_refuses_networks_without_guidance_inputs_or_auxiliary_head():
    objective = ImprovedMeanFlow(num_classes=CLASSES)
    with pytest.raises(ValueError, match="guidance_interval"):
        objective.check_model(MLP(MLPConfig(num_classes=CLASSES, auxiliary_velocity=True)))
    with pytest.raises(ValueError, match="auxiliary velocity"):
        objective.check_model(MLP(MLPConfig(num_classes=CLASSES, guidance_conditions=True)))
    objective.check_model(two_head_mlp())
    assert OBJECTIVES["imf"] is ImprovedMeanFlow


@pytest.mark.parametrize("field, value, message", [
    ("fraction_r_neq_t", 1.5, "fraction_r_neq_t"), ("mask_mode", "first", "mask_mode"), ("s_max", 0.0, "s_max"),
    ("beta", math.nan, "beta"), ("t_min_high", 0.7, "t_max_low"), ("t_min_low", -0.1, "t_min_low"),
    ("t_max_high", 1.2, "t_max_high"), ("class_dropout", 1.0, "class_dropout"), ("p", -1.0, "p"),
    ("c", 0.0, "c"), ("auxiliary_weight", -1.0, "auxiliary_weight"), ("derivative", "autograd", "derivative"),
    ("finite_difference_step", 0.0, "finite_difference_step"), ("sigma", 0.0, "sigma"),
])
def test_settings_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        ImfSettings(**{field: value})
    with pytest.raises(ValueError, match="objective.imf"):
        ImprovedMeanFlow.parse_settings({field: value})
    with pytest.raises(ValueError, match="valid"):
        ImprovedMeanFlow.parse_settings({"omega": 2.0})


def test_explicit_inputs_are_checked():
    model, objective = two_head_mlp(), ImprovedMeanFlow(num_classes=CLASSES)
    x, noise, r, t, labels, omega, interval, dropped = batch_inputs()
    with pytest.raises(ValueError, match="omega"):
        objective.prediction_and_target(model, x, noise, r, t, labels, omega * 0.1, interval)
    with pytest.raises(ValueError, match="interval"):
        objective.prediction_and_target(model, x, noise, r, t, labels, omega, interval.flip(1))


def test_sampler_passes_the_guidance_inputs_at_one_nfe_a_step():
    sampler = ImfSampler()
    assert sampler_from_dict(sampler.to_dict()) == sampler and sampler.nfe(2, guidance_scale=8.0) == 2
    seen = []

    def network(z, r, t, conditions):
        seen.append(conditions)
        return z * conditions.guidance_scale[:, None] + conditions.guidance_interval[:, :1]

    noise = torch.ones(3, 2)
    out = sampler.with_guidance(4.0, (0.25, 0.75))(network, noise, torch.tensor([0, 1, 2]), num_steps=2)
    assert len(seen) == 2 and (seen[0].guidance_scale == 4.0).all()
    assert (seen[0].guidance_interval == torch.tensor([0.25, 0.75])).all() and (seen[0].labels == torch.arange(3)).all()
    # Two Eq. 3 steps of u = 4 z + 0.25 on [1, 0.5, 0]: z -> z - 0.5 (4 z + 0.25) twice.
    expected = noise
    for _ in range(2):
        expected = expected - 0.5 * (4 * expected + 0.25)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="omega"):
        sampler.with_guidance(0.5)
    with pytest.raises(ValueError, match="learns its guidance"):  # no classifier-free guidance on top
        sampler(network, noise, num_steps=1, guidance_scale=2.0)
    assert sampler_from_dict(ImfSampler(8.0, (0.4, 0.65)).to_dict()) == ImfSampler(8.0, (0.4, 0.65))



def test_toy_preset_trains_through_the_registry_and_samples_with_its_own_sampler(tmp_path):
    from meanflow.inference import load_model
    from meanflow.train import train

    result = train(tiny(preset("toy-checkerboard-imf")), tmp_path / "run", progress=False)
    assert result.step == 6 and math.isfinite(result.metrics["loss"])
    loaded = load_model(tmp_path / "run")
    assert loaded.record.method == "imf" and loaded.sampler == ImfSampler()
    samples = loaded.sampler.with_guidance(2.0, (0.3, 0.7))(loaded.model, torch.randn(5, 2), num_steps=1)
    assert samples.shape == (5, 2) and torch.isfinite(samples).all()


def test_guidance_inputs_change_the_samples_of_a_trained_class_conditional_toy(tmp_path):
    from meanflow.inference import load_model
    from meanflow.train import train

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, CLASSES, (256,), generator=generator)
    points = torch.randn(256, 2, generator=generator) * 0.2 + torch.stack([labels.float() - 1, labels.float() % 2], 1)
    config = tiny(preset("toy-checkerboard-imf"), steps=20).with_overrides([f"model.options.num_classes={CLASSES}"])
    train(config, tmp_path / "run", progress=False, data=points, labels=labels)
    loaded = load_model(tmp_path / "run", weights="raw")
    noise, classes = torch.randn(16, 2, generator=generator), torch.arange(16) % CLASSES
    base = loaded.sampler(loaded.model, noise, classes, num_steps=1)
    again = loaded.sampler(loaded.model, noise, classes, num_steps=1)
    stronger = loaded.sampler.with_guidance(6.0)(loaded.model, noise, classes, num_steps=1)
    narrower = loaded.sampler.with_guidance(interval=(0.4, 0.6))(loaded.model, noise, classes, num_steps=1)
    torch.testing.assert_close(base, again)
    assert (stronger - base).abs().max() > 1e-4 and (narrower - base).abs().max() > 1e-4


@pytest.fixture(scope="module")
def conditional_toy_run(tmp_path_factory):
    from meanflow.train import train

    folder = tmp_path_factory.mktemp("imf") / "run"
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, CLASSES, (256,), generator=generator)
    points = torch.randn(256, 2, generator=generator) * 0.2 + torch.stack([labels.float() - 1, labels.float() % 2], 1)
    config = tiny(preset("toy-checkerboard-imf"), steps=20).with_overrides([f"model.options.num_classes={CLASSES}"])
    train(config, folder, progress=False, data=points, labels=labels)
    return folder


def test_the_command_line_samples_an_imf_run_at_any_guidance_in_one_step(conditional_toy_run, tmp_path, capsys):
    from meanflow.cli import main
    from meanflow.sample_files import read_sample_file

    common = ["sample", "--checkpoint", str(conditional_toy_run), "--num-samples", "12", "--no-progress",
              "--weights", "raw"]  # 20 steps: the EMA has hardly left its start
    assert main(common + ["--output", str(tmp_path / "own.npz")]) == 0
    assert main(common + ["--omega", "6", "--interval", "0.3,0.7", "--output", str(tmp_path / "w6.npz")]) == 0
    out = capsys.readouterr().out
    assert "imf sampler, 1 steps = 1 NFE" in out  # learnt guidance: no second pass at any scale
    own, labels = read_sample_file(tmp_path / "own.npz")
    guided, _ = read_sample_file(tmp_path / "w6.npz")
    assert labels.tolist() == [k % CLASSES for k in range(12)] and np.abs(guided - own).max() > 1e-4
    assert main(common + ["--interval", "0.7,0.3"]) == 2  # refused before any work
    assert "T_MIN <= T_MAX" in capsys.readouterr().err


def test_the_eval_sweep_covers_scale_by_interval_by_steps_from_one_checkpoint(conditional_toy_run, tmp_path, capsys):
    import json

    from meanflow.cli import main

    report = tmp_path / "sweep.json"
    assert main(["eval", "--checkpoint", str(conditional_toy_run), "--num-samples", "64", "--steps", "1", "2",
                 "--omega", "1", "4", "--interval", "0,1", "0.3,0.7", "--sweep", "--weights", "raw",
                 "--reference", "checkerboard", "--json", str(report), "--no-progress"]) == 0
    rows = json.loads(report.read_text())["table"]
    settings = {(row["sampler"], row["nfe"]) for row in rows}
    assert len(rows) == 8 and settings == {(f"steps{k}_w{w}_i{a}-{b}", k) for k in (1, 2) for w in (1, 4)
                                           for a, b in (("0", "1"), ("0.3", "0.7"))}


def test_learnt_guidance_options_are_refused_for_runs_without_it(tmp_path, capsys):
    from meanflow.cli import main
    from meanflow.train import train

    train(tiny(preset("toy-checkerboard"), steps=2), tmp_path / "plain", progress=False)
    assert main(["sample", "--checkpoint", str(tmp_path / "plain"), "--omega", "4", "--no-progress"]) == 2
    assert "has no learnt guidance to set" in capsys.readouterr().err
