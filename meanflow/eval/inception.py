"""Inception-v3 features for FID and IS with the standard TF-FID weights, and IS / precision-recall.

The numbers papers report (FID-50K, IS) come from one specific network: the Inception-v3 graph
of 2015-12-05 that TensorFlow's FID code uses, converted to PyTorch. Any other Inception (e.g.
an ImageNet-trained torchvision model) gives different, incomparable scores. We therefore take
the network, its TensorFlow-compatible bilinear resize to 299 x 299 and its input scaling from
``torch-fidelity`` instead of re-implementing them.

Why torch-fidelity and not pytorch-fid: both ship these weights, but pytorch-fid builds its
network out of torchvision's Inception blocks, so it cannot run without torchvision, and
torchvision pins one torch version (installing it can replace torch). torch-fidelity defines
the whole network in one module, ``torch_fidelity.feature_extractor_inceptionv3``, that imports
only torch. Its package ``__init__`` imports torchvision-based extractors too, so we import that
module alone (see :func:`inception_module`) and never need torchvision. Install it with

    pip install --no-deps torch-fidelity

(``--no-deps`` keeps pip from pulling torchvision and with it another torch).

Weights: torch-fidelity downloads ``weights-inception-2015-12-05-6726825d.pth`` into torch
hub's cache (``$TORCH_HOME/hub/checkpoints``) on first use. Offline, copy the file there or pass
its path (``weights_path=`` here, ``--inception-weights`` on the command line).

:func:`inception_score` is a pure function of logits; :func:`precision_recall` (from
:mod:`meanflow.eval.distances`) of features.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Union
from urllib.parse import urlparse

import torch
from torch import Tensor

from ..fingerprints import state_fingerprint
from ..pixels import to_uint8
from .distances import ArrayLike, precision_recall  # noqa: F401  (precision_recall re-exported)

INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_LOGITS = 1008  # the TF graph's 1000 ImageNet classes plus 8 unused ones
# The file torch-fidelity downloads; pytorch-fid's copy of the same weights is named
# pt_inception-2015-12-05-6726825d.pth.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_LIBRARY_MODULE = "torch_fidelity.feature_extractor_inceptionv3"
# torch-fidelity's feature names: pool features, and logits without the bias (what IS uses).
_FEATURES, _LOGITS = "2048", "logits_unbiased"


class InceptionWeightsUnavailable(FileNotFoundError):
    """The TF-FID Inception weights could neither be found locally nor downloaded."""


def inception_module() -> ModuleType:
    """torch-fidelity's Inception-v3 module, imported without the package's torchvision users.

    When ``torch_fidelity`` is already imported (torchvision present) the module is imported
    normally. Otherwise the package is registered without running its ``__init__`` while the
    module and its three small helpers load, then unregistered again, so a later
    ``import torch_fidelity`` behaves as it would have.
    """
    if "torch_fidelity" in sys.modules:
        return importlib.import_module(_LIBRARY_MODULE)
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "Inception FID needs torch-fidelity (the standard TF-FID Inception-v3 in PyTorch): "
            "pip install --no-deps torch-fidelity   (--no-deps: it must not pull torchvision)"
        )
    package = importlib.util.module_from_spec(spec)  # created, not executed
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module(_LIBRARY_MODULE)
    finally:
        if sys.modules.get("torch_fidelity") is package:
            del sys.modules["torch_fidelity"]


def images_to_uint8_rgb(images: ArrayLike) -> Tensor:
    """Bring images to what the TF-FID network takes: (B, 3, H, W) uint8.

    Args:
        images: (B, C, H, W) or (B, H, W) with C in {1, 3}; uint8 in 0..255, or floating point
            in [-1, 1] (the model's range), mapped by :func:`meanflow.pixels.to_uint8` (what saving the
            image as a PNG would store). Grey images are repeated to 3 channels.
    """
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) or (B, H, W) with C in {{1, 3}}, got {tuple(images.shape)}")
    if images.dtype.is_floating_point:
        if bool(torch.isnan(images).any()):
            raise ValueError("images contain NaN")
        images = to_uint8(images)
    elif images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255) or floating point in [-1, 1], got {images.dtype}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


class InceptionFeatureExtractor:
    """2048-d pool features (and 1008 IS logits) of the TF-FID Inception-v3, via torch-fidelity.

    Images of any size are resized to 299 x 299 by the library (TensorFlow-1.x-compatible
    bilinear) and scaled to [-1, 1] as in the TF graph; see :func:`images_to_uint8_rgb` for the
    accepted inputs. The network runs in float32, ``batch_size`` images at a time.

    Args:
        weights_path: a local copy of the weights (``weights-inception-2015-12-05-6726825d.pth``);
            None lets torch-fidelity find it in torch hub's cache or download it.
        device: where the network runs.
        batch_size: images per forward pass (memory only; features do not depend on it).

    Raises:
        ImportError: torch-fidelity is not installed.
        InceptionWeightsUnavailable: no weights file and the download failed (offline).
        ValueError: the file at ``weights_path`` is not a state dict of this network.
    """

    dim = INCEPTION_FEATURE_DIM
    num_logits = INCEPTION_NUM_LOGITS

    def __init__(self, weights_path: Optional[Union[str, Path]] = None,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        module = inception_module()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.weights_path = None if weights_path is None else Path(weights_path)
        network_class = module.FeatureExtractorInceptionV3
        if self.weights_path is None:
            try:
                network = network_class("inception-v3-compat", [_FEATURES, _LOGITS])
            except OSError as error:  # URLError, socket and HTTP errors are all OSErrors
                raise InceptionWeightsUnavailable(_offline_message(module, error)) from error
        else:
            _check_weights_file(self.weights_path)
            try:
                network = network_class("inception-v3-compat", [_FEATURES, _LOGITS],
                                        feature_extractor_weights_path=str(self.weights_path))
            except RuntimeError as error:  # load_state_dict: missing / unexpected keys, shapes
                raise ValueError(f"{self.weights_path} does not hold the TF-FID Inception-v3 weights that "
                                 f"torch-fidelity expects ({INCEPTION_WEIGHTS_FILE}): {error}") from error
        self.network = network.to(self.device).eval()
        self._fingerprint: Optional[str] = None

    @property
    def name(self) -> str:
        """Identifies the network and its weights (cache keys of reference statistics use it)."""
        return f"inception-v3-tf2015-{self.fingerprint[:12]}"

    @property
    def fingerprint(self) -> str:
        """sha256 of the loaded weights (in parameter order), whichever file they came from."""
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.network.state_dict())
        return self._fingerprint

    @torch.no_grad()
    def features_and_logits(self, images: ArrayLike) -> tuple[Tensor, Tensor]:
        """(B, 2048) pool features and (B, 1008) logits (no bias, as the IS code uses), float32 on the
        extractor's device."""
        images = images_to_uint8_rgb(images)
        features, logits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start:start + self.batch_size].to(self.device)
            pooled, unbiased = self.network(batch)
            features.append(pooled)
            logits.append(unbiased)
        return torch.cat(features), torch.cat(logits)

    def __call__(self, images: ArrayLike) -> Tensor:
        """(B, 2048) pool features, float32."""
        return self.features_and_logits(images)[0]


