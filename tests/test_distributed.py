"""Real torchrun processes (gloo, CPU): DDP must not lose the JVP's gradient synchronisation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def torchrun(*args, nproc=2, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("mode", ["ddp", "fsdp-two_pass", "fsdp-jvp"])
def test_two_processes_update_weights_exactly_like_one_process_on_the_global_batch(tmp_path, mode):
    """DDP (two-pass JVP) and FSDP2 (either JVP form) against one process on the whole batch."""
    torchrun(str(HERE / "ddp_worker.py"), str(tmp_path / "ddp.safetensors"), mode)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path / "single.safetensors"), mode],
                   check=True, env=env, timeout=300)
    ddp, single = load_file(tmp_path / "ddp.safetensors"), load_file(tmp_path / "single.safetensors")
    moved = 0.0
    for key in single:
        # float64 throughout; the only difference is the order of the gradient all-reduce sum.
        torch.testing.assert_close(ddp[key], single[key], atol=1e-12, rtol=1e-10)
        moved = max(moved, float((single[key]).abs().max()))
    assert moved > 0


def test_gathering_sharded_state_keeps_full_copies_on_rank_0_only(tmp_path):
    """FSDP2 checkpoints gather one tensor at a time; ranks other than 0 keep nothing, and what
    rank 0 keeps is bitwise the unsharded model (and its EMA, a copy of it at the start)."""
    import ddp_worker

    output = tmp_path / "gathered.safetensors"
    torchrun(str(HERE / "ddp_worker.py"), str(output), "gather")
    reports = [json.loads((tmp_path / f"gathered.safetensors.rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["kept"] and not reports[1]["kept"] and reports[1]["tensors"] == 0
    gathered = load_file(output)
    reference = ddp_worker.build_model().state_dict()
    assert reports[0]["tensors"] == len(gathered) == 2 * len(reference)
    for key, value in reference.items():
        assert torch.equal(gathered[f"model/{key}"], value), key
        assert torch.equal(gathered[f"ema/ema_0.9/{key}"], value.float()), key


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The finiteness flag is reduced over ranks (with the stop request, in one all-reduce): a
    loss only rank 1 sees as infinite, with finite gradients, makes both ranks skip."""
    torchrun(str(HERE / "ddp_worker.py"), str(tmp_path / "outcome.json"), "inf-on-rank-1")
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome == {"step": 4, "skipped": 1, "calls": 5}


def test_gather_helpers_in_one_process_keep_or_drop():
    from meanflow.distributed import gather_state, gather_to_main, shard_range

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    assert gather_state(tensors, keep=False) is None and gather_to_main(tensors["w"], keep=False) is None
    kept = gather_state(tensors, keep=True)
    assert kept.keys() == tensors.keys() and all(torch.equal(kept[k], tensors[k]) for k in tensors)
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_meanflow_train_runs_under_torchrun_and_resumes(tmp_path):
    args = ["-m", "meanflow.cli", "train", "--preset", "toy-two-moons", "--output", str(tmp_path), "--no-progress",
            "--set", "model.options.hidden_size=16", "--set", "training.batch_size=32",
            "--set", "training.checkpoint_every=4", "--set", "training.log_every=2", "--set", "training.grid_samples=16"]
    torchrun(*args, "--steps", "4")
    torchrun(*args, "--steps", "8")
    state = json.loads((tmp_path / "checkpoints" / "step_000000008" / "trainer.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["rng"][0] != state["rng"][1]
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6, 8]
    with pytest.raises(AssertionError, match="written by 2 processes"):
        torchrun(*args, "--steps", "12", nproc=1)


def test_fsdp_training_with_resume_matches_ddp_training(tmp_path):
    """`training.parallel=fsdp` shards weights, optimizer state and EMA; its checkpoints hold full
    tensors. Resumed halfway, it ends where an uninterrupted DDP run ends (fp32 tolerance)."""
    from meanflow.checkpoint import load_checkpoint

    common = ["-m", "meanflow.cli", "train", "--preset", "digits", "--no-progress",
              "--set", "model.options.hidden_size=32", "--set", "model.options.depth=2",
              "--set", "model.options.num_heads=2", "--set", "training.batch_size=16",
              "--set", "training.checkpoint_every=2", "--set", "training.grid_samples=10",
              "--set", "training.ema_decays=[0.9]"]
    torchrun(*common, "--output", str(tmp_path / "ddp"), "--steps", "4")
    fsdp = [*common, "--output", str(tmp_path / "fsdp"), "--set", "training.parallel=fsdp"]
    torchrun(*fsdp, "--steps", "2")  # stop at 2 (the schedule does not depend on the total) ...
    torchrun(*fsdp, "--steps", "4")  # ... and resume to 4
    a = load_checkpoint(tmp_path / "ddp")
    b = load_checkpoint(tmp_path / "fsdp")
    assert a.step == b.step == 4
    for part in ("model", "ema", "optimizer"):
        left, right = getattr(a, part), getattr(b, part)
        assert left.keys() == right.keys()
        for key in left:
            torch.testing.assert_close(right[key], left[key], atol=1e-5, rtol=1e-4)
    assert (tmp_path / "fsdp" / "samples" / "step000000004_nfe1.png").exists()


def test_meanflow_eval_under_torchrun_equals_one_process(tmp_path):
    """Two ranks generate disjoint halves (per-sample seeds) and sum their statistics: the same
    domain FID, accuracy and precision / recall as one process, and only rank 0 writes."""
    from meanflow.presets import preset
    from meanflow.train import train

    config = preset("digits").with_overrides([
        "training.steps=4", "training.batch_size=16", "model.options.hidden_size=16", "model.options.depth=1",
        "model.options.num_heads=2", "training.grid_samples=10", "training.checkpoint_every=4"])
    train(config, tmp_path / "run", progress=False)
    common = ["-m", "meanflow.cli", "eval", "--checkpoint", str(tmp_path / "run"), "--metric", "domain",
              "--classifier", str(tmp_path / "classifier"), "--train-classifier", "--classifier-steps", "10",
              "--num-samples", "60", "--steps", "1", "2", "--batch-size", "16", "--precision-recall", "30",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    torchrun(*common, "--json", str(tmp_path / "two.json"))
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    subprocess.run([sys.executable, *common, "--json", str(tmp_path / "one.json")], check=True, env=env, timeout=300)
    two, one = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(two["scores"], one["scores"], strict=True):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-6)
        assert a["accuracy"] == b["accuracy"]
        assert abs(a["precision"] - b["precision"]) <= 1 / 30 and abs(a["recall"] - b["recall"]) <= 1 / 30
