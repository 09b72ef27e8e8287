"""Resuming with other settings: refused unless asked for, and then really applied.

A resumed run continues the run in its folder. If the command now asks for other settings
than the run was trained with (a new learning rate, batch, objective...), continuing silently
would train a run that matches neither config, while ``config.json`` claims the new one. So the
differences are listed and the resume is refused, unless ``training.allow_changed_config`` is
set; then the new settings take effect from the resumed step, the optimizer's included (its
restored hyper-parameters would otherwise win over the new config).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import Config, OptimConfig

# Settings that change nothing of what is trained: how long, how often it logs and saves, how
# many files it keeps, where and how fast it runs. They may differ on any resume.
FREE_TO_CHANGE = {
    "note", "training.steps", "training.log_every", "training.checkpoint_every", "training.keep_checkpoints",
    "training.milestone_every", "training.sample_every", "training.grid_samples", "training.grid_steps",
    "training.tensorboard", "training.on_nonfinite", "training.max_consecutive_skips", "training.device",
    "training.compile", "training.activation_checkpointing", "training.tf32", "training.parallel", "training.allow_changed_config",
}


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}`` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"section.field: old -> new"`` for every setting (outside :data:`FREE_TO_CHANGE`) that differs."""
    before, after = flatten(then), flatten(now)
    changed = []
    for key in sorted(set(before) | set(after)):
        if key in FREE_TO_CHANGE or before.get(key) == after.get(key):
            continue
        changed.append(f"{key}: {before.get(key, '(absent)')!r} -> {after.get(key, '(absent)')!r}")
    return changed


def check_resume(then: dict[str, Any], config: Config) -> list[str]:
    """Refuse to resume with other settings unless ``training.allow_changed_config``; returns the
    changes (empty when there are none)."""
    changes = config_changes(then, config.to_dict())
    if changes and not config.training.allow_changed_config:
        listed = "\n  ".join(changes)
        raise ValueError(f"this run folder was trained with other settings than the ones given now:\n  {listed}\n"
                         "Resume with the run's own settings (--config <run>/config.json), train into a new "
                         "--output, or add --set training.allow_changed_config=true to continue with the new ones")
    return changes


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, schedule, settings: OptimConfig) -> None:
    """After restoring a checkpoint: the new lr, betas and weight decay in every parameter group,
    with the schedule rescaled to the new base lr at its current step."""
    factors = [group["lr"] / base if base else 1.0 for group, base in zip(optimizer.param_groups, schedule.base_lrs)]
    schedule.base_lrs = [settings.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, factors):
        group["initial_lr"] = settings.lr
        group["lr"] = settings.lr * factor
        group["betas"] = tuple(settings.betas)
        group["weight_decay"] = settings.weight_decay
