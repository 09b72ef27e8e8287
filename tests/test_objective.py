"""The MeanFlow target and loss, pinned by closed forms and finite differences."""

import math

import pytest
import torch
from fields import gaussian_field, random_mlp, times

from meanflow.conventions import interpolate
from meanflow.jvp import Derivative
from meanflow.objectives import (
    AdaptiveWeighting,
    FlowMatching,
    MaskMode,
    MeanFlow,
    TimeSampler,
    TrainingGuidance,
    guided_velocity,
)

EXACT = [Derivative.JVP, Derivative.TWO_PASS]








@pytest.mark.parametrize("derivative", EXACT)
def test_target_of_exact_field_is_exact(derivative):
    """With the exact u and (x, e) at their posterior means given z_t, u_tgt == u (MeanFlow identity)."""
    field = gaussian_field()
    batch = 64
    r, t = times(batch, equal_every=4)
    g = torch.Generator().manual_seed(2)
    a, b = field.mean_std(t)
    z = a + b * torch.randn(batch, 3, generator=g, dtype=torch.float64)
    x_mean, e_mean = field.posterior_means(z, t)
    assert torch.allclose(interpolate(x_mean, e_mean, t), z, atol=1e-13)
    u, u_tgt = MeanFlow(derivative=derivative).prediction_and_target(field, x_mean, e_mean, r, t)
    torch.testing.assert_close(u_tgt, field(z, r, t), atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(u, field(z, r, t), atol=1e-12, rtol=1e-12)


def test_target_of_exact_field_finite_difference_is_close():
    field = gaussian_field()
    r, t = times(32)
    z = torch.randn(32, 3, dtype=torch.float64)
    x_mean, e_mean = field.posterior_means(z, t)
    objective = MeanFlow(derivative=Derivative.FINITE_DIFFERENCE, finite_difference_step=1e-5)
    _, u_tgt = objective.prediction_and_target(field, x_mean, e_mean, r, t)
    torch.testing.assert_close(u_tgt, field(z, r, t), atol=1e-7, rtol=1e-7)


def central_difference_target(model, x, e, r, t, tangent_r=0.0, tangent_t=1.0, h=1e-6):
    z = interpolate(x, e, t)
    v = e - x
    with torch.no_grad():
        plus = model(z + h * v, r + h * tangent_r, t + h * tangent_t)
        minus = model(z - h * v, r - h * tangent_r, t - h * tangent_t)
    dudt = (plus - minus) / (2 * h)
    return v - (t - r)[:, None] * dudt


@pytest.mark.parametrize("derivative", list(Derivative))
def test_every_backend_agrees_with_float64_central_differences(derivative):
    model = random_mlp()
    g = torch.Generator().manual_seed(3)
    x, e = torch.randn(24, 3, generator=g, dtype=torch.float64), torch.randn(24, 3, generator=g, dtype=torch.float64)
    r, t = times(24, equal_every=3)
    objective = MeanFlow(derivative=derivative, finite_difference_step=1e-6)
    u, u_tgt = objective.prediction_and_target(model, x, e, r, t)
    reference = central_difference_target(model, x, e, r, t)
    torch.testing.assert_close(u_tgt, reference, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(u, model(interpolate(x, e, t), r, t), atol=1e-14, rtol=0)


@pytest.mark.parametrize("wrong", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
def test_a_wrong_tangent_gives_a_different_target(wrong):
    """Tangents (v,0,0), (v,1,0), (v,1,1) are the paper's failed ablations; ours is (v,0,1)."""
    model = random_mlp()
    g = torch.Generator().manual_seed(4)
    x, e = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    r, t = times(16)
    _, u_tgt = MeanFlow().prediction_and_target(model, x, e, r, t)
    wrong_target = central_difference_target(model, x, e, r, t, tangent_r=wrong[0], tangent_t=wrong[1])
    assert (u_tgt - wrong_target).abs().max() > 1e-3
    torch.testing.assert_close(u_tgt, central_difference_target(model, x, e, r, t), atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("derivative", list(Derivative))
def test_r_equals_t_everywhere_is_exactly_flow_matching(derivative):
    model = random_mlp()
    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64)
    weighting = AdaptiveWeighting(p=0.75, c=1e-3)
    mean_flow = MeanFlow(weighting=weighting, derivative=derivative).loss_at(model, x, e, t, t)
    flow_matching = FlowMatching(weighting=weighting).loss_at(model, x, e, t, t)
    assert torch.equal(mean_flow.loss, flow_matching.loss)
    assert torch.equal(mean_flow.per_sample, flow_matching.per_sample)
    assert float(mean_flow.metrics["fraction_r_neq_t"]) == 0.0


def test_loss_gradient_flows_only_through_the_prediction():
    """d loss / d theta must equal the gradient of sum((u - c)^2) with the target held constant."""
    model = random_mlp()
    g = torch.Generator().manual_seed(6)
    x, e = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    r, t = times(8)
    objective = MeanFlow(weighting=AdaptiveWeighting(p=0.0))
    for derivative in EXACT:
        objective.derivative = derivative
        model.zero_grad()
        objective.loss_at(model, x, e, r, t).loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        u, u_tgt = objective.prediction_and_target(model, x, e, r, t)
        ((u - u_tgt.detach()) ** 2).sum(dim=1).mean().backward()
        for got, want in zip(grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_adaptive_weights_match_hand_computed_values():
    errors = torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64, requires_grad=True)
    weighted = AdaptiveWeighting(p=1.0, c=0.01)(errors)
    torch.testing.assert_close(weighted, torch.tensor([1 / 1.01, 3 / 3.01, 0.0], dtype=torch.float64))
    weighted.sum().backward()  # the weight is a constant: d/dL = 1 / (L + c)^p
    torch.testing.assert_close(errors.grad, torch.tensor([1 / 1.01, 1 / 3.01, 1 / 0.01], dtype=torch.float64))
    weighted = AdaptiveWeighting(p=0.75, c=1e-3)(errors.detach())
    expected = [1 / 1.001**0.75, 3 / 3.001**0.75, 0.0]
    torch.testing.assert_close(weighted, torch.tensor(expected, dtype=torch.float64))
    plain = AdaptiveWeighting(p=0.0)(errors.detach())
    torch.testing.assert_close(plain, errors.detach())


def test_per_sample_error_is_the_sum_over_dimensions_squared_once():
    model = lambda z, r, t, y=None: torch.zeros_like(z)  # noqa: E731  u = 0, so delta = -u_tgt = -v
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    e = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[3.0, 0.0], [0.0, 4.0]]]], dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    out = MeanFlow(weighting=AdaptiveWeighting(p=1.0, c=0.01)).loss_at(model, x, e, t, t)
    errors = torch.tensor([5.0, 25.0], dtype=torch.float64)
    torch.testing.assert_close(out.per_sample, errors / (errors + 0.01))
    torch.testing.assert_close(out.loss, (errors / (errors + 0.01)).mean())
    torch.testing.assert_close(out.metrics["unweighted_error"], errors.mean())
    torch.testing.assert_close(out.metrics["velocity_error"], errors.mean())


