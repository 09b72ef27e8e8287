"""Tests of the iMF transformer: shapes, official sizes, zero init, the JVP, the explicit tangent and the conditions."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from meanflow import Batch, MeanFlow
from meanflow.conditions import Conditions, ModelOutput, Tangent
from meanflow.models import build_model
from meanflow.models import attention as attention_module
from meanflow.models.imf_dit import (
    IMF_DIT_PRESETS,
    ImfDiT,
    ImfDiTConfig,
    RMSNorm,
    apply_rope,
    imf_dit_preset,
    rope_angles,
)

TINY = ImfDiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=4,
                    num_classes=10, aux_head_depth=2, frequency_size=32)

# The official imfDiT_*_2(eval_mode=True) parameter counts (v blocks absent, v final layer kept),
# counted from Lyy-iiis/imeanflow's torch-branch models/imfDiT.py; FAMILY.md F1 rounds them to
# 88.9M, 173.9M, 409.1M, 610.4M.
OFFICIAL_PARAMETERS = {
    "iMF-B/2": 88_948_256,
    "iMF-M/2": 173_921_312,
    "iMF-L/2": 409_071_648,
    "iMF-XL/2": 610_433_056,
}
# The same definitions with the v head built (eval_mode=False): training size.
OFFICIAL_TRAINING_PARAMETERS = {
    "iMF-B/2": 145_596_960,
    "iMF-M/2": 230_570_016,
    "iMF-L/2": 509_752_352,
    "iMF-XL/2": 711_113_760,
}


def perturb(model: ImfDiT, seed: int = 0, std: float = 0.3) -> ImfDiT:
    """Open the zero-initialised residual scales and final linears, so the model computes something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("attn_scale", "mlp_scale")) or "final_layer.linear" in name:
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
    return model


def inputs(config: ImfDiTConfig, batch: int = 3, dtype: torch.dtype = torch.float32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=generator,
                    dtype=dtype)
    r = 0.5 * torch.rand(batch, generator=generator, dtype=dtype)
    t = r + 0.4 * torch.rand(batch, generator=generator, dtype=dtype)
    conditions = Conditions(
        labels=torch.arange(batch) % (config.num_classes + 1),
        guidance_scale=1.0 + 5.0 * torch.rand(batch, generator=generator, dtype=dtype),
        guidance_interval=torch.stack([0.3 * torch.rand(batch, generator=generator, dtype=dtype),
                                       0.6 + 0.4 * torch.rand(batch, generator=generator, dtype=dtype)], 1),
    )
    return z, r, t, conditions


def test_output_shapes_and_the_eval_mode_has_no_v():
    z, r, t, conditions = inputs(TINY)
    out = ImfDiT(TINY)(z, r, t, conditions)
    assert isinstance(out, ModelOutput) and out.u.shape == z.shape and out.v.shape == z.shape
    lean = ImfDiT(ImfDiTConfig.from_dict({**TINY.to_dict(), "auxiliary_head": False}))
    out = lean(z, r, t, conditions)
    assert out.u.shape == z.shape and out.v is None and not lean.auxiliary_velocity
    assert ImfDiT(TINY).auxiliary_velocity and len(lean.v_heads) == 0


@pytest.mark.parametrize("name", sorted(IMF_DIT_PRESETS))
def test_preset_parameter_counts_match_the_official_definition(name):
    with torch.device("meta"):  # count without allocating
        released = ImfDiT(imf_dit_preset(name, auxiliary_head=False))
        training = ImfDiT(imf_dit_preset(name))
    assert sum(p.numel() for p in released.parameters()) == OFFICIAL_PARAMETERS[name]
    assert sum(p.numel() for p in training.parameters()) == OFFICIAL_TRAINING_PARAMETERS[name]


def test_preset_layout_is_the_official_one():
    config = IMF_DIT_PRESETS["iMF-B/2"]
    with torch.device("meta"):
        model = ImfDiT(config)
    assert (len(model.shared_blocks), len(model.u_heads), len(model.v_heads)) == (4, 8, 8)
    assert config.prefix_tokens == 20 and config.mlp_hidden_size == 2048
    assert IMF_DIT_PRESETS["iMF-L/2"].mlp_hidden_size == 2730  # int(1024 * 8 / 3)
    assert model.rope_cos.shape == (20 + 256, 32)
    state = model.state_dict()
    assert tuple(state["shared_blocks.0.attn.q_norm.weight"].shape) == (64,)
    assert tuple(state["y_embedder.embedding_table.weight"].shape) == (1001, 768)
    assert not any("bias" in key for key in state if "blocks" in key or "heads" in key)
    with pytest.raises(ValueError, match="unknown iMF DiT preset"):
        imf_dit_preset("iMF-S/2")


