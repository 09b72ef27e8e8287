"""The feature networks that scores are computed in: which one (:class:`Metric`), what evaluation
asks of it (:class:`FeatureExtractor`), and building it (:func:`build_feature_extractor`).

- ``inception``: TF-FID Inception-v3 features (:mod:`meanflow.eval.inception`) and the Inception
  Score. Comparable with published numbers when the reference statistics are the published ones
  (e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``).
- ``domain``: the features of a classifier trained by this project on the data set
  (:mod:`meanflow.eval.classifier`), plus the class accuracy of class-conditional samples.
  **Not comparable with Inception FID**, only with runs scored by the same classifier.
"""

from __future__ import annotations

import enum
from typing import Optional, Protocol, Union

import torch
from torch import Tensor

from ..validation import PathLike

# The Inception network's forward pass holds far more activations per image than the classifier's.
INCEPTION_MAX_BATCH = 100
CLASSIFIER_NEEDED = ("metric 'domain' needs a trained classifier: give classifier_path (--classifier PATH); "
                     "train one with meanflow.eval.classifier or `meanflow eval --train-classifier`")


class Metric(str, enum.Enum):
    """Which features the Fréchet distance uses."""

    INCEPTION = "inception"
    DOMAIN = "domain"


class FeatureExtractor(Protocol):
    """What evaluation needs from a feature network (Inception, domain classifier).

    ``name`` identifies the network *and its weights* (cache keys and reports carry it);
    ``features_and_logits`` maps uint8 images (B, C, H, W) to features (B, dim) and logits
    (B, num_logits).
    """

    name: str
    dim: int
    num_logits: int

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


def require_classifier(classifier_path: Optional[PathLike]) -> None:
    """Refuse the domain metric without a classifier to compute it with."""
    if classifier_path is None:
        raise ValueError(CLASSIFIER_NEEDED)


def build_feature_extractor(
    metric: Union[Metric, str],
    inception_weights: Optional[PathLike] = None,
    classifier_path: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 250,
) -> FeatureExtractor:
    """The Inception network or the domain classifier, ready to featurise uint8 images."""
    from ..validation import parse_enum

    metric = parse_enum(Metric, metric, "metric")
    if metric is Metric.INCEPTION:
        from .inception import InceptionFeatureExtractor

        return InceptionFeatureExtractor(inception_weights, device, batch_size=min(batch_size, INCEPTION_MAX_BATCH))
    require_classifier(classifier_path)
    from .classifier import DomainFeatureExtractor, load_classifier

    return DomainFeatureExtractor(load_classifier(classifier_path, device), batch_size=batch_size)


__all__ = ["CLASSIFIER_NEEDED", "FeatureExtractor", "Metric", "build_feature_extractor", "require_classifier"]
