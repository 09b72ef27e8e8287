"""Scoring a run of 2-D points (the toys): distances between the generated points and fresh exact
samples of the run's toy distribution, for each sampler setting.

There are no pixels and no feature network here: the points are compared directly
(:mod:`meanflow.eval.distances`) by the energy distance (unbiased, 0 in expectation for equal
laws), the sliced 2-Wasserstein distance (256 random directions seeded by ``seed``) and improved
precision / recall (k nearest neighbours). The reference is N exact samples of the toy named by
the run's :class:`~meanflow.encoders.PointEncoder` (or by ``reference``), drawn by a torch
generator seeded by ``seed``; the generated points follow the one noise scheme, as for images.
Under torch.distributed each process generates its shard and rank 0 gathers and scores them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from ..encoders import Encoder
from ..progress import Progress
from ..samplers import Sampler
from ..validation import parse_enum
from .protocol import (
    SamplePlan,
    SamplerSetting,
    gather_rows,
    generate_shard,
    settings_for_steps,
)
from .reports import POINTS_METRIC, POINTS_NOTE, ScoredRun, setting_entry
from .sample_writer import GRID_COUNT, sample_file_for

if TYPE_CHECKING:
    from ..inference import LoadedModel
    from .settings import EvalSettings

SLICED_WASSERSTEIN_DIRECTIONS = 256


def toy_reference(reference: Optional[str], encoder: Encoder) -> str:
    """The toy distribution to compare with: ``reference`` when given, else the run's own."""
    from ..toys import ToyDistribution

    name = reference if reference is not None else getattr(encoder, "reference", None)
    valid = [member.value for member in ToyDistribution]
    if name is None:
        raise ValueError("this run of 2-D points names no toy distribution to compare its samples with (its "
                         f"encoder has no reference); give reference (--reference) as one of {valid}")
    return parse_enum(ToyDistribution, name, "the reference of a points run").value


def score_point_run(loaded: "LoadedModel", encoder: Encoder, sampler: Sampler,
                    settings: "EvalSettings") -> ScoredRun:
    """Every setting of ``settings.steps`` scored against exact samples of the toy distribution."""
    from ..toys import sample_toy

    name = toy_reference(settings.reference, encoder)
    plan = SamplePlan.from_settings(settings, loaded.sample_shape, loaded.num_classes)
    if settings.num_samples <= settings.precision_recall_k:
        raise ValueError(f"precision / recall of points needs num_samples > k={settings.precision_recall_k}")
    real = sample_toy(name, settings.num_samples, torch.Generator().manual_seed(settings.seed))  # (N, 2)
    setting_list = settings_for_steps(sampler, settings.steps, settings.intermediate)
    bar = Progress(total=len(setting_list) * plan.num_batches, enabled=settings.progress and settings.rank == 0,
                   every=10, unit="batch")
    try:
        scores = [_score_setting(loaded.model, setting, plan, encoder, real, settings, bar) for setting in setting_list]
    finally:
        bar.close()
    reference = {"source": f"toy:{name}", "num_points": settings.num_samples,
                 "sampled_by": f"meanflow.toys.sample_toy({name!r}, N, torch.Generator().manual_seed(seed))"}
    return ScoredRun(POINTS_METRIC, None, reference, scores,
                     {"samples": settings.num_samples, "k": settings.precision_recall_k}, POINTS_NOTE)


def _score_setting(model, setting: SamplerSetting, plan: SamplePlan, encoder: Encoder, real: Tensor,
                   settings: "EvalSettings", bar: Progress) -> dict[str, Any]:
    """One entry of ``scores``: generate this process's points, gather them on rank 0, score them."""
    started = time.perf_counter()
    parts = []
    for batch in generate_shard(model, setting, plan):
        parts.append(batch.samples.float().cpu())  # (B, *sample_shape)
        bar.update()
    entry = setting_entry(setting, settings.guidance_scale)
    if settings.save_samples is not None:
        entry.update(_save(parts, setting, plan, encoder, settings))
    generated = gather_rows(parts, plan.sample_shape, settings.world_size)  # (N, *sample_shape) in index order
    if settings.rank == 0:
        entry.update(point_distances(generated, real, settings.precision_recall_k, settings.seed))
        if "samples_file" in entry:  # rank 0 saved its shard: the plot of the points goes beside it
            shown = generated[:encoder.grid_samples(GRID_COUNT)]
            entry["samples_grid"] = str(encoder.write_grid(shown, Path(entry["samples_file"]).with_suffix(".png"),
                                                           title=f"{entry['nfe']}-NFE samples"))
    entry["seconds"] = time.perf_counter() - started
    return entry


def point_distances(generated: Tensor, real: Tensor, k: int, seed: int) -> dict[str, float]:
    """Energy distance, sliced 2-Wasserstein, precision and recall of points (N, D) against (M, D)."""
    from .distances import energy_distance, precision_recall, sliced_wasserstein

    directions = torch.Generator().manual_seed(seed)
    return {"energy_distance": energy_distance(generated, real),
            "sliced_wasserstein": sliced_wasserstein(generated, real, SLICED_WASSERSTEIN_DIRECTIONS, directions),
            **precision_recall(real, generated, k=k)}


def _save(parts: list[Tensor], setting: SamplerSetting, plan: SamplePlan, encoder: Encoder,
          settings: "EvalSettings") -> dict[str, str]:
    """This process's points in the one sample file format (the encoder's file rows: float32)."""
    writer = sample_file_for(Path(settings.save_samples), setting.describe(), plan.shard_size, plan.rank,
                             plan.world_size)
    for samples in parts:
        writer.write(encoder.file_rows(samples))
    path = writer.finish(plan.shard_labels())
    return {} if path is None else {"samples_file": str(path)}


__all__ = ["point_distances", "score_point_run", "toy_reference"]