def _check_weights_file(path: Path) -> None:
    """The file exists and unpickles with ``weights_only=True`` (tensors, no code) before the
    library loads it with an unrestricted ``torch.load``."""
    if not path.is_file():
        raise InceptionWeightsUnavailable(f"no Inception weights file at {path} (expected a copy of "
                                          f"{INCEPTION_WEIGHTS_FILE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means: not a plain state dict
        raise ValueError(f"{path} is not a plain state dict of tensors: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")


def _offline_message(module: ModuleType, error: Exception) -> str:
    url = getattr(module, "URL_INCEPTION_V3", "")
    file_name = Path(urlparse(url).path).name or INCEPTION_WEIGHTS_FILE
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"could not get the TF-FID Inception-v3 weights '{file_name}': torch-fidelity looks for it in {cache} "
        f"and otherwise downloads it from {url or 'its release page'}, which failed ({error}). "
        f"Offline, copy {file_name} into {cache}, or point at a local copy with --inception-weights PATH "
        "(Python: InceptionFeatureExtractor(weights_path=PATH))."
    )


class InceptionScoreStatistics:
    """Streams the Inception Score: per split, the sum of p(y|x) and of sum_y p log p.

    Split ``s`` holds the samples with global index in ``[s N / S, (s + 1) N / S)`` (integer
    division, the split rule of the original IS code), so batches may arrive in any order and
    from several processes (``all_reduce``). With ``p_y`` the mean of p(y|x) over a split of
    ``n`` samples, its KL term is ``(1/n) sum_x sum_y p log p - sum_y p_y log p_y``.

    Args:
        num_samples: N, the total over all processes.
        num_classes: K.
        splits: S.
    """

    def __init__(self, num_samples: int, num_classes: int, splits: int = 10,
                 device: Union[str, torch.device] = "cpu"):
        if splits < 1 or num_samples < splits:
            raise ValueError(f"need 1 <= splits <= num_samples, got splits={splits}, num_samples={num_samples}")
        self.num_samples, self.num_classes, self.splits = num_samples, num_classes, splits
        self.boundaries = torch.tensor([s * num_samples // splits for s in range(splits + 1)], device=device)
        self.probability_sums = torch.zeros(splits, num_classes, dtype=torch.float64, device=device)  # (S, K)
        self.negative_entropy_sums = torch.zeros(splits, dtype=torch.float64, device=device)  # (S,)
        self.counts = torch.zeros(splits, dtype=torch.float64, device=device)  # (S,)

    def update(self, logits: ArrayLike, indices: ArrayLike) -> "InceptionScoreStatistics":
        """Add logits (B, K) of the samples with global indices (B,). Returns ``self``."""
        device = self.counts.device
        logits = torch.as_tensor(logits).to(device=device, dtype=torch.float64)
        indices = torch.as_tensor(indices).to(device=device, dtype=torch.long)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or indices.shape != (logits.shape[0],):
            raise ValueError(f"expected logits (B, {self.num_classes}) and indices (B,), got "
                             f"{tuple(logits.shape)} and {tuple(indices.shape)}")
        if bool(((indices < 0) | (indices >= self.num_samples)).any()):
            raise ValueError(f"sample indices must lie in [0, {self.num_samples})")
        log_p = torch.log_softmax(logits, dim=1)  # (B, K)
        p = log_p.exp()
        split = torch.searchsorted(self.boundaries, indices, right=True) - 1  # (B,)
        self.probability_sums.index_add_(0, split, p)
        self.negative_entropy_sums.index_add_(0, split, torch.xlogy(p, p).sum(dim=1))
        self.counts.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        return self

    def all_reduce(self, group=None) -> "InceptionScoreStatistics":
        """Sum over the processes of ``torch.distributed`` (no-op when it is not initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for tensor in (self.probability_sums, self.negative_entropy_sums, self.counts):
                dist.all_reduce(tensor, group=group)
        return self

    def score(self) -> tuple[float, float]:
        """(mean, standard deviation) over the splits of ``exp(KL(p(y|x) || p(y)))``."""
        if bool((self.counts < 1).any()):
            raise ValueError("some splits received no samples")
        p_y = self.probability_sums / self.counts[:, None]  # (S, K)
        kl = self.negative_entropy_sums / self.counts - torch.xlogy(p_y, p_y).sum(dim=1)  # (S,)
        scores = kl.exp().cpu().numpy()
        return float(scores.mean()), float(scores.std())


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """The Inception Score of logits (N, K): mean and std over ``splits`` of ``exp(E_x KL(p(y|x) || p(y)))``.

    It is 1 when every prediction is the same distribution and K when predictions are
    confident one-hots spread evenly over the K classes within each split.
    """
    logits = torch.as_tensor(logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got {tuple(logits.shape)}")
    statistics = InceptionScoreStatistics(logits.shape[0], logits.shape[1], splits)
    return statistics.update(logits, torch.arange(logits.shape[0])).score()


__all__ = [
    "INCEPTION_FEATURE_DIM",
    "INCEPTION_NUM_LOGITS",
    "INCEPTION_WEIGHTS_FILE",
    "InceptionFeatureExtractor",
    "InceptionScoreStatistics",
    "InceptionWeightsUnavailable",
    "images_to_uint8_rgb",
    "inception_module",
    "inception_score",
    "precision_recall",
]
