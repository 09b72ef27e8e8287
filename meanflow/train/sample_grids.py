"""Periodic and final sample grids from EMA weights, drawn by the run's encoder (images: a PNG
grid; 2-D points: a scatter plot) with the objective's own sampler."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..encoders import Encoder
from ..inference import balanced_labels, generate
from ..samplers import Sampler


def write_sample_grids(model: nn.Module, sampler: Sampler, encoder: Encoder, num_classes: Optional[int],
                       grid_steps: Sequence[int], grid_samples: int, seed: int, folder: Path, step: int,
                       device: torch.device) -> list[Path]:
    """One file per entry of ``grid_steps`` from ``model`` (the EMA weights, in eval mode);
    returns their paths. Class-conditional grids show one class per row when the count allows."""
    count = encoder.grid_samples(grid_samples)
    labels = balanced_labels(count, num_classes)
    rows = num_classes if num_classes and count % num_classes == 0 else None
    paths = []
    for num_steps in grid_steps:
        samples = generate(model, count, encoder.sample_shape, num_steps, labels, seed=seed, device=device,
                           sampler=sampler, num_classes=num_classes)
        name = folder / f"step{step:09d}_nfe{sampler.nfe(num_steps)}.png"
        try:
            paths.append(encoder.write_grid(samples.to(device), name, nrow=rows,
                                            title=f"{sampler.nfe(num_steps)}-NFE samples, step {step}"))
        except (FileNotFoundError, ImportError) as error:  # e.g. the VAE that decodes latents is absent
            warnings.warn(f"no sample grid: {error}")
            return paths
    return paths
