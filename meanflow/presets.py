"""Named run configurations. ``meanflow train --preset NAME`` starts from one of these."""

from __future__ import annotations

from typing import Callable

from .config import Config, DataConfig, ModelSpec, ObjectiveConfig, OptimConfig, TrainingConfig
from .data.toy import ToyDistribution


def digits() -> Config:
    """Class-conditional 8x8 digits with guidance in the target: the demo, minutes on a laptop CPU."""
    return Config(
        data=DataConfig(name="digits"),
        model=ModelSpec("dit", dict(input_size=8, in_channels=1, patch_size=2, hidden_size=128, depth=4,
                                    num_heads=4, num_classes=10, frequency_size=64)),
        # omega' = omega / (1 - kappa) = 2.0, the B/2 setting of the paper.
        objective=ObjectiveConfig(fraction_r_neq_t=0.25, omega=1.0, kappa=0.5, class_dropout=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=100),
        training=TrainingConfig(steps=3000, batch_size=128, ema_decays=(0.999, 0.9995), log_every=50,
                                checkpoint_every=1000, grid_samples=100, grid_steps=(1, 2)),
        note="scikit-learn's 8x8 digits, class-conditional, CFG in training (omega'=2). No paper number.",
    )


def toy(name: str) -> Callable[[], Config]:
    def build() -> Config:
        return Config(
            data=DataConfig(name="toy", toy=name, class_conditional=False),
            model=ModelSpec("mlp", dict(data_dim=2, hidden_size=256, depth=4)),
            objective=ObjectiveConfig(fraction_r_neq_t=0.75, mu=-0.4, sigma=1.0, p=1.0, c=0.01),
            optim=OptimConfig(lr=1e-3, warmup_steps=100),
            training=TrainingConfig(steps=3000, batch_size=512, ema_decays=(0.999,), log_every=100,
                                    checkpoint_every=1000, grid_samples=2000, grid_steps=(1, 2)),
            note=f"2-D toy '{name}', unconditional MLP. No paper number.",
        )

    build.__doc__ = f"The 2-D toy distribution '{name}' with an MLP."
    return build


PRESETS: dict[str, Callable[[], Config]] = {"digits": digits}
PRESETS.update({f"toy-{d.value.replace('_', '-')}": toy(d.value) for d in ToyDistribution})


def preset(name: str) -> Config:
    """A fresh copy of the named preset; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets are {sorted(PRESETS)}")
    return PRESETS[name]()
