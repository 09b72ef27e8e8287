"""Training on the user's own samples: a tensor, a numpy array, a Dataset, or an .npz from the CLI.

The same samples reach the loop by every route, so the routes must give bit-identical
checkpoints; a resumed run given the same data must equal an uninterrupted one; bad data must
be refused before training with a message that says what is wrong.
"""

import json

import numpy as np
import pytest
import torch

from meanflow.checkpoint import load_checkpoint
from meanflow.cli import main
from meanflow.inference import generate, load_model
from meanflow.presets import preset
from meanflow.train import train


def points_config(steps=6):
    return preset("toy-two-moons").with_overrides([
        f"training.steps={steps}", "training.batch_size=16", "training.log_every=2", "training.checkpoint_every=3",
        "model.options.hidden_size=16", "model.options.depth=2", "training.grid_samples=16"])


def images_config(steps=4):
    return preset("digits").with_overrides([
        f"training.steps={steps}", "training.batch_size=8", "training.log_every=2", "training.checkpoint_every=2",
        "model.options.hidden_size=16", "model.options.depth=1", "model.options.num_heads=2",
        "model.options.num_classes=3", "training.grid_samples=6", "training.ema_decays=[0.9]"])


def blobs(count=64, seed=0):
    """(count, 2) float32 points around (+-2, 0)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])[torch.arange(count) % 2]
    return centres + 0.1 * torch.randn(count, 2, generator=generator)


def small_images(count=24, seed=0):
    """(count, 1, 8, 8) float32 images in [-1, 1] and (count,) labels 0..2, as numpy arrays."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = np.tanh(rng.standard_normal((count, 1, 8, 8)) + labels[:, None, None, None] - 1).astype(np.float32)
    return images, labels