def test_fresh_model_outputs_exactly_zero_and_perturbed_does_not():
    model = ImfDiT(TINY)
    z, r, t, conditions = inputs(TINY)
    out = model(z, r, t, conditions)
    assert torch.equal(out.u, torch.zeros_like(z)) and torch.equal(out.v, torch.zeros_like(z))
    scales = [p for n, p in model.named_parameters() if n.endswith(("attn_scale", "mlp_scale"))]
    assert scales and all(torch.equal(s, torch.zeros_like(s)) for s in scales)
    out = perturb(model)(z, r, t, conditions)
    assert out.u.abs().mean() > 1e-2 and out.v.abs().mean() > 1e-2
    assert not torch.allclose(out.u, out.v)


def test_jvp_matches_central_finite_difference_in_float64():
    model = perturb(ImfDiT(TINY)).double()
    z, r, t, conditions = inputs(TINY, dtype=torch.float64)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def u(z_, r_, t_):
        return model(z_, r_, t_, conditions).u

    # Tangent (dz, dr, dt) = (v, 0, 1): the total derivative along the flow (Eq. 5).
    primal, tangent = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    step = 1e-6
    with torch.no_grad():
        forward = u(z, r, t)
        difference = (u(z + step * v, r, t + step) - u(z - step * v, r, t - step)) / (2 * step)
    assert tangent.abs().mean() > 1e-2
    torch.testing.assert_close(primal, forward, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, difference, rtol=1e-6, atol=1e-7)


def test_ordinary_forward_uses_fused_kernel_and_jvp_does_not(monkeypatch):
    model = perturb(ImfDiT(TINY))
    z, r, t, conditions = inputs(TINY)
    calls = []
    fused = attention_module.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(z, r, t, conditions)
    assert len(calls) == TINY.depth + TINY.aux_head_depth  # trunk + u head + v head
    calls.clear()
    torch.func.jvp(lambda z_, t_: model(z_, r, t_, conditions).u, (z, t), (torch.ones_like(z), torch.ones_like(t)))
    assert len(calls) == 0


def test_conditions_are_required_and_others_refused():
    model = ImfDiT(TINY)
    z, r, t, conditions = inputs(TINY)
    assert model.accepted_conditions == {"labels", "guidance_scale", "guidance_interval"}
    with pytest.raises(ValueError, match="missing"):
        model(z, r, t, conditions.labels)  # a bare label tensor lacks the guidance inputs
    with pytest.raises(ValueError, match="missing"):
        model(z, r, t, Conditions(labels=conditions.labels, guidance_scale=conditions.guidance_scale))
    with pytest.raises(ValueError, match="missing"):
        model(z, r, t, None)
    with pytest.raises(ValueError, match=r"guidance_interval \(3, 2\)"):
        model(z, r, t, Conditions(labels=conditions.labels, guidance_scale=conditions.guidance_scale,
                                  guidance_interval=conditions.guidance_interval[:, 0]))
    with pytest.raises(ValueError, match="z must have shape"):
        model(z[:, :2], r, t, conditions)


@pytest.mark.parametrize("field", ["guidance_scale", "guidance_interval", "labels", "h"])
def test_each_condition_changes_the_output_once_weights_are_nonzero(field):
    model = perturb(ImfDiT(TINY))
    z, r, t, conditions = inputs(TINY)
    with torch.no_grad():
        before = model(z, r, t, conditions)
        if field == "h":  # same t, other r: only h = t - r reaches the network
            after = model(z, r * 0.5, t, conditions)
        else:
            value = getattr(conditions, field)
            other = (value + 1) % (TINY.num_classes + 1) if field == "labels" else value * 0.5 + 0.1
            after = model(z, r, t, Conditions(**{**conditions.__dict__, field: other}))
    for a, b in ((before.u, after.u), (before.v, after.v)):
        assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-5  # every sample changes