def test_defaults_are_the_papers():
    objective = MeanFlow()
    assert objective.time_sampler.mu == -0.4 and objective.time_sampler.sigma == 1.0
    assert objective.time_sampler.fraction_r_neq_t == 0.25  # ImageNet: 75% of samples have r = t
    assert (objective.weighting.p, objective.weighting.c) == (1.0, 0.01)
    assert objective.derivative is Derivative.TWO_PASS
    guidance = TrainingGuidance()
    assert guidance.class_dropout == 0.1 and guidance.t_min == 0.0 and guidance.t_max == 1.0


def test_kappa_form_equals_plain_form_at_the_effective_scale():
    """If the network's conditional prediction is the guided field itself (the fixed point it is
    trained towards), Eq. 10 with (omega, kappa) equals Eq. 9 with omega' = omega / (1 - kappa)."""
    g = torch.Generator().manual_seed(7)
    v, v_unc = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    for omega, kappa in [(1.0, 0.5), (0.2, 0.92), (0.5, 0.3)]:
        effective = TrainingGuidance(omega=omega, kappa=kappa).effective_scale
        assert effective == pytest.approx(omega / (1 - kappa))
        plain = guided_velocity(v, v_unc, None, effective, 0.0)
        torch.testing.assert_close(plain, v_unc + effective * (v - v_unc))
        torch.testing.assert_close(guided_velocity(v, v_unc, plain, omega, kappa), plain)


