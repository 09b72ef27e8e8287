"""An offline domain metric for small grey images: a CNN the project trains itself.

    *** A "domain FID" computed with these features is NOT comparable with Inception FID, ***
    *** with published numbers, or with domain FIDs from another classifier.              ***

Inception FID needs weights that cannot always be downloaded, and its ImageNet features say
little about 28 x 28 digits. For MNIST-sized data we instead train a small classifier on the
data set itself (a few hundred Adam steps on a CPU) and use

- its 128-d penultimate layer as the feature space of a Fréchet distance (:func:`domain_fid`):
  the "domain FID", useful to compare runs, checkpoints, step counts and EMA rates evaluated
  with the *same* classifier file (the file's weights fingerprint is part of every cache key
  and report), and
- its predictions to check class-conditional samples (:func:`classifier_accuracy`): the
  fraction of samples classified as the class they were generated for.

Images are (N, 1, H, W) in [-1, 1] (or uint8 0..255); other sizes are resized to the
classifier's 28 x 28 (bilinear, antialiased when shrinking). A classifier is saved as a folder
with ``classifier.safetensors`` (weights) and ``classifier.json`` (its constructor arguments
and how it was trained), so loading runs no pickled code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fingerprints import state_fingerprint
from ..io import write_text_atomic
from .frechet import FeatureStatistics, frechet_distance

ArrayLike = Union[Tensor, np.ndarray]

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
_FORMAT = "meanflow-domain-classifier"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """The classifier's shape. ``width`` channels in the first block, twice that in the second."""

    in_channels: int = 1
    num_classes: int = 10
    input_size: int = 28
    width: int = 32
    feature_dim: int = 128

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ClassifierConfig.{field.name} must be a positive integer, got {value!r}")
        if self.input_size % 4:
            raise ValueError(f"ClassifierConfig.input_size must be a multiple of 4 (two 2x poolings), "
                             f"got {self.input_size}")
        if self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes must be >= 2, got {self.num_classes}")


class DomainClassifier(nn.Module):
    """Two conv blocks and a ``feature_dim`` penultimate layer.

    ``[conv3x3, ReLU, maxpool2] x 2 -> linear(feature_dim) -> ReLU -> linear(classes)``, about 0.4M
    parameters and 4M multiply-adds per 28 x 28 image: cheap enough to train on a CPU in seconds.
    The features are the penultimate layer *before* its ReLU: without the ReLU's exact zeros
    they are closer to the Gaussian the Fréchet distance assumes, and of full rank.
    """

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        c, w = config.in_channels, config.width
        self.blocks = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, w, S/2, S/2)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, S/4, S/4)
        )
        side = config.input_size // 4
        self.penultimate = nn.Linear(2 * w * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def prepare(self, images: ArrayLike) -> Tensor:
        """Images in any accepted form -> (B, C, S, S) float32 in [-1, 1] on the model's device.

        Accepts (B, C, H, W) or (B, H, W), uint8 0..255 or floating point in [-1, 1].
        """
        images = torch.as_tensor(images)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W) or (B, H, W), "
                             f"got {tuple(images.shape)}")
        device = self.head.weight.device
        if images.dtype == torch.uint8:
            images = images.to(device=device, dtype=torch.float32) / 127.5 - 1.0
        elif images.dtype.is_floating_point:
            images = images.to(device=device, dtype=torch.float32).clamp(-1.0, 1.0)
        else:
            raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
        size = self.config.input_size
        if images.shape[-2:] != (size, size):
            shrinking = images.shape[-1] > size or images.shape[-2] > size
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=shrinking).clamp(-1.0, 1.0)
        return images

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, S, S) prepared images -> features (B, feature_dim), logits (B, classes)."""
        h = self.blocks(x).flatten(1)  # (B, 2w * S/4 * S/4)
        features = self.penultimate(h)  # (B, feature_dim), before the ReLU
        return features, self.head(F.relu(features))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, S, S) prepared images -> logits (B, classes)."""
        return self.features_and_logits(x)[1]


def train_domain_classifier(
    images: ArrayLike,
    labels: ArrayLike,
    steps: int = 500,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    config: Optional[ClassifierConfig] = None,
    device: Union[str, torch.device] = "cpu",
) -> DomainClassifier:
    """Train a :class:`DomainClassifier` with Adam and cross-entropy; returns it in eval mode.

    The learning rate decays along a cosine to zero over ``steps``. Batches are drawn from
    shuffled epochs seeded by ``seed``, which also seeds the initial weights, so the result is
    deterministic on a given machine. 500 steps of 128 reach about 98-99% on the MNIST test set.

    Args:
        images: (N, C, H, W) or (N, H, W), uint8 or float in [-1, 1]; resized to the input size.
        labels: (N,) integer classes in [0, num_classes).
        config: the architecture; by default one channel, ``max(labels) + 1`` classes.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    images = torch.as_tensor(images)
    if images.shape[0] != labels.shape[0] or labels.dim() != 1:
        raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if config is None:
        channels = 1 if images.dim() == 3 else images.shape[1]
        config = ClassifierConfig(in_channels=channels, num_classes=max(int(labels.max()) + 1, 2))
    if int(labels.min()) < 0 or int(labels.max()) >= config.num_classes:
        raise ValueError(f"labels must lie in [0, {config.num_classes})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainClassifier(config).to(device)
    data = torch.cat([model.prepare(images[start:start + 4096]) for start in range(0, len(images), 4096)])
    labels = labels.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(data), generator=generator), 0
    model.train()
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(data), generator=generator), 0
        rows = order[position:position + batch_size].to(device)
        position += batch_size
        loss = F.cross_entropy(model(data[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def domain_features_and_logits(model: DomainClassifier, images: ArrayLike,
                               batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """(N, feature_dim) features and (N, classes) logits, float32 on the model's device."""
    model.eval()
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        batch_features, batch_logits = model.features_and_logits(model.prepare(images[start:start + batch_size]))
        features.append(batch_features)
        logits.append(batch_logits)
    return torch.cat(features), torch.cat(logits)


