"""Two-dimensional toy distributions with exact samplers and exactly stated densities.

Each distribution is defined below precisely enough that its moments can be written down, so
tests and toy experiments can compare generated samples against the truth rather than against
another sample. All of them live roughly inside the square [-4, 4]^2 and have a spread of a few
units, which suits the N(0, I) noise at ``t = 1``.

The constants of each definition are module-level names (``CHECKERBOARD_CELLS``,
``EIGHT_GAUSSIANS_RADIUS`` ...) so that tests and plots refer to one source of truth.
"""

from __future__ import annotations

import enum
import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

# Checkerboard: a board of CHECKERBOARD_CELLS x CHECKERBOARD_CELLS unit squares centred at 0.
CHECKERBOARD_CELLS = 4

# Eight Gaussians: isotropic components on a circle.
EIGHT_GAUSSIANS_RADIUS = 2.0
EIGHT_GAUSSIANS_STD = 0.2

# Two moons: the classic half-circles, then centred and scaled (see _two_moons).
MOONS_NOISE_STD = 0.1  # in the units of the unit half-circles, before scaling
MOONS_CENTRE = (0.5, 0.25)
MOONS_SCALE = 2.0

# Spirals: two Archimedean arms rho = theta / pi, theta in [0, SPIRALS_MAX_ANGLE].
SPIRALS_MAX_ANGLE = 3.0 * math.pi
SPIRALS_NOISE_STD = 0.1

# Rings: concentric circles, picked with probability proportional to their radius.
RINGS_RADII = (1.0, 2.0, 3.0)
RINGS_NOISE_STD = 0.1


class ToyDistribution(str, enum.Enum):
    """The 2-D toy distributions of :func:`sample_toy`.

    CHECKERBOARD: uniform on the "black" unit squares of a 4 x 4 board covering [-2, 2]^2, the
        squares ``[i, i + 1) x [j, j + 1)`` with integers ``i, j`` in {-2, ..., 1} and ``i + j``
        even (8 squares). The density is 1/8 on them and 0 elsewhere; each coordinate is
        marginally uniform on [-2, 2] (mean 0, variance 4/3).
    EIGHT_GAUSSIANS: an equal-weight mixture of 8 isotropic Gaussians N(c_k, 0.2^2 I) with
        centres ``c_k = 2 (cos(2 pi k / 8), sin(2 pi k / 8))``, k = 0..7.
    TWO_MOONS: pick one of two moons with probability 1/2 and an angle ``a ~ U(0, pi)``; the upper
        moon is ``(cos a, sin a)``, the lower ``(1 - cos a, 1/2 - sin a)``; add N(0, 0.1^2 I)
        noise; finally map ``p -> 2 (p - (0.5, 0.25))`` so the mean is exactly 0.
    SPIRALS: two interleaved Archimedean arms. Draw ``s ~ U(0, 1)``, ``theta = 3 pi sqrt(s)``
        (density ``2 theta / (3 pi)^2`` on [0, 3 pi], i.e. roughly uniform along the arc), radius
        ``rho = theta / pi`` (so at most 3), point ``rho (cos theta, sin theta)``; the second arm,
        chosen with probability 1/2, is the first rotated by pi. Add N(0, 0.1^2 I) noise. The mean
        is exactly 0 and ``E|z|^2 = 9/2 + 2 * 0.1^2``.
    RINGS: concentric circles of radii 1, 2, 3 chosen with probabilities 1/6, 2/6, 3/6 (so the
        density per unit of arc length is the same on every ring), a uniform angle, and radial
        noise: the point is ``(R + 0.1 eps) (cos phi, sin phi)`` with ``eps ~ N(0, 1)``.
    """

    CHECKERBOARD = "checkerboard"
    EIGHT_GAUSSIANS = "eight_gaussians"
    TWO_MOONS = "two_moons"
    SPIRALS = "spirals"
    RINGS = "rings"


