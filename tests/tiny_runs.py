"""A toy preset cut down to a few real training steps, for the end-to-end tests of each objective."""

from __future__ import annotations

from meanflow.config import Config


def tiny(config: Config, steps: int = 6, grid_steps: str = "[1]") -> Config:
    """``config`` at ``steps`` steps of batch 32 with a width-16, depth-2 network, checkpoints every
    3 steps and small grids at ``grid_steps``."""
    return config.with_overrides([
        f"training.steps={steps}", "training.batch_size=32", "training.checkpoint_every=3", "training.log_every=3",
        f"training.grid_steps={grid_steps}", "training.grid_samples=16", "model.options.hidden_size=16",
        "model.options.depth=2"])
