"""Shortcut models (FAMILY.md F3, F-4): the targets against the exact Gaussian flow map and hand
computations in float64, the step and time laws, guidance, clipping, the checks and a toy run."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_runs import tiny
from fields import gaussian_field, random_mlp
from torch import nn

from meanflow.models.mlp import MLP, MLPConfig
from meanflow.objectives import OBJECTIVES, Shortcut, ShortcutSettings, guided_velocity
from meanflow.presets import preset
from meanflow.samplers import AverageVelocitySampler

CLASSES = 3
NULL = CLASSES
EXACT = ShortcutSettings(smallest_step_is_velocity=False, clip=None)






def posterior_inputs(field, r, t, seed=2):
    """z_t from the marginal and (x, e) at their posterior means given z_t: targets linear in v
    then see the marginal velocity (as tests/test_objective.py does)."""
    generator = torch.Generator().manual_seed(seed)
    a, b = field.mean_std(t)
    z = a + b * torch.randn(t.shape[0], field.mu.shape[0], generator=generator, dtype=torch.float64)
    x, e = field.posterior_means(z, t)
    return z, x, e


def drawn_times(objective, batch=64, seed=1):
    return objective.sample_times(batch, torch.zeros(1, dtype=torch.float64), torch.Generator().manual_seed(seed))


def test_every_target_of_the_exact_field_is_the_exact_average_velocity():
    """The exact flow map is a semigroup: two half steps average to u over the double step, on
    every dyadic level; the flow rows (r = t) see the marginal velocity."""
    field = gaussian_field()
    objective = Shortcut(EXACT)
    r, t = drawn_times(objective)
    assert set((t - r).tolist()) == {0.0, *objective.settings.double_steps}  # every level is present
    z, x, e = posterior_inputs(field, r, t)
    u, u_tgt = objective.prediction_and_target(field, x, e, r, t)
    torch.testing.assert_close(u_tgt, field(z, r, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u, field(z, r, t), rtol=1e-12, atol=1e-12)


def test_the_finest_halves_are_two_euler_steps_of_the_velocity_by_default():
    """Official: the smallest step is the flow level, so the finest double step 2/2^k averages two
    velocity evaluations (d = 0); the other levels stay exact."""
    field = gaussian_field()
    objective = Shortcut(ShortcutSettings(clip=None))
    r, t = drawn_times(objective)
    z, x, e = posterior_inputs(field, r, t)
    _, u_tgt = objective.prediction_and_target(field, x, e, r, t)
    d = (t - r) / 2
    finest = (t - r) == 2.0 ** -6
    first = field.velocity(z, t)
    euler = (first + field.velocity(z - d[:, None] * first, t - d)) / 2
    torch.testing.assert_close(u_tgt[finest], euler[finest], rtol=1e-12, atol=1e-12)
    assert (u_tgt[finest] - field(z, r, t)[finest]).abs().max() > 1e-8  # not the exact field: Euler's error
    torch.testing.assert_close(u_tgt[~finest], field(z, r, t)[~finest], rtol=1e-12, atol=1e-12)


def test_flow_rows_at_d_zero_are_flow_matching_on_any_network():
    model = random_mlp()
    objective = Shortcut()  # p = 0: the plain squared error
    generator = torch.Generator().manual_seed(3)
    x, e = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.0], dtype=torch.float64)
    u, u_tgt = objective.prediction_and_target(model, x, e, t, t)
    assert torch.equal(u_tgt, e - x)
    z = (1 - t)[:, None] * x + t[:, None] * e
    out = objective.loss_at(model, x, e, t, t)
    torch.testing.assert_close(out.per_sample, ((model(z, t, t) - (e - x)) ** 2).sum(1).detach())
    out.loss.backward()
    assert model.output[1].weight.grad.abs().sum() > 0 and not u_tgt.requires_grad


def test_a_bootstrap_target_is_f4_on_any_network_and_carries_no_gradient():
    model = random_mlp()
    objective = Shortcut(EXACT)
    generator = torch.Generator().manual_seed(4)
    x, e = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64)
    r = t - torch.tensor([1.0, 0.25, 0.5], dtype=torch.float64)
    _, u_tgt = objective.prediction_and_target(model, x, e, r, t)
    z, d = (1 - t)[:, None] * x + t[:, None] * e, (t - r) / 2
    with torch.no_grad():
        first = model(z, t - d, t)
        second = model(z - d[:, None] * first, r, t - d)
    torch.testing.assert_close(u_tgt, (first + second) / 2, rtol=1e-12, atol=1e-12)
    assert not u_tgt.requires_grad


def test_dyadic_steps_and_time_grids_follow_the_settings():
    default = ShortcutSettings()
    assert default.smallest_step == 1 / 128 and default.double_steps == (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)
    objective = Shortcut(ShortcutSettings(smallest_step_exponent=3, bootstrap_fraction=0.5))
    r, t = drawn_times(objective, batch=40)
    step = t - r
    # 20 bootstrap rows first: 6 per level (1/4, 1/2, 1), finest first, the remainder of 2 at step 1.
    assert step[:20].tolist() == [0.25] * 6 + [0.5] * 6 + [1.0] * 8 and (step[20:] == 0).all()
    cells = t[:20] / step[:20]
    assert torch.equal(cells, cells.round()) and (cells >= 1).all() and (cells <= 1 / step[:20]).all()
    flow = t[20:] * 8  # the grid of the smallest step 1/8: t in {1/8, ..., 1}
    assert torch.equal(flow, flow.round()) and flow.min() >= 1 and flow.max() <= 8
    many_r, many_t = drawn_times(objective, batch=4000)
    assert set((many_t[2000:] * 8).tolist()) == set(range(1, 9))  # every grid point is drawn
    assert set((many_t[:666] * 4).tolist()) == {1.0, 2.0, 3.0, 4.0}  # step 1/4 starts at 1/4, ..., 1
    uniform = Shortcut(ShortcutSettings(smallest_step_exponent=3, bootstrap_fraction=0.5, bootstrap_times="uniform",
                                        flow_matching_times="uniform"))
    r, t = drawn_times(uniform, batch=4000)
    step = t - r
    assert (t[:2000] >= step[:2000]).all() and (r >= 0).all() and (t <= 1).all()
    assert len(set((t * 8).tolist())) > 3000 and t[2000:].min() > 0  # off the grid, never data itself
    assert step[:2000].tolist() == [0.25] * 666 + [0.5] * 666 + [1.0] * 668  # the same levels as 'grid'


def test_guidance_in_the_target_matches_the_closed_form():
    """CFG u_unc + w (u_cond - u_unc) on both halves of the finest double step (the official
    ``bootstrap_cfg``); the first guided half gives the step z_m. Larger steps, null labels and
    flow rows get none; guided_steps='all' guides every double step."""
    model = random_mlp(num_classes=CLASSES)
    w = 2.5
    generator = torch.Generator().manual_seed(5)
    x, e = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.5, 1.0, 0.25, 0.75, 0.6], dtype=torch.float64)
    step = torch.tensor([1 / 64, 1.0, 1 / 64, 1 / 4, 0.0], dtype=torch.float64)
    r, labels = t - step, torch.tensor([0, 1, NULL, 2, 1])
    z, d = (1 - t)[:, None] * x + t[:, None] * e, step / 2

    def reference(guide_rows):
        def u(z_, r_, t_):
            with torch.no_grad():
                conditional = model(z_, r_, t_, labels)
                unconditional = model(z_, r_, t_, torch.full_like(labels, NULL))
            return torch.where(guide_rows[:, None], guided_velocity(conditional, unconditional, None, w, 0.0),
                               conditional)

        finest = step == 1 / 64
        first = u(z, torch.where(finest, t, t - d), t)  # the finest halves at d = 0
        second = u(z - d[:, None] * first, torch.where(finest, t - d, r), t - d)
        return (first + second) / 2

    smallest = Shortcut(ShortcutSettings(guidance_scale=w, clip=None), num_classes=CLASSES)
    _, u_tgt = smallest.prediction_and_target(model, x, e, r, t, labels)
    torch.testing.assert_close(u_tgt[:4], reference(torch.tensor([True, False, False, False, False]))[:4])
    assert torch.equal(u_tgt[4], (e - x)[4])
    plain = Shortcut(ShortcutSettings(clip=None), num_classes=CLASSES).prediction_and_target(model, x, e, r, t, labels)[1]
    assert (u_tgt[0] - plain[0]).abs().max() > 1e-6
    torch.testing.assert_close(u_tgt[1:], plain[1:], rtol=1e-13, atol=1e-13)
    every = Shortcut(ShortcutSettings(guidance_scale=w, guided_steps="all", clip=None), num_classes=CLASSES)
    _, u_all = every.prediction_and_target(model, x, e, r, t, labels)
    torch.testing.assert_close(u_all[:4], reference(torch.tensor([True, True, False, True, False]))[:4])


class Linear(nn.Module):
    """u(z, r, t) = a z: a field whose half steps are easy to follow by hand."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, z, r, t, conditions=None):
        return self.a * z


