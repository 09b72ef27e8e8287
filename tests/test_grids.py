"""Image grids pinned pixel by pixel, PNG round trips, scatter plots."""

import os
import sys

import numpy as np
import pytest
import torch

from meanflow.grids import image_grid_array, save_image_grid, save_scatter


def test_value_mapping_pinned():
    # -1 -> 0, 1 -> 255, 0 -> 128 (round half up), out of range clamped, NaN -> 0.
    image = torch.tensor([[[[-1.0, 1.0, 0.0], [-3.0, 7.0, float("nan")]]]])  # (1, 1, 2, 3)
    grid = image_grid_array(image, padding=0)
    assert grid.dtype == np.uint8
    assert grid.shape == (2, 3, 1)
    np.testing.assert_array_equal(grid[:, :, 0], [[0, 255, 128], [0, 255, 0]])


def test_custom_value_range():
    image = torch.tensor([[[[0.0, 0.5, 1.0]]]])
    grid = image_grid_array(image, value_range=(0.0, 1.0), padding=0)
    np.testing.assert_array_equal(grid[0, :, 0], [0, 128, 255])


def test_tiny_grid_layout_and_padding_pinned():
    # Three 2x2 grey images, two per row, one pixel of padding (value 255): a 7x7 picture with
    # an empty last cell.
    images = torch.stack([torch.full((1, 2, 2), value) for value in (-1.0, 0.0, 1.0)])  # (3, 1, 2, 2)
    grid = image_grid_array(images, nrow=2, padding=1)[:, :, 0]
    P, A, B, C = 255, 0, 128, 255
    expected = np.array(
        [
            [P, P, P, P, P, P, P],
            [P, A, A, P, B, B, P],
            [P, A, A, P, B, B, P],
            [P, P, P, P, P, P, P],
            [P, C, C, P, P, P, P],
            [P, C, C, P, P, P, P],
            [P, P, P, P, P, P, P],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(grid, expected)
    # The black pad variant shows the empty cell as padding too.
    black = image_grid_array(images, nrow=2, padding=1, pad_value=0)[:, :, 0]
    assert black[0, 0] == 0 and black[4, 4] == 0 and black[4, 1] == 255


def test_default_layout_and_colour_channels():
    images = torch.zeros(5, 3, 4, 6)
    images[:, 0] = 1.0  # red
    grid = image_grid_array(images)  # ceil(sqrt(5)) = 3 per row, 2 rows, padding 2
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    np.testing.assert_array_equal(grid[2, 2], [255, 128, 128])
    # More columns than images shrinks the grid to the images present.
    assert image_grid_array(images[:2], nrow=8, padding=0).shape == (4, 12, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip(tmp_path, channels):
    from PIL import Image

    images = torch.rand(6, channels, 5, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_image_grid(images, tmp_path / "nested" / "folder" / "grid.png", nrow=3)
    assert path == tmp_path / "nested" / "folder" / "grid.png"
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        loaded = np.asarray(picture)
    expected = image_grid_array(images, nrow=3)
    np.testing.assert_array_equal(loaded, expected[:, :, 0] if channels == 1 else expected)
    # Only the final file remains: the temporary file was renamed, not copied.
    assert os.listdir(path.parent) == ["grid.png"]


def test_png_overwrites_existing_file(tmp_path):
    from PIL import Image

    path = tmp_path / "grid.png"
    save_image_grid(torch.full((1, 1, 2, 2), -1.0), path, padding=0)
    save_image_grid(torch.full((1, 1, 3, 3), 1.0), path, padding=0)
    with Image.open(path) as picture:
        np.testing.assert_array_equal(np.asarray(picture), np.full((3, 3), 255, dtype=np.uint8))


@pytest.mark.parametrize(
    "shape, message",
    [((2, 2, 4, 4), r"\(N, C, H, W\) with C in \{1, 3\}"), ((4, 4, 3), r"\(N, C, H, W\)"), ((0, 1, 4, 4), "non-empty")],
)
def test_bad_image_shapes_raise(shape, message):
    with pytest.raises(ValueError, match=message):
        image_grid_array(torch.zeros(shape))


def test_bad_grid_arguments_raise():
    images = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match="value_range"):
        image_grid_array(images, value_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="nrow"):
        image_grid_array(images, nrow=0)
    with pytest.raises(ValueError, match="padding"):
        image_grid_array(images, padding=-1)


def test_missing_pillow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"meanflow\[all\]"):
        save_image_grid(torch.zeros(1, 1, 2, 2), tmp_path / "grid.png")


def test_scatter_writes_a_png(tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    points = torch.randn(300, 2, generator=generator)
    reference = torch.randn(500, 2, generator=generator)
    path = tmp_path / "plots" / "scatter.png"
    assert save_scatter(points, path, reference=reference, title="samples", limits=(-4, 4)) == path
    assert path.stat().st_size > 0
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as picture:
        picture.verify()
    with Image.open(path) as picture:
        assert picture.size[0] > 100 and picture.size[1] > 100
        # The plot is not blank: it has both light and dark pixels.
        grey = np.asarray(picture.convert("L"))
        assert grey.min() < 128 < grey.max()
    assert os.listdir(path.parent) == ["scatter.png"]


def test_scatter_leaves_pyplot_state_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    save_scatter(torch.zeros(3, 2), tmp_path / "scatter.png")
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_scatter_bad_shapes_raise(tmp_path):
    with pytest.raises(ValueError, match=r"points must have shape \(N, 2\)"):
        save_scatter(torch.zeros(10, 3), tmp_path / "scatter.png")
    with pytest.raises(ValueError, match=r"reference must have shape \(N, 2\)"):
        save_scatter(torch.zeros(10, 2), tmp_path / "scatter.png", reference=torch.zeros(10))
    with pytest.raises(ValueError, match="limits"):
        save_scatter(torch.zeros(10, 2), tmp_path / "scatter.png", limits=(2, -2))
    assert not (tmp_path / "scatter.png").exists()


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"meanflow\[all\]"):
        save_scatter(torch.zeros(3, 2), tmp_path / "scatter.png")
