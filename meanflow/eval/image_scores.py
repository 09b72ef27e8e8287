"""Scoring a run whose samples are images (pixels, or VAE latents decoded by the run's encoder):
FID against the reference statistics, plus the Inception Score (metric ``inception``) or the
class accuracy of conditional samples (metric ``domain``), and optionally precision / recall,
for each sampler setting.

Under torch.distributed every process streams its shard (:mod:`meanflow.eval.protocol`) and
the statistics are summed before the distance is computed; the features kept for precision /
recall are gathered on rank 0, which holds the reference features.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..encoders import Encoder
from ..progress import Progress
from ..samplers import Sampler
from .features import FeatureExtractor, Metric
from .frechet import frechet_distance
from .protocol import (
    SamplePlan,
    SamplerSetting,
    SampleStatistics,
    gather_rows,
    settings_for_steps,
    stream_sample_statistics,
)
from .references import Reference, resolve_reference
from .reports import DOMAIN_NOTE, ScoredRun, setting_entry
from .sample_writer import StreamedSampleFile, sample_file_for, write_image_grid

if TYPE_CHECKING:
    from ..inference import LoadedModel
    from .settings import EvalSettings


def score_image_run(loaded: "LoadedModel", encoder: Encoder, sampler: Sampler, settings: "EvalSettings",
                    extractor: FeatureExtractor) -> ScoredRun:
    """Every setting of ``settings.steps`` scored against the reference (see the module docstring)."""
    reference = resolve_reference(settings, loaded.config.get("data", {}), encoder.image_shape()[-1], extractor)
    plan = SamplePlan.from_settings(settings, loaded.sample_shape, loaded.num_classes)
    setting_list = settings_for_steps(sampler, settings.steps, settings.intermediate)
    bar = Progress(total=len(setting_list) * plan.num_batches, enabled=settings.progress and settings.rank == 0,
                   every=10, unit="batch")
    try:
        scores = [_score_setting(loaded.model, setting, plan, encoder, extractor, reference, settings, bar)
                  for setting in setting_list]
    finally:
        bar.close()
    precision_recall = None if settings.precision_recall_samples is None else {
        "samples": settings.precision_recall_samples, "k": settings.precision_recall_k}
    return ScoredRun(settings.metric.value, extractor.name, reference.report, scores, precision_recall,
                     DOMAIN_NOTE if settings.metric is Metric.DOMAIN else None)


def _score_setting(model: nn.Module, setting: SamplerSetting, plan: SamplePlan, encoder: Encoder,
                   extractor: FeatureExtractor, reference: Reference, settings: "EvalSettings",
                   bar: Progress) -> dict[str, Any]:
    """One entry of ``scores``: stream this setting's samples, reduce, score, finish the files."""
    started = time.perf_counter()
    writer = None
    if settings.save_samples is not None:
        writer = sample_file_for(Path(settings.save_samples), setting.describe(), plan.shard_size, plan.rank,
                                 plan.world_size)
    gathered = stream_sample_statistics(model, setting, plan, encoder, extractor,
                                        with_inception_score=settings.metric is Metric.INCEPTION,
                                        keep_first=settings.precision_recall_samples or 0, writer=writer, progress=bar)
    entry = setting_entry(setting, settings.guidance_scale)
    entry.update(_scores(gathered, reference, settings, conditional=plan.labels is not None))
    if writer is not None:
        entry.update(_finish_samples(writer, plan))
    entry["seconds"] = time.perf_counter() - started
    return entry


def _scores(gathered: SampleStatistics, reference: Reference, settings: "EvalSettings",
            conditional: bool) -> dict[str, float]:
    """FID and its companions from this process's statistics, summed over all processes first.

    Every process makes the same collective calls in the same order (the conditions below are
    the same on all of them); only rank 0, which holds the reference features, scores
    precision / recall.
    """
    distributed = settings.world_size > 1
    if distributed:
        gathered.features.all_reduce()
    scores = {"fid": frechet_distance(*gathered.features.mean_and_covariance(), reference.mu, reference.sigma)}
    if gathered.inception_score is not None:
        if distributed:
            gathered.inception_score.all_reduce()
        scores["inception_score_mean"], scores["inception_score_std"] = gathered.inception_score.score()
    if settings.metric is Metric.DOMAIN and conditional:
        counts = torch.tensor([gathered.correct, gathered.labelled], dtype=torch.float64, device=settings.device)
        if distributed:
            torch.distributed.all_reduce(counts)
        if counts[1] > 0:  # 0 when the classifier's classes are not the model's
            scores["accuracy"] = float(counts[0] / counts[1])
    if settings.precision_recall_samples is not None:
        fake_features = gather_rows(gathered.kept_features, (gathered.features.dim,), settings.world_size)
        if reference.real_features is not None:  # rank 0
            from .distances import precision_recall

            scores.update(precision_recall(reference.real_features, fake_features, k=settings.precision_recall_k))
    return scores


def _finish_samples(writer: StreamedSampleFile, plan: SamplePlan) -> dict[str, str]:
    """Write this process's sample file; rank 0 also draws the grid of its first samples."""
    path = writer.finish(plan.shard_labels())
    if path is None:
        return {}
    files = {"samples_file": str(path)}
    if plan.rank == 0:
        files["samples_grid"] = str(write_image_grid(writer.first_rows(), path.with_suffix(".png"), plan.num_classes))
    return files


__all__ = ["score_image_run"]
