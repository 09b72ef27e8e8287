"""Data sets reach the training loop through build_source with the right shapes and classes."""

import numpy as np
import pytest
import torch

from meanflow.config import DataConfig
from meanflow.data import TensorBatches, build_source


def test_mnist_from_a_local_npz(shared_data):
    source, info = build_source(DataConfig(name="mnist", path=f"{shared_data}/mnist.npz"), 16, seed=0)
    x, y = source.next_batch()
    assert info.sample_shape == (1, 28, 28) and info.num_classes == 10 and info.encoder.name == "pixels"
    assert x.shape == (16, 1, 28, 28) and float(x.min()) >= -1 and float(x.max()) <= 1 and y.dtype == torch.int64


def test_image_folder_source_with_resolution(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    source, info = build_source(DataConfig(name="folder", path=str(tmp_path), resolution=16), 4, seed=0)
    assert info.sample_shape == (3, 16, 16) and info.num_classes == 2
    with pytest.raises(ValueError, match="needs data.path"):
        build_source(DataConfig(name="folder"), 4, seed=0)


def test_ranks_take_disjoint_slices_of_one_global_batch():
    data = torch.arange(40.0).reshape(40, 1)
    whole = TensorBatches(data, None, 8, seed=3)
    halves = [TensorBatches(data, None, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):  # across epoch boundaries
        expected = whole.next_batch()[0]
        got = torch.cat([h.next_batch()[0] for h in halves])
        assert torch.equal(expected, got)


def test_flips_are_reproducible_after_resume():
    data = torch.randn(32, 1, 4, 4)
    a = TensorBatches(data, None, 8, seed=1, horizontal_flip=True)
    for _ in range(3):
        a.next_batch()
    b = TensorBatches(data, None, 8, seed=1, horizontal_flip=True)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    flipped = TensorBatches(data, None, 32, seed=1, horizontal_flip=True).next_batch()[0]
    plain = TensorBatches(data, None, 32, seed=1).next_batch()[0]
    same = [torch.equal(f, p) for f, p in zip(flipped, plain)]
    mirrored = [torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain)]
    assert all(s or m for s, m in zip(same, mirrored)) and 4 < sum(mirrored) < 28
