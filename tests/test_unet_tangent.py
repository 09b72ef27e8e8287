"""The U-Net's explicit tangent (UNet.forward_with_tangent): torch.func.jvp, central differences,
dropout through one mask, and the leading rows of a batch."""

from __future__ import annotations

import pytest
import torch

from meanflow.conditions import Tangent
from meanflow.models.unet import UNet, UNetConfig

F64 = torch.float64
CONFIGS = {
    "conditional": UNetConfig(input_size=8, in_channels=3, base_channels=8, channel_multipliers=(1, 2),
                              num_res_blocks=1, attention_resolutions=(4,), num_classes=4, frequency_size=16),
    "unconditional-2-heads": UNetConfig(input_size=4, in_channels=2, base_channels=8, channel_multipliers=(1, 1),
                                        num_res_blocks=2, attention_resolutions=(4, 2), num_heads=2,
                                        frequency_size=8),
}


def random_unet(config: UNetConfig, seed: int = 0, dropout: float = 0.0) -> UNet:
    """A float64 U-Net whose zero output conv is random, every weight perturbed (no trivial term)."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig.from_dict({**config.to_dict(), "dropout": dropout})).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def inputs(config: UNetConfig, batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g, dtype=F64)
    t = 0.2 + 0.7 * torch.rand(batch, generator=g, dtype=F64)
    r = t * torch.rand(batch, generator=g, dtype=F64)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=g) if config.num_classes else None
    tangent = Tangent(torch.randn(z.shape, generator=g, dtype=F64), torch.randn(batch, generator=g, dtype=F64),
                      torch.randn(batch, generator=g, dtype=F64))
    return z, r, t, y, tangent


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_explicit_tangent_equals_func_jvp_and_a_central_difference(name):
    config = CONFIGS[name]
    model = random_unet(config).eval()
    assert model.explicit_tangent
    z, r, t, y, random = inputs(config)
    flow = Tangent(random.dz, torch.zeros_like(r), torch.ones_like(t))  # (v, 0, 1): Eq. 5
    for tangent in (flow, random):
        out = model(z, r, t, y, tangent=tangent)
        _, du_ref = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t),
                                   (tangent.dz, tangent.dr, tangent.dt))
        assert du_ref.abs().mean() > 1e-2 and not out.du.requires_grad and out.u.requires_grad
        torch.testing.assert_close(out.du, du_ref, rtol=1e-10, atol=1e-10)
        step = 1e-6
        with torch.no_grad():
            plus = model(z + step * tangent.dz, r + step * tangent.dr, t + step * tangent.dt, y)
            minus = model(z - step * tangent.dz, r - step * tangent.dr, t - step * tangent.dt, y)
            assert torch.equal(out.u, model(z, r, t, y))  # the forward's own ops: the same bits
        torch.testing.assert_close(out.du, (plus - minus) / (2 * step), rtol=1e-6, atol=1e-7)


def test_the_tangent_of_the_leading_rows_and_dropout_through_one_mask():
    config = CONFIGS["conditional"]
    model = random_unet(config, dropout=0.3).train()
    z, r, t, y, tangent = inputs(config, batch=5)
    rows = 2
    lead = Tangent(tangent.dz[:rows], tangent.dr[:rows], tangent.dt[:rows])
    torch.manual_seed(7)
    out = model(z, r, t, y, tangent=lead)
    torch.manual_seed(7)
    plain = model(z, r, t, y)
    assert torch.equal(out.u, plain)  # the same dropout masks as a plain training forward
    # The tangent of the dropped network: the JVP with those masks, i.e. the same seed replayed.
    torch.manual_seed(7)
    u_ref, du_ref = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, y), (z, r, t),
                                   (torch.cat([lead.dz, torch.zeros_like(z[rows:])]),
                                    torch.cat([lead.dr, torch.zeros_like(r[rows:])]),
                                    torch.cat([lead.dt, torch.zeros_like(t[rows:])])))
    torch.testing.assert_close(u_ref, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.du, du_ref[:rows], rtol=1e-10, atol=1e-10)
    model.eval()
    with torch.no_grad():
        unmasked = model(z, r, t, y, tangent=lead)
    assert (unmasked.du - out.du).abs().max() > 1e-3  # the masks did act on the tangent


def test_a_subclass_overriding_forward_declares_no_explicit_tangent():
    class Scaled(UNet):
        def forward(self, z, r, t, conditions=None):
            return 2 * super().forward(z, r, t, conditions)

    assert not Scaled(CONFIGS["unconditional-2-heads"]).explicit_tangent


def test_a_tangent_of_no_rows():
    config = CONFIGS["conditional"]
    model = random_unet(config)
    z, r, t, y, tangent = inputs(config)
    out = model(z, r, t, y, tangent=Tangent(tangent.dz[:0], tangent.dr[:0], tangent.dt[:0]))
    assert out.du.shape == (0, *z.shape[1:]) and torch.equal(out.u, model(z, r, t, y))