def test_clip_bounds_the_half_step_state_and_the_target():
    """Two double steps of 1 (halves 1/2) under u = a z, clip 4: row 0 only the state z_m is clipped
    (target (a z0 + a clip(z_m)) / 2 = -3.5, not -3.75); row 1 the target too."""
    objective = Shortcut(ShortcutSettings(clip=4.0))
    z0 = torch.tensor([[3.0], [3.9]], dtype=torch.float64)
    a = torch.tensor([-1.0, -1.5], dtype=torch.float64)
    t, r = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    targets = [objective.prediction_and_target(Linear(float(a[i])), z0[i:i + 1] * 0, z0[i:i + 1], r[:1], t[:1])[1]
               for i in range(2)]  # x = 0, e = z0: z_1 = z0
    assert float(targets[0]) == pytest.approx(-3.5) and float(targets[1]) == -4.0
    unclipped = Shortcut(ShortcutSettings(clip=None)).prediction_and_target(Linear(-1.0), z0[:1] * 0, z0[:1], r[:1], t[:1])
    assert float(unclipped[1]) == pytest.approx(-3.75)


class LabelSpy(nn.Module):
    """A real MLP that records the labels of its gradient (batch-sized) calls."""

    def __init__(self):
        super().__init__()
        self.inner = MLP(MLPConfig(data_dim=2, hidden_size=8, depth=2, num_classes=CLASSES))
        self.seen = []

    @property
    def accepted_conditions(self):
        return self.inner.accepted_conditions

    def forward(self, z, r, t, conditions=None):
        if torch.is_grad_enabled():
            self.seen.append(conditions)
        return self.inner(z, r, t, conditions)


