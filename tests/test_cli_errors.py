"""Every expected failure of the real `meanflow` command: a non-zero exit, one or two lines that say
what is wrong and what is valid, and no traceback (unless --debug / MEANFLOW_DEBUG=1).

The cases run `python -m meanflow.cli ...` in a subprocess; they share one tiny run of each
kind (2-D points, class-conditional 8x8 digits) trained once for the module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow.checkpoint import latest_checkpoint, load_checkpoint
from meanflow.presets import preset
from meanflow.train import train

ROOT = Path(__file__).parent.parent
TINY_POINTS = ["training.steps=2", "training.batch_size=16", "model.options.hidden_size=16", "model.options.depth=1",
               "training.grid_samples=16", "training.checkpoint_every=2"]
TINY_DIGITS = ["training.steps=2", "training.batch_size=16", "model.options.hidden_size=16", "model.options.depth=1",
               "model.options.num_heads=2", "training.grid_samples=10", "training.grid_steps=[1]",
               "training.checkpoint_every=2"]
# `meanflow train` on points from an .npz: a few steps of a small MLP.
POINTS_FROM_NPZ = ["train", "--preset", "toy-two-moons", "--no-progress", "--set", "model.options.hidden_size=16",
                   "--set", "training.batch_size=16", "--set", "training.grid_samples=16", "--set", "data.name=npz",
                   "--set", "data.class_conditional=false", "--set", "training.log_every=1"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m meanflow.cli *args`` in a fresh process (MEANFLOW_DEBUG only where ``env`` sets it)."""
    environment = {key: value for key, value in os.environ.items() if key != "MEANFLOW_DEBUG"}
    environment.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "meanflow.cli", *args], capture_output=True, text=True,
                          timeout=300, env=environment)


