"""Distances between two sets of samples, for toy distributions and small image sets.

Energy distance and sliced Wasserstein compare whole distributions; precision / recall
(Kynkäänniemi et al.) tell sharpness from coverage. The distances take sample sets of any
dimension: (B,) is read as B scalars, and (B, D1, D2, ...) is flattened to (B, D), so images can
be compared directly. All arithmetic is float64 whatever the input dtype, and the work is chunked
so that sets of 10,000 samples each fit in memory.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray]

# Largest block of pairwise distances held at once (float64 entries: 32 MiB).
_MAX_BLOCK_ENTRIES = 1 << 22


def energy_distance(x: Tensor, y: Tensor, unbiased: bool = True, chunk_size: Optional[int] = None) -> float:
    """The (squared) energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two sample sets.

    ``|.|`` is the Euclidean norm in R^D. The population value is 0 exactly when the two laws
    are equal and positive otherwise.

    With ``unbiased=True`` (the default) each expectation is a U-statistic: ``E|X - Y|`` is the
    mean over all N * M cross pairs, ``E|X - X'|`` the mean over the N (N - 1) pairs with
    ``i != j`` (likewise for Y). The estimate is then unbiased, so two samples of the same law
    give values scattered around 0 (occasionally slightly negative). With ``unbiased=False`` the
    within-set means also average the zero diagonal (divide by N^2, M^2): the V-statistic,
    which is the exact energy distance between the two empirical measures, always >= 0, but
    biased upwards by about ``E|X - X'| / N + E|Y - Y'| / M``.

    Args:
        x: (N, ...) samples of the first law; N >= 2 when ``unbiased``.
        y: (M, ...) samples of the second law, with the same per-sample size as ``x``.
        unbiased: U-statistic (True) or V-statistic (False), as above.
        chunk_size: rows of each block of pairwise distances; by default chosen so a block holds
            about 4M entries. It changes memory use only, not the result beyond rounding.

    Returns:
        The estimate as a Python float.
    """
    x, y = _as_sample_matrices(x, y)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n, m = x.shape[0], y.shape[0]
    if unbiased and min(n, m) < 2:
        raise ValueError(f"the unbiased estimate needs at least 2 samples per set, got {n} and {m}")

    cross = _distance_sum(x, y, chunk_size, skip_diagonal=False) / (n * m)
    if unbiased:
        within_x = _distance_sum(x, x, chunk_size, skip_diagonal=True) / (n * (n - 1))
        within_y = _distance_sum(y, y, chunk_size, skip_diagonal=True) / (m * (m - 1))
    else:
        within_x = _distance_sum(x, x, chunk_size, skip_diagonal=True) / (n * n)
        within_y = _distance_sum(y, y, chunk_size, skip_diagonal=True) / (m * m)
    return float(2.0 * cross - within_x - within_y)


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    num_projections: int = 256,
    generator: Optional[torch.Generator] = None,
    p: float = 2.0,
) -> float:
    """Monte Carlo sliced p-Wasserstein distance between two sample sets.

    ``SW_p(X, Y) = (E_theta[ W_p^p(theta . X, theta . Y)])^(1/p)`` with ``theta`` uniform on the
    unit sphere of R^D; the expectation is a mean over ``num_projections`` random directions.
    Each 1-D distance is exact for the two empirical measures (uniform weights on the samples):
    it integrates ``|F_x^-1(q) - F_y^-1(q)|^p`` over q in (0, 1), where the quantile functions are
    the step functions of the sorted projections. With N == M this is
    ``mean_i |x_(i) - y_(i)|^p``; with N != M the integral runs over the merged breakpoints
    ``{i / N} U {j / M}``, on each piece of which both quantile functions are constant, so unequal
    sample counts are handled exactly too, without interpolation.

    For D = 1 every direction is +-1, so the result is the exact 1-D W_p; e.g. it is exactly
    ``|s|`` for ``y = x + s``.

    Args:
        x: (N, ...) samples of the first law.
        y: (M, ...) samples of the second law, with the same per-sample size as ``x``.
        num_projections: number of random directions, >= 1.
        generator: source of the directions (on ``x``'s device); seeded, it makes the result
            deterministic.
        p: the order, >= 1.

    Returns:
        The estimate as a Python float.
    """
    x, y = _as_sample_matrices(x, y)
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    if not p >= 1.0:
        raise ValueError(f"p must be >= 1, got {p}")
    dim = x.shape[1]
    directions = torch.randn(dim, num_projections, generator=generator, device=x.device, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)  # (D, P) unit columns
    costs = []
    # Blocks of directions keep the (N, P) projections within the memory budget.
    per_block = max(1, _MAX_BLOCK_ENTRIES // max(x.shape[0], y.shape[0]))
    for start in range(0, num_projections, per_block):
        block = directions[:, start : start + per_block]  # (D, P_b)
        x_sorted = torch.sort((x @ block).T, dim=1).values  # (P_b, N)
        y_sorted = torch.sort((y @ block).T, dim=1).values  # (P_b, M)
        costs.append(_sorted_wasserstein_power(x_sorted, y_sorted, p))  # (P_b,)
    return float(torch.cat(costs).mean() ** (1.0 / p))


def _as_sample_matrices(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Validate and reshape both sets to float64 (N, D) and (M, D) on ``x``'s device."""
    matrices = []
    for name, samples in (("x", x), ("y", y)):
        if not isinstance(samples, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(samples).__name__}")
        if samples.dim() == 0 or samples.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (B, ...) tensor, got shape {tuple(samples.shape)}")
        samples = samples.detach().to(device=x.device, dtype=torch.float64)
        matrices.append(samples.reshape(samples.shape[0], -1))
    if matrices[0].shape[1] != matrices[1].shape[1]:
        raise ValueError(
            f"x and y must have the same per-sample size, got {tuple(x.shape[1:])} and {tuple(y.shape[1:])}"
        )
    return matrices[0], matrices[1]


def _distance_sum(a: Tensor, b: Tensor, chunk_size: Optional[int], skip_diagonal: bool) -> Tensor:
    """Sum of ``|a_i - b_j|`` over all pairs, leaving out ``i == j`` when ``skip_diagonal``. -> ()"""
    rows = chunk_size or max(1, _MAX_BLOCK_ENTRIES // b.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], rows):
        block = torch.cdist(a[start : start + rows], b)  # (rows, M)
        if skip_diagonal:
            # The matrix-product form of cdist leaves tiny nonzeros where a point meets itself.
            index = torch.arange(block.shape[0], device=a.device)
            block[index, start + index] = 0.0
        total = total + block.sum()
    return total


def _sorted_wasserstein_power(x_sorted: Tensor, y_sorted: Tensor, p: float) -> Tensor:
    """``W_p^p`` between the empirical laws of each row pair. (P, N), (P, M) sorted -> (P,)"""
    n, m = x_sorted.shape[1], y_sorted.shape[1]
    if n == m:
        return (x_sorted - y_sorted).abs().pow(p).mean(dim=1)
    device = x_sorted.device
    # Breakpoints of both quantile functions; on each piece between them both are constant.
    levels = torch.cat(
        [
            torch.zeros(1, dtype=torch.float64, device=device),
            torch.arange(1, n + 1, dtype=torch.float64, device=device) / n,
            torch.arange(1, m + 1, dtype=torch.float64, device=device) / m,
        ]
    )
    levels = torch.unique(levels)  # sorted; near-duplicates leave pieces of ~zero width
    widths = levels[1:] - levels[:-1]  # (K,)
    middles = 0.5 * (levels[1:] + levels[:-1])  # midpoints stay clear of rounding at breakpoints
    x_index = torch.clamp((middles * n).long(), max=n - 1)  # (K,) which order statistic of x
    y_index = torch.clamp((middles * m).long(), max=m - 1)
    gaps = (x_sorted[:, x_index] - y_sorted[:, y_index]).abs().pow(p)  # (P, K)
    return gaps @ widths


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3,
                     chunk_size: int = 1000) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated vs real features.

    Each set's manifold is the union of balls around its points, a point's radius being the
    distance to its k-th nearest neighbour within the set (itself excluded). Precision is the
    fraction of generated points inside the real manifold; recall the fraction of real points
    inside the generated one. Distances are computed in float64, ``chunk_size`` rows at a time.

    Args:
        real_features: (N, D), N > k.
        fake_features: (M, D), M > k.

    Returns:
        ``{"precision": ..., "recall": ...}``.
    """
    real = torch.as_tensor(real_features).detach().to(torch.float64)
    fake = torch.as_tensor(fake_features).detach().to(device=real.device, dtype=torch.float64)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(real.shape[0], fake.shape[0]) <= k or k < 1:
        raise ValueError(f"need 1 <= k < number of samples in each set, got k={k}")
    real_radii = _neighbour_radii(real, k, chunk_size)
    fake_radii = _neighbour_radii(fake, k, chunk_size)
    return {
        "precision": _fraction_inside(fake, real, real_radii, chunk_size),
        "recall": _fraction_inside(real, fake, fake_radii, chunk_size),
    }


def _neighbour_radii(points: Tensor, k: int, chunk_size: int) -> Tensor:
    """Distance from each point to its k-th nearest other point. (N, D) -> (N,)"""
    radii = []
    for start in range(0, points.shape[0], chunk_size):
        distances = torch.cdist(points[start:start + chunk_size], points)  # (C, N), self at ~0
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # k + 1: the first is the point itself
    return torch.cat(radii)


def _fraction_inside(points: Tensor, centres: Tensor, radii: Tensor, chunk_size: int) -> float:
    """Fraction of ``points`` within ``radii[j]`` of some ``centres[j]``."""
    inside = 0
    for start in range(0, points.shape[0], chunk_size):
        distances = torch.cdist(points[start:start + chunk_size], centres)  # (C, N)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / points.shape[0]
