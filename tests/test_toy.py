"""The toy samplers against their exact definitions: supports, weights, moments."""

import math

import numpy as np
import pytest
import torch

from meanflow import toys as toy
from meanflow.toys import ToyDistribution, sample_toy

N = 40_000


def draw(name, n=N, seed=0):
    return sample_toy(name, n, torch.Generator().manual_seed(seed), dtype=torch.float64)


def binomial_tolerance(n, probability, sigmas=5.0):
    return sigmas * math.sqrt(n * probability * (1 - probability))


@pytest.mark.parametrize("name", list(ToyDistribution))
def test_shape_dtype_range_and_finiteness(name):
    samples = sample_toy(name, 4096, torch.Generator().manual_seed(1))
    assert samples.shape == (4096, 2)
    assert samples.dtype == torch.float32
    assert torch.isfinite(samples).all()
    assert samples.abs().max() <= 4.0


@pytest.mark.parametrize("name", [member.value for member in ToyDistribution])
def test_seeded_generator_is_deterministic(name):
    first = sample_toy(name, 500, torch.Generator().manual_seed(7))
    second = sample_toy(name, 500, torch.Generator().manual_seed(7))
    other = sample_toy(name, 500, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_global_generator_and_dtype():
    torch.manual_seed(3)
    first = sample_toy("rings", 100, dtype=torch.float64)
    torch.manual_seed(3)
    second = sample_toy("rings", 100, dtype=torch.float64)
    assert first.dtype == torch.float64
    assert torch.equal(first, second)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="checkerboard.*eight_gaussians.*two_moons.*spirals.*rings"):
        sample_toy("swiss_roll", 10)


@pytest.mark.parametrize("count", [0, -5, 2.5])
def test_bad_sample_count_raises(count):
    with pytest.raises(ValueError, match="num_samples"):
        sample_toy("checkerboard", count)


def test_integer_dtype_raises():
    with pytest.raises(ValueError, match="floating"):
        sample_toy("checkerboard", 10, dtype=torch.int64)


def test_checkerboard_lies_on_black_squares_uniformly():
    samples = draw("checkerboard")
    cells = torch.floor(samples).long()  # (N, 2) lower-left corners
    assert ((cells >= -2) & (cells <= 1)).all()
    assert (torch.remainder(cells.sum(dim=1), 2) == 0).all()
    # The 8 black squares are equally likely.
    square_id = (cells[:, 0] + 2) * 4 + (cells[:, 1] + 2)
    counts = torch.bincount(square_id, minlength=16)
    black = counts[counts > 0]
    assert black.numel() == 8
    assert (black - N / 8).abs().max() < binomial_tolerance(N, 1 / 8)
    # Uniform inside each square: offset mean 1/2 and variance 1/12 per coordinate.
    offsets = samples - cells
    assert torch.allclose(offsets.mean(dim=0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.01)
    assert torch.allclose(offsets.var(dim=0), torch.full((2,), 1 / 12, dtype=torch.float64), atol=0.003)


def test_eight_gaussians_components():
    samples = draw("eight_gaussians")
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    centres = toy.EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    # Centres are 1.53 apart (3.8 std to the midpoint), so nearest-centre assignment is exact in
    # all but a negligible fraction of draws.
    nearest = torch.cdist(samples, centres).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=8)
    assert (counts - N / 8).abs().max() < binomial_tolerance(N, 1 / 8)
    for k in range(8):
        members = samples[nearest == k]
        # Standard error of the mean is 0.2 / sqrt(5000) ~ 0.003; of the std ~ 1%.
        assert torch.allclose(members.mean(dim=0), centres[k], atol=0.015)
        expected_std = torch.full((2,), toy.EIGHT_GAUSSIANS_STD, dtype=torch.float64)
        assert torch.allclose(members.std(dim=0), expected_std, rtol=0.05)


def test_two_moons_moments_match_closed_form():
    samples = draw("two_moons", n=100_000)
    noise = toy.MOONS_NOISE_STD**2
    # Per moon: x has variance E[cos^2] = 1/2, y has variance 1/2 - (2/pi)^2; the moon means
    # differ by 1 in x and 4/pi - 1/2 in y, adding (difference / 2)^2 for an even mixture.
    var_x = 0.5 + 0.25 + noise
    var_y = 0.5 - 4 / math.pi**2 + (4 / math.pi - 0.5) ** 2 / 4 + noise
    # Covariance: E[xy] of the raw mixture minus the product of the means.
    upper_xy = 0.0  # E[cos a sin a] = 0
    lower_xy = 0.5 - 2 / math.pi  # E[(1 - cos a)(1/2 - sin a)] = 1/2 - 2/pi + E[cos a sin a]
    cov_xy = 0.5 * (upper_xy + lower_xy) - 0.5 * 0.25
    scale = toy.MOONS_SCALE**2
    expected_cov = scale * torch.tensor([[var_x, cov_xy], [cov_xy, var_y]], dtype=torch.float64)
    assert samples.mean(dim=0).abs().max() < 0.02  # standard error ~ 0.006
    assert torch.allclose(torch.cov(samples.T), expected_cov, atol=0.03)


def test_spirals_moments_match_closed_form():
    samples = draw("spirals", n=100_000)
    # theta has density 2 theta / T^2 on [0, T], radius theta / pi; integrate numerically.
    total_angle = toy.SPIRALS_MAX_ANGLE
    grid = (np.arange(200_000) + 0.5) / 200_000 * total_angle  # midpoint rule, error ~1e-10
    weight = 2 * grid / total_angle**2 * (total_angle / 200_000)
    radius_squared = (grid / math.pi) ** 2
    noise = toy.SPIRALS_NOISE_STD**2
    directions = np.stack([np.cos(grid), np.sin(grid)])  # (2, K)
    second_moment = np.einsum("k,ik,jk->ij", weight * radius_squared, directions, directions) + noise * np.eye(2)
    assert math.isclose(np.trace(second_moment), 4.5 + 2 * noise, rel_tol=1e-8)
    assert samples.mean(dim=0).abs().max() < 0.025  # the two arms cancel; standard error ~ 0.005
    empirical = samples.T @ samples / samples.shape[0]
    assert torch.allclose(empirical, torch.from_numpy(second_moment), atol=0.04)


def test_rings_radii_weights_and_width():
    samples = draw("rings")
    radii = torch.tensor(toy.RINGS_RADII, dtype=torch.float64)
    norms = samples.norm(dim=1)
    nearest = (norms[:, None] - radii).abs().argmin(dim=1)
    counts = torch.bincount(nearest, minlength=3)
    probabilities = radii / radii.sum()
    for k in range(3):
        assert abs(counts[k] - N * probabilities[k]) < binomial_tolerance(N, float(probabilities[k]))
        ring = norms[nearest == k]
        assert abs(ring.mean() - radii[k]) < 0.005
        assert abs(ring.std() / toy.RINGS_NOISE_STD - 1) < 0.05
    # The angle is uniform: the mean direction vanishes.
    directions = samples / norms[:, None]
    assert directions.mean(dim=0).abs().max() < 0.02