def test_guided_target_velocity_applies_the_formula_where_it_should():
    num_classes = 4
    model = random_mlp(num_classes=num_classes)
    guidance = TrainingGuidance(omega=0.2, kappa=0.92, t_min=0.0, t_max=0.75)
    objective = MeanFlow(num_classes=num_classes, guidance=guidance)
    g = torch.Generator().manual_seed(8)
    z, v = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.7, 0.9, 0.3, 0.6, 0.76, 0.2], dtype=torch.float64)
    labels = torch.tensor([0, 1, 4, 2, 3, 4, 1, 0])  # 4 is the null class: dropped
    v_hat = objective.guided_target_velocity(model, z, t, v, labels)
    with torch.no_grad():
        v_unc = model(z, t, t, torch.full_like(labels, num_classes))
        v_cond = model(z, t, t, labels)
    expected = 0.2 * v + (1 - 0.2 - 0.92) * v_unc + 0.92 * v_cond
    guided = torch.tensor([True, True, False, False, True, False, False, True])  # kept label, t <= 0.75
    torch.testing.assert_close(v_hat[guided], expected[guided])
    assert torch.equal(v_hat[~guided], v[~guided])  # dropped labels and t outside the interval: plain v


def test_guidance_changes_the_tangent_too():
    """The JVP tangent is v_hat, not v: the target with guidance differs beyond the v_hat shift."""
    num_classes = 3
    model = random_mlp(num_classes=num_classes)
    g = torch.Generator().manual_seed(9)
    x, e = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    r, t = times(6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    objective = MeanFlow(num_classes=num_classes, guidance=TrainingGuidance(omega=2.0))
    _, u_tgt = objective.prediction_and_target(model, x, e, r, t, labels)
    z = interpolate(x, e, t)
    v_hat = objective.guided_target_velocity(model, z, t, e - x, labels)
    h = 1e-6
    with torch.no_grad():
        dudt = (model(z + h * v_hat, r, t + h, labels) - model(z - h * v_hat, r, t - h, labels)) / (2 * h)
    torch.testing.assert_close(u_tgt, v_hat - (t - r)[:, None] * dudt, atol=1e-7, rtol=1e-7)


def test_class_dropout_rate_and_null_id():
    objective = MeanFlow(num_classes=10, guidance=TrainingGuidance(class_dropout=0.1))
    seen = []

    def spy(z, r, t, y=None):
        seen.append(y.clone())
        return torch.zeros_like(z)

    objective.loss(spy, torch.zeros(20000, 2), torch.randint(0, 10, (20000,)), generator=torch.Generator().manual_seed(0))
    dropped = (seen[-1] == 10).float().mean().item()
    assert abs(dropped - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20000)


def test_time_sampler_laws():
    g = torch.Generator().manual_seed(10)
    n = 200_000
    r, t = TimeSampler(fraction_r_neq_t=1.0, mu=-0.4, sigma=1.0).sample(n, generator=g, dtype=torch.float64)
    assert bool((r <= t).all())
    pooled = torch.logit(torch.cat([r, t]))  # the two draws, sorted, pool back to N(mu, sigma)
    assert pooled.mean().item() == pytest.approx(-0.4, abs=0.01)
    assert pooled.std().item() == pytest.approx(1.0, abs=0.01)
    r, t = TimeSampler(fraction_r_neq_t=0.25).sample(n, generator=g)
    assert (r != t).float().mean().item() == pytest.approx(0.25, abs=0.005)
    r, t = TimeSampler(fraction_r_neq_t=0.25, mask_mode=MaskMode.PREFIX).sample(8, generator=g)
    assert (r == t).tolist()[:6] == [True] * 6 and bool((r[6:] < t[6:]).all())
    r, t = TimeSampler(distribution="uniform", fraction_r_neq_t=1.0).sample(n, generator=g)
    assert t.mean().item() == pytest.approx(2 / 3, abs=0.005)  # E[max of two uniforms]
    r, t = TimeSampler(mu=-0.6, sigma=1.6, r_mu=-4.0, r_sigma=1.6, fraction_r_neq_t=1.0).sample(n, generator=g)
    assert bool((r <= t).all()) and torch.logit(t).mean().item() == pytest.approx(-0.6, abs=0.02)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TimeSampler(fraction_r_neq_t=1.5), "fraction_r_neq_t"),
        (lambda: TimeSampler(sigma=0.0), "sigma"),
        (lambda: TimeSampler(distribution="gaussian"), "'logit_normal', 'uniform'"),
        (lambda: TrainingGuidance(t_min=0.8, t_max=0.3), "t_min <= t_max"),
        (lambda: TrainingGuidance(kappa=1.0), "kappa"),
        (lambda: AdaptiveWeighting(c=0.0), "constant c"),
        (lambda: MeanFlow(derivative="backprop"), "'jvp', 'two_pass', 'finite_difference'"),
        (lambda: MeanFlow(guidance=TrainingGuidance()), "num_classes"),
    ],
)
def test_invalid_settings_are_rejected_with_the_valid_values(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_invalid_inputs_are_rejected():
    model = random_mlp(num_classes=3)
    objective = MeanFlow(num_classes=3)
    x = torch.zeros(4, 3, dtype=torch.float64)
    r, t = times(4)
    with pytest.raises(ValueError, match="r <= t"):
        objective.prediction_and_target(model, x, x, t, r, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels are required"):
        objective.loss(model, x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        objective.loss(model, x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        MeanFlow().loss(random_mlp(), x, torch.zeros(4, dtype=torch.long))


def test_single_pass_jvp_refuses_data_parallel_wrappers():
    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed to test the guard
            torch.nn.Module.__init__(self)
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    model = FakeDDP(random_mlp())
    x = torch.randn(4, 3, dtype=torch.float64)
    r, t = times(4)
    with pytest.raises(ValueError, match="two_pass"):
        MeanFlow(derivative="jvp").prediction_and_target(model, x, x + 1, r, t)
    u, _ = MeanFlow(derivative="two_pass").prediction_and_target(model, x, x + 1, r, t)
    assert u.shape == x.shape


def test_bf16_autocast_keeps_target_in_fp32():
    model = random_mlp().float()
    x, e = torch.randn(2, 16, 3)
    r, t = times(16)
    r, t = r.float(), t.float()
    reference = MeanFlow().prediction_and_target(model, x, e, r, t)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, u_tgt = MeanFlow().prediction_and_target(model, x, e, r, t)
    assert u_tgt.dtype == torch.float32
    # The target's JVP ran without autocast; only v_hat = v here, so it matches fp32 to rounding.
    torch.testing.assert_close(u_tgt, reference, atol=1e-5, rtol=1e-5)


def test_two_pass_uses_the_dit_explicit_tangent_and_agrees_with_torch_func():
    from meanflow.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                          num_classes=3, frequency_size=16)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    tangent_rows = []  # per call of the network: the rows its tangent covers (None: a plain forward)
    original = model.forward_with_tangent
    model.forward_with_tangent = lambda *a: tangent_rows.append(None if a[4] is None else len(a[4])) or original(*a)
    g = torch.Generator().manual_seed(11)
    x, e = torch.randn(2, 6, 2, 4, 4, generator=g, dtype=torch.float64)
    r, t = times(6, equal_every=2)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    guidance = TrainingGuidance(omega=1.0, kappa=0.5)
    two_pass = MeanFlow(num_classes=3, guidance=guidance, derivative="two_pass")
    single = MeanFlow(num_classes=3, guidance=guidance, derivative="jvp")
    _, fast = two_pass.prediction_and_target(model, x, e, r, t, labels)
    # One pass: the guidance forward, then ONE call whose tangent covers the 3 rows with r != t.
    assert tangent_rows == [None, 3]
    _, reference = single.prediction_and_target(model, x, e, r, t, labels)
    torch.testing.assert_close(fast, reference, atol=1e-12, rtol=1e-10)


def test_two_pass_draws_its_own_dropout_masks_and_jvp_shares_one():
    """The documented choice (meanflow.jvp): under dropout, 'two_pass' with the tangent apart (a
    network without an explicit tangent) runs the derivative pass first with masks of its own,
    then the gradient forward with fresh masks; 'jvp', and 'two_pass' in one pass (the U-Net's
    explicit tangent), differentiate the very forward the gradient flows through (one mask).
    Without dropout all are the same."""
    from test_tangent import TorchFuncOnly

    from meanflow.conditions import Tangent
    from meanflow.jvp import jvp_along_flow, tangent_along_flow
    from meanflow.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(input_size=8, in_channels=1, base_channels=8, channel_multipliers=[1, 2],
                            num_res_blocks=1, attention_resolutions=[], dropout=0.5, num_classes=None,
                            num_heads=1, frequency_size=16)).double()
    torch.nn.init.normal_(model.output_conv.weight, std=0.3)
    x, noise = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    r, t = torch.full((4,), 0.2, dtype=torch.float64), torch.full((4,), 0.7, dtype=torch.float64)
    z, v = interpolate(x, noise, t), noise - x
    gap = (t - r)[:, None, None, None]
    apart = TorchFuncOnly(model)

    torch.manual_seed(5)
    u, target = MeanFlow(derivative="two_pass").prediction_and_target(apart, x, noise, r, t)
    torch.manual_seed(5)
    dudt = tangent_along_flow(apart, z, r, t, None, v)  # the derivative pass first, its own masks
    assert torch.equal(u, model(z, r, t)) and torch.equal(target, v - gap * dudt)

    torch.manual_seed(5)
    u_one, target_one = MeanFlow(derivative="two_pass").prediction_and_target(model, x, noise, r, t)
    torch.manual_seed(5)
    out = model(z, r, t, tangent=Tangent(v, torch.zeros_like(r), torch.ones_like(t)))  # one forward, one mask
    assert torch.equal(u_one, out.u) and torch.equal(target_one, v - gap * out.du)

    torch.manual_seed(5)
    u_jvp, target_jvp = MeanFlow(derivative="jvp").prediction_and_target(model, x, noise, r, t)
    torch.manual_seed(5)
    primal, dudt_jvp = jvp_along_flow(model, z, r, t, None, v)  # one forward: u and du/dt share a mask
    assert torch.equal(u_jvp, primal) and torch.equal(target_jvp, v - gap * dudt_jvp)
    # The same seed gives the derivative passes the same masks (equal targets), but the apart
    # prediction comes from a second forward with other masks, the one-pass and jvp ones from the first.
    torch.testing.assert_close(target, target_jvp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(target_one, target_jvp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u_one, u_jvp, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(u, u_jvp)

    model.eval()  # no dropout: the two backends agree
    two_pass = MeanFlow(derivative="two_pass").prediction_and_target(model, x, noise, r, t)[1]
    one_pass = MeanFlow(derivative="jvp").prediction_and_target(model, x, noise, r, t)[1]
    torch.testing.assert_close(two_pass, one_pass, rtol=1e-10, atol=1e-12)
