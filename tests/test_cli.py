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
    done = run("train", "--preset", "digits", "--dry-run", "--set", "objective.meanflow.omega=0.5", "--steps", "7")
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    assert config["objective"]["meanflow"]["omega"] == 0.5 and config["training"]["steps"] == 7
    assert config["model"]["architecture"] == "dit"


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "imagenet"], "unknown preset 'imagenet'; valid presets are"),
    (["train", "--preset", "digits", "--set", "optim.lr=-1", "--dry-run"], "optim.lr must be a finite number in (0, 1]; got -1"),
    (["train", "--preset", "digits", "--set", "objective.meanflow.fraction_r_neq_t=2", "--dry-run"], "fraction_r_neq_t must be a finite number in [0, 1]"),
    (["train", "--preset", "digits", "--set", "objective.meanflow.t_min=0.9", "--set", "objective.meanflow.t_max=0.1", "--dry-run"],
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
    with np.load(out) as data:  # the one sample file format: arr_0 holds 2-D points as they are
        assert data["arr_0"].shape == (33, 2) and np.isfinite(data["arr_0"]).all() and "arr_1" not in data
    assert out.with_suffix(".png").stat().st_size > 1000


def user_mistakes(tmp_path):
    """(argv, message) pairs: inputs a user can get wrong, each with the one line it must print."""
    empty = tmp_path / "empty_run"
    empty.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("{}")
    return [
        (["info", "--preset", "imagenet"], "meanflow info: error: unknown preset 'imagenet'"),
        (["train", "--preset", "digits", "--set", "trainer.steps=3", "--dry-run"],
         "override 'trainer.steps=3': the key must be section.field"),
        (["train", "--preset", "digits", "--set", "steps", "--dry-run"], "override 'steps' must look like"),
        (["train", "--preset", "digits", "--config", "run.json"], "give exactly one of --preset NAME or --config"),
        (["train", "--config", str(tmp_path), "--dry-run"],
         f"meanflow train: error: config file {tmp_path} is a folder; give the JSON file (a run's config.json)"),
        (["train", "--config", str(a_file / "config.json")], f"{a_file / 'config.json'}: Not a directory"),
        (["train", "--config", str(tmp_path / "missing.json")], "does not exist"),
        (["sample", "--checkpoint", str(empty)], f"meanflow sample: error: no checkpoint at {empty}"),
        (["sample", "--checkpoint", str(empty), "--num-samples", "0"], "argument --num-samples: must be >= 1, got 0"),
        (["sample", "--checkpoint", str(empty), "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["sample", "--checkpoint", str(empty), "--steps", "-1"], "argument --steps: must be >= 1, got -1"),
        (["sample", "--checkpoint", str(empty), "--num-samples", "many"],
         "argument --num-samples: must be an integer, got 'many'"),
        (["eval", "--checkpoint", str(empty), "--steps", "1", "0"], "argument --steps: must be >= 1, got 0"),
        (["bake"], "invalid choice: 'bake'"),
    ]


def test_each_user_mistake_returns_2_with_one_error_line_and_no_traceback(tmp_path, capsys):
    for argv, message in user_mistakes(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.count("error:") == 1, (argv, err)


@pytest.mark.parametrize("error, message", [
    (PermissionError(13, "Permission denied", "/runs/locked"), "/runs/locked: Permission denied"),
    (FileExistsError(17, "File exists", "/runs/a", None, "/runs/b"), "/runs/a -> /runs/b: File exists"),
    (IsADirectoryError(21, "Is a directory", "/runs"), "/runs: Is a directory"),
    (ImportError("eval needs 'scipy': pip install scipy"), "eval needs 'scipy': pip install scipy"),
    (FileNotFoundError("no statistics file stats.npz"), "no statistics file stats.npz"),
])
def test_errors_about_the_users_paths_and_packages_print_one_line(error, message, monkeypatch, capsys):
    import meanflow.cli.presets

    def fail(args):
        raise error

    monkeypatch.setattr(meanflow.cli.presets, "run", fail)
    assert main(["presets"]) == 2
    assert capsys.readouterr().err == f"meanflow presets: error: {message}\n"


def test_ctrl_c_returns_130_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import meanflow.cli.presets

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(meanflow.cli.presets, "run", interrupted)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "meanflow presets: error: interrupted\n"

    def broken(args):
        raise OSError(5, "Input/output error")  # about no path of the user's: a traceback helps here

    monkeypatch.setattr(meanflow.cli.presets, "run", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main(["presets"])

    def broken_import(args):
        raise ImportError("cannot import name 'Batch' from 'meanflow.conventions'", name="meanflow.conventions")

    monkeypatch.setattr(meanflow.cli.presets, "run", broken_import)
    with pytest.raises(ImportError, match="cannot import name 'Batch'"):
        main(["presets"])


def test_help_and_a_missing_command_return_without_raising(capsys):
    assert main(["--help"]) == 0
    assert "{train,sample,demo,encode,eval,info,presets,convert}" in capsys.readouterr().out
    assert main([]) == 2
    assert "the following arguments are required: command" in capsys.readouterr().err


def test_a_mistake_in_a_real_process_prints_no_traceback(tmp_path):
    done = run("train", "--config", str(tmp_path), "--dry-run")
    assert done.returncode == 2
    assert done.stderr == f"meanflow train: error: config file {tmp_path} is a folder; give the JSON file (a run's config.json)\n"
    done = run("sample", "--checkpoint", str(tmp_path), "--num-samples", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("meanflow sample: error: argument --num-samples: must be >= 1, got 0")
