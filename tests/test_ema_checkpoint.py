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


def test_the_writer_publishes_parts_only_on_commit_and_copies_only_shared_storage(tmp_path):
    from meanflow.checkpoint import CheckpointWriter, _distinct_storage, load_checkpoint

    weight = torch.arange(6.0).reshape(2, 3)
    tied = {"encoder.weight": weight, "decoder.weight": weight, "bias": torch.ones(3)}
    ready = _distinct_storage(tied)
    assert ready["bias"].data_ptr() == tied["bias"].data_ptr()  # no host copy of a tensor sharing nothing
    assert ready["encoder.weight"].data_ptr() != ready["decoder.weight"].data_ptr()
    writer = CheckpointWriter(tmp_path, 7)
    writer.tensors("model", tied)
    writer.tensors("ema", {})
    writer.tensors("optimizer", {})
    writer.trainer_state({"note": "x"}, {"param_groups": [], "scalars": {}})
    assert list_checkpoints(tmp_path) == []  # nothing visible before the commit
    path = writer.commit()
    state = load_checkpoint(path)
    assert state.step == 7 and state.trainer["note"] == "x"
    assert all(torch.equal(state.model[key], value) for key, value in tied.items())
    abandoned = CheckpointWriter(tmp_path, 8)
    abandoned.tensors("model", tied)  # killed here: the .tmp folder is ignored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000007"]
