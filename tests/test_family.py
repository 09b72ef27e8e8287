"""Every objective of the family through the same parts: the three backbones, guidance in the
target, bf16 autocast, exact resume, and real torchrun processes (DDP).

The math of each method is pinned in its own test file; this one checks that each registered
objective runs wherever MeanFlow runs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_distributed import torchrun

from meanflow.checkpoint import load_checkpoint
from meanflow.models.dit import DiT, DiTConfig
from meanflow.models.mlp import MLP, MLPConfig
from meanflow.models.unet import UNet, UNetConfig
from meanflow.objectives import OBJECTIVES, build_objective
from meanflow.presets import preset
from meanflow.train import train

# case -> (method, settings that switch on what it can do: guidance in the target where its paper
# has it, the curricula of F6 on MeanFlow).
FAMILY = {
    "alpha_flow": ("alpha_flow", {"omega": 1.0, "kappa": 0.5}),
    "shortcut": ("shortcut", {"guidance_scale": 2.0}),
    "split_meanflow": ("split_meanflow", {"omega": 1.0, "kappa": 0.5}),
    "consistency": ("consistency", {}),
    "consistency_continuous": ("consistency", {"mode": "continuous"}),
    "meanflow_schedules": ("meanflow", {"fraction_r_neq_t_start": 0.0, "gap_scale_start": 0.2, "omega": 1.0,
                                        "kappa": 0.5}),
}
CLASSES = 3


def method_of(name: str) -> str:
    return FAMILY[name][0]


def settings_of(name: str) -> dict:
    return FAMILY[name][1]


def overrides_of(name: str) -> list[str]:
    method = method_of(name)
    return [f"objective.method={method}",
            *(f"objective.{method}.{key}={json.dumps(value)}" for key, value in settings_of(name).items())]


def backbones() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "mlp": (MLP(MLPConfig(data_dim=4, hidden_size=16, depth=2, num_classes=CLASSES)), (4,)),
        "dit": (DiT(DiTConfig(input_size=4, in_channels=1, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                              num_classes=CLASSES, frequency_size=16)), (1, 4, 4)),
        "unet": (UNet(UNetConfig(input_size=8, in_channels=1, base_channels=8, channel_multipliers=(1, 2),
                                 num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_heads=2,
                                 num_classes=CLASSES, frequency_size=16)), (1, 8, 8)),
    }


def test_the_family_is_registered():
    assert {method_of(name) for name in FAMILY} | {"flow_matching", "imf"} == set(OBJECTIVES)


@pytest.mark.parametrize("name", sorted(FAMILY))
@pytest.mark.parametrize("backbone", ["mlp", "dit", "unet"])
def test_every_method_trains_every_backbone_with_labels(name, backbone):
    """One loss and backward through each backbone, class-conditional, guidance on where the
    method has it: finite, and the gradient reaches every parameter group that should move."""
    model, shape = backbones()[backbone]
    objective = build_objective(method_of(name), settings_of(name), CLASSES, model=model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, *shape, generator=generator)
    labels = torch.randint(0, CLASSES, (16,), generator=generator)
    for progress in (0.0, 0.5, 1.0):  # the curricula's ends and middle
        model.zero_grad()
        out = objective.loss(model, x, labels, generator=generator, progress=progress)
        out.loss.backward()
        assert math.isfinite(float(out.loss.detach()))
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(float(g.abs().max()) > 0 for g in grads)


def tiny_digits(name: str, steps: int, *extra: str):
    return preset("digits").with_overrides([
        *overrides_of(name), f"training.steps={steps}", "training.batch_size=16",
        "training.log_every=2", "training.checkpoint_every=2", "model.options.hidden_size=16",
        "model.options.depth=1", "model.options.num_heads=2", "training.grid_samples=10",
        "training.grid_steps=[1]", "training.ema_decays=[0.9]", *extra])


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_resume_is_bit_identical_and_bf16_autocast_keeps_fp32_weights(tmp_path, name):
    """Stopped at step 2 of 4 and resumed (the curricula read progress = step / steps), a run
    ends bitwise where an uninterrupted one ends; bf16 autocast trains with fp32 weights."""
    straight = train(tiny_digits(name, 4), tmp_path / "straight", progress=False)
    train(tiny_digits(name, 4), tmp_path / "resumed", progress=False, max_steps=2)
    resumed = train(tiny_digits(name, 4), tmp_path / "resumed", progress=False)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a.step == b.step == 4
    for part in ("model", "ema", "optimizer"):
        left, right = getattr(a, part), getattr(b, part)
        for key in left:
            assert torch.equal(left[key], right[key]), f"{part}/{key} differs after resume"
    bf16 = train(tiny_digits(name, 2, "training.precision=bf16"), tmp_path / "bf16", progress=False)
    assert math.isfinite(bf16.metrics["loss"])
    assert all(v.dtype == torch.float32 for v in load_checkpoint(bf16.checkpoint).model.values())


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_every_method_trains_under_torchrun_with_synchronised_gradients(tmp_path, name):
    """Two real processes (DDP, gloo): the trainer checks after each logged window that every
    rank holds the same weights and raises if not, so a gradient forward that bypassed DDP fails."""
    args = ["-m", "meanflow.cli", "train", "--preset", "digits", "--output", str(tmp_path), "--no-progress",
            "--steps", "4"]
    for override in [*overrides_of(name), "model.options.hidden_size=16", "model.options.depth=1", "model.options.num_heads=2",
                     "training.batch_size=16", "training.checkpoint_every=4", "training.log_every=2",
                     "training.grid_samples=10", "training.grid_steps=[1]"]:
        args += ["--set", override]
    torchrun(*args)
    state = json.loads((tmp_path / "checkpoints" / "step_000000004" / "trainer.json").read_text())
    assert state["world_size"] == 2
    record = json.loads((tmp_path / "checkpoints" / "step_000000004" / "run.json").read_text())
    assert record["config"]["objective"]["method"] == method_of(name)
