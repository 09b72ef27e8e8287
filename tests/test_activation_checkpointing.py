"""``training.activation_checkpointing``: the same loss and gradients (and the same tangent, computed
once), less memory kept for backward, dropout replayed; refused with a clear error where unsupported."""

from __future__ import annotations

import pytest
import torch
from test_one_pass import CLASSES, batch, dit, unet
from tiny_runs import tiny

from meanflow.checkpoint import load_checkpoint
from meanflow.models import enable_activation_checkpointing
from meanflow.models.imf_dit import ImfDiT, ImfDiTConfig
from meanflow.objectives import ImprovedMeanFlow, MeanFlow, TrainingGuidance
from meanflow.presets import preset
from meanflow.train import train


def gradients(model, objective, inputs, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = objective.loss_at(model, *inputs)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("network,dropout", [(dit, 0.0), (unet, 0.0), (unet, 0.3)], ids=["dit", "unet", "unet-dropout"])
def test_checkpointed_step_equals_the_plain_one_and_recomputes_without_the_tangent(network, dropout):
    model = network()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    inputs = batch(model)
    objective = MeanFlow(num_classes=CLASSES, guidance=TrainingGuidance(omega=1.0, kappa=0.5))
    loss, grads = gradients(model, objective, inputs)
    enable_activation_checkpointing(model, "test")
    calls = []
    blocks = [m for m in model.modules() if type(m).__name__ in ("DiTBlock", "_Stage", "ResidualBlock")]
    hooks = [block.register_forward_pre_hook(lambda m, args: calls.append(len(args) > 2 and args[2] is not None))
             for block in blocks[:1]]
    loss_c, grads_c = gradients(model, objective, inputs)
    for hook in hooks:
        hook.remove()
    assert torch.equal(loss, loss_c)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    # The first block ran in the forward with the tangent, and in backward's recompute without it.
    assert calls[-2:] == [True, False]


def test_checkpointing_the_imf_dit_keeps_its_numbers():
    torch.manual_seed(0)
    model = ImfDiT(ImfDiTConfig(input_size=4, in_channels=2, patch_size=2, hidden_size=16, depth=3, num_heads=2,
                                num_classes=CLASSES, aux_head_depth=1, num_class_tokens=1, num_cfg_tokens=1,
                                num_interval_tokens=1, num_time_tokens=1)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x, e, r, t, labels = batch(model, size=6)
    inputs = (x, e, r, t, labels.clamp(max=CLASSES - 1))
    objective = ImprovedMeanFlow(num_classes=CLASSES)
    loss, grads = gradients(model, objective, inputs)
    enable_activation_checkpointing(model, "imf_dit")
    loss_c, grads_c = gradients(model, objective, inputs)
    assert torch.equal(loss, loss_c)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_a_checkpointed_run_trains_like_a_plain_one_and_the_mlp_is_refused(tmp_path):
    # digits: the DiT preset on the embedded data set; the setting changes no number, so a run may
    # resume with it switched (FREE_TO_CHANGE) and ends where the plain run ends.
    plain = train(tiny(preset("digits"), steps=4), tmp_path / "plain", progress=False)
    train(tiny(preset("digits"), steps=4), tmp_path / "switched", progress=False, max_steps=2)
    switched = train(tiny(preset("digits"), steps=4).with_overrides(["training.activation_checkpointing=true"]),
                     tmp_path / "switched", progress=False)
    a, b = load_checkpoint(plain.checkpoint).model, load_checkpoint(switched.checkpoint).model
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="dit, imf_dit, unet"):
        train(tiny(preset("toy-checkerboard")).with_overrides(["training.activation_checkpointing=true"]),
              tmp_path / "mlp", progress=False)
