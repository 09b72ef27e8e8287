"""Energy and sliced Wasserstein distances against closed forms."""

import math

import pytest
import torch

from meanflow.eval.distances import energy_distance, sliced_wasserstein


def gaussians(seed, n, dim=1, dtype=torch.float64):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def mean_absolute_normal(mu, sigma):
    """E|Z| for Z ~ N(mu, sigma^2)."""
    return sigma * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sigma**2)) + mu * (1 - 2 * normal_cdf(-mu / sigma))


# ---------------------------------------------------------------------------------------------
# energy distance


def test_energy_point_masses_closed_form():
    # Between point masses at 0 and d the energy distance is 2|d| (within-set terms vanish).
    shift = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)  # |d| = 13
    x = torch.zeros(5, 3, dtype=torch.float64)
    y = x + shift
    assert energy_distance(x, y) == pytest.approx(26.0, abs=1e-9)
    assert energy_distance(x, y, unbiased=False) == pytest.approx(26.0, abs=1e-9)


def test_energy_two_point_sets_pin_u_and_v():
    # x = y = {0, 1}: cross mean 1/2; within pairs i != j have distance 1, so the U-statistic is
    # 2 * 1/2 - 1 - 1 = -1, while the V-statistic (empirical measures) is exactly 0.
    x = torch.tensor([0.0, 1.0])
    assert energy_distance(x, x) == pytest.approx(-1.0, abs=1e-12)
    assert energy_distance(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-12)


def brute_force_energy(x, y, unbiased):
    def mean_distance(a, b, skip_diagonal):
        total, count = 0.0, 0
        for i in range(a.shape[0]):
            for j in range(b.shape[0]):
                if skip_diagonal and i == j:
                    continue
                total += float(torch.linalg.vector_norm(a[i] - b[j]))
                count += 1
        return total, count

    cross, cross_count = mean_distance(x, y, False)
    within_x, count_x = mean_distance(x, x, True)
    within_y, count_y = mean_distance(y, y, True)
    if not unbiased:
        count_x, count_y = x.shape[0] ** 2, y.shape[0] ** 2
    return 2 * cross / cross_count - within_x / count_x - within_y / count_y


@pytest.mark.parametrize("unbiased", [True, False])
def test_energy_matches_brute_force_and_ignores_chunking(unbiased):
    x = gaussians(0, 13, dim=4)
    y = gaussians(1, 9, dim=4) + 0.3
    expected = brute_force_energy(x, y, unbiased)
    for chunk_size in (None, 1, 4, 100):
        assert energy_distance(x, y, unbiased=unbiased, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-10)


def test_energy_flattens_images_and_accepts_float32():
    x = gaussians(2, 20, dim=12).reshape(20, 3, 2, 2)
    y = gaussians(3, 15, dim=12).reshape(15, 3, 2, 2)
    flat = energy_distance(x.reshape(20, -1), y.reshape(15, -1))
    assert energy_distance(x, y) == pytest.approx(flat, rel=1e-12)
    assert energy_distance(x.float(), y.float()) == pytest.approx(flat, rel=1e-5)


def test_energy_of_shifted_gaussians_matches_closed_form():
    # X ~ N(0, 1), Y ~ N(m, 1): X - Y ~ N(-m, 2) and X - X' ~ N(0, 2).
    m = 1.0
    expected = 2 * mean_absolute_normal(-m, math.sqrt(2)) - 2 * mean_absolute_normal(0.0, math.sqrt(2))
    assert expected == pytest.approx(0.5418065793, abs=1e-9)
    estimate = energy_distance(gaussians(10, 4000), gaussians(11, 4000) + m)
    # The estimate's standard deviation at this size is about 0.024 (measured over 30 seeds).
    assert estimate == pytest.approx(expected, abs=0.1)


def test_energy_same_law_is_near_zero_relative_to_a_shift():
    x, same = gaussians(20, 2000, dim=2), gaussians(21, 2000, dim=2)
    shifted = gaussians(22, 2000, dim=2) + torch.tensor([0.5, 0.0], dtype=torch.float64)
    null_value = energy_distance(x, same)
    shifted_value = energy_distance(x, shifted)
    assert shifted_value > 0.05
    assert abs(null_value) < 0.05 * shifted_value