def sample_toy(
    name: Union[str, ToyDistribution],
    num_samples: int,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Draw ``num_samples`` exact samples of a 2-D toy distribution.

    Args:
        name: a :class:`ToyDistribution` or its string value (``"checkerboard"`` ...); see
            :class:`ToyDistribution` for each exact definition.
        num_samples: N, a positive integer.
        generator: the random source; samples are drawn on its device. With ``None`` the global
            torch generator is used on the CPU. The same seeded generator gives the same samples.
        dtype: floating dtype of the result. Sampling is done in float64 and then cast.

    Returns:
        (N, 2) samples.
    """
    distribution = _resolve(name)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    rng = _Random(generator)
    return _SAMPLERS[distribution](num_samples, rng).to(dtype)


def _resolve(name: Union[str, ToyDistribution]) -> ToyDistribution:
    if isinstance(name, ToyDistribution):
        return name
    try:
        return ToyDistribution(name)
    except ValueError:
        valid = ", ".join(repr(member.value) for member in ToyDistribution)
        raise ValueError(f"unknown toy distribution {name!r}; valid names are {valid}") from None


class _Random:
    """float64 draws from one generator on its device, so every sampler stays deterministic."""

    def __init__(self, generator: Optional[torch.Generator]):
        self.generator = generator
        self.device = generator.device if generator is not None else torch.device("cpu")

    def uniform(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device, dtype=torch.float64)

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float64)

    def integers(self, high: int, *shape: int) -> Tensor:
        return torch.randint(high, shape, generator=self.generator, device=self.device)

    def coin(self, n: int) -> Tensor:
        """(n,) booleans, True with probability 1/2."""
        return self.integers(2, n).bool()


def _checkerboard(n: int, rng: _Random) -> Tensor:
    half = CHECKERBOARD_CELLS // 2
    # Pick a column i uniformly, then one of the CELLS/2 rows j with i + j even: this is a uniform
    # choice among the black squares.
    column = rng.integers(CHECKERBOARD_CELLS, n) - half  # (n,) in {-2, ..., 1}
    row_slot = rng.integers(CHECKERBOARD_CELLS // 2, n)  # (n,) in {0, 1}
    parity = torch.remainder(column + half, 2)  # makes j have the parity of i
    row = 2 * row_slot + parity - half  # (n,) in {-2, ..., 1}, i + j even
    corner = torch.stack([column, row], dim=1).to(torch.float64)  # (n, 2)
    return corner + rng.uniform(n, 2)


def _eight_gaussians(n: int, rng: _Random) -> Tensor:
    component = rng.integers(8, n).to(torch.float64)  # (n,)
    angle = 2.0 * math.pi * component / 8.0
    centre = EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centre + EIGHT_GAUSSIANS_STD * rng.normal(n, 2)


def _two_moons(n: int, rng: _Random) -> Tensor:
    lower = rng.coin(n)  # (n,)
    angle = math.pi * rng.uniform(n)  # (n,)
    upper_moon = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    lower_moon = torch.stack([1.0 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    points = torch.where(lower[:, None], lower_moon, upper_moon)  # (n, 2)
    points = points + MOONS_NOISE_STD * rng.normal(n, 2)
    centre = torch.tensor(MOONS_CENTRE, dtype=torch.float64, device=points.device)
    return MOONS_SCALE * (points - centre)


def _spirals(n: int, rng: _Random) -> Tensor:
    second_arm = rng.coin(n)  # (n,)
    theta = SPIRALS_MAX_ANGLE * torch.sqrt(rng.uniform(n))  # (n,)
    radius = theta / math.pi
    points = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    points = torch.where(second_arm[:, None], -points, points)  # rotation by pi
    return points + SPIRALS_NOISE_STD * rng.normal(n, 2)


def _rings(n: int, rng: _Random) -> Tensor:
    radii = torch.tensor(RINGS_RADII, dtype=torch.float64, device=rng.device)
    # Weights proportional to the radius: equal density per unit of arc length on every ring.
    ring = torch.multinomial(radii / radii.sum(), n, replacement=True, generator=rng.generator)
    angle = 2.0 * math.pi * rng.uniform(n)
    radius = radii[ring] + RINGS_NOISE_STD * rng.normal(n)
    return radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


_SAMPLERS: dict[ToyDistribution, Callable[[int, _Random], Tensor]] = {
    ToyDistribution.CHECKERBOARD: _checkerboard,
    ToyDistribution.EIGHT_GAUSSIANS: _eight_gaussians,
    ToyDistribution.TWO_MOONS: _two_moons,
    ToyDistribution.SPIRALS: _spirals,
    ToyDistribution.RINGS: _rings,
}
