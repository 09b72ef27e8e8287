"""EMA arithmetic and checkpoint retention."""

import pytest
import torch

from meanflow.checkpoint import list_checkpoints, save_checkpoint
from meanflow.train.ema import EMA, ema_name


def test_ema_follows_its_recurrence_for_several_decays_and_a_period():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = EMA(model, (0.9, 0.5), period=2)
    assert ema.names == ("ema_0.9", "ema_0.5") and ema_name(0.9999) == "ema_0.9999"
    expected = {0.9: 0.0, 0.5: 0.0}
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update(model, step)
        if step % 2 == 0:  # every second step with decay**2
            for decay in expected:
                expected[decay] = decay**2 * expected[decay] + (1 - decay**2) * step
    for decay, value in expected.items():
        assert ema.shadows[ema_name(decay)]["weight"].item() == pytest.approx(value, rel=1e-6)
    copy = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(copy, "ema_0.5")
    assert copy.weight.item() == pytest.approx(expected[0.5], rel=1e-6)
    with pytest.raises(ValueError, match="unknown EMA 'ema_0.7'"):
        ema.copy_to(copy, "ema_0.7")


def test_keep_last_k_plus_milestones(tmp_path):
    tensors = {"w": torch.zeros(2)}
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, tensors, {}, ({}, {"param_groups": [], "scalars": {}}), {}, keep_last=2,
                        milestone_every=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000004", "step_000000008", "step_000000009",
                                                             "step_000000010"]
    (tmp_path / "step_000000011.tmp").mkdir()  # a write that was killed half-way
    assert len(list_checkpoints(tmp_path)) == 4
