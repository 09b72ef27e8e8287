"""The sampling protocol of an evaluation: which samples, with which labels, on which process,
and streaming one sampler setting's samples through the feature network.

Sample ``i`` starts from the noise of :func:`meanflow.noise.sample_noise` seeded by
``[seed, i]`` (the one noise scheme, shared with ``meanflow sample`` and
:func:`meanflow.inference.generate`) and its label is a function of ``i``
(:func:`sample_labels`), so the samples, and hence the scores up to float64 rounding, do not
depend on the batch size or on the number of processes. Process ``rank`` of ``world_size`` takes
the contiguous slice ``[rank N / W, (rank + 1) N / W)`` (:func:`meanflow.distributed.shard_range`).

Streaming: samples are generated, decoded and quantised by the run's encoder (exactly the uint8
pixels a saved sample file holds), featurised and folded into a
:class:`~meanflow.eval.frechet.FeatureStatistics` one batch at a time; no image set is ever
held whole. Only :func:`gather_rows` communicates across processes; the caller reduces the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..conventions import null_class_id
from ..distributed import shard_range
from ..encoders import Encoder
from ..noise import sample_noise
from ..samplers import Sampler
from ..validation import parse_enum
from .features import FeatureExtractor
from .frechet import FeatureStatistics
from .inception import InceptionScoreStatistics
from .settings import EvalSettings, LabelMode

if TYPE_CHECKING:
    from ..progress import Progress
    from .sample_writer import StreamedSampleFile

INCEPTION_SCORE_SPLITS = 10


def sample_labels(num_samples: int, num_classes: Optional[int], mode: LabelMode | str, seed: int) -> Optional[Tensor]:
    """The labels (N,) int64 of all ``num_samples`` samples (None when unconditional)."""
    if num_classes is None:
        return None
    mode = parse_enum(LabelMode, mode, "label_mode")
    if mode is LabelMode.BALANCED:
        return torch.arange(num_samples) % num_classes
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (num_samples,), generator=generator)


@dataclass(frozen=True, eq=False)
class SamplePlan:
    """Which samples this process generates, and how; the same for every sampler setting.

    ``labels`` (N,) are those of all N samples (None when unconditional); a process takes the
    rows of its shard.
    """

    num_samples: int
    sample_shape: tuple
    labels: Optional[Tensor]
    num_classes: Optional[int]
    seed: int = 0
    batch_size: int = 250
    guidance_scale: float = 1.0
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def shard(self) -> tuple[int, int]:
        """This process's slice [start, end) of the sample indices."""
        return shard_range(self.num_samples, self.rank, self.world_size)

    @property
    def num_batches(self) -> int:
        return -(-self.shard_size // self.batch_size)

    @classmethod
    def from_settings(cls, settings: "EvalSettings", sample_shape: tuple, num_classes: Optional[int]) -> "SamplePlan":
        """The plan of an evaluation: every sample's label drawn here, once, from the settings."""
        labels = sample_labels(settings.num_samples, num_classes, settings.label_mode, settings.seed)
        return cls(settings.num_samples, tuple(sample_shape), labels, num_classes, settings.seed, settings.batch_size,
                   settings.guidance_scale, settings.rank, settings.world_size, torch.device(settings.device))

    @property
    def shard_size(self) -> int:
        start, end = self.shard
        return end - start

    def shard_labels(self) -> Optional[Tensor]:
        """The labels of this process's samples, in index order."""
        start, end = self.shard
        return None if self.labels is None else self.labels[start:end]


@dataclass(frozen=True)
class SamplerSetting:
    """One setting to score: a sampler, its step count and (2-step average velocity) its middle time."""

    sampler: Sampler
    num_steps: int
    intermediate: Optional[float] = None

    def nfe(self, guidance_scale: float) -> int:
        """The true number of network evaluations per sample (the sampler counts them)."""
        return self.sampler.nfe(self.num_steps, guidance_scale)

    def describe(self) -> str:
        """A short name (``steps2_t0.3``, ``euler8``) for file names and tables."""
        return self.sampler.describe(self.num_steps, self.intermediate)


def settings_for_steps(sampler: Sampler, steps: tuple[int, ...], intermediate: Optional[float]) -> list[SamplerSetting]:
    """One setting per step count; the middle time applies to 2-step sampling only."""
    return [SamplerSetting(sampler, k, intermediate if k == 2 else None) for k in steps]


@dataclass(frozen=True)
class SampleBatch:
    """Generated samples (B, *sample_shape) of the indices (B,), with their labels (B,) or None."""

    indices: Tensor
    labels: Optional[Tensor]
    samples: Tensor


@torch.no_grad()
def generate_shard(model: nn.Module, setting: SamplerSetting, plan: SamplePlan) -> Iterator[SampleBatch]:
    """This process's samples of one setting, ``plan.batch_size`` at a time, in index order."""
    null = null_class_id(plan.num_classes) if plan.num_classes is not None else None
    start, end = plan.shard
    for first in range(start, end, plan.batch_size):
        indices = torch.arange(first, min(first + plan.batch_size, end))
        noise = sample_noise(plan.seed, indices, plan.sample_shape).to(plan.device)
        labels = None if plan.labels is None else plan.labels[indices].to(plan.device)
        samples = setting.sampler(model, noise, labels, num_steps=setting.num_steps, intermediate=setting.intermediate,
                                  guidance_scale=plan.guidance_scale, null_label=null)
        yield SampleBatch(indices, labels, samples)


@dataclass
class SampleStatistics:
    """What streaming one sampler setting gathers on one process: feature moments, Inception
    Score marginals (when asked), class hits of conditional samples (counted when the feature
    network's ``num_classes`` logits are the model's classes), and the features (n, D) of the
    samples with index below ``keep_first`` (for precision / recall)."""

    features: FeatureStatistics
    inception_score: Optional[InceptionScoreStatistics] = None
    num_classes: Optional[int] = None
    keep_first: int = 0
    correct: int = 0
    labelled: int = 0
    kept_features: list[Tensor] = field(default_factory=list)

    def add(self, batch: SampleBatch, images: Tensor, extractor: FeatureExtractor) -> None:
        """Fold in a batch whose uint8 images (B, C, H, W) are those of ``batch``."""
        features, logits = extractor.features_and_logits(images)
        self.features.update(features)
        first = int(batch.indices[0])
        if first < self.keep_first:
            self.kept_features.append(features[:self.keep_first - first].detach().float().cpu())
        if self.inception_score is not None:
            self.inception_score.update(logits, batch.indices)
        if batch.labels is not None and logits.shape[1] == self.num_classes:
            self.correct += int((logits.argmax(dim=1) == batch.labels.to(logits.device)).sum())
            self.labelled += len(batch.indices)


def stream_sample_statistics(
    model: nn.Module,
    setting: SamplerSetting,
    plan: SamplePlan,
    encoder: Encoder,
    extractor: FeatureExtractor,
    *,
    with_inception_score: bool = False,
    keep_first: int = 0,
    writer: Optional["StreamedSampleFile"] = None,
    progress: Optional["Progress"] = None,
) -> SampleStatistics:
    """Generate this process's samples of one setting batch by batch and fold their features in.

    Each batch is turned into uint8 images by ``encoder.quantize`` (decoding latents with the
    run's VAE), which is also what ``writer`` receives as (B, H, W, C) rows.
    """
    from ..sample_files import image_rows

    statistics = SampleStatistics(FeatureStatistics(extractor.dim, plan.device), keep_first=keep_first,
                                  num_classes=plan.num_classes)
    if with_inception_score:
        splits = min(INCEPTION_SCORE_SPLITS, plan.num_samples)
        statistics.inception_score = InceptionScoreStatistics(plan.num_samples, extractor.num_logits, splits,
                                                              plan.device)
    for batch in generate_shard(model, setting, plan):
        with torch.no_grad():
            images = encoder.quantize(batch.samples)  # (B, C, H, W) uint8: what a saved sample holds
        statistics.add(batch, images, extractor)
        if writer is not None:
            writer.write(image_rows(images))
        if progress is not None:
            progress.update()
    return statistics


def gather_rows(parts: list[Tensor], row_shape: tuple, world_size: int) -> Tensor:
    """This process's rows (n, *row_shape) on the CPU, or, under torch.distributed, every
    process's in rank order (ranks hold contiguous index slices, so rank order is index order)."""
    local = torch.cat(parts) if parts else torch.zeros(0, *row_shape)
    if world_size == 1:
        return local
    import torch.distributed as dist

    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, local)
    return torch.cat(everyone)


__all__ = [
    "INCEPTION_SCORE_SPLITS",
    "LabelMode",
    "SampleBatch",
    "SamplePlan",
    "SampleStatistics",
    "SamplerSetting",
    "gather_rows",
    "generate_shard",
    "sample_labels",
    "settings_for_steps",
    "stream_sample_statistics",
]