def test_only_h_is_embedded_so_equal_gaps_agree():
    model = perturb(ImfDiT(TINY))
    z, r, t, conditions = inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(model(z, r, t, conditions).u, model(z, r + 0.1, t + 0.1, conditions).u)


def test_guidance_scale_is_embedded_as_one_minus_its_inverse(monkeypatch):
    model = ImfDiT(TINY)
    z, r, t, conditions = inputs(TINY)
    seen = []
    original = model.omega_embedder.forward
    monkeypatch.setattr(model.omega_embedder, "forward", lambda values: (seen.append(values), original(values))[1])
    model(z, r, t, conditions)
    torch.testing.assert_close(seen[0], 1 - 1 / conditions.guidance_scale)


def test_rope_rotates_adjacent_pairs_by_position_times_frequency():
    cos, sin = rope_angles(head_dim=4, length=3, theta=100.0)
    x = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    x[..., 0] = 1.0  # the first pair (x0, x1) = (1, 0); the second pair (x2, x3) = (0, 0)
    x[..., 3] = 1.0  # the second pair = (0, 1)
    out = apply_rope(x, cos, sin)[0, 0]
    positions = torch.arange(3, dtype=torch.float64)
    slow = positions * 100.0 ** -0.5  # frequency of the second pair: theta^(-2/4)
    torch.testing.assert_close(out[:, 0], torch.cos(positions), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1], torch.sin(positions), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 2], -torch.sin(slow), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 3], torch.cos(slow), atol=1e-6, rtol=0)


def test_config_round_trip_registry_and_validation():
    data = json.loads(json.dumps(TINY.to_dict()))
    assert ImfDiTConfig.from_dict(data) == TINY
    model = build_model("imf_dit", data)
    assert isinstance(model, ImfDiT) and model.config == TINY
    with pytest.raises(ValueError, match="unknown ImfDiTConfig"):
        ImfDiTConfig.from_dict({**data, "depht": 3})
    bad = [
        {"aux_head_depth": 4},  # more than depth
        {"hidden_size": 24, "num_heads": 8},  # head width 3: RoPE needs pairs
        {"num_classes": None},
        {"mlp_ratio": 0.0},
        {"auxiliary_head": 1},
        {"depth": True},
    ]
    for change in bad:
        with pytest.raises(ValueError):
            ImfDiTConfig.from_dict({**data, **change})


class ConstantGuidance(nn.Module):
    """Feeds MeanFlow's labels to the iMF network with fixed guidance inputs (omega 1, [0, 1])."""

    def __init__(self, network: ImfDiT):
        super().__init__()
        self.network = network

    @property
    def accepted_conditions(self) -> frozenset[str]:
        return frozenset({"labels"})

    def forward(self, z, r, t, labels):
        batch = z.shape[0]
        return self.network(z, r, t, Conditions(labels=labels, guidance_scale=z.new_ones(batch),
                                                guidance_interval=z.new_tensor([[0.0, 1.0]]).expand(batch, 2)))


@pytest.mark.parametrize("derivative", ["two_pass", "jvp"])
def test_tiny_model_trains_one_step_under_meanflow(derivative):
    torch.manual_seed(0)
    network = perturb(ImfDiT(TINY), std=0.05)
    model = ConstantGuidance(network)
    objective = MeanFlow(num_classes=TINY.num_classes, derivative=derivative)
    objective.check_model(model)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    labels = torch.randint(0, TINY.num_classes, (4,), generator=generator)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in network.parameters()]
    out = objective.loss(model, Batch(x, labels), generator=generator)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert network.u_final_layer.linear.weight.grad.abs().sum() > 0
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters()))


def test_the_imf_objective_trains_the_imf_dit_through_the_registry():
    """The two halves of iMF meet: ImprovedMeanFlow checks the network takes its conditions and
    has the auxiliary head, and one step of both losses moves its weights."""
    from meanflow.conventions import Batch
    from meanflow.models.imf_dit import ImfDiT, ImfDiTConfig
    from meanflow.objectives import build_objective

    torch.manual_seed(0)
    model = ImfDiT(ImfDiTConfig(input_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=3, num_heads=2,
                                num_classes=3, aux_head_depth=1))
    objective = build_objective("imf", None, num_classes=3, model=model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    out = objective.loss(model, Batch(torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])),
                         generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss) and "auxiliary_error" in out.metrics
    out.loss.backward()
    optimizer.step()
    assert sum(not torch.equal(b, p) for b, p in zip(before, model.parameters())) > 0


