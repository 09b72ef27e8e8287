"""A damaged checkpoint is refused with a ValueError that names the file, says what is wrong and
what to do; nothing is ever unpickled."""

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from meanflow.checkpoint import load_checkpoint, load_weights, resolve_checkpoint
from meanflow.inference import load_model
from meanflow.presets import preset
from meanflow.train import train

ADVICE = "copy it again from where it came from, or delete that folder to resume"
RECORD_ADVICE = "copy it again from where it came from, or use another checkpoint of the run"


def tiny(steps=2):
    return preset("toy-checkerboard").with_overrides([
        f"training.steps={steps}", "training.batch_size=32", "model.options.hidden_size=16",
        "training.grid_samples=16", "training.grid_steps=[1]", "training.log_every=1"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder with one checkpoint (step 2)."""
    folder = tmp_path_factory.mktemp("run")
    train(tiny(), folder, progress=False)
    return folder


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def step_folder(run: Path) -> Path:
    return run / "checkpoints" / "step_000000002"


def cut(path: Path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def garbage_header(path: Path) -> None:
    data, length = path.read_bytes(), header_length(path)
    path.write_bytes(data[:8] + b"#" * length + data[8 + length:])


def legacy_pickle(path: Path) -> None:
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)


NEVER = "a pickle can run any code, so meanflow reads checkpoints only as safetensors and JSON and never unpickles"
DAMAGE = {  # case: (file, damage, message)
    "truncated tensors": (
        "model.safetensors", lambda p: cut(p, lambda n: n - 100),
        r"model.safetensors is truncated: its header describes \d+ bytes of tensor data but the file holds \d+"),
    "truncated to a few bytes": (
        "ema.safetensors", lambda p: cut(p, lambda n: 3), "ema.safetensors is truncated: 3 bytes, fewer than the 8"),
    "cut inside the header": (
        "optimizer.safetensors", lambda p: cut(p, lambda n: 8 + header_length(p) // 2),
        "optimizer.safetensors is not a complete safetensors file: its header length field says"),
    "garbage header": ("model.safetensors", garbage_header, "model.safetensors has a damaged safetensors header"),
    "torch.save zip": (
        "model.safetensors", lambda p: torch.save({"w": torch.zeros(3)}, p),
        rf"model.safetensors is a zip archive \(the format of torch.save\), not a safetensors file, and is "
        rf"refused: {NEVER}"),
    "legacy pickle": (
        "model.safetensors", legacy_pickle, rf"model.safetensors holds pickled data .* and is refused: {NEVER}"),
    "plain pickle": (
        "ema.safetensors", lambda p: p.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4)),
        "ema.safetensors holds pickled data"),
    "missing tensors": (
        "optimizer.safetensors", lambda p: p.unlink(),
        "optimizer.safetensors is missing: the checkpoint is incomplete"),
    "empty trainer.json": (
        "trainer.json", lambda p: p.write_text(""), r"trainer.json is empty \(0 bytes\) instead of the trainer state"),
    "corrupt trainer.json": (
        "trainer.json", lambda p: cut(p, lambda n: n // 2),
        r"trainer.json is not valid JSON \(.*\), so it cannot be the trainer state"),
    "binary trainer.json": (
        "trainer.json", lambda p: p.write_bytes(b"\x80\x04\x95\xff\xfe"), "trainer.json is not valid JSON"),
    "trainer.json a list": (
        "trainer.json", lambda p: p.write_text("[1, 2]"),
        "trainer.json holds a JSON list, not the object the trainer state is"),
    "trainer.json without keys": (
        "trainer.json", lambda p: p.write_text("{}"),
        r"trainer.json lacks \['step'(, 'optimizer')?\]: it is not the trainer state of a complete checkpoint"),
    "trainer.json step not a number": (
        "trainer.json", lambda p: edit_json(p, lambda d: d.update(step="two")),
        "trainer.json has step 'two', not an integer >= 0"),
    "trainer.json of a newer format": (
        "trainer.json", lambda p: edit_json(p, lambda d: d.update(format_version=99)),
        r"trainer.json has checkpoint format 99; this version of meanflow reads formats \[1, 2\]. Upgrade meanflow"),
}
RESAVE = "Save the tensors with safetensors.torch.save_file in the program that made them"
OTHER_ADVICE = {"torch.save zip": RESAVE, "legacy pickle": RESAVE, "plain pickle": RESAVE,
                "trainer.json of a newer format": "Upgrade meanflow to read it"}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_checkpoint_file_is_a_clear_value_error(run_copy, case):
    name, damage, message = DAMAGE[case]
    folder = step_folder(run_copy)
    damage(folder / name)
    loaders = [load_checkpoint] + ([load_weights, load_model] if name != "optimizer.safetensors" else [])
    for loader in loaders:
        with pytest.raises(ValueError, match=message) as error:
            loader(folder)
        assert str(folder / name) in str(error.value) and OTHER_ADVICE.get(case, ADVICE) in str(error.value)


RECORD_DAMAGE = {  # case: (damage, message, advice)
    "empty run.json": (lambda p: p.write_text(""), r"run.json is empty \(0 bytes\) instead of the run record", ADVICE),
    "corrupt run.json": (lambda p: cut(p, lambda n: n - 5), "run.json is not valid JSON", ADVICE),
    "run.json without entries": (
        lambda p: edit_json(p, lambda d: [d.pop("model"), d.pop("sampler")]),
        r"run.json lacks \['model', 'sampler'\]: it is not a complete run record", RECORD_ADVICE),
    "run.json model without architecture": (
        lambda p: edit_json(p, lambda d: d["model"].pop("architecture")),
        r"run.json: 'model' lacks \['architecture'\]", RECORD_ADVICE),
    "run.json encoder not an object": (
        lambda p: edit_json(p, lambda d: d.update(encoder=[])),
        "run.json: 'encoder' is a JSON list, not an object", RECORD_ADVICE),
}


@pytest.mark.parametrize("case", RECORD_DAMAGE, ids=list(RECORD_DAMAGE))
def test_a_damaged_run_record_is_a_clear_value_error(run_copy, case):
    damage, message, advice = RECORD_DAMAGE[case]
    folder = step_folder(run_copy)
    damage(folder / "run.json")
    with pytest.raises(ValueError, match=message) as error:
        load_model(run_copy)
    assert str(folder / "run.json") in str(error.value) and advice in str(error.value)


def test_a_folder_without_run_json_and_an_incomplete_trainer_json_is_refused(run_copy):
    folder = step_folder(run_copy)
    (folder / "run.json").unlink()
    edit_json(folder / "trainer.json", lambda d: d.pop("format_version"))  # read as format 1: no description
    with pytest.raises(ValueError, match=r"trainer.json lacks \['config', 'model', 'data_info'\] and the folder "
                                         "holds no run.json: it is not a complete checkpoint"):
        load_model(folder)


def test_resuming_from_a_trainer_json_without_an_entry_names_the_file_and_the_entry(run_copy):
    edit_json(step_folder(run_copy) / "trainer.json", lambda d: d.pop("rng"))
    with pytest.raises(ValueError, match=r"trainer.json lacks the entry 'rng': it was not written by a complete save"):
        train(tiny(), run_copy, progress=False)


def test_the_command_line_reports_a_damaged_checkpoint_in_one_line(run_copy, capsys):
    from meanflow.cli import main

    cut(step_folder(run_copy) / "model.safetensors", lambda n: n // 2)
    settings = ["training.batch_size=32", "model.options.hidden_size=16", "training.grid_samples=16",
                "training.grid_steps=[1]", "training.log_every=1"]
    code = main(["train", "--preset", "toy-checkerboard", "--output", str(run_copy), "--no-progress", "--steps", "2",
                 *[argument for setting in settings for argument in ("--set", setting)]])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "error:" in error and "model.safetensors is truncated" in error


def test_loading_never_unpickles(run_copy, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    torch.save({"w": torch.zeros(3)}, step_folder(run_copy) / "model.safetensors", _use_new_zipfile_serialization=False)
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ValueError, match="never unpickles"):
        load_checkpoint(run_copy)
    (step_folder(run_copy) / "model.safetensors").write_bytes((step_folder(run_copy) / "ema.safetensors").read_bytes())
    assert load_weights(run_copy)[0] == step_folder(run_copy)  # a real safetensors file loads with pickle gone


def test_an_incomplete_step_folder_given_directly_says_what_it_lacks(run_copy):
    folder = step_folder(run_copy)
    (folder / "trainer.json").unlink()
    with pytest.raises(ValueError, match="step_000000002 is an incomplete checkpoint folder "
                                         r"\(it lacks trainer.json\)"):
        resolve_checkpoint(folder)
