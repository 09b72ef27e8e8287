"""Periodic and final sample grids from EMA weights (images: PNG grid; 2-D: scatter plot)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..data import DataInfo
from ..inference import balanced_labels, generate


def write_sample_grids(model: nn.Module, config: Config, info: DataInfo, folder: Path, step: int,
                       device: torch.device) -> list[Path]:
    """One file per entry of ``training.grid_steps`` from ``model`` (the EMA weights, in eval mode);
    returns their paths."""
    from ..eval.grids import save_image_grid, save_scatter

    settings = config.training
    averaged = model
    count = settings.grid_samples if info.kind != "points" else max(settings.grid_samples, 2000)
    labels = balanced_labels(count, info.num_classes)
    ode = "euler" if config.objective.method == "flow_matching" else None
    paths = []
    for num_steps in settings.grid_steps:
        samples = generate(averaged, count, info.sample_shape, num_steps, labels, seed=settings.seed, device=device,
                           ode=ode)
        name = folder / f"step{step:09d}_nfe{num_steps}.png"
        if info.kind == "latent":
            samples = _decode(samples, config.data.vae, device)
            if samples is None:
                return paths
        if info.kind in ("image", "latent"):
            rows = info.num_classes if info.num_classes and count % info.num_classes == 0 else None
            paths.append(save_image_grid(samples, name, nrow=rows))
        else:
            from ..data.toy import sample_toy

            reference = sample_toy(config.data.toy, count, torch.Generator().manual_seed(settings.seed + 1))
            paths.append(save_scatter(samples, name, reference=reference,
                                      title=f"{config.data.toy}: {num_steps}-NFE samples, step {step}"))
    return paths


def _decode(latents, vae_name: str, device):
    """Latents -> images with the run's VAE, or None (with a warning) when it cannot be loaded."""
    import warnings

    from ..data.latents import decode_latents, load_vae

    try:
        vae = load_vae(vae_name, device=device)
    except (FileNotFoundError, ImportError) as error:
        warnings.warn(f"no sample grid: the VAE that decodes latents is unavailable ({error})")
        return None
    return decode_latents(vae, latents.to(device)).cpu()