# --- the explicit tangent ----------------------------------------------------------------------------

F64 = torch.float64
TANGENT_TOLERANCE = dict(rtol=1e-10, atol=1e-10)
TANGENT_CONFIGS = {
    "auxiliary-head": TINY,
    "no-auxiliary-head": ImfDiTConfig(input_size=4, in_channels=3, patch_size=2, hidden_size=16, depth=3,
                                      num_heads=2, num_classes=10, aux_head_depth=1, frequency_size=16,
                                      auxiliary_head=False),
    "patch-1-no-trunk": ImfDiTConfig(input_size=4, in_channels=2, patch_size=1, hidden_size=16, depth=2,
                                     num_heads=2, num_classes=3, aux_head_depth=2, frequency_size=16,
                                     num_class_tokens=2, num_cfg_tokens=1, num_interval_tokens=1,
                                     num_time_tokens=3),
}


def random_imf_dit(config: ImfDiTConfig, seed: int = 0) -> ImfDiT:
    """A float64 imfDiT with every zero-initialised parameter (residual scales, final linears) and
    every RMSNorm weight (one at init) random, so no term of the tangent is trivially zero."""
    model = perturb(ImfDiT(config), seed=seed).double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):  # the block norms, the QK-norms, the final norms
                module.weight.add_(0.3 * torch.randn(module.weight.shape, generator=generator, dtype=F64))
    return model


def flow_tangent(z, r, t, seed: int = 5) -> Tangent:
    """(dz, dr, dt) = (v, 0, 1) with a random v: the tangent of F-2 / Eq. 5."""
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
    return Tangent(v, torch.zeros_like(r), torch.ones_like(t))


def u_head(model, conditions):
    return lambda z_, r_, t_: model(z_, r_, t_, conditions).u


@pytest.mark.parametrize("name", sorted(TANGENT_CONFIGS))
def test_explicit_tangent_equals_func_jvp_and_its_primal_the_forward(name):
    config = TANGENT_CONFIGS[name]
    model = random_imf_dit(config)
    assert model.explicit_tangent
    z, r, t, conditions = inputs(config, batch=3, dtype=F64)
    generator = torch.Generator().manual_seed(7)
    random = Tangent(torch.randn(z.shape, generator=generator, dtype=F64),
                     torch.randn(r.shape, generator=generator, dtype=F64),
                     torch.randn(t.shape, generator=generator, dtype=F64))
    for tangent in (flow_tangent(z, r, t), random):
        out = model(z, r, t, conditions, tangent=tangent)  # through the module call
        u_ref, du_ref = torch.func.jvp(u_head(model, conditions), (z, r, t), (tangent.dz, tangent.dr, tangent.dt))
        assert isinstance(out, ModelOutput) and not out.du.requires_grad and out.u.requires_grad
        assert du_ref.abs().mean() > 1e-2
        torch.testing.assert_close(out.du, du_ref, **TANGENT_TOLERANCE)
        plain = model(z, r, t, conditions)
        # One pass: the same ops as the forward, so the same bits, and both heads (v with gradient).
        assert torch.equal(out.u, plain.u)
        assert (out.v is None) == (plain.v is None) and (out.v is None or torch.equal(out.v, plain.v))


def test_explicit_tangent_is_a_central_difference_in_float64():
    # Independent of torch.func: [u(z + h v, r, t + h) - u(z - h v, r, t - h)] / 2h.
    model = random_imf_dit(TINY, seed=2)
    z, r, t, conditions = inputs(TINY, dtype=F64, seed=3)
    tangent = flow_tangent(z, r, t)
    du = model(z, r, t, conditions, tangent=tangent).du
    step = 1e-6
    u = u_head(model, conditions)
    with torch.no_grad():
        difference = (u(z + step * tangent.dz, r, t + step) - u(z - step * tangent.dz, r, t - step)) / (2 * step)
    assert du.abs().mean() > 1e-2
    torch.testing.assert_close(du, difference, rtol=1e-6, atol=1e-7)