def test_class_dropout_reaches_the_flow_rows_only():
    model = LabelSpy()
    objective = Shortcut(ShortcutSettings(class_dropout=0.5), num_classes=CLASSES)
    labels = torch.arange(400) % CLASSES
    out = objective.loss(model, torch.randn(400, 2), labels, generator=torch.Generator().manual_seed(0))
    seen = model.seen[-1]
    assert torch.equal(seen[:100], labels[:100])  # the 100 bootstrap rows keep their labels
    dropped = (seen[100:] == NULL).float().mean()
    assert 0.4 < float(dropped) < 0.6 and torch.equal(seen[100:][seen[100:] != NULL], labels[100:][seen[100:] != NULL])
    assert math.isfinite(float(out.loss.detach())) and float(out.metrics["fraction_r_neq_t"]) == 0.25


def test_k_uniform_average_velocity_steps_are_the_k_step_sampler():
    """Shortcut's k-step sampler is k steps of size 1/k; on the exact field every k lands on the
    exact flow map z_0 = a_0 + (b_0 / b_1)(e - a_1)."""
    field = gaussian_field()
    sampler = Shortcut().sampler
    assert sampler == AverageVelocitySampler() and OBJECTIVES["shortcut"] is Shortcut
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ones, zeros = torch.ones(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    (a_1, b_1), (a_0, b_0) = field.mean_std(ones), field.mean_std(zeros)
    for steps in (1, 2, 4, 128):
        torch.testing.assert_close(sampler(field, noise, num_steps=steps), a_0 + b_0 / b_1 * (noise - a_1))


def test_explicit_inputs_are_checked():
    model, objective = random_mlp(num_classes=CLASSES), Shortcut(num_classes=CLASSES)
    x = torch.zeros(2, 3, dtype=torch.float64)
    t = torch.tensor([0.5, 1.0], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"double step t - r in \[0.015625"):
        objective.prediction_and_target(model, x, x, t - 0.3, t, labels)
    with pytest.raises(ValueError, match="labels are required"):
        objective.prediction_and_target(model, x, x, t, t)
    with pytest.raises(ValueError, match="noise shape"):
        objective.prediction_and_target(model, x, x[:1], t, t, labels)
    with pytest.raises(ValueError, match="r <= t"):
        objective.prediction_and_target(model, x, x, t, t - 0.25, labels)
    with pytest.raises(ValueError, match="unconditional"):
        Shortcut().prediction_and_target(random_mlp(), x, x, t, t, labels)
    objective.prediction_and_target(model, x, x, t - torch.tensor([0.5, 1.0], dtype=torch.float64), t, labels)


@pytest.mark.parametrize("field, value, message", [
    ("smallest_step_exponent", 0, "smallest_step_exponent"), ("smallest_step_exponent", 21, "at most 20"),
    ("smallest_step_exponent", 2.0, "smallest_step_exponent"), ("smallest_step_is_velocity", "yes", "true or false"),
    ("bootstrap_fraction", 1.5, "bootstrap_fraction"), ("bootstrap_times", "random", "'grid', 'uniform'"),
    ("flow_matching_times", "logit", "flow_matching_times"), ("class_dropout", -0.1, "class_dropout"),
    ("guidance_scale", -1.0, "guidance_scale"), ("guided_steps", "finest", "'smallest', 'all'"),
    ("clip", 0.0, "clip"), ("p", -1.0, "p"), ("c", 0.0, "c"),
])
def test_settings_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        ShortcutSettings(**{field: value})
    with pytest.raises(ValueError, match="objective.shortcut"):
        Shortcut.parse_settings({field: value})
    with pytest.raises(ValueError, match="valid"):
        Shortcut.parse_settings({"omega": 2.0})



def test_toy_preset_trains_through_the_registry_and_samples_with_its_own_sampler(tmp_path):
    from meanflow.inference import load_model
    from meanflow.train import train

    result = train(tiny(preset("toy-checkerboard-shortcut")), tmp_path / "run", progress=False)
    assert result.step == 6 and math.isfinite(result.metrics["loss"])
    loaded = load_model(tmp_path / "run")
    assert loaded.record.method == "shortcut" and loaded.sampler == AverageVelocitySampler()
    for steps in (1, 4):
        samples = loaded.sampler(loaded.model, torch.randn(5, 2), num_steps=steps)
        assert samples.shape == (5, 2) and torch.isfinite(samples).all()


def test_the_image_presets_share_the_meanflow_presets_runs():
    for name, base in (("shortcut-digits", "digits"), ("shortcut-mnist", "mnist")):
        config, reference = preset(name), preset(base)
        assert config.objective.method == "shortcut" and config.objective.settings.guidance_scale == 1.5
        for section in ("data", "model", "optim", "training"):
            assert getattr(config, section) == getattr(reference, section)
    paper = preset("imagenet256-shortcut-xl2")
    o, opt, tr = paper.objective.settings, paper.optim, paper.training
    assert (o.guidance_scale, o.class_dropout, o.bootstrap_fraction, o.smallest_step_exponent) == (1.5, 0.1, 0.25, 7)
    assert (opt.lr, opt.betas, opt.weight_decay, tr.batch_size, tr.steps) == (1e-4, (0.9, 0.999), 0.1, 256, 810_000)
    assert paper.model.options["hidden_size"] == 1152 and "10.6" in paper.note
    celeba = preset("celebahq256-shortcut-b2")
    assert celeba.model.options["num_classes"] is None and not celeba.data.class_conditional
    assert (celeba.training.batch_size, celeba.training.steps) == (64, 410_000) and "20.5" in celeba.note
