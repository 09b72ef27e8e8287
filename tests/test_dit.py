"""Tests of the DiT backbone: adaLN-Zero, shapes, preset sizes, the JVP and the conditioning."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from meanflow.models import attention as attention_module
from meanflow.models.dit import DIT_PRESETS, DiT, DiTConfig, dit_preset, sincos_position_embedding_2d

TINY = DiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                 num_classes=10, frequency_size=32)

# Parameter counts of the paper's table (spec section 7).
PAPER_PARAMETERS = {
    "DiT-B/4": 131e6,
    "DiT-B/2": 131e6,
    "DiT-M/2": 308e6,
    "DiT-L/2": 459e6,
    "DiT-XL/2": 676e6,
}


def zero_initialised_linears(model: DiT) -> list[nn.Linear]:
    """The linears adaLN-Zero starts at zero."""
    linears = [block.modulation[-1] for block in model.blocks]
    return linears + [model.final_layer.modulation[-1], model.final_layer.linear]


def perturb(model: DiT, seed: int = 0, std: float = 0.2) -> DiT:
    """Give the zero-initialised linears random weights, so the model computes something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in zero_initialised_linears(model):
            for parameter in (linear.weight, linear.bias):
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def inputs(config: DiTConfig, batch: int = 3, seed: int = 1, dtype: torch.dtype = torch.float32):
    """Random (z, r, t, y) with 0.2 <= r <= t <= 0.9."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=generator,
                    dtype=dtype)
    t = 0.5 + 0.4 * torch.rand(batch, generator=generator, dtype=dtype)
    r = 0.2 + (t - 0.2) * torch.rand(batch, generator=generator, dtype=dtype)
    y = torch.randint(0, config.num_classes, (batch,), generator=generator) if config.num_classes else None
    return z, r, t, y


def test_fresh_model_outputs_exactly_zero_and_perturbed_does_not():
    torch.manual_seed(0)
    model = DiT(TINY)
    z, r, t, y = inputs(TINY)
    assert torch.equal(model(z, r, t, y), torch.zeros_like(z))
    perturb(model)
    out = model(z, r, t, y)
    assert out.abs().mean() > 1e-2


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        DiTConfig(input_size=8, in_channels=4, patch_size=4, hidden_size=32, depth=1, num_heads=2),
        DiTConfig(input_size=12, in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=1,
                  num_classes=3, mlp_ratio=2.0),
        DiTConfig(input_size=16, in_channels=2, patch_size=4, hidden_size=24, depth=2, num_heads=3),
    ],
    ids=["p2-cond", "p4-uncond", "p2-cond-mlp2", "p4-uncond-16"],
)
def test_output_shape_equals_input_shape(config):
    torch.manual_seed(0)
    model = perturb(DiT(config))
    z, r, t, y = inputs(config, batch=2)
    out = model(z, r, t, y)
    assert out.shape == z.shape
    assert torch.isfinite(out).all()
    assert config.num_patches == model.position_embedding.shape[1] == (config.input_size // config.patch_size) ** 2


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETERS))
def test_preset_parameter_counts_match_the_paper(name):
    with torch.device("meta"):
        model = DiT(DIT_PRESETS[name])
    count = sum(parameter.numel() for parameter in model.parameters())
    assert abs(count / PAPER_PARAMETERS[name] - 1) < 0.01, f"{name}: {count / 1e6:.2f}M parameters"


def test_preset_lookup_and_overrides():
    assert dit_preset("DiT-XL/2").depth == 28
    unconditional = dit_preset("DiT-B/4", num_classes=None)
    assert unconditional.num_classes is None and unconditional.patch_size == 4
    with pytest.raises(ValueError, match="DiT-B/2"):
        dit_preset("DiT-S/2")
    with pytest.raises(ValueError, match="num_heads"):
        dit_preset("DiT-B/2", num_head=3)


def test_jvp_matches_central_finite_difference_in_float64():
    torch.manual_seed(0)
    model = perturb(DiT(TINY)).double()
    z, r, t, y = inputs(TINY, dtype=torch.float64)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def u(z_, r_, t_):
        return model(z_, r_, t_, y)

    # Tangent (dz, dr, dt) = (v, 0, 1): the total derivative along the flow (Eq. 5).
    primal, tangent = torch.func.jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    h = 1e-6
    with torch.no_grad():
        forward = u(z, r, t)
        difference = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    assert tangent.abs().mean() > 1e-2
    torch.testing.assert_close(primal, forward, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, difference, rtol=1e-6, atol=1e-7)


def test_ordinary_forward_uses_fused_kernel_and_jvp_does_not(monkeypatch):
    torch.manual_seed(0)
    model = perturb(DiT(TINY))
    z, r, t, y = inputs(TINY)
    calls = []
    fused = attention_module.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(z, r, t, y)
    assert len(calls) == TINY.depth
    calls.clear()
    torch.func.jvp(lambda z_, t_: model(z_, r, t_, y), (z, t), (torch.ones_like(z), torch.ones_like(t)))
    assert len(calls) == 0


def test_labels_matter_and_null_class_is_accepted():
    torch.manual_seed(0)
    model = perturb(DiT(TINY))
    z, r, t, _ = inputs(TINY)
    first = model(z, r, t, torch.tensor([0, 1, 2]))
    second = model(z, r, t, torch.tensor([3, 4, 5]))
    null = model(z, r, t, torch.full((3,), TINY.num_classes))
    assert (first - second).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (first - null).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    with pytest.raises(ValueError, match="class-conditional"):
        model(z, r, t, None)
    unconditional = DiT(dataclasses.replace(TINY, num_classes=None))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(z, r, t, torch.tensor([0, 1, 2]))


def test_gap_t_minus_r_is_embedded_and_changes_the_output(monkeypatch):
    torch.manual_seed(0)
    model = perturb(DiT(TINY))
    z, r, t, y = inputs(TINY)
    seen = []
    gap_forward = model.conditioning.gap_embedder.forward_with_tangent

    def recording(values, dvalues):
        seen.append(values)
        return gap_forward(values, dvalues)

    monkeypatch.setattr(model.conditioning.gap_embedder, "forward_with_tangent", recording)
    out = model(z, r, t, y)
    torch.testing.assert_close(seen[0], t - r, rtol=0, atol=0)
    # Same t, gap t - r of 0 versus t: the time MLPs start small (std 0.02), so the effect is
    # modest, but it is far above float32 round-off.
    flow_matching = model(z, t, t, y)
    widest = model(z, torch.zeros_like(r), t, y)
    assert (flow_matching - widest).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert (out - flow_matching).abs().amax() > 1e-5


def test_output_patch_depends_only_on_its_input_patch():
    # With the blocks gated shut (fresh adaLN-Zero) and only the output linear opened, each output
    # patch is a function of its own input patch: pins the patchify / unpatchify layout.
    torch.manual_seed(0)
    config = DiTConfig(input_size=8, in_channels=2, patch_size=2, hidden_size=16, depth=1, num_heads=2)
    model = DiT(config)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()
    z, r, t, _ = inputs(config, batch=1)
    base = model(z, r, t)
    bumped = z.clone()
    bumped[0, 1, 5, 2] += 1.0  # row 5, column 2: the patch at grid (2, 1)
    changed = (model(bumped, r, t) - base).abs().sum(dim=(0, 1)) > 0  # (H, W)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:6, 2:4] = True
    assert torch.equal(changed, expected)


def test_position_embedding_values():
    table = sincos_position_embedding_2d(hidden_size=8, grid_size=3)  # (9, 8)
    # Token 0 sits at (0, 0): all sines 0, all cosines 1.
    torch.testing.assert_close(table[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # Token 5 sits at row 1, column 2; frequencies are 1 and 10000^(-1/2) = 0.01.
    row, col = 1.0, 2.0
    expected = [math.sin(row), math.sin(row * 0.01), math.cos(row), math.cos(row * 0.01),
                math.sin(col), math.sin(col * 0.01), math.cos(col), math.cos(col * 0.01)]
    torch.testing.assert_close(table[5], torch.tensor(expected))
    model = DiT(TINY)
    assert "position_embedding" not in model.state_dict()
    assert not any(parameter is model.position_embedding for parameter in model.parameters())


def test_config_round_trip_and_validation():
    config = DIT_PRESETS["DiT-L/2"]
    assert DiTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="valid fields"):
        DiTConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(input_size=30, in_channels=4, patch_size=4, hidden_size=64, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(input_size=32, in_channels=4, patch_size=4, hidden_size=64, depth=1, num_heads=5)
    with pytest.raises(ValueError, match="depth"):
        DiTConfig(input_size=32, in_channels=4, patch_size=4, hidden_size=64, depth=0, num_heads=4)
    with pytest.raises(ValueError, match="num_classes"):
        DiTConfig(input_size=32, in_channels=4, patch_size=4, hidden_size=64, depth=1, num_heads=4,
                  num_classes=0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        DiTConfig(input_size=32, in_channels=4, patch_size=4, hidden_size=64, depth=1, num_heads=4,
                  mlp_ratio=-1.0)


def test_wrong_input_shape_raises():
    model = DiT(TINY)
    z, r, t, y = inputs(TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model(z[:, :2], r, t, y)