def domain_features(model: DomainClassifier, images: ArrayLike, batch_size: int = 500) -> Tensor:
    """The classifier's penultimate features (N, feature_dim), float32 on the model's device."""
    return domain_features_and_logits(model, images, batch_size)[0]


def domain_fid(model: DomainClassifier, images_a: ArrayLike, images_b: ArrayLike, batch_size: int = 500) -> float:
    """Fréchet distance between two image sets in the classifier's feature space.

    NOT comparable with Inception FID or with published numbers; only with domain FIDs of the
    same classifier file. Each set is streamed through :class:`FeatureStatistics` in batches.
    """
    statistics = []
    for images in (images_a, images_b):
        accumulator = FeatureStatistics(model.config.feature_dim)
        for start in range(0, len(images), batch_size):
            accumulator.update(domain_features(model, images[start:start + batch_size], batch_size))
        statistics.append(accumulator.mean_and_covariance())
    return frechet_distance(*statistics[0], *statistics[1])


def classifier_accuracy(model: DomainClassifier, images: ArrayLike, labels: ArrayLike, batch_size: int = 500) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels`` (N,): for class-conditional
    samples, how often a sample shows the class it was generated for."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    _, logits = domain_features_and_logits(model, images, batch_size)
    return float((logits.argmax(dim=1).cpu() == labels).double().mean())


class DomainFeatureExtractor:
    """A classifier as a feature extractor with the interface evaluation uses (like Inception's)."""

    def __init__(self, model: DomainClassifier, batch_size: int = 500):
        self.model = model.eval()
        self.batch_size = batch_size
        self.dim = model.config.feature_dim
        self.num_logits = model.config.num_classes
        self.fingerprint = classifier_fingerprint(model)

    @property
    def name(self) -> str:
        return f"domain-classifier-{self.fingerprint[:12]}"

    def features_and_logits(self, images: ArrayLike) -> tuple[Tensor, Tensor]:
        return domain_features_and_logits(self.model, images, self.batch_size)

    def __call__(self, images: ArrayLike) -> Tensor:
        return self.features_and_logits(images)[0]


def classifier_fingerprint(model: DomainClassifier) -> str:
    """sha256 of the configuration and weights: two classifiers share it only if they are identical."""
    settings = json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode()
    return state_fingerprint(model.state_dict(), prefix=settings)


def save_classifier(model: DomainClassifier, path: Union[str, Path], info: Optional[dict[str, Any]] = None) -> Path:
    """Write ``<path>/classifier.safetensors`` and ``<path>/classifier.json``; returns the folder.

    ``info`` (JSON-able) records how the classifier was made (data set, steps, test accuracy...).
    """
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    staging = weights.with_name(f".{WEIGHTS_FILE}.tmp")
    save_file({key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()},
              str(staging))
    staging.replace(weights)
    record = {"format": _FORMAT, "version": _FORMAT_VERSION, "config": dataclasses.asdict(model.config),
              "fingerprint": classifier_fingerprint(model), "info": info or {}}
    write_text_atomic(folder / CONFIG_FILE, json.dumps(record, indent=2) + "\n")
    return folder


def load_classifier(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> DomainClassifier:
    """Rebuild a classifier saved by :func:`save_classifier` (in eval mode)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no domain classifier at {folder}: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                                "(train one with meanflow.eval.classifier.train_domain_classifier and save_classifier, "
                                "or `meanflow eval --metric domain --train-classifier`)")
    from safetensors import SafetensorError

    retrain = "train it again (`meanflow eval --metric domain --train-classifier`) into an empty folder"
    try:
        record = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({error}); {retrain}") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT or "config" not in record:
        raise ValueError(f"{folder / CONFIG_FILE} is not a domain classifier record; {retrain}")
    model = DomainClassifier(ClassifierConfig(**record["config"]))
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except SafetensorError as error:  # truncated, or not safetensors at all (a pickle, say): never unpickled
        raise ValueError(f"{folder / WEIGHTS_FILE} could not be read as safetensors ({error}); {retrain}") from None
    model.load_state_dict(weights)
    return model.to(device).eval()


def classifier_info(path: Union[str, Path]) -> dict[str, Any]:
    """The JSON record saved with a classifier (config, fingerprint, info)."""
    return json.loads((Path(path) / CONFIG_FILE).read_text())


__all__ = [
    "ClassifierConfig",
    "DomainClassifier",
    "DomainFeatureExtractor",
    "classifier_accuracy",
    "classifier_fingerprint",
    "classifier_info",
    "domain_features",
    "domain_features_and_logits",
    "domain_fid",
    "load_classifier",
    "save_classifier",
    "train_domain_classifier",
]
