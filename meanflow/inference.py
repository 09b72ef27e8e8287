"""Loading trained models from checkpoints and generating samples in batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .conventions import null_class_id
from .models import build_model
from .sampling import sample, sample_ode
from .checkpoint import check_compatible, load_checkpoint


@dataclass
class LoadedModel:
    """A model in eval mode with the weights chosen from a checkpoint, and what it was trained on."""

    model: nn.Module
    weights: str
    step: int
    sample_shape: tuple
    num_classes: Optional[int]
    kind: str
    config: dict


def load_model(path: str | Path, weights: Optional[str] = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model stored in a checkpoint (a ``step_<n>`` folder or a run folder).

    ``weights`` names an EMA copy (``ema_0.9999``...) or ``raw``; the default is the first EMA.
    """
    checkpoint = load_checkpoint(Path(path))
    spec = checkpoint.trainer["model"]
    model = build_model(spec["architecture"], spec["options"])
    chosen = checkpoint.ema_weights(weights)
    check_compatible(model.state_dict(), chosen if weights == "raw" else {**checkpoint.model, **chosen})
    model.load_state_dict({**checkpoint.model, **chosen})
    info = checkpoint.trainer["data_info"]
    name = weights or (checkpoint.trainer["ema_names"] or ["raw"])[0]
    return LoadedModel(model.to(device).eval(), name, checkpoint.step, tuple(info["sample_shape"]),
                       info["num_classes"], info["kind"], checkpoint.trainer["config"])


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
    ode: Optional[str] = None,
) -> Tensor:
    """``num_samples`` samples (N, *sample_shape) on the CPU, generated in batches.

    The noise of sample i depends only on (seed, i // batch_size), so results do not depend on
    the device. ``ode`` = 'euler' / 'heun' integrates the instantaneous velocity instead
    (the flow-matching baseline); otherwise the average-velocity sampler (Eq. 3) is used.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    null = null_class_id(num_classes) if num_classes is not None else None
    chunks = []
    for index, start in enumerate(range(0, num_samples, batch_size)):
        count = min(batch_size, num_samples - start)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        noise = torch.randn((count, *sample_shape), generator=generator).to(device)
        batch_labels = None if labels is None else labels[start:start + count].to(device)
        if ode is None:
            out = sample(model, noise, batch_labels, num_steps=num_steps, intermediate=intermediate,
                         guidance_scale=guidance_scale, null_label=null)
        else:
            out = sample_ode(model, noise, batch_labels, num_steps=num_steps, method=ode,
                             guidance_scale=guidance_scale, null_label=null)
        chunks.append(out.float().cpu())
    return torch.cat(chunks)
