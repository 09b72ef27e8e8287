"""Tests of the DDPM++-style U-Net: shapes, the CIFAR-10 preset's size, zero init, the JVP, config."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import jvp

from meanflow.models.unet import UNET_PRESETS, UNet, UNetConfig, unet_preset

PAPER_PARAMETERS = 55.9e6  # spec section 7, CIFAR-10 U-Net
PRESET_PARAMETERS = 56_227_587  # this implementation's exact count for "unet-cifar10"


def tiny_config(**overrides) -> UNetConfig:
    """Two levels (8x8, 4x4), attention at 4x4, two heads: every code path, a few thousand weights."""
    values = dict(
        input_size=8,
        in_channels=2,
        base_channels=8,
        channel_multipliers=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        num_heads=2,
        frequency_size=16,
    )
    values.update(overrides)
    return UNetConfig(**values)


def perturbed_model(config: UNetConfig, dtype=torch.float64, seed: int = 0) -> UNet:
    """A model whose zero-initialised output conv is given random weights, so outputs are non-trivial."""
    torch.manual_seed(seed)
    model = UNet(config).to(dtype)
    with torch.no_grad():
        model.output_conv.weight.normal_(0.0, 0.3)
        model.output_conv.bias.normal_(0.0, 0.3)
    return model


def inputs(config: UNetConfig, batch_size: int = 3, dtype=torch.float64, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch_size, config.in_channels, config.input_size, config.input_size, generator=generator,
                    dtype=dtype)
    t = torch.rand(batch_size, generator=generator, dtype=dtype) * 0.8 + 0.1
    r = t * torch.rand(batch_size, generator=generator, dtype=dtype)
    return z, r, t


def test_output_shape_matches_input():
    config = tiny_config()
    model = UNet(config)
    z, r, t = inputs(config, dtype=torch.float32)
    assert model(z, r, t).shape == z.shape


def test_cifar10_preset_parameter_count():
    config = unet_preset("unet-cifar10")
    assert config.dropout == 0.2 and config.num_classes is None
    with torch.device("meta"):
        model = UNet(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / PAPER_PARAMETERS - 1) < 0.02
    assert count == PRESET_PARAMETERS


def test_fresh_model_outputs_exactly_zero():
    config = tiny_config(num_classes=5)
    model = UNet(config)
    z, r, t = inputs(config, dtype=torch.float32)
    out = model(z, r, t, torch.tensor([0, 4, 5]))
    assert torch.equal(out, torch.zeros_like(z))


def test_jvp_matches_central_finite_difference():
    """Tangent (v, 0, 1) (Eq. 5): the JVP is d/dh u(z + h v, r, t + h) at h = 0."""
    config = tiny_config(dropout=0.3)
    model = perturbed_model(config).eval()
    z, r, t = inputs(config)
    v = torch.randn_like(z)

    def u(z_, r_, t_):
        return model(z_, r_, t_)

    with torch.no_grad():
        primal, dudt = jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        h = 1e-5
        finite_difference = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
        forward = u(z, r, t)
    assert dudt.abs().max() > 1e-3  # a vacuous comparison would pass trivially
    torch.testing.assert_close(dudt, finite_difference, rtol=1e-7, atol=1e-9)
    # The JVP path uses explicit softmax attention, the plain forward the fused kernel.
    torch.testing.assert_close(primal, forward, rtol=1e-12, atol=1e-12)


def test_jvp_in_t_sees_the_gap_t_minus_r():
    """With z fixed, d/dt at fixed r differs from d/dt at fixed t - r: the subtraction is inside."""
    config = tiny_config()
    model = perturbed_model(config).eval()
    z, r, t = inputs(config)
    one = torch.ones_like(t)
    with torch.no_grad():
        _, fixed_r = jvp(lambda t_: model(z, r, t_), (t,), (one,))
        _, moving_r = jvp(lambda r_, t_: model(z, r_, t_), (r, t), (one, one))
        _, only_r = jvp(lambda r_: model(z, r_, t), (r,), (one,))
    torch.testing.assert_close(fixed_r, moving_r - only_r, rtol=1e-9, atol=1e-12)
    assert (fixed_r - moving_r).abs().max() > 1e-4


def test_changing_r_changes_output():
    config = tiny_config()
    model = perturbed_model(config).eval()
    z, r, t = inputs(config)
    with torch.no_grad():
        difference = model(z, r, t) - model(z, r * 0.5, t)
    assert difference.abs().amax(dim=(1, 2, 3)).min() > 1e-4  # float64 noise is ~1e-15


def test_dropout_active_in_train_mode_only():
    config = tiny_config(dropout=0.5)
    model = perturbed_model(config)
    z, r, t = inputs(config)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(z, r, t), model(z, r, t))
        model.eval()
        assert torch.equal(model(z, r, t), model(z, r, t))


def test_class_conditional_model_accepts_null_class():
    config = tiny_config(num_classes=4)
    model = perturbed_model(config).eval()
    z, r, t = inputs(config)
    null = torch.full((3,), config.num_classes, dtype=torch.long)
    with torch.no_grad():
        unconditional = model(z, r, t, null)
        conditional = model(z, r, t, torch.tensor([0, 1, 3]))
    assert unconditional.shape == z.shape and torch.isfinite(unconditional).all()
    assert not torch.allclose(unconditional, conditional)
    with pytest.raises(ValueError, match="class-conditional"):
        model(z, r, t)


def test_unconditional_model_rejects_labels():
    config = tiny_config()
    model = UNet(config)
    z, r, t = inputs(config, dtype=torch.float32)
    with pytest.raises(ValueError, match="unconditional"):
        model(z, r, t, torch.zeros(3, dtype=torch.long))


def test_wrong_input_shapes_raise():
    config = tiny_config()
    model = UNet(config)
    z, r, t = inputs(config, dtype=torch.float32)
    with pytest.raises(ValueError, match="z must have shape"):
        model(z[:, :1], r, t)
    with pytest.raises(ValueError, match="t must have shape"):
        model(z, r, t[:2])


def test_config_round_trips_through_json():
    config = tiny_config(num_classes=10)
    restored = UNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.channel_multipliers, tuple)


def test_config_rejects_unknown_keys_listing_valid_ones():
    values = {**tiny_config().to_dict(), "channel_mult": [1, 2]}
    with pytest.raises(ValueError, match=r"channel_mult'\].*valid fields are .*channel_multipliers"):
        UNetConfig.from_dict(values)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(base_channels=0), "base_channels"),
        (dict(channel_multipliers=()), "channel_multipliers"),
        (dict(input_size=6, channel_multipliers=(1, 2, 2)), "input_size"),
        (dict(attention_resolutions=(3,)), "attention_resolutions"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_classes=0), "num_classes"),
        (dict(frequency_size=15), "frequency_size"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_presets():
    assert set(UNET_PRESETS) == {"unet-cifar10"}
    assert unet_preset("unet-cifar10", num_classes=10, dropout=0.0).num_classes == 10
    with pytest.raises(ValueError, match="valid names are .*unet-cifar10"):
        unet_preset("unet-imagenet")
    with pytest.raises(ValueError, match="valid fields"):
        unet_preset("unet-cifar10", dropout_rate=0.1)
