"""A run that is killed, preempted or meets a NaN loses nothing; precision and compile paths."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meanflow.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from meanflow.presets import preset
from meanflow.train import train
from meanflow.train.loop import Trainer

ROOT = Path(__file__).parent.parent


def toy(steps, *extra):
    return preset("toy-two-moons").with_overrides([
        f"training.steps={steps}", "training.batch_size=64", "model.options.hidden_size=32",
        "model.options.depth=2", "training.log_every=1", "training.grid_samples=16", *extra])


def start_training(folder, *extra):
    args = [sys.executable, "-m", "meanflow.cli", "train", "--preset", "toy-two-moons", "--output", str(folder),
            "--no-progress", "--steps", "1000000", "--set", "model.options.hidden_size=32",
            "--set", "model.options.depth=2", "--set", "training.batch_size=64", "--set", "training.log_every=1", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_steps(folder, count, process, timeout=120):
    deadline = time.time() + timeout
    log = Path(folder) / "metrics.jsonl"
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError("training did not start")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_preemption_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    process = start_training(tmp_path, "--set", "training.checkpoint_every=100000")
    wait_for_steps(tmp_path, 3, process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopped by a signal" in out
    checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint.step >= 3 and checkpoint.step == logged[-1]
    resumed = train(toy(1000000), tmp_path, progress=False, max_steps=checkpoint.step + 2)
    assert resumed.step == checkpoint.step + 2


def test_sigkill_at_a_random_moment_leaves_the_last_checkpoint_loadable(tmp_path):
    rng = random.Random(0)
    for attempt in range(3):
        process = start_training(tmp_path, "--set", "training.checkpoint_every=1", "--set", "training.keep_checkpoints=2")
        wait_for_steps(tmp_path, 2, process)
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()  # SIGKILL: no handler runs
        process.communicate()
        found = list_checkpoints(tmp_path / "checkpoints")
        assert found, "no complete checkpoint survived"
        state = load_checkpoint(found[-1])
        assert all(torch.isfinite(v).all() for v in state.model.values())
        assert state.trainer["step"] == state.step


def test_nonfinite_steps_are_skipped_and_counted_and_never_reach_a_checkpoint(tmp_path):
    trainer = Trainer(toy(6, "training.checkpoint_every=1"), tmp_path, progress=False)
    real_loss = trainer.take_step.loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        out = real_loss(*args, **kwargs)
        if calls["n"] in (2, 3):
            out.loss = out.loss * math.nan
        return out

    trainer.take_step.loss = sometimes_nan
    result = trainer.run()
    assert result.step == 6 and result.skipped_steps == 2 and calls["n"] == 8
    for path in list_checkpoints(tmp_path / "checkpoints"):
        state = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for part in (state.model, state.ema, state.optimizer)
                   for v in part.values() if v.is_floating_point())
    assert load_checkpoint(result.checkpoint).trainer["skipped_steps"] == 2


def test_stop_mode_and_too_many_skips_stop_with_a_clear_message(tmp_path):
    for extra, message in ((["training.on_nonfinite=stop"], "training.on_nonfinite='stop'"),
                           (["training.max_consecutive_skips=3"], "3 steps in a row were skipped")):
        folder = tmp_path / extra[0].split("=")[0]
        trainer = Trainer(toy(10, "training.checkpoint_every=1", *extra), folder, progress=False)
        real_loss = trainer.take_step.loss
        calls = {"n": 0}

        def nan_after_two(*args, **kwargs):
            calls["n"] += 1
            out = real_loss(*args, **kwargs)
            if calls["n"] > 2:
                out.loss = out.loss * math.nan
            return out

        trainer.take_step.loss = nan_after_two
        with pytest.raises(FloatingPointError, match=message):
            trainer.run()
        state = load_checkpoint(latest_checkpoint(folder / "checkpoints"))
        assert state.step == 2 and all(torch.isfinite(v).all() for v in state.model.values())


def test_bf16_autocast_training_runs_with_fp32_target(tmp_path):
    config = preset("digits").with_overrides([
        "training.steps=3", "training.batch_size=16", "model.options.hidden_size=32", "model.options.depth=1",
        "model.options.num_heads=2", "training.precision=bf16", "training.grid_samples=10"])
    result = train(config, tmp_path, progress=False)
    assert result.step == 3 and math.isfinite(result.metrics["loss"])
    state = load_checkpoint(result.checkpoint)
    assert all(v.dtype == torch.float32 for v in state.model.values())  # weights stay fp32


def test_compiled_model_trains_like_eager(tmp_path):
    eager = train(toy(3, "training.checkpoint_every=3"), tmp_path / "eager", progress=False)
    compiled = train(toy(3, "training.checkpoint_every=3", "training.compile=aot_eager"), tmp_path / "compiled",
                     progress=False)
    a, b = load_checkpoint(eager.checkpoint).model, load_checkpoint(compiled.checkpoint).model
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_tensorboard_logs_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    train(toy(2, "training.tensorboard=true"), tmp_path, progress=False)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_checkpoints_hold_only_data_files(tmp_path):
    result = train(toy(2), tmp_path, progress=False)
    names = sorted(p.name for p in result.checkpoint.iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "run.json", "trainer.json"]