def cli_all(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """:func:`cli` of each argv, two at a time (each process spends its time importing torch)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda argv: cli(*argv), argvs))


def assert_clean_failure(done: subprocess.CompletedProcess, message: str, code: int = 2) -> str:
    """Exit ``code``, ``message`` in the one ``error:`` line, stderr of at most two lines, no traceback."""
    err = done.stderr
    assert done.returncode == code, (done.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) <= 2, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained run of points and one of class-conditional digits."""
    root = tmp_path_factory.mktemp("runs")
    train(preset("toy-two-moons").with_overrides(TINY_POINTS), root / "points", progress=False)
    train(preset("digits").with_overrides(TINY_DIGITS), root / "digits", progress=False)
    return root


@pytest.fixture
def paths(tmp_path):
    """A file and a folder to hand where the other is needed."""
    a_file, a_folder = tmp_path / "a_file", tmp_path / "a_folder"
    a_file.write_text("not a folder")
    a_folder.mkdir()
    return a_file, a_folder


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in: a read-only folder, or for root (which writes
    anywhere on an ordinary file system) /sys, where even root may not create files."""
    from meanflow.cli.common import _not_writable

    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if _not_writable(folder) is not None:
            yield folder
        elif _not_writable(Path("/sys")) is not None:
            yield Path("/sys")
        else:
            pytest.skip("no folder here refuses this process's writes")
    finally:
        folder.chmod(0o755)


# -- seeds, counts and batch sizes ----------------------------------------------------------------

def test_bad_seeds_counts_and_batch_sizes_name_the_option_and_what_is_valid(tmp_path):
    cases = [
        (["sample", "--seed", "abc"], "argument --seed: must be an integer >= 0, got 'abc'"),
        (["eval", "--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
        (["sample", "--num-samples", "-1"], "argument --num-samples: must be >= 1, got -1"),
        (["sample", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["eval", "--num-samples", "-1"], "argument --num-samples: must be >= 1, got -1"),
        (["eval", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    ]
    argvs = [[command, "--checkpoint", str(tmp_path), *options] for (command, *options), _ in cases]
    for done, ((command, *_), message) in zip(cli_all(argvs), cases, strict=True):
        line = assert_clean_failure(done, message)
        assert line.startswith(f"meanflow {command}: error:")
        usage = f"usage: meanflow {command} ... (`meanflow {command} --help` lists the options)"
        assert done.stderr.splitlines() == [usage, line]


def test_a_string_training_seed_is_refused_before_training(tmp_path):
    done = cli("train", "--preset", "toy-two-moons", "--output", str(tmp_path / "run"), "--steps", "1",
               "--set", 'training.seed="x"')
    assert_clean_failure(done, "training.seed must be an integer")
    assert not (tmp_path / "run").exists()


# -- devices ------------------------------------------------------------------------------------

def test_devices_are_checked_against_this_machine_by_every_command(runs, tmp_path):
    points = str(runs / "points")
    cases = [
        (["sample", "--checkpoint", points, "--device", "tpu"],
         "--device 'tpu' is not a device; valid devices here: auto, cpu"),
        (["eval", "--checkpoint", points, "--device", "cuda:7", "--num-samples", "10"], "--device 'cuda:7': "),
        (["encode", "--images", str(tmp_path), "--output", str(tmp_path / "cache"), "--device", "tpu"],
         "--device 'tpu' is not a device"),
    ]
    if not torch.cuda.is_available():
        cases += [(["sample", "--checkpoint", points, "--device", "cuda"],
                   "--device 'cuda': no CUDA device is available ("),
                  (["train", "--preset", "toy-two-moons", "--output", str(tmp_path / "run"), "--steps", "1",
                    "--set", "training.device=cuda"], "training.device 'cuda': no CUDA device is available")]
    for done, (_, message) in zip(cli_all([argv for argv, _ in cases]), cases, strict=True):
        assert_clean_failure(done, message)
    assert not (tmp_path / "run").exists()


def test_resolve_device_is_the_one_check(monkeypatch):
    from meanflow.distributed import resolve_device
    from meanflow.errors import DeviceUnavailableError, MeanflowError

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceUnavailableError, match="'tpu' is not a device") as raised:
        resolve_device("tpu", "--device")
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, MeanflowError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceUnavailableError, match=re.escape(
            "--device 'cuda:7': this machine has 2 CUDA devices; valid devices here: auto, cpu, cuda, "
            "cuda:0 .. cuda:1")):
        resolve_device("cuda:7", "--device")
    # Under torchrun (refused before any GPU is touched): a GPU index, or more processes than GPUs.
    from meanflow.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(DeviceUnavailableError, match="under torchrun give --device cuda .* not cuda:1"):
        init_distributed("cuda:1", setting="--device")
    with pytest.raises(DeviceUnavailableError, match=r"LOCAL_RANK=3 needs GPU 3 but this machine has 2; start at "
                                                     r"most 2 processes per machine"):
        init_distributed("cuda")


# -- output paths, checked before any work ---------------------------------------------------------

def test_output_paths_of_the_wrong_kind_are_refused_before_any_work(runs, paths, tmp_path):
    a_file, a_folder = paths
    points, digits = str(runs / "points"), str(runs / "digits")
    cases = [
        (["train", "--preset", "toy-two-moons", "--steps", "1", "--output", str(a_file)],
         f"--output {a_file} is a file, but a folder is needed"),
        (["train", "--preset", "toy-two-moons", "--steps", "1", "--output", str(a_file / "run")],
         f"--output {a_file / 'run'} cannot be created: {a_file} is a file, not a folder"),
        (["sample", "--checkpoint", digits, "--output", str(a_folder)],
         f"--output {a_folder} is a folder, but a file is needed; give a file path such as {a_folder}/samples.npz"),
        (["sample", "--checkpoint", digits, "--output", str(tmp_path / "s.npz"), "--grid", str(a_folder)],
         f"--grid {a_folder} is a folder, but a file is needed"),
        (["eval", "--checkpoint", points, "--num-samples", "20", "--json", str(a_folder)],
         f"--json {a_folder} is a folder, but a file is needed"),
        (["eval", "--checkpoint", points, "--num-samples", "20", "--sweep", "--plot", str(a_folder)],
         f"--plot {a_folder} is a folder, but a file is needed"),
        (["eval", "--checkpoint", points, "--num-samples", "20", "--save-samples", str(a_file)],
         f"--save-samples {a_file} is a file, but a folder is needed"),
        (["encode", "--images", str(a_folder), "--output", str(a_file)],
         f"--output {a_file} is a file, but a folder is needed"),
    ]
    for done, (_, message) in zip(cli_all([[*argv, "--no-progress"] for argv, _ in cases]), cases, strict=True):
        assert_clean_failure(done, message)
    assert not (tmp_path / "s.npz").exists() and not list((runs / "digits" / "samples").glob("ema_*"))
    assert sorted(p.name for p in a_folder.iterdir()) == []  # nothing was written into the folder


def test_an_unwritable_output_folder_is_refused_before_any_work(runs, unwritable, tmp_path):
    line = assert_clean_failure(cli("train", "--preset", "toy-two-moons", "--steps", "1",
                                    "--output", str(unwritable / "run")), "is not writable (")
    assert f"--output {unwritable / 'run'} cannot be written: {unwritable}" in line
    assert_clean_failure(cli("sample", "--checkpoint", str(runs / "points"), "--output", str(unwritable / "s.npz")),
                         f"--output {unwritable / 's.npz'} cannot be written")
    assert_clean_failure(cli("eval", "--checkpoint", str(runs / "points"), "--num-samples", "20",
                             "--json", str(unwritable / "report.json")), "--json")


# -- data files -------------------------------------------------------------------------------------

def image_npz_args(path: Path, output: Path) -> list[str]:
    return ["train", "--preset", "digits", "--output", str(output), "--no-progress", "--steps", "1",
            "--set", "data.name=npz", "--set", f"data.path={path}", "--set", "model.options.hidden_size=16",
            "--set", "model.options.depth=1", "--set", "model.options.num_heads=2", "--set", "training.batch_size=16"]


def test_bad_data_files_are_refused_before_training_with_what_to_change(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(32) % 10
    floats = (images / 127.5 - 1).astype(np.float32)
    floats[3, 0, 0, 0] = np.nan
    files = {  # name: (arrays, what the message says)
        "big_labels": ({"x": images, "labels": labels + 5},
                       "labels must lie in [0, 10) for model.options.num_classes=10; found 14"),
        "negative_labels": ({"x": images, "labels": labels - 1}, "labels must be class ids >= 0, found -1"),
        "float_labels": ({"x": images, "labels": labels.astype(np.float32)}, "labels must be integer class ids"),
        "short_labels": ({"x": images, "labels": labels[:5]},
                         "labels must have shape (32,), one per sample, got (5,)"),
        "no_x": ({"images": images, "labels": labels}, "has no array 'x' (it has ['images', 'labels'])"),
        "int_x": ({"x": images.astype(np.int64), "labels": labels}, "must hold floating-point samples, got int64"),
        "nan_x": ({"x": floats, "labels": labels},
                  "non-finite values (NaN or inf) in 1 of 32 samples, the first at index 3"),
        "flat_x": ({"x": images[:, 0, 0], "labels": labels}, "uint8 images must be (N, C, H, W) with C = 1 or 3"),
        "objects": ({"x": np.array([{"a": 1}] * 32, dtype=object), "labels": labels},
                    "holds pickled data (Python objects), which is refused"),
    }
    for name, (arrays, _) in files.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    outcomes = cli_all([image_npz_args(tmp_path / f"{name}.npz", tmp_path / name) for name in files])
    for done, (name, (_, message)) in zip(outcomes, files.items(), strict=True):
        line = assert_clean_failure(done, message)
        assert str(tmp_path / f"{name}.npz") in line, line
        assert "allow_pickle" not in line and not (tmp_path / name / "checkpoints").exists()
    # The model's classes and the file's disagree the other way: the fix is spelled as --set spells it.
    done = cli(*image_npz_args(tmp_path / "big_labels.npz", tmp_path / "x"), "--set", "model.options.num_classes=null")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    found = "model.options.num_classes=null but the data has 15 classes (labels 0..14)"
    assert f"{found}; use --set model.options.num_classes=15" in done.stderr


def test_pickled_arrays_of_a_built_in_data_set_are_refused_without_numpys_advice(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.array([{"a": 1}] * 32, dtype=object), y_train=np.arange(32) % 10)
    done = cli("train", "--preset", "mnist", "--output", str(tmp_path / "run"), "--steps", "1",
               "--set", f"data.path={tmp_path / 'mnist.npz'}")
    line = assert_clean_failure(done, f"{tmp_path / 'mnist.npz'}: array 'x_train' holds pickled data")
    assert "allow_pickle" not in done.stderr and "store numeric arrays only" in line


def test_relayed_advice_to_unpickle_is_never_printed():
    from meanflow.cli.common import describe

    assert describe(ValueError("x.npz: Object arrays cannot be loaded when allow_pickle=False")) == \
        "x.npz: the file holds pickled data (Python objects), which is refused"
    torch_style = ValueError("Weights only load failed ... set `weights_only=False` if you trust the file")
    assert "weights_only" not in describe(torch_style) and "pickled data" in describe(torch_style)


def test_an_unreadable_image_hint_is_spelled_as_the_command_line_spells_it(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / name / "ok.png")
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    done = cli("train", "--preset", "digits", "--output", str(tmp_path / "run"), "--steps", "1",
               "--set", "data.name=folder", "--set", f"data.path={tmp_path / 'images'}", "--set", "data.resolution=8")
    line = assert_clean_failure(done, "cannot read image file")
    assert "--set data.skip_corrupt=true" in line and "(meanflow encode: --skip-corrupt; Python: skip_corrupt=True)" \
        in line


# -- missing files ----------------------------------------------------------------------------------

def test_encode_checks_the_images_before_it_reads_the_vae(tmp_path):
    done = cli("encode", "--images", str(tmp_path / "missing"), "--output", str(tmp_path / "cache"),
               "--vae", str(tmp_path / "no_vae"), "--no-progress")
    assert_clean_failure(done, f"image folder {tmp_path / 'missing'} does not exist")


def test_a_missing_vae_folder_and_statistics_file_are_reported_in_one_line(runs, tmp_path):
    from PIL import Image

    from meanflow.data.digits import load_digits_tensors
    from meanflow.eval.classifier import save_classifier, train_domain_classifier

    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / name / "x.png")
    done = cli("encode", "--images", str(tmp_path / "images"), "--output", str(tmp_path / "cache"),
               "--vae", str(tmp_path / "no_vae"), "--no-progress")
    assert_clean_failure(done, f"the VAE folder {tmp_path / 'no_vae'} does not exist")
    images, labels = load_digits_tensors()
    save_classifier(train_domain_classifier(images, labels, steps=2), tmp_path / "classifier")
    done = cli("eval", "--checkpoint", str(runs / "digits"), "--metric", "domain", "--classifier",
               str(tmp_path / "classifier"), "--reference", str(tmp_path / "stats.npz"), "--num-samples", "20",
               "--steps", "1", "--no-progress")
    assert_clean_failure(done, f"no statistics file at {tmp_path / 'stats.npz'}")


# -- labels -----------------------------------------------------------------------------------------

def test_labels_beyond_the_classes_are_refused_by_the_command_and_the_api(runs):
    from meanflow.inference import generate, load_model

    digits = str(runs / "digits")
    for label in ("10", "11", "-1"):
        assert_clean_failure(cli("sample", "--checkpoint", digits, "--num-samples", "4", "--label", label),
                             f"--label must be a class id in [0, 9] (the model has 10 classes), got {label}")
    loaded = load_model(digits)
    for labels, message in ((torch.full((4,), 11), r"class ids in \[0, 9\] \(or 10, the null class"),
                            (torch.full((4,), -1), "class ids >= 0, found -1"),
                            (torch.zeros(3, dtype=torch.long), r"shape \(4,\)"),
                            (torch.zeros(4), "integer class ids")):
        with pytest.raises(ValueError, match=message):
            generate(loaded.model, 4, loaded.sample_shape, labels=labels, num_classes=10, sampler=loaded.sampler)
    null = generate(loaded.model, 4, loaded.sample_shape, labels=torch.full((4,), 10), num_classes=10,
                    sampler=loaded.sampler)  # the null class: unconditional samples
    assert null.shape == (4, 1, 8, 8) and torch.isfinite(null).all()


# -- the non-finite policy --------------------------------------------------------------------------

def test_a_run_stopped_by_the_non_finite_policy_exits_1_with_its_message(tmp_path):
    huge = np.random.default_rng(0).standard_normal((32, 2)).astype(np.float32) * 1e30  # finite, but the loss is not
    np.savez(tmp_path / "huge.npz", x=huge)
    done = cli(*POINTS_FROM_NPZ, "--output", str(tmp_path / "stop"), "--steps", "5", "--set",
               f"data.path={tmp_path / 'huge.npz'}", "--set", "training.on_nonfinite=stop")
    assert_clean_failure(done, "non-finite loss or gradient at step 1 (loss inf", code=1)
    assert "(--set training.on_nonfinite=stop; Python: training.on_nonfinite='stop')" in done.stderr
    assert "--set optim.lr=" in done.stderr
    done = cli(*POINTS_FROM_NPZ, "--output", str(tmp_path / "skips"), "--steps", "5", "--set",
               f"data.path={tmp_path / 'huge.npz'}", "--set", "training.max_consecutive_skips=3")
    assert_clean_failure(done, "3 steps in a row were skipped, stopping", code=1)
    assert done.stderr.count(": warning: ") == 1  # the first skip warns; the stop explains the rest


def test_skipped_steps_warn_rate_limited_and_the_summary_counts_them(tmp_path):
    points = np.random.default_rng(0).standard_normal((32, 2)).astype(np.float32)
    points[0] = 1e30  # one of the two batches of each epoch has a non-finite loss
    np.savez(tmp_path / "one_huge.npz", x=points)
    done = cli(*POINTS_FROM_NPZ, "--output", str(tmp_path / "run"), "--steps", "24", "--set",
               f"data.path={tmp_path / 'one_huge.npz'}")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    skipped = int(re.search(r"trained to step 24 in \d+ s; (\d+) steps? skipped for a non-finite loss or gradient",
                            done.stdout).group(1))
    warnings = [line for line in done.stderr.splitlines() if line.startswith("meanflow train: warning: ")]
    assert skipped >= 10 and len(warnings) == 1 + skipped // 10, done.stderr
    assert all("non-finite loss or gradient at step" in line and "skipped" in line for line in warnings)
    assert "skipped, 1 so far" in warnings[0] and "skipped, 10 so far" in warnings[1]
    assert load_checkpoint(tmp_path / "run").trainer["skipped_steps"] == skipped


# -- --debug ----------------------------------------------------------------------------------------

def test_debug_or_meanflow_debug_shows_the_traceback(runs):
    bad = ["sample", "--checkpoint", str(runs / "points"), "--device", "tpu"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        calls = [(["--debug", *bad], None), ([*bad, "--debug"], None), (bad, {"MEANFLOW_DEBUG": "1"})]
        outcomes = list(pool.map(lambda call: cli(*call[0], env=call[1]), calls))
    for done in outcomes:
        assert done.returncode == 2 and "Traceback" in done.stderr and "DeviceUnavailableError" in done.stderr
        assert done.stderr.rstrip().splitlines()[-1].startswith("meanflow sample: error: --device 'tpu'")


def test_which_failures_are_expected():
    from meanflow.cli.common import expected_exit_code
    from meanflow.errors import NonFiniteTrainingError, OutputPathError

    assert expected_exit_code(OutputPathError("x")) == 2 and expected_exit_code(NonFiniteTrainingError("x")) == 1
    assert expected_exit_code(IsADirectoryError("runs is a folder")) == 2  # about a path, even with no file name
    assert expected_exit_code(ValueError("x")) == 2 and expected_exit_code(FileNotFoundError("x")) == 2
    assert expected_exit_code(RuntimeError("x")) is None and expected_exit_code(OSError(5, "I/O error")) is None
    assert expected_exit_code(ImportError("x", name="meanflow.sampling")) is None  # our own import: a bug


# -- signals under torchrun -------------------------------------------------------------------------

def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the torchrun workers through /proc")
def test_a_preemption_signal_under_torchrun_stops_every_rank_cleanly(tmp_path):
    """SIGTERM to every worker (as a scheduler sends it), and again a moment later (torchrun forwards
    the one it got): every rank checkpoints and exits 0, rank 0 prints the resume line once."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "meanflow.cli",
            "train", "--preset", "toy-two-moons", "--output", str(tmp_path), "--no-progress", "--steps", "1000000",
            "--set", "model.options.hidden_size=16", "--set", "training.batch_size=32", "--set", "training.log_every=1",
            "--set", "training.checkpoint_every=100000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        log = tmp_path / "metrics.jsonl"
        deadline = time.time() + 180
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert process.poll() is None and time.time() < deadline, process.communicate()
            time.sleep(0.05)
        workers = children_of(process.pid)
        assert len(workers) == 2
        for _ in range(2):
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.2)
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = re.findall(r"stopped by a signal at step (\d+); run the same command to resume", out)
    assert len(stopped) == 1, out
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints")).step == int(stopped[0])
    state = json.loads((latest_checkpoint(tmp_path / "checkpoints") / "trainer.json").read_text())
    assert state["world_size"] == 2
