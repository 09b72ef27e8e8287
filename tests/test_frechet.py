"""The Fréchet distance against closed forms, and streaming statistics against one batch."""

import numpy as np
import pytest
import torch

from meanflow.eval.frechet import (
    FeatureStatistics,
    frechet_distance,
    load_statistics,
    load_statistics_with_info,
    save_statistics,
)


def random_covariance(rng, dim, rank=None):
    factor = rng.standard_normal((dim, rank or dim))
    return factor @ factor.T / (rank or dim) + (0.0 if rank else 0.1 * np.eye(dim))


def psd_sqrt(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def fid_by_eigendecomposition(mu1, s1, mu2, s2):
    """tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the symmetric form, by eigh only."""
    root1 = psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_root)


def test_diagonal_covariances_match_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_one_dimension_is_the_squared_gap_of_means_plus_of_standard_deviations():
    # W2^2 between N(1, 4) and N(-2, 9): (1 + 2)^2 + (2 - 3)^2 = 10.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(10.0, rel=1e-12)


def test_full_covariances_match_an_independent_eigendecomposition():
    rng = np.random.default_rng(1)
    dim = 12
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = random_covariance(rng, dim), random_covariance(rng, dim)
    expected = fid_by_eigendecomposition(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_singular_covariances_stay_accurate():
    # Rank 3 in 10 dimensions: the product is singular.
    rng = np.random.default_rng(2)
    dim = 10
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = random_covariance(rng, dim, rank=3), random_covariance(rng, dim, rank=3)
    expected = fid_by_eigendecomposition(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)


def test_a_failed_square_root_is_retried_with_the_offset(monkeypatch):
    import scipy.linalg

    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def failing_first(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_first)
    rng = np.random.default_rng(9)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = random_covariance(rng, 6), random_covariance(rng, 6)
    value = frechet_distance(mu1, s1, mu2, s2, offset=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(6)) @ (s2 + 1e-6 * np.eye(6)))
    assert value == pytest.approx(fid_by_eigendecomposition(mu1, s1, mu2, s2), abs=1e-4)


def test_a_set_against_itself_scores_zero_and_a_shift_scores_its_square():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    mu, sigma = FeatureStatistics(16).update(features).mean_and_covariance()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    shifted = FeatureStatistics(16).update(features + 0.5).mean_and_covariance()
    assert frechet_distance(mu, sigma, *shifted) == pytest.approx(16 * 0.25, rel=1e-8)


def test_statistics_match_numpy():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((300, 7)) * 3 + 10
    stats = FeatureStatistics(7).update(torch.as_tensor(features, dtype=torch.float32))
    reference = features.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.mean(), reference.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(reference, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.count == 300


def test_streaming_in_chunks_equals_one_batch():
    rng = np.random.default_rng(5)
    features = rng.standard_normal((257, 9))
    whole = FeatureStatistics(9).update(features)
    streamed = FeatureStatistics(9)
    for start in range(0, 257, 7):
        streamed.update(features[start:start + 7])
    assert streamed.count == whole.count
    np.testing.assert_allclose(streamed.mean(), whole.mean(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(streamed.covariance(), whole.covariance(), rtol=1e-12, atol=1e-14)


def test_merge_equals_concatenation():
    rng = np.random.default_rng(6)
    a, b, c = rng.standard_normal((50, 4)), rng.standard_normal((3, 4)) + 2, rng.standard_normal((20, 4))
    merged = FeatureStatistics(4).update(a).merge(FeatureStatistics(4).update(b)).merge(FeatureStatistics(4).update(c))
    whole = FeatureStatistics(4).update(np.concatenate([a, b, c]))
    assert merged.count == 73
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-13)
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-12, atol=1e-14)


def test_all_reduce_without_distributed_is_a_no_op():
    stats = FeatureStatistics(3).update(np.eye(3))
    before = stats.covariance()
    np.testing.assert_array_equal(stats.all_reduce().covariance(), before)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        FeatureStatistics(3).update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStatistics(2).update(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics(2).update(np.zeros((1, 2))).covariance()
    with pytest.raises(ValueError, match="expected mu"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_a_large_imaginary_part_raises():
    # Not covariances: the product has negative eigenvalues, so its square root is truly complex.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_save_and_load_round_trip_in_adm_format(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.standard_normal(6), random_covariance(rng, 6)
    path = save_statistics(tmp_path / "stats.npz", mu, sigma, info={"data": "mnist", "split": "test"})
    with np.load(path) as raw:
        assert {"mu", "sigma"} <= set(raw.files)
    loaded_mu, loaded_sigma, info = load_statistics_with_info(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    assert info == {"data": "mnist", "split": "test"}


def test_an_adm_reference_batch_with_images_loads_its_statistics(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma = rng.standard_normal(4), random_covariance(rng, 4)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(2), sigma_s=np.eye(2))
    loaded_mu, loaded_sigma = load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="not the statistics"):
        load_statistics(tmp_path / "images_only.npz")