class ImageDataset(torch.utils.data.Dataset):
    """Items (x (1, 8, 8) tensor, label int)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return torch.from_numpy(self.images[index]), int(self.labels[index])


def assert_same_checkpoint(a, b):
    for part in ("model", "ema", "optimizer"):
        left, right = getattr(load_checkpoint(a), part), getattr(load_checkpoint(b), part)
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), f"{part}/{key} differs"


def test_training_on_a_tensor_of_points_with_the_mlp(tmp_path):
    result = train(points_config(), tmp_path, progress=False, data=blobs())
    assert result.step == 6 and result.checkpoint.name == "step_000000006"
    saved = json.loads((tmp_path / "config.json").read_text())["data"]
    assert saved["name"] == "memory" and saved["class_conditional"] is False and saved["path"] is None
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [2, 4, 6] and all(np.isfinite(line["loss"]) for line in logged)
    loaded = load_model(tmp_path)
    assert loaded.sample_shape == (2,) and loaded.num_classes is None
    assert generate(loaded.model, 5, loaded.sample_shape, 1).shape == (5, 2)
    assert [p.name for p in result.grids] == ["step000000006_nfe1.png", "step000000006_nfe2.png"]


def test_a_numpy_array_and_a_dataset_of_labelled_images_train_the_dit_identically(tmp_path):
    images, labels = small_images()
    from_array = train(images_config(), tmp_path / "array", progress=False, data=images, labels=labels)
    from_dataset = train(images_config(), tmp_path / "dataset", progress=False, data=ImageDataset(images, labels))
    from_tensor = train(images_config(), tmp_path / "tensor", progress=False, data=torch.from_numpy(images),
                        labels=torch.from_numpy(labels).int())
    assert from_array.step == from_dataset.step == from_tensor.step == 4
    assert_same_checkpoint(from_array.checkpoint, from_dataset.checkpoint)
    assert_same_checkpoint(from_array.checkpoint, from_tensor.checkpoint)
    loaded = load_model(tmp_path / "array")
    assert loaded.num_classes == 3 and loaded.sample_shape == (1, 8, 8)
    assert from_array.grids and all(path.exists() for path in from_array.grids)


def test_vectors_the_grids_cannot_draw_still_train(tmp_path):
    config = points_config(3).with_overrides(["model.options.data_dim=5"])
    result = train(config, tmp_path, progress=False, data=np.random.default_rng(0).standard_normal((32, 5)))
    assert result.step == 3 and result.grids == []
    assert load_model(tmp_path).sample_shape == (5,)


def test_resume_on_the_same_data_is_bit_identical_and_other_data_are_refused(tmp_path):
    images, labels = small_images()
    straight = train(images_config(6), tmp_path / "straight", progress=False, data=images, labels=labels)
    train(images_config(6), tmp_path / "resumed", progress=False, data=images, labels=labels, max_steps=2)
    resumed = train(images_config(6), tmp_path / "resumed", progress=False, data=images, labels=labels)
    assert resumed.step == straight.step == 6
    assert_same_checkpoint(straight.checkpoint, resumed.checkpoint)
    with pytest.raises(ValueError, match="trained on other data"):
        train(images_config(8), tmp_path / "resumed", progress=False, data=images[::-1].copy(), labels=labels)


def image_args(path, output, *extra):
    return ["train", "--preset", "digits", "--output", str(output), "--no-progress", "--steps", "2",
            "--set", "data.name=npz", "--set", f"data.path={path}", "--set", "model.options.hidden_size=16",
            "--set", "model.options.depth=1", "--set", "model.options.num_heads=2",
            "--set", "model.options.num_classes=3", "--set", "training.batch_size=8",
            "--set", "training.grid_samples=6", *extra]


def test_an_npz_trains_from_the_command_line(tmp_path, capsys):
    images, labels = small_images()
    pixels = np.round((images + 1) * 127.5).astype(np.uint8)  # (N, 1, 8, 8) uint8
    np.savez(tmp_path / "images.npz", x=pixels, labels=labels)
    assert main(image_args(tmp_path / "images.npz", tmp_path / "run")) == 0
    assert load_checkpoint(tmp_path / "run").step == 2 and load_model(tmp_path / "run").num_classes == 3
    # Float points without labels train an unconditional MLP.
    np.savez(tmp_path / "points.npz", x=blobs().numpy())
    assert main(["train", "--preset", "toy-two-moons", "--output", str(tmp_path / "points"), "--no-progress",
                 "--steps", "2", "--set", "data.name=npz", "--set", f"data.path={tmp_path / 'points.npz'}",
                 "--set", "model.options.hidden_size=16", "--set", "training.batch_size=16",
                 "--set", "training.grid_samples=16"]) == 0
    assert load_model(tmp_path / "points").sample_shape == (2,)
    capsys.readouterr()
    np.savez(tmp_path / "no_labels.npz", x=pixels)
    assert main(image_args(tmp_path / "no_labels.npz", tmp_path / "bad")) == 2
    assert "has no 'labels' array; set data.class_conditional=false" in capsys.readouterr().err
    np.savez(tmp_path / "last.npz", x=pixels.transpose(0, 2, 3, 1), labels=labels)  # channels-last
    assert main(image_args(tmp_path / "last.npz", tmp_path / "bad")) == 2
    assert "it looks channels-last" in capsys.readouterr().err


def test_an_npz_of_python_objects_is_refused_not_unpickled(tmp_path, capsys):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}] * 32, dtype=object))
    args = ["train", "--preset", "toy-two-moons", "--output", str(tmp_path / "run"), "--steps", "1",
            "--set", "data.name=npz", "--set", "data.class_conditional=false"]
    assert main([*args, "--set", f"data.path={tmp_path / 'objects.npz'}"]) == 2
    assert "store numeric arrays only" in capsys.readouterr().err
    assert main([*args, "--set", f"data.path={tmp_path / 'objects.npy'}"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("data, labels, error, message", [
    (np.zeros((32, 2), dtype=np.int64), None, ValueError, "must hold floating-point samples, got int64"),
    (torch.full((32, 2), float("nan")), None, ValueError, r"non-finite values \(NaN or inf\) in 32 of 32"),
    (torch.zeros(32), None, ValueError, r"reshape scalars to \(N, 1\)"),
    (torch.zeros(8, 2), None, ValueError, "the data set has 8 samples, fewer than one global batch of 16"),
    (torch.zeros(32, 2), torch.zeros(31, dtype=torch.long), ValueError, r"labels must have shape \(32,\)"),
    (torch.zeros(32, 2), torch.zeros(32), ValueError, "labels must be integer class ids"),
    (torch.zeros(32, 2), -torch.ones(32, dtype=torch.long), ValueError, "class ids >= 0, found -1"),
    ([[0.0, 1.0]] * 32, None, TypeError, "must be a torch Tensor, a numpy array or a torch Dataset"),
])
def test_invalid_data_is_refused_before_training_with_a_clear_message(tmp_path, data, labels, error, message):
    with pytest.raises(error, match=message):
        train(points_config(), tmp_path, progress=False, data=data, labels=labels)
    assert not (tmp_path / "checkpoints").exists()


def test_labels_must_fit_the_model_and_the_model_must_fit_the_labels(tmp_path):
    images, labels = small_images()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) for model.options.num_classes=3; found 5"):
        train(images_config(), tmp_path, progress=False, data=images, labels=labels + 3)
    with pytest.raises(ValueError, match=r"num_classes=3 but the data has no classes \(labels= given to train"):
        train(images_config(), tmp_path, progress=False, data=images)
    with pytest.raises(ValueError, match="labels= are the labels of data="):
        train(images_config(), tmp_path, progress=False, labels=labels)
    with pytest.raises(ValueError, match="data.name='memory' means samples passed in Python"):
        train(images_config().with_overrides(["data.name=memory"]), tmp_path, progress=False)


def test_a_dataset_with_mixed_items_is_refused(tmp_path):
    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, index):
            x = torch.zeros(2)
            return x if index else (x, 0)

    with pytest.raises(ValueError, match="item 1 lacks a label unlike item 0"):
        train(points_config(), tmp_path, progress=False, data=Mixed())