def test_only_z_and_the_gap_move_along_the_tangent():
    """t reaches the network only through h = t - r: moving r and t together (dh = 0) with z fixed
    changes nothing, exactly; moving t alone moves the time tokens, as torch.func.jvp says."""
    model = random_imf_dit(TINY, seed=4)
    z, r, t, conditions = inputs(TINY, dtype=F64, seed=5)
    ones = torch.ones_like(t)
    still = model(z, r, t, conditions, tangent=Tangent(torch.zeros_like(z), ones, ones)).du
    assert torch.equal(still, torch.zeros_like(z))
    gap_only = model(z, r, t, conditions, tangent=Tangent(torch.zeros_like(z), torch.zeros_like(r), ones)).du
    _, reference = torch.func.jvp(lambda t_: model(z, r, t_, conditions).u, (t,), (ones,))
    assert reference.abs().mean() > 1e-3
    torch.testing.assert_close(gap_only, reference, **TANGENT_TOLERANCE)


def test_explicit_tangent_in_float32_agrees_with_func_jvp():
    # The dtype training runs the target in (RoPE promotes to float32 and back; the buffers keep it).
    model = random_imf_dit(TINY, seed=9).float()
    z, r, t, conditions = inputs(TINY, batch=4, seed=10)
    tangent = flow_tangent(z, r, t)
    out = model(z, r, t, conditions, tangent=tangent)
    _, du_ref = torch.func.jvp(u_head(model, conditions), (z, r, t), (tangent.dz, tangent.dr, tangent.dt))
    assert out.du.dtype == torch.float32
    torch.testing.assert_close(out.du, du_ref, rtol=1e-4, atol=1e-4 * du_ref.abs().max().item())


def test_explicit_tangent_checks_its_inputs():
    model = random_imf_dit(TINY)
    z, r, t, conditions = inputs(TINY, dtype=F64)
    tangent = flow_tangent(z, r, t)
    with pytest.raises(ValueError, match="dz"):
        model(z, r, t, conditions, tangent=Tangent(tangent.dz[:, :2], tangent.dr, tangent.dt))
    with pytest.raises(ValueError, match="missing"):
        model(z, r, t, conditions.labels, tangent=tangent)


@pytest.mark.parametrize("dropped", [False, True], ids=["kept", "dropped"])
def test_imf_terms_with_the_explicit_tangent_equal_those_with_torch_func_jvp(dropped):
    """The iMF objective's two_pass derivative, du/dt of the u head along (v_c, 0, 1), goes through
    the explicit tangent (one call with tangent=) and gives the terms that torch.func.jvp gives."""
    from meanflow.objectives import build_objective
    from test_tangent import TorchFuncOnly

    config = ImfDiTConfig.from_dict({**TINY.to_dict(), "num_classes": 3})
    model = random_imf_dit(config, seed=6)
    objective = build_objective("imf", None, num_classes=3, model=model)
    generator = torch.Generator().manual_seed(8)
    x, noise = torch.randn(2, 6, 3, 8, 8, generator=generator, dtype=F64)
    t = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=F64)
    r = torch.tensor([0.1, 0.8, 0.3, 0.0, 0.5, 0.2], dtype=F64)  # r = t on rows 1 and 4
    labels = torch.tensor([0, 1, 2, 3, 0, 1])  # 3 is the null class
    omega = torch.tensor([1.0, 2.0, 3.5, 1.5, 4.0, 6.0], dtype=F64)
    interval = torch.tensor([[0.0, 1.0], [0.2, 0.9], [0.1, 0.6], [0.3, 0.7], [0.0, 1.0], [0.35, 0.5]], dtype=F64)
    drop = torch.tensor([False, False, True, False, False, True]) if dropped else None
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append("tangent" in kwargs), with_kwargs=True)
    fast = objective.prediction_and_target(model, x, noise, r, t, labels, omega, interval, drop)
    assert calls.count(True) == 1  # the derivative went through the explicit tangent
    reference = objective.prediction_and_target(TorchFuncOnly(model), x, noise, r, t, labels, omega, interval, drop)
    assert calls.count(True) == 1  # ... and the reference did not
    moving = r < t
    assert (fast.V - fast.u)[moving].abs().mean() > 1e-2  # (t - r) du/dt matters on the r != t rows
    torch.testing.assert_close(fast.V, reference.V, **TANGENT_TOLERANCE)
    for name in ("u", "v", "target"):
        assert torch.equal(getattr(fast, name), getattr(reference, name)), name
