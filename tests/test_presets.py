"""The paper's recipes as presets: their numbers, and one real training step of each model."""

import pytest
import torch

from meanflow.models import build_model
from meanflow.objectives import build_objective
from meanflow.presets import PRESETS, preset

IMAGENET = {
    # name: (params in M of the paper, omega, kappa, t_min, t_max, epochs)
    "imagenet256-b4": (131, 1.0, 0.0, 0.0, 1.0, 80),
    "imagenet256-b2": (131, 1.0, 0.5, 0.0, 1.0, 240),
    "imagenet256-m2": (308, 1.0, 0.5, 0.0, 1.0, 240),
    "imagenet256-l2": (459, 0.2, 0.92, 0.0, 0.8, 240),
    "imagenet256-xl2": (676, 0.2, 0.92, 0.0, 0.75, 240),
    "imagenet256-xl2-plus": (676, 1.0, 0.5, 0.3, 0.8, 1000),
}


def count(config):
    with torch.device("meta"):
        model = build_model(config.model.architecture, config.model.options)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_presets_carry_the_papers_recipe(name):
    params, omega, kappa, t_min, t_max, epochs = IMAGENET[name]
    config = preset(name)
    assert abs(count(config) / 1e6 - params) / params < 0.01
    o, opt, tr = config.objective.settings, config.optim, config.training
    assert (o.mu, o.sigma, o.fraction_r_neq_t, o.p, o.c, o.class_dropout) == (-0.4, 1.0, 0.25, 1.0, 0.01, 0.1)
    assert (o.omega, o.kappa, o.t_min, o.t_max) == (omega, kappa, t_min, t_max)
    assert (opt.lr, opt.betas, opt.weight_decay, opt.warmup_steps) == (1e-4, (0.9, 0.95), 0.0, 0)
    assert (tr.batch_size, tr.ema_decays, tr.precision) == (256, (0.9999,), "fp32")
    assert tr.steps == epochs * (1_281_167 // 256)
    assert config.model.options["input_size"] == 32 and config.model.options["in_channels"] == 4
    assert config.data.name == "latents" and config.note.count("Paper:") == 1


def test_cifar10_preset_carries_the_papers_recipe():
    config = preset("cifar10")
    assert abs(count(config) / 1e6 - 55.9) / 55.9 < 0.02
    o, opt, tr = config.objective.settings, config.optim, config.training
    assert (o.mu, o.sigma, o.fraction_r_neq_t, o.p, o.c) == (-2.0, 2.0, 0.75, 0.75, 1e-3)
    assert (opt.lr, opt.betas) == (6e-4, (0.9, 0.999)) and opt.warmup_steps > 0
    assert (tr.batch_size, tr.steps, tr.ema_decays) == (1024, 800_000, (0.9999, 0.99995, 0.9996))
    assert config.model.options["dropout"] == 0.2 and config.data.horizontal_flip and not config.data.class_conditional
    assert "2.92" in config.note


def test_every_preset_resolves_and_round_trips_through_json():
    for name in PRESETS:
        config = preset(name)
        assert type(config).from_dict(config.to_dict()).to_dict() == config.to_dict()


_LARGE = pytest.mark.slow  # 30-130 s each on 2 cores: run with `pytest -m slow` (benchmarks/paper_presets.sh)


@pytest.mark.parametrize("name", ["imagenet256-b4", "cifar10"] + [
    pytest.param(name, marks=_LARGE) for name in ("imagenet256-b2", "imagenet256-m2", "imagenet256-l2",
                                                  "imagenet256-xl2")])
def test_each_paper_model_takes_one_real_training_step_on_cpu(name):
    """Builds the full-size model and takes one AdamW step at batch 2 (one sample with r != t, so
    the JVP runs; guidance as in the recipe). XL/2 fits: about 11 GB with the optimizer state."""
    config = preset(name)
    torch.manual_seed(0)
    model = build_model(config.model.architecture, config.model.options)
    num_classes = config.model.options.get("num_classes")
    objective = build_objective(config.objective.method, config.objective.settings, num_classes)
    shape = (2, config.model.options["in_channels"], 32, 32)
    x, noise = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0.7, 0.5])
    r = torch.tensor([0.2, 0.5])
    labels = torch.tensor([3, 7]) if num_classes else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas)
    probe = next(p for n, p in model.named_parameters() if "weight" in n and p.dim() > 1)
    before = probe.detach().clone()
    out = objective.loss_at(model, x, noise, r, t, labels)
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss) and not torch.equal(before, probe)
