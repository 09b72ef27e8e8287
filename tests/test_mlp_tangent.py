"""Tests of the MLP's explicit tangent (MLP.forward_with_tangent) in every option combination.

Everything runs in float64 with every weight random (the zero-initialised output layers too), so
a missed term shows as an O(1) error against torch.func.jvp and float64 central differences. The
MeanFlow and iMF targets computed through the explicit tangent are compared with the same
objectives forced onto torch.func.jvp (:class:`test_tangent.TorchFuncOnly`).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from meanflow import MeanFlow
from meanflow.conditions import Conditions, ModelOutput, Tangent, average_velocity
from meanflow.conventions import interpolate
from meanflow.models.mlp import MLP, MLPConfig
from meanflow.objectives import TrainingGuidance, build_objective
from test_tangent import TorchFuncOnly

F64 = torch.float64
TOLERANCE = dict(rtol=1e-10, atol=1e-10)
OPTIONS = [
    dict(num_classes=classes, guidance_conditions=guidance, auxiliary_velocity=auxiliary, condition_blocks=blocks)
    for classes, guidance, auxiliary, blocks in itertools.product([None, 3], [False, True], [False, True],
                                                                   [True, False])
]


def option_id(options: dict) -> str:
    return "-".join([f"classes{options['num_classes']}"] + [name for name in ("guidance_conditions",
                    "auxiliary_velocity", "condition_blocks") if options[name]])


def random_mlp(seed: int = 0, **options) -> MLP:
    """A float64 MLP (width 16, depth 3) whose every parameter is random: the zero-initialised
    output layers would otherwise make u and its tangent exactly zero."""
    torch.manual_seed(seed)
    model = MLP(MLPConfig(data_dim=3, hidden_size=16, depth=3, frequency_size=8, **options)).double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=F64))
    return model


def mlp_inputs(options: dict, batch: int = 5, seed: int = 1):
    """(z, r, t, conditions) in float64, 0 <= r < t <= 1; labels include the null class."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 3, generator=generator, dtype=F64)
    t = 0.2 + 0.8 * torch.rand(batch, generator=generator, dtype=F64)
    r = t * torch.rand(batch, generator=generator, dtype=F64)
    classes, guidance = options["num_classes"], options["guidance_conditions"]
    conditions = Conditions(
        labels=torch.arange(batch) % (classes + 1) if classes else None,
        guidance_scale=1 + 4 * torch.rand(batch, generator=generator, dtype=F64) if guidance else None,
        guidance_interval=torch.tensor([[0.1, 0.7]], dtype=F64).expand(batch, 2) if guidance else None,
    )
    return z, r, t, conditions


def random_tangent(z, r, t, seed: int = 2) -> Tangent:
    generator = torch.Generator().manual_seed(seed)
    return Tangent(*(torch.randn(tensor.shape, generator=generator, dtype=F64) for tensor in (z, r, t)))


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_explicit_tangent_equals_func_jvp_and_central_differences(options):
    model = random_mlp(**options)
    assert model.explicit_tangent
    z, r, t, conditions = mlp_inputs(options)

    def u(z_, r_, t_):
        return average_velocity(model(z_, r_, t_, conditions))

    flow = Tangent(random_tangent(z, r, t).dz, torch.zeros_like(r), torch.ones_like(t))  # (v, 0, 1): Eq. 5
    for tangent in (flow, random_tangent(z, r, t, seed=3)):
        out = model(z, r, t, conditions, tangent=tangent)
        assert isinstance(out, ModelOutput) and not out.du.requires_grad
        _, du_ref = torch.func.jvp(u, (z, r, t), (tangent.dz, tangent.dr, tangent.dt))
        assert du_ref.abs().mean() > 1e-2
        torch.testing.assert_close(out.du, du_ref, **TOLERANCE)
        step = 1e-6
        with torch.no_grad():
            shifted = [(z + s * tangent.dz, r + s * tangent.dr, t + s * tangent.dt) for s in (step, -step)]
            difference = (u(*shifted[0]) - u(*shifted[1])) / (2 * step)
            forward = u(z, r, t)
        torch.testing.assert_close(out.du, difference, rtol=1e-6, atol=1e-7)
        # One pass: the forward's own ops on the same rows, so the same bits, v head included.
        plain = model(z, r, t, conditions)
        assert torch.equal(out.u, forward) and out.u.requires_grad
        assert (out.v is None) == (not options.get("auxiliary_velocity"))
        assert out.v is None or torch.equal(out.v, plain.v)


def test_t_moves_the_mlp_at_a_fixed_gap_and_the_conditions_are_constant():
    options = dict(num_classes=3, guidance_conditions=True, auxiliary_velocity=True, condition_blocks=True)
    model = random_mlp(seed=4, **options)
    z, r, t, conditions = mlp_inputs(options, seed=5)
    ones = torch.ones_like(t)
    # dz = 0, dr = dt = 1: t moves (embed(t) changes) but t - r does not.
    t_only = model(z, r, t, conditions, tangent=Tangent(torch.zeros_like(z), ones, ones)).du
    _, reference = torch.func.jvp(lambda r_, t_: model(z, r_, t_, conditions).u, (r, t), (ones, ones))
    assert reference.abs().mean() > 1e-3  # unlike the imfDiT, the MLP embeds t itself
    torch.testing.assert_close(t_only, reference, **TOLERANCE)
    zero = model(z, r, t, conditions, tangent=Tangent(torch.zeros_like(z), torch.zeros_like(r), torch.zeros_like(t)))
    assert torch.equal(zero.du, torch.zeros_like(z))
    with pytest.raises(ValueError, match="dz"):
        model(z, r, t, conditions, tangent=Tangent(z[:, :2], r, t))
    with pytest.raises(ValueError, match="guidance_conditions"):
        model(z, r, t, conditions.labels, tangent=Tangent(z, r, t))


