"""An exact average-velocity field: Gaussian data N(mu, diag(s^2)) under the linear path.

z_t = a_t + b_t xi with a_t = (1 - t) mu and b_t = sqrt((1 - t)^2 s^2 + t^2), so the flow map is
affine, z_r = a_r + (b_r / b_t)(z_t - a_t), and the average velocity (Eq. 2) has a closed form.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GaussianAverageVelocity(nn.Module):
    """The exact u(z, r, t) for data N(mu, diag(scale^2)). z: (B, D)."""

    def __init__(self, mu: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("scale", scale)

    def mean_std(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t[:, None]
        return (1 - t) * self.mu, torch.sqrt((1 - t) ** 2 * self.scale**2 + t**2)

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        """The marginal velocity u(z, t, t) = a_t' + (b_t' / b_t)(z - a_t)."""
        a, b = self.mean_std(t)
        tt = t[:, None]
        db = (-(1 - tt) * self.scale**2 + tt) / b
        return -self.mu + db / b * (z - a)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y=None) -> Tensor:
        a_t, b_t = self.mean_std(t)
        a_r, b_r = self.mean_std(r)
        gap = (t - r)[:, None]
        moving = gap > 0
        safe_gap = torch.where(moving, gap, torch.ones_like(gap))
        z_r = a_r + b_r / b_t * (z - a_t)
        return torch.where(moving, (z - z_r) / safe_gap, self.velocity(z, t))

    def posterior_means(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """E[x | z_t] and E[e | z_t]; their path point (1 - t) x + t e is z_t itself."""
        a, b = self.mean_std(t)
        tt = t[:, None]
        x_mean = self.mu + (1 - tt) * self.scale**2 / b**2 * (z - a)
        e_mean = tt / b**2 * (z - a)
        return x_mean, e_mean
