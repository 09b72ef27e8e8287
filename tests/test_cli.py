"""The `meanflow` command in real subprocesses and in-process."""

import json
import subprocess
import sys

import numpy as np
import pytest

from meanflow.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "meanflow.cli", *args], capture_output=True, text=True, timeout=300)


def test_dry_run_prints_the_resolved_configuration():
    done = run("train", "--preset", "digits", "--dry-run", "--set", "objective.omega=0.5", "--steps", "7")
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert config["objective"]["omega"] == 0.5 and config["training"]["steps"] == 7
    assert config["model"]["architecture"] == "dit"


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "imagenet"], "unknown preset 'imagenet'; valid presets are"),
    (["train", "--preset", "digits", "--set", "optim.lr=-1", "--dry-run"], "optim.lr must be > 0"),
    (["train", "--preset", "digits", "--set", "objective.fraction_r_neq_t=2", "--dry-run"], "must lie in [0, 1]"),
    (["train", "--preset", "digits", "--set", "objective.t_min=0.9", "--set", "objective.t_max=0.1", "--dry-run"],
     "t_min <= t_max"),
    (["train", "--preset", "digits", "--set", "training.batchsize=3", "--dry-run"], "unknown field 'batchsize'"),
    (["train", "--preset", "digits", "--set", "model.options.hidden=3", "--dry-run"], "unknown DiTConfig field(s) ['hidden']"),
    (["sample", "--checkpoint", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
])
def test_bad_input_gets_a_clear_error(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_train_then_sample_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    done = run("train", "--preset", "toy-two-moons", "--output", str(run_dir), "--no-progress", "--steps", "5",
               "--set", "model.options.hidden_size=16", "--set", "training.grid_samples=16")
    assert done.returncode == 0, done.stderr
    assert "checkpoint:" in done.stdout and (run_dir / "checkpoints" / "step_000000005").is_dir()
    out = tmp_path / "samples.npz"
    done = run("sample", "--checkpoint", str(run_dir), "--num-samples", "33", "--steps", "2", "--output", str(out))
    assert done.returncode == 0, done.stderr
    with np.load(out) as data:
        assert data["samples"].shape == (33, 2) and np.isfinite(data["samples"]).all()
    assert out.with_suffix(".png").stat().st_size > 1000
