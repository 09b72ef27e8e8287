"""What the math tests of the objectives share: the exact Gaussian field at fixed parameters, a
random float64 MLP, and random (r, t) pairs."""

from __future__ import annotations

import torch
from gaussian import GaussianAverageVelocity

from meanflow.models.mlp import MLP, MLPConfig


def gaussian_field(dim: int = 3) -> GaussianAverageVelocity:
    """The exact u(z, r, t) of N(mu, diag(scale^2)) data with fixed random mu and scale in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(dim, generator=g, dtype=torch.float64)
    return GaussianAverageVelocity(mu, scale)


def random_mlp(num_classes=None, seed: int = 0) -> MLP:
    """A float64 MLP on 3-d data whose zero-initialised output layer is given random weights."""
    torch.manual_seed(seed)
    model = MLP(MLPConfig(data_dim=3, hidden_size=32, depth=3, num_classes=num_classes)).double()
    torch.nn.init.normal_(model.output[1].weight, std=0.3)  # leave the zero init: u must vary
    return model


def times(batch: int, seed: int = 1, equal_every=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t), each (batch,) float64 with r <= t; every ``equal_every``-th row has r = t."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(batch, generator=g, dtype=torch.float64), torch.rand(batch, generator=g, dtype=torch.float64)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    if equal_every:
        r[::equal_every] = t[::equal_every]
    return r, t