def test_a_subclass_that_overrides_forward_falls_back_to_torch_func():
    """A subclass's forward may compute another u (or not take tangent=): the hand-written tangent
    of MLP.forward would be wrong for it, so it declares none and the objectives use torch.func.jvp."""
    from meanflow.jvp import jvp_along_flow, tangent_along_flow

    class Doubled(MLP):
        def forward(self, z, r, t, conditions=None):
            return 2 * super().forward(z, r, t, conditions)

    options = dict(num_classes=None, guidance_conditions=False, auxiliary_velocity=False, condition_blocks=True)
    model = random_mlp(seed=8, **options)
    doubled = Doubled(model.config).double()
    doubled.load_state_dict(model.state_dict())
    assert model.explicit_tangent and not doubled.explicit_tangent
    z, r, t, _ = mlp_inputs(options)
    v = random_tangent(z, r, t).dz
    dudt = tangent_along_flow(doubled, z, r, t, None, v)  # Doubled.forward takes no tangent=: a call would raise
    torch.testing.assert_close(dudt, jvp_along_flow(doubled, z, r, t, None, v)[1], **TOLERANCE)
    torch.testing.assert_close(dudt, 2 * tangent_along_flow(model, z, r, t, None, v), **TOLERANCE)


def _meanflow_batch(batch: int = 6):
    generator = torch.Generator().manual_seed(9)
    x, noise = torch.randn(2, batch, 3, generator=generator, dtype=F64)
    t = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=F64)
    r = torch.tensor([0.1, 0.8, 0.3, 0.0, 0.5, 0.2], dtype=F64)  # r = t on rows 1 and 4
    return x, noise, r, t


def _count_tangent_calls(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append("tangent" in kwargs), with_kwargs=True)
    return calls


@pytest.mark.parametrize("classes,auxiliary", [(None, False), (3, True)])
def test_meanflow_target_with_the_explicit_tangent_equals_torch_func(classes, auxiliary):
    model = random_mlp(seed=6, num_classes=classes, auxiliary_velocity=auxiliary)
    x, noise, r, t = _meanflow_batch()
    labels = None if classes is None else torch.tensor([0, 1, 2, 3, 0, 1])
    guidance = None if classes is None else TrainingGuidance(omega=2.0, kappa=0.5)
    objective = MeanFlow(num_classes=classes, guidance=guidance, derivative="two_pass")
    calls = _count_tangent_calls(model)
    u, target = objective.prediction_and_target(model, x, noise, r, t, labels)
    assert calls.count(True) == 1
    u_ref, target_ref = objective.prediction_and_target(TorchFuncOnly(model), x, noise, r, t, labels)
    assert calls.count(True) == 1
    v_hat = objective.guided_target_velocity(model, interpolate(x, noise, t), t, noise - x, labels)  # Eq. 9-10
    assert (v_hat - target)[r < t].abs().mean() > 1e-2  # (t - r) du/dt (Eq. 6) is not trivially zero
    assert torch.equal(u, u_ref)
    torch.testing.assert_close(target, target_ref, **TOLERANCE)


@pytest.mark.parametrize("classes", [None, 3])
def test_imf_terms_with_the_explicit_tangent_equal_torch_func(classes):
    model = random_mlp(seed=7, num_classes=classes, guidance_conditions=True, auxiliary_velocity=True)
    objective = build_objective("imf", None, num_classes=classes, model=model)
    x, noise, r, t = _meanflow_batch()
    labels = None if classes is None else torch.tensor([0, 1, 2, 3, 0, 1])
    omega = torch.tensor([1.0, 2.0, 3.5, 1.5, 4.0, 6.0], dtype=F64)
    interval = torch.tensor([[0.0, 1.0], [0.2, 0.9], [0.1, 0.6], [0.3, 0.7], [0.0, 1.0], [0.35, 0.5]], dtype=F64)
    dropped = None if classes is None else torch.tensor([False, False, True, False, False, True])
    calls = _count_tangent_calls(model)
    fast = objective.prediction_and_target(model, x, noise, r, t, labels, omega, interval, dropped)
    assert calls.count(True) == 1
    reference = objective.prediction_and_target(TorchFuncOnly(model), x, noise, r, t, labels, omega, interval,
                                                dropped)
    assert calls.count(True) == 1
    assert (fast.V - fast.u)[r < t].abs().mean() > 1e-2
    torch.testing.assert_close(fast.V, reference.V, **TOLERANCE)
    for name in ("u", "v", "target"):
        assert torch.equal(getattr(fast, name), getattr(reference, name)), name
