"""Evaluating a checkpoint by the standard protocol: the entry point.

The protocol (as in the paper's FID-50K): generate ``num_samples`` samples from the chosen
weights (an EMA copy by default) with the run's own sampler (or the ``ode`` override) at each
step count, decode and quantise them with the run's encoder exactly as a saved sample file holds
them, extract features, fit a Gaussian, and compare it with the Gaussian of the reference
images (:func:`meanflow.eval.frechet.frechet_distance`). A run of 2-D points is instead compared
with exact samples of its toy distribution by distribution distances.

The parts, each its own module of :mod:`meanflow.eval`:

- :mod:`~meanflow.eval.settings`: :class:`EvalSettings`, every choice, validated at construction;
- :mod:`~meanflow.eval.features`: the feature networks (:class:`Metric`, :func:`build_feature_extractor`);
- :mod:`~meanflow.eval.references`: reference images and their cached statistics;
- :mod:`~meanflow.eval.protocol`: labels, noise, sharding, streaming one sampler setting;
- :mod:`~meanflow.eval.image_scores` / :mod:`~meanflow.eval.point_scores`: scoring image and point runs;
- :mod:`~meanflow.eval.sample_writer`: ``--save-samples`` in the one sample file format;
- :mod:`~meanflow.eval.reports`: the JSON report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .features import FeatureExtractor, PathLike, build_feature_extractor
from .settings import EvalSettings


def evaluate_checkpoint(checkpoint: PathLike, settings: EvalSettings, *,
                        feature_extractor: Optional[FeatureExtractor] = None) -> dict[str, Any]:
    """Score a checkpoint's samples for each step count of ``settings``; returns the JSON-able report.

    Args:
        checkpoint: a run folder or a ``step_<n>`` folder.
        settings: what to score and how (:class:`EvalSettings`).
        feature_extractor: a ready feature network to reuse across calls (sweeps); overrides
            the one ``settings.metric`` names. Unused for runs of 2-D points.

    Returns:
        The report (:mod:`meanflow.eval.reports`): every setting needed to reproduce the
        numbers and, under ``scores``, one entry per step count.
    """
    from ..inference import load_model
    from ..samplers import ode_sampler
    from .reports import build_report, sampler_report

    loaded = load_model(checkpoint, settings.weights, settings.device)
    encoder = loaded.encoder.with_vae(settings.vae)
    sampler = (ode_sampler(settings.ode) or loaded.sampler).with_guidance(settings.omega, settings.interval)
    if encoder.is_image:
        from .image_scores import score_image_run

        extractor = feature_extractor or build_feature_extractor(settings.metric, settings.inception_weights,
                                                                 settings.classifier_path, settings.device,
                                                                 settings.batch_size)
        scored = score_image_run(loaded, encoder, sampler, settings, extractor)
    else:
        from .point_scores import score_point_run

        scored = score_point_run(loaded, encoder, sampler, settings)
    return build_report(Path(checkpoint), loaded, settings, encoder, sampler_report(sampler, settings.ode is not None),
                        scored)


__all__ = ["EvalSettings", "evaluate_checkpoint"]
