"""The embedded 8x8 digits data set: shapes, exact value range, class counts, resizing."""

import sys

import pytest
import torch

pytest.importorskip("sklearn")

from meanflow.data.digits import load_digits_tensors  # noqa: E402

CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors()


def test_shapes_and_dtypes(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 8, 8)
    assert images.dtype == torch.float32
    assert labels.shape == (1797,)
    assert labels.dtype == torch.int64


def test_value_range_is_exactly_minus_one_to_one(digits):
    images, _ = digits
    assert images.min().item() == -1.0
    assert images.max().item() == 1.0
    # Every value is one of the 17 levels v / 16 * 2 - 1.
    levels = (images + 1) / 2 * 16
    assert torch.equal(levels, levels.round())


def test_class_counts(digits):
    _, labels = digits
    assert torch.bincount(labels, minlength=10).tolist() == CLASS_COUNTS


def test_first_image_is_a_zero(digits):
    images, labels = digits
    assert labels[0].item() == 0
    # The top-left corner is background and the centre column of a zero is its empty middle.
    assert images[0, 0, 0, 0].item() == -1.0
    assert images[0, 0, 1:7, 3:5].mean() < images[0, 0, 1:7, [2, 5]].mean()


def test_resize(digits):
    images, labels = load_digits_tensors(resolution=16)
    assert images.shape == (1797, 1, 16, 16)
    assert images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(labels, digits[1])
    # Bilinear upsampling by 2 preserves the mean of each image up to the border weighting.
    assert torch.allclose(images.mean(dim=(2, 3)), digits[0].mean(dim=(2, 3)), atol=0.05)
    assert load_digits_tensors(resolution=12)[0].shape == (1797, 1, 12, 12)


@pytest.mark.parametrize("resolution", [4, 7, 8.0, True])
def test_bad_resolution_raises(resolution):
    with pytest.raises(ValueError, match="resolution"):
        load_digits_tensors(resolution=resolution)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"meanflow\[all\]"):
        load_digits_tensors()
