"""A short MeanFlow run on a 2-D toy moves its 1-NFE samples onto the data."""

import torch

from meanflow.eval.distances import energy_distance
from meanflow.inference import generate, load_model
from meanflow.models import build_model
from meanflow.presets import preset
from meanflow.toys import sample_toy
from meanflow.train import train


def test_one_step_samples_approach_the_data_after_a_short_run(tmp_path):
    config = preset("toy-eight-gaussians").with_overrides([
        "training.steps=400", "training.batch_size=256", "model.options.hidden_size=64", "model.options.depth=3",
        "training.ema_decays=[0.98]", "training.checkpoint_every=400", "training.grid_steps=[1]",
        "training.grid_samples=256",
    ])
    train(config, tmp_path, progress=False)
    reference = sample_toy("eight_gaussians", 2000, torch.Generator().manual_seed(123))
    fresh = build_model(config.model.architecture, config.model.options).eval()
    untrained = generate(fresh, 2000, (2,), 1, seed=7)
    trained = generate(load_model(tmp_path).model, 2000, (2,), 1, seed=7)
    before = energy_distance(untrained, reference)
    after = energy_distance(trained, reference)
    print(f"energy distance to the data: untrained {before:.4f}, trained {after:.4f}")
    assert after < 0.2 * before, (before, after)
