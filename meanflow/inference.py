"""Loading trained models from checkpoints and generating samples in batches.

A checkpoint's run record (:mod:`meanflow.run_record`) says what the model is, what space its
samples live in (the encoder) and how it is sampled (the objective's sampler); loading reads the
record and the chosen weights only, never the optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import check_compatible, load_weights
from .conventions import null_class_id
from .distributed import resolve_device
from .encoders import Encoder
from .noise import sample_noise
from .progress import Progress
from .run_record import RunRecord
from .samplers import Sampler


@dataclass
class LoadedModel:
    """A model in eval mode with the weights chosen from a checkpoint, and its run's record."""

    model: nn.Module
    weights: str
    step: int
    record: RunRecord
    encoder: Encoder
    sampler: Sampler
    path: Path

    @property
    def sample_shape(self) -> tuple:
        return self.record.sample_shape

    @property
    def num_classes(self) -> Optional[int]:
        return self.record.num_classes

    @property
    def config(self) -> dict:
        return self.record.config


def load_model(path: str | Path, weights: Optional[str] = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model stored in a checkpoint (a ``step_<n>`` folder or a run folder).

    ``weights`` names an EMA copy (``ema_0.9999``...) or ``raw``; the default is the first EMA.
    ``device`` is checked against the devices this machine has before anything is read
    (:func:`meanflow.distributed.resolve_device`).
    """
    device = resolve_device(device, "device")
    folder, raw, ema, trainer = load_weights(Path(path))
    record = RunRecord.load(folder)
    model = record.build_model()
    name = weights or (list(record.ema_names) or ["raw"])[0]
    chosen = raw if name == "raw" else _ema_copy(ema, name, record.ema_names)
    check_compatible(model.state_dict(), chosen if name == "raw" else {**raw, **chosen})
    model.load_state_dict({**raw, **chosen})
    return LoadedModel(model.to(device).eval(), name, int(trainer["step"]), record, record.build_encoder(),
                       record.build_sampler(), folder)


def _ema_copy(ema: dict[str, Tensor], name: str, names: Sequence[str]) -> dict[str, Tensor]:
    if name not in names:
        raise ValueError(f"unknown weights {name!r}; this checkpoint has {['raw', *names]}")
    prefix = f"{name}/"
    return {key[len(prefix):]: value for key, value in ema.items() if key.startswith(prefix)}


def balanced_labels(num_samples: int, num_classes: Optional[int], device=None) -> Optional[Tensor]:
    """0, 1, ..., C-1, 0, 1, ...: every class equally often (None when unconditional)."""
    if num_classes is None:
        return None
    return torch.arange(num_samples, device=device) % num_classes


@torch.no_grad()
def generate(
    model: nn.Module,
    num_samples: int,
    sample_shape: Sequence[int],
    num_steps: int = 1,
    labels: Optional[Tensor] = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    intermediate: Optional[float] = None,
    guidance_scale: float = 1.0,
    num_classes: Optional[int] = None,
    sampler: Optional[Sampler] = None,
    progress: bool = False,
) -> Tensor:
    """``num_samples`` samples (N, *sample_shape) on the CPU, generated in batches.

    The noise of sample i depends only on (seed, i) (:func:`meanflow.noise.sample_noise`), so
    the samples do not depend on the batch size or the device, and equal those of
    ``meanflow eval`` for the same seed. ``sampler`` is how the network is sampled (default:
    average-velocity steps, Eq. 3; a loaded model's own is ``LoadedModel.sampler``).

    ``labels`` (num_samples,) integers are class ids 0..C-1, or C (the null class, unconditional
    samples of a model trained with class dropout); with ``num_classes`` given they are checked
    against it, and any negative label is refused.
    """
    from .samplers import AverageVelocitySampler

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = resolve_device(device, "device")
    if labels is not None:
        _check_labels(labels, num_samples, num_classes)
    sampler = sampler or AverageVelocitySampler()
    null = null_class_id(num_classes) if num_classes is not None else None
    chunks = []
    bar = Progress(total=-(-num_samples // batch_size), enabled=progress)
    try:
        for start in range(0, num_samples, batch_size):
            indices = torch.arange(start, min(start + batch_size, num_samples))
            noise = sample_noise(seed, indices, sample_shape).to(device)
            batch_labels = None if labels is None else labels[indices].to(device)
            out = sampler(model, noise, batch_labels, num_steps=num_steps, intermediate=intermediate,
                          guidance_scale=guidance_scale, null_label=null)
            chunks.append(out.float().cpu())
            bar.update()
    finally:
        bar.close()
    return torch.cat(chunks)


def _check_labels(labels: Tensor, num_samples: int, num_classes: Optional[int]) -> None:
    """(num_samples,) integer class ids in [0, C] (C: the null class), or a ValueError saying which are not."""
    if not isinstance(labels, Tensor) or labels.dtype == torch.bool or labels.is_floating_point() \
            or labels.is_complex():
        raise ValueError(f"labels must be a tensor of integer class ids, got "
                         f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if tuple(labels.shape) != (num_samples,):
        raise ValueError(f"labels must have shape ({num_samples},), one per sample, got {tuple(labels.shape)}")
    if num_samples == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"labels must be class ids >= 0, found {low}")
    if num_classes is not None and high > null_class_id(num_classes):
        raise ValueError(f"labels must be class ids in [0, {num_classes - 1}] (or {null_class_id(num_classes)}, the "
                         f"null class, for unconditional samples); found {high}")
