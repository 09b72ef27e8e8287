"""The JSON report of an evaluation: every setting needed to reproduce the numbers, and one
entry per scored sampler setting.

Each entry of ``scores`` starts with what was sampled -- ``steps``, ``nfe`` (the true number of
network evaluations, counted by the sampler: a Heun step costs two, CFG doubles), ``intermediate``
and ``sampler`` (a short name such as ``steps2_t0.3`` or ``euler8``) -- followed by the scores:
``fid`` and ``inception_score_mean`` / ``_std`` (inception) or ``accuracy`` (domain,
conditional), ``precision`` / ``recall`` when asked for, or for 2-D points ``energy_distance``,
``sliced_wasserstein``, ``precision`` and ``recall``; then ``seconds`` and, with
``--save-samples``, ``samples_file`` and ``samples_grid``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..encoders import Encoder
from ..noise import NOISE_SCHEME
from ..samplers import Sampler
from .protocol import SamplerSetting

if TYPE_CHECKING:
    from ..inference import LoadedModel
    from .settings import EvalSettings

POINTS_METRIC = "distances"  # the report's metric for runs of 2-D points
DOMAIN_NOTE = ("domain FID: Fréchet distance in the feature space of a classifier trained by this project; "
               "NOT comparable with Inception FID or published numbers, only with scores from the same classifier")
POINTS_NOTE = ("distances between the generated points and fresh exact samples of the toy distribution "
               "(as many as generated): energy distance (unbiased), sliced 2-Wasserstein (256 directions), "
               "improved precision / recall")


@dataclass
class ScoredRun:
    """What scoring a run gave: the report's metric name, feature network (None for points),
    reference description, score entries, the precision / recall sizes, and a note on how to
    read the numbers."""

    metric: str
    feature_extractor: Optional[str]
    reference: dict[str, Any]
    scores: list[dict[str, Any]]
    precision_recall: Optional[dict[str, int]] = None  # {"samples": M, "k": k} when computed
    note: Optional[str] = None


def setting_entry(setting: SamplerSetting, guidance_scale: float) -> dict[str, Any]:
    """The start of a score entry: what was sampled, and at what cost."""
    return {"steps": setting.num_steps, "nfe": setting.nfe(guidance_scale), "intermediate": setting.intermediate,
            "sampler": setting.describe()}


def sampler_report(sampler: Sampler, overridden: bool) -> dict[str, Any]:
    """The sampler as stored in a run record, and whether it is the run's own or ``--ode``'s."""
    return {**sampler.to_dict(), "source": "--ode" if overridden else "run record"}


def build_report(checkpoint: Path, loaded: "LoadedModel", settings: "EvalSettings", encoder: Encoder,
                 sampler: dict[str, Any], scored: ScoredRun) -> dict[str, Any]:
    """The whole report (JSON-able) of one evaluation of ``checkpoint``."""
    from .. import __version__

    encoder_record = encoder.to_dict()
    report = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "step": loaded.step,
        "weights": loaded.weights,
        "metric": scored.metric,
        "feature_extractor": scored.feature_extractor,
        "classifier": _resolved(settings.classifier_path),
        "inception_weights": _resolved(settings.inception_weights),
        "encoder": encoder_record,
        "vae": encoder_record.get("vae"),
        "reference": scored.reference,
        "num_samples": settings.num_samples,
        "seed": settings.seed,
        "noise": NOISE_SCHEME,
        "label_mode": settings.label_mode.value if loaded.num_classes is not None else None,
        "num_classes": loaded.num_classes,
        "steps": list(settings.steps),
        "intermediate": settings.intermediate,
        "ode": sampler.get("method"),  # the ODE integrating the velocity, None for average-velocity steps
        "sampler": sampler,
        "guidance_scale": settings.guidance_scale,
        "precision_recall": scored.precision_recall,
        "batch_size": settings.batch_size,
        "world_size": settings.world_size,
        "device": str(settings.device),
        "scores": scored.scores,
        "meanflow_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if scored.note is not None:
        report["note"] = scored.note
    return report


def _resolved(path: Optional[Any]) -> Optional[str]:
    return None if path is None else str(Path(path).resolve())


__all__ = ["DOMAIN_NOTE", "POINTS_METRIC", "POINTS_NOTE", "ScoredRun", "build_report", "sampler_report",
           "setting_entry"]
