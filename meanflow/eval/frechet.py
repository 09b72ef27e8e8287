"""The Fréchet distance between Gaussians fitted to feature sets, with streaming statistics.

FID (Heusel et al. 2017) fits a Gaussian to the features of real and of generated images and
reports the Fréchet (2-Wasserstein) distance between the two Gaussians::

    d^2 = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

:class:`FeatureStatistics` accumulates what the Gaussian needs batch by batch (a count, the sum
and the sum of outer products, all float64), so no feature set, let alone the images behind it,
is ever held in memory whole. Two accumulators merge by adding their sums, which is how the
statistics of several processes combine (:meth:`FeatureStatistics.all_reduce`).

Statistics files use the format of the ADM evaluation suite: an ``.npz`` with ``mu`` (D,) and
``sigma`` (D, D). ADM's reference batches hold the images (``arr_0``) and further statistics
too; :func:`load_statistics` reads ``mu`` / ``sigma`` from such a file and ignores the rest.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..io import write_bytes_atomic

ArrayLike = Union[Tensor, np.ndarray]

# Offset added to both covariance diagonals when (S_1 S_2)^(1/2) is not accurate (singular or
# near-singular products, e.g. fewer samples than feature dimensions). The usual value of FID code.
SQRTM_OFFSET = 1e-6
# A square root whose relative residual ||X X - A|| / ||A|| exceeds this is retried with the offset.
_SQRTM_TOLERANCE = 1e-5
# Imaginary parts of the square root's diagonal below this are rounding noise and are dropped.
_IMAGINARY_TOLERANCE = 1e-3


class FeatureStatistics:
    """Count, sum and sum of outer products of D-dimensional features, in float64.

    ``update`` adds a batch; ``merge`` adds another accumulator (a disjoint set of features);
    ``all_reduce`` sums the accumulators of all processes. The result does not depend on how the
    features were split into batches or processes, beyond float64 rounding.

    Args:
        dim: D, the feature dimension.
        device: where the sums live (the device of the features, so updates avoid copies; a
            CUDA device also lets NCCL reduce them).
    """

    def __init__(self, dim: int, device: Union[str, torch.device] = "cpu"):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)  # (D,)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (D, D)

    @property
    def device(self) -> torch.device:
        return self.sum.device

    def update(self, features: ArrayLike) -> "FeatureStatistics":
        """Add a batch of features (B, D). Returns ``self``."""
        features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}), got {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or infinity")
        x = features.detach().to(device=self.device, dtype=torch.float64)  # (B, D)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Add the statistics of another (disjoint) feature set. Returns ``self``."""
        if not isinstance(other, FeatureStatistics) or other.dim != self.dim:
            raise ValueError(f"can only merge FeatureStatistics of dimension {self.dim}")
        self.count += other.count
        self.sum += other.sum.to(self.device)
        self.sum_outer += other.sum_outer.to(self.device)
        return self

    def all_reduce(self, group: Optional[Any] = None) -> "FeatureStatistics":
        """Sum the statistics of every process of ``torch.distributed`` (no-op when it is not
        initialised). Each process must hold a disjoint share. Returns ``self``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        # One reduction of one packed buffer: the count rides along in float64 (exact below 2^53).
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=self.device),
                            self.sum, self.sum_outer.reshape(-1)])
        dist.all_reduce(packed, group=group)
        self.count = int(round(float(packed[0])))
        self.sum = packed[1:1 + self.dim].clone()
        self.sum_outer = packed[1 + self.dim:].reshape(self.dim, self.dim).clone()
        return self

    def mean(self) -> np.ndarray:
        """mu (D,) float64."""
        if self.count < 1:
            raise ValueError("no features were added")
        return (self.sum / self.count).cpu().numpy()

    def covariance(self) -> np.ndarray:
        """The unbiased sample covariance (D, D) float64 (divides by N - 1, as ``np.cov``)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {self.count}")
        mean = self.sum / self.count
        sigma = (self.sum_outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return sigma.cpu().numpy()

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)), both float64."""
        return self.mean(), self.covariance()


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     offset: float = SQRTM_OFFSET) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``, the square root
    by ``scipy.linalg.sqrtm``. When the product is singular or nearly so the square root is
    inaccurate; it is then recomputed from ``(sigma1 + eps I)(sigma2 + eps I)`` with
    ``eps = offset``, as FID implementations do. The square root of a product of two symmetric
    positive semi-definite matrices has a real spectrum, so an imaginary part is rounding noise:
    it is dropped when small and raises a ValueError when large (a sign of broken statistics).

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
        offset: eps of the fallback.

    Returns:
        The distance as a Python float (this *squared* distance is what is reported as FID).
    """
    from scipy import linalg

    mu1, mu2 = _as_float64(mu1), _as_float64(mu2)
    sigma1, sigma2 = _as_float64(sigma1), _as_float64(sigma2)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"expected mu (D,) and sigma (D, D) for both sets, got {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinity")

    def square_root(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns about singular input; we check the result instead
            root = linalg.sqrtm(matrix)
        if not np.isfinite(root).all():
            return root, False
        residual = np.linalg.norm(root @ root - matrix) / max(np.linalg.norm(matrix), 1e-300)
        return root, bool(residual <= _SQRTM_TOLERANCE)

    product = sigma1 @ sigma2
    root, accurate = square_root(product)
    if not accurate:
        shift = offset * np.eye(dim)
        root, accurate = square_root((sigma1 + shift) @ (sigma2 + shift))
        if not np.isfinite(root).all():
            raise ValueError("the matrix square root of the covariance product is not finite, even with the offset")
    if np.iscomplexobj(root):
        largest = float(np.max(np.abs(np.diagonal(root).imag)))
        if largest > _IMAGINARY_TOLERANCE:
            raise ValueError(f"the matrix square root has a large imaginary component ({largest:.3g}); "
                             "the covariances are not valid (too few samples or corrupt statistics?)")
        root = root.real
    difference = mu1 - mu2
    value = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root)
    return float(value)