def test_energy_input_errors():
    with pytest.raises(ValueError, match="same per-sample size"):
        energy_distance(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        energy_distance(torch.zeros(1, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="non-empty"):
        energy_distance(torch.zeros(0, 2), torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------------
# sliced Wasserstein


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_sliced_1d_shift_is_exact(p):
    x = gaussians(30, 500)
    shift = -0.7
    value = sliced_wasserstein(x, x[torch.randperm(500, generator=torch.Generator().manual_seed(0))] + shift, 8, p=p)
    assert value == pytest.approx(abs(shift), abs=1e-12)


def test_sliced_unequal_counts_pinned():
    # Quantile functions of {0, 1} and {0, 1/2, 1} differ by 1/2 on (1/3, 2/3) only:
    # W_1 = 1/3 * 1/2 = 1/6 and W_2 = sqrt(1/3 * 1/4) = sqrt(1/12).
    x = torch.tensor([1.0, 0.0])
    y = torch.tensor([0.5, 1.0, 0.0])
    assert sliced_wasserstein(x, y, 4, p=1) == pytest.approx(1 / 6, abs=1e-12)
    assert sliced_wasserstein(x, y, 4, p=2) == pytest.approx(math.sqrt(1 / 12), abs=1e-12)
    assert sliced_wasserstein(y, x, 4, p=2) == pytest.approx(math.sqrt(1 / 12), abs=1e-12)


def test_sliced_unequal_path_agrees_with_equal_path():
    # Repeating every sample leaves the empirical law unchanged, so the result must not move.
    x, y = gaussians(40, 50, dim=3), gaussians(41, 50, dim=3) * 2
    equal = sliced_wasserstein(x, y, 64, generator=torch.Generator().manual_seed(5))
    repeated = sliced_wasserstein(x.repeat(2, 1), y.repeat(3, 1), 64, generator=torch.Generator().manual_seed(5))
    assert repeated == pytest.approx(equal, rel=1e-10)
    assert sliced_wasserstein(x, x.repeat(3, 1), 16) == pytest.approx(0.0, abs=1e-12)


def test_sliced_shift_in_3d_matches_expectation():
    # For y = x + s each projection moves rigidly by theta . s, so SW_2^2 = E(theta . s)^2 = |s|^2 / D.
    x = gaussians(50, 200, dim=3)
    s = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64)  # |s| = 3
    value = sliced_wasserstein(x, x + s, 4096, generator=torch.Generator().manual_seed(1))
    # Relative standard error of the squared value ~ 1.5% with 4096 directions.
    assert value**2 == pytest.approx(9.0 / 3.0, rel=0.08)


def test_sliced_gaussians_match_closed_form():
    # Projections of N(mu, a^2 I) onto theta are N(theta . mu, a^2), and W_2 between 1-D
    # Gaussians is sqrt(dmu^2 + (a - b)^2): SW_2^2 = |mu|^2 / D + (a - b)^2.
    mu = torch.tensor([0.6, 0.0], dtype=torch.float64)
    x = gaussians(60, 5000, dim=2)
    y = 1.5 * gaussians(61, 5000, dim=2) + mu
    value = sliced_wasserstein(x, y, 512, generator=torch.Generator().manual_seed(2))
    # Sampling noise in the two spreads dominates: relative standard deviation ~4% (30 seeds).
    assert value**2 == pytest.approx(0.36 / 2 + 0.25, rel=0.2)


def test_sliced_is_deterministic_with_a_generator():
    x, y = gaussians(70, 100, dim=5), gaussians(71, 80, dim=5)
    first = sliced_wasserstein(x, y, 32, generator=torch.Generator().manual_seed(9))
    second = sliced_wasserstein(x, y, 32, generator=torch.Generator().manual_seed(9))
    assert first == second


def test_sliced_input_errors():
    with pytest.raises(ValueError, match="p must be >= 1"):
        sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 2), p=0.5)
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 2), num_projections=0)
    with pytest.raises(ValueError, match="same per-sample size"):
        sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 1, 2, 2))
