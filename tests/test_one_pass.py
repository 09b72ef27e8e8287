"""MeanFlow's one-pass derivative and guidance without repeated forwards (the derivative engine).

With an explicit tangent, the gradient forward over the whole batch also returns the no-grad
tangent of the r != t rows (one call of the wrapped module), and the r = t rows' conditional
predictions of the guided target (Eq. 10) are that forward's own outputs. The targets, losses and
gradients must be the ones of the separate passes (torch.func.jvp on the r != t rows, a guidance
forward over every guided row), in float64 to round-off; what each path pays is counted.
"""

from __future__ import annotations

import pytest
import torch
from fields import random_mlp, times
from torch import nn

from meanflow.conventions import interpolate
from meanflow.models.dit import DiT, DiTConfig
from meanflow.models.mlp import MLP, MLPConfig
from meanflow.models.unet import UNet, UNetConfig
from meanflow.objectives import MeanFlow, TrainingGuidance
from meanflow.objectives.guidance import GuidedVelocity, guided_target_velocity

F64 = torch.float64
CLASSES = 3


class Census(nn.Module):
    """The network, recording per call (rows, tangent rows or None, gradient recorded)."""

    def __init__(self, network: nn.Module, explicit: bool = True):
        super().__init__()
        self.network = network
        self.explicit_tangent = explicit
        self.accepted_conditions = network.accepted_conditions
        self.calls: list[tuple[int, int | None, bool]] = []

    def forward(self, z, r, t, conditions=None, tangent=None):
        if torch._C._functorch.is_functorch_wrapped_tensor(z):
            self.calls.append((z.shape[0], "torch.func", False))
            return self.network(z, r, t, conditions)
        self.calls.append((z.shape[0], None if tangent is None else tangent.dz.shape[0], torch.is_grad_enabled()))
        if tangent is None:
            return self.network(z, r, t, conditions)
        return self.network(z, r, t, conditions, tangent=tangent)


def dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                          num_classes=CLASSES, frequency_size=16)).double()
    with torch.no_grad():  # open the adaLN-Zero gates
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def mlp() -> MLP:
    torch.manual_seed(1)
    model = MLP(MLPConfig(data_dim=3, hidden_size=16, depth=3, num_classes=CLASSES)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def unet() -> UNet:
    torch.manual_seed(2)
    model = UNet(UNetConfig(input_size=4, in_channels=2, base_channels=8, channel_multipliers=(1, 1),
                            num_res_blocks=1, attention_resolutions=(2,), num_classes=CLASSES,
                            frequency_size=8)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def batch(model: nn.Module, size: int = 12, seed: int = 3):
    shape = (3,) if isinstance(model, MLP) else (2, 4, 4)
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(2, size, *shape, generator=g, dtype=F64)
    r, t = times(size, seed=seed, equal_every=3)
    labels = torch.randint(0, CLASSES + 1, (size,), generator=g)  # CLASSES: dropped (null)
    labels[:2] = torch.tensor([CLASSES, 0])
    return x, e, r, t, labels


GUIDANCE = {
    "unguided": None,
    "omega=2": TrainingGuidance(omega=2.0),
    "omega=1 kappa=0.5": TrainingGuidance(omega=1.0, kappa=0.5),
    "omega=1.5 kappa=0.3 [0.2, 0.8]": TrainingGuidance(omega=1.5, kappa=0.3, t_min=0.2, t_max=0.8),
}


@pytest.mark.parametrize("guidance", sorted(GUIDANCE))
def test_deferred_conditional_predictions_give_the_same_bits(guidance):
    model = mlp()
    x, e, r, t, labels = batch(model)
    z, v = interpolate(x, e, t), e - x
    expected = guided_target_velocity(model, GUIDANCE[guidance], CLASSES, z, t, v, labels)
    deferred = r == t
    split = GuidedVelocity(model, GUIDANCE[guidance], CLASSES, z, t, v, labels, deferred)
    with torch.no_grad():
        conditional = model(z, t, t, labels)  # what the gradient forward gives on the r = t rows
    assert torch.equal(split.complete(conditional), expected)
    kappa = 0.0 if GUIDANCE[guidance] is None else GUIDANCE[guidance].kappa
    assert (split.pending.numel() > 0) == (kappa > 0)
    # The pending rows are deferred ones; every other row is final before the gradient forward.
    assert bool(deferred[split.pending].all())
    final = torch.ones(len(r), dtype=torch.bool)
    final[split.pending] = False
    assert torch.equal(split.v_hat[final], expected[final])


@pytest.mark.parametrize("network", [dit, mlp, unet], ids=["dit", "mlp", "unet"])
@pytest.mark.parametrize("guidance", sorted(GUIDANCE))
def test_one_pass_target_loss_and_gradient_equal_the_separate_passes(network, guidance):
    model = network()
    x, e, r, t, labels = batch(model)
    objective = MeanFlow(num_classes=CLASSES, guidance=GUIDANCE[guidance], derivative="two_pass")
    one_pass, separate = Census(model), Census(model, explicit=False)  # the second: torch.func.jvp

    def run(wrapper):
        model.zero_grad(set_to_none=True)
        out = objective.loss_at(wrapper, x, e, r, t, labels)
        out.loss.backward()
        u, u_tgt = objective.prediction_and_target(wrapper, x, e, r, t, labels)
        return u.detach(), u_tgt, out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    u_a, target_a, loss_a, grads_a = run(one_pass)
    u_b, target_b, loss_b, grads_b = run(separate)
    torch.testing.assert_close(u_a, u_b, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(target_a, target_b, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-13)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-10, atol=1e-12)
    # What the one pass paid: at most one guidance forward, then ONE call with the r != t tangent.
    moving = int((r < t).sum())
    calls = one_pass.calls[: len(one_pass.calls) // 2]  # the loss_at run
    assert calls[-1] == (len(r), moving, True)
    assert all(tangent is None and not grad for _, tangent, grad in calls[:-1]) and len(calls) <= 2
    assert all(tangent != moving for _, tangent, _ in separate.calls)


def test_guided_rows_pay_the_unconditional_forward_and_only_moving_rows_the_conditional_one():
    model = mlp()
    x, e, r, t, labels = batch(model, size=24)
    census = Census(model)
    MeanFlow(num_classes=CLASSES, guidance=TrainingGuidance(omega=1.0, kappa=0.5)).loss_at(census, x, e, r, t, labels)
    guided = int((labels != CLASSES).sum())
    guided_moving = int(((labels != CLASSES) & (r < t)).sum())
    assert 0 < guided_moving < guided
    # Before: one forward of 2 x guided rows (unconditional + conditional), then two more calls.
    assert census.calls == [(guided + guided_moving, None, False), (24, int((r < t).sum()), True)]


def test_no_moving_rows_and_no_resting_rows():
    model = dit()
    x, e, r, t, labels = batch(model, size=4)
    objective = MeanFlow(num_classes=CLASSES, derivative="two_pass")
    for r_case in (t.clone(), t * 0.5):  # all r = t (flow matching), all r < t
        census = Census(model)
        reference = objective.prediction_and_target(Census(model, explicit=False), x, e, r_case, t, labels)
        actual = objective.prediction_and_target(census, x, e, r_case, t, labels)
        torch.testing.assert_close(actual[1], reference[1], rtol=1e-11, atol=1e-12)
        assert census.calls[-1][:2] == (4, 0 if torch.equal(r_case, t) else 4)  # a tangent of no rows: one graph


def test_bf16_autocast_keeps_the_tangent_apart_in_fp32():
    # The one pass would differentiate at the bf16 primal; under autocast the tangent runs on its
    # own in fp32 (spec section 8), so the target matches the fp32 one to rounding of u alone.
    model = random_mlp().float()
    census = Census(model)
    x, e = torch.randn(2, 16, 3)
    r, t = (part.float() for part in times(16, equal_every=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        MeanFlow().prediction_and_target(census, x, e, r, t)
    assert census.calls == [(8, 8, False), (16, None, True)]


def test_imf_one_pass_gives_both_heads_and_the_separate_passes_numbers():
    from test_imf import batch_inputs, two_head_mlp

    from meanflow.objectives import ImprovedMeanFlow

    model = two_head_mlp()
    inputs = batch_inputs()
    objective = ImprovedMeanFlow(num_classes=3)

    def run(wrapper):
        model.zero_grad(set_to_none=True)
        terms = objective.prediction_and_target(wrapper, *inputs)
        loss = objective.loss_output(terms, inputs[1] - inputs[0], inputs[2], inputs[3]).loss
        loss.backward()
        return terms, loss.detach(), [p.grad.clone() for p in model.parameters()]

    one_pass, separate = Census(model), Census(model, explicit=False)
    one_pass.auxiliary_velocity = separate.auxiliary_velocity = True
    (terms_a, loss_a, grads_a), (terms_b, loss_b, grads_b) = run(one_pass), run(separate)
    for name in ("u", "V", "v", "target"):
        torch.testing.assert_close(getattr(terms_a, name).detach(), getattr(terms_b, name).detach(),
                                   rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-13)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-10, atol=1e-12)
    r, t = inputs[2], inputs[3]
    moving = int((r < t).sum())
    assert one_pass.calls[-1] == (len(r), moving, True) and len(one_pass.calls) == 2


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_alpha_flow_reuses_the_gradient_forward_for_its_guided_flow_rows(alpha):
    # Its target, rebuilt from the one-step guided velocity, equals the objective's, which takes
    # the r = t rows' conditional predictions from its gradient forward instead.
    from meanflow.objectives import AlphaFlow, AlphaFlowSettings

    model = mlp()
    x, e, r, t, labels = batch(model, size=16)
    objective = AlphaFlow(AlphaFlowSettings(omega=1.0, kappa=0.5), CLASSES)
    census = Census(model)
    _, target = objective.prediction_and_target(census, x, e, r, t, labels, alpha=alpha)
    z = interpolate(x, e, t)
    v_hat = guided_target_velocity(model, objective.meanflow.guidance, CLASSES, z, t, e - x, labels)
    moving = (r < t).nonzero().squeeze(1)
    expected = v_hat.index_copy(0, moving, objective.consistency_target(model, z, r, t, labels, v_hat, moving, alpha))
    torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-13)
    guided = int((labels != CLASSES).sum())
    guided_moving = int(((labels != CLASSES) & (r < t)).sum())
    assert census.calls[0] == (guided + guided_moving, None, False)  # not 2 x guided rows