def save_statistics(path: Union[str, Path], mu: ArrayLike, sigma: ArrayLike,
                    info: Optional[dict[str, Any]] = None) -> Path:
    """Write ``mu`` (D,) and ``sigma`` (D, D) as an ``.npz`` in ADM's format (written atomically).

    ``info`` (JSON-able) is stored as a JSON string under the extra key ``info``: where the
    statistics came from. Readers of the ADM format ignore it.
    """
    mu, sigma = _as_float64(mu), _as_float64(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    arrays = {"mu": mu, "sigma": sigma}
    if info is not None:
        arrays["info"] = np.array(json.dumps(info, sort_keys=True))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomic(Path(path), buffer.getvalue())


def load_statistics(path: Union[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu (D,), sigma (D, D))`` float64 from an ``.npz`` (ours, or an ADM reference batch)."""
    mu, sigma, _ = load_statistics_with_info(path)
    return mu, sigma


def load_statistics_with_info(path: Union[str, Path]) -> tuple[np.ndarray, np.ndarray, Optional[dict[str, Any]]]:
    """:func:`load_statistics` plus the ``info`` record when the file has one (else None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no statistics file at {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as error:  # numpy's message for a non-numpy file advises unpickling it: not relayed
        reason = "no numpy arrays; pickled data is never loaded" if "pickle" in str(error) else error
        raise ValueError(f"{path} is not an .npz of statistics ({reason})") from None
    with archive as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path} holds {sorted(data.files)}, not the statistics 'mu' and 'sigma' "
                             "(an .npz of images only must be turned into statistics first)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        info = json.loads(str(data["info"])) if "info" in data.files else None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    return mu, sigma, info


def _as_float64(value: ArrayLike) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


__all__ = ["FeatureStatistics", "frechet_distance", "load_statistics", "load_statistics_with_info",
           "save_statistics", "SQRTM_OFFSET"]
