"""Image data sets: array formats on disk, value range and resizing, the ADM centre crop, ImageFolder trees."""

import gzip
import io
import os
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from meanflow.data.arrays import load_array_dataset  # noqa: E402
from meanflow.data.folders import ImageFolderDataset, center_crop_adm, load_image_folder  # noqa: E402
from meanflow.data.transforms import prepare_images, to_model_range  # noqa: E402

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def random_pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# The offline copies in ../shared/data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, file, first_labels, train_counts, test_counts",
    [
        ("mnist", "mnist.npz", [5, 0, 4, 1, 9], MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS),
        ("fashion-mnist", "fashion_mnist.npz", [9, 0, 0, 3, 0], [6000] * 10, [1000] * 10),
    ],
)
def test_mnist_like_npz(shared_data, name, file, first_labels, train_counts, test_counts):
    path = os.path.join(shared_data, file)
    images, labels = load_array_dataset(name, path=path)
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels[:5].tolist() == first_labels
    assert torch.bincount(labels, minlength=10).tolist() == train_counts
    with np.load(path) as raw:
        assert torch.equal(images[123, 0], torch.from_numpy(raw["x_train"][123]))

    test_images, test_labels = load_array_dataset(name, path=path, split="test")
    assert test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test_labels, minlength=10).tolist() == test_counts


def test_cifar_jpeg_npz_first_images(shared_data):
    path = os.path.join(shared_data, "cifar10_jpeg_q75.npz")
    images, labels = load_array_dataset("cifar10", path=path, max_images=100)
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.uint8
    with np.load(path) as raw:
        assert labels.tolist() == raw["y_train"][:100].tolist()
        offsets, buffer = raw["train_offsets"], raw["train_jpeg"]
        first = np.array(Image.open(io.BytesIO(buffer[offsets[0]:offsets[1]].tobytes())).convert("RGB"))
        test_labels = raw["y_test"][:10].tolist()
    assert torch.equal(images[0], torch.from_numpy(first).permute(2, 0, 1))
    test_images, loaded_test_labels = load_array_dataset("cifar10", path=path, split="test", max_images=10)
    assert test_images.shape == (10, 3, 32, 32)
    assert loaded_test_labels.tolist() == test_labels


# ------------------------------------------------------------------------------------------------
# Local .npz formats, synthetic
# ------------------------------------------------------------------------------------------------


def test_npz_with_wrong_keys_names_found_and_expected_keys(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, images=random_pixels((4, 8, 8)), targets=np.arange(4))
    with pytest.raises(ValueError) as error:
        load_array_dataset("mnist", path=path)
    message = str(error.value)
    for key in ("images", "targets", "x_train", "y_train", "train_jpeg", "train_offsets"):
        assert key in message


def test_npz_without_the_requested_split(tmp_path):
    path = tmp_path / "train_only.npz"
    np.savez(path, x_train=random_pixels((4, 8, 8)), y_train=np.arange(4))
    with pytest.raises(ValueError, match="x_test"):
        load_array_dataset("mnist", path=path, split="test")


def test_npz_channels_last_and_grey_layouts(tmp_path):
    colour = random_pixels((6, 5, 7, 3), seed=1)
    grey = random_pixels((6, 5, 7), seed=2)
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8)  # any integer type is accepted
    np.savez(tmp_path / "colour.npz", x_train=colour, y_train=labels, x_test=colour[:2], y_test=labels[:2])
    np.savez(tmp_path / "grey.npz", x_train=grey, y_train=labels)

    images, loaded = load_array_dataset("cifar10", path=tmp_path / "colour.npz")
    assert images.shape == (6, 3, 5, 7)
    assert torch.equal(images, torch.from_numpy(colour).permute(0, 3, 1, 2))
    assert loaded.dtype == torch.int64 and loaded.tolist() == labels.tolist()
    assert load_array_dataset("cifar10", path=tmp_path / "colour.npz", split="test")[0].shape == (2, 3, 5, 7)

    images, _ = load_array_dataset("mnist", path=tmp_path / "grey.npz", max_images=4)
    assert torch.equal(images, torch.from_numpy(grey[:4, None]))


def test_npz_with_bad_arrays(tmp_path):
    np.savez(tmp_path / "float.npz", x_train=np.zeros((2, 4, 4), np.float32), y_train=np.arange(2))
    with pytest.raises(ValueError, match="uint8"):
        load_array_dataset("mnist", path=tmp_path / "float.npz")
    np.savez(tmp_path / "chw.npz", x_train=random_pixels((2, 3, 8, 8)), y_train=np.arange(2))
    with pytest.raises(ValueError, match="channels-last"):
        load_array_dataset("cifar10", path=tmp_path / "chw.npz")
    np.savez(tmp_path / "short.npz", x_train=random_pixels((3, 4, 4)), y_train=np.arange(2))
    with pytest.raises(ValueError, match="labels"):
        load_array_dataset("mnist", path=tmp_path / "short.npz")


def test_encoded_images_npz_round_trip(tmp_path):
    # The offline CIFAR copy stores JPEG files; PNG bytes use the same layout and decode exactly.
    pixels = random_pixels((5, 9, 11, 3), seed=3)
    files = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
    labels = np.array([7, 0, 2, 2, 9], dtype=np.int64)
    path = tmp_path / "encoded.npz"
    np.savez(path, train_jpeg=np.concatenate(files), train_offsets=offsets, y_train=labels)

    images, loaded = load_array_dataset("cifar10", path=path)
    assert torch.equal(images, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert loaded.tolist() == labels.tolist()
    images, loaded = load_array_dataset("cifar10", path=path, max_images=2)
    assert images.shape == (2, 3, 9, 11) and loaded.tolist() == [7, 0]


def test_path_that_is_neither_npz_nor_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_array_dataset("mnist", path=tmp_path / "absent.npz")
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz"):
        load_array_dataset("mnist", path=tmp_path / "notes.txt")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_array_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_array_dataset("mnist", split="validation")
    with pytest.raises(ValueError, match="max_images"):
        load_array_dataset("mnist", max_images=0)


def test_missing_torchvision_says_how_to_install_and_about_data_path(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(ImportError) as error:
        load_array_dataset("cifar10", download_root=tmp_path / "downloads")
    message = str(error.value)
    assert "pip install torchvision" in message and "data.path" in message and ".npz" in message
    assert not (tmp_path / "downloads").exists()


# ------------------------------------------------------------------------------------------------
# Folders in the torchvision layout, synthetic
# ------------------------------------------------------------------------------------------------


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_folder_of_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    train_images, train_labels = random_pixels((7, 28, 28), seed=4), np.arange(7) % 10
    test_images, test_labels = random_pixels((3, 28, 28), seed=5), np.array([9, 8, 7])
    write_idx(raw / "train-images-idx3-ubyte.gz", train_images, compress=True)
    write_idx(raw / "train-labels-idx1-ubyte.gz", train_labels, compress=True)
    write_idx(raw / "t10k-images-idx3-ubyte", test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_labels)

    for path in (tmp_path, tmp_path / folder, raw):  # the download root, the data set folder, raw/
        images, labels = load_array_dataset(name, path=path)
        assert torch.equal(images, torch.from_numpy(train_images[:, None]))
        assert labels.tolist() == train_labels.tolist()
    images, labels = load_array_dataset(name, path=tmp_path, split="test", max_images=2)
    assert torch.equal(images, torch.from_numpy(test_images[:2, None])) and labels.tolist() == [9, 8]


def test_torchvision_folder_of_cifar_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected_images, expected_labels = [], []
    for index, file in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        planes = random_pixels((2, 3, 32, 32), seed=10 + index)  # (n, C, H, W)
        labels = [index, 9 - index]
        # Rows are channel-major (all red values, then green, then blue), as in the real batches.
        batch = {b"batch_label": b"batch", b"data": planes.reshape(2, 3072), b"labels": labels}
        with open(folder / file, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        expected_images.append(planes)
        expected_labels += labels

    images, labels = load_array_dataset("cifar10", path=tmp_path)
    assert images.shape == (10, 3, 32, 32)
    assert torch.equal(images, torch.from_numpy(np.concatenate(expected_images[:5])))
    assert labels.tolist() == expected_labels[:10]
    images, labels = load_array_dataset("cifar10", path=folder, split="test")
    assert torch.equal(images, torch.from_numpy(expected_images[5])) and labels.tolist() == [5, 4]


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_batches_refuse_pickles_that_name_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for file in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / file, "wb") as handle:
            pickle.dump({b"data": _RunsCode(), b"labels": []}, handle, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        load_array_dataset("cifar10", path=tmp_path)


def test_unrecognised_folder_lists_what_it_found(tmp_path):
    (tmp_path / "something.bin").write_bytes(b"\0")
    with pytest.raises(ValueError) as error:
        load_array_dataset("mnist", path=tmp_path)
    message = str(error.value)
    assert "something.bin" in message and "train-images-idx3-ubyte" in message and "MNIST/raw" in message


# ------------------------------------------------------------------------------------------------
# Value range and resizing
# ------------------------------------------------------------------------------------------------


def test_to_model_range_is_exact():
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    mapped = to_model_range(levels)
    assert mapped.dtype == torch.float32
    assert mapped.min().item() == -1.0 and mapped.max().item() == 1.0
    # Every level is x / 127.5 - 1 computed in float64 and rounded once to float32.
    expected = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    assert torch.equal(mapped.flatten(), expected.to(torch.float32))
    assert torch.equal(mapped.flatten(), -mapped.flatten().flip(0))  # symmetric about 127.5
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(levels.float())


def test_prepare_images_range_and_shapes():
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(3 * 28 * 28).reshape(2, 3, 28, 28)
    prepared = prepare_images(images)
    assert prepared.shape == (2, 3, 28, 28) and prepared.dtype == torch.float32
    assert (prepared[0] == -1.0).all() and (prepared[1] == 1.0).all()
    for resolution in (16, 32):
        resized = prepare_images(images, resolution)
        assert resized.shape == (2, 3, resolution, resolution)
        # Constant images stay at the ends of the range (up to float32 rounding), shrinking or growing.
        assert resized.min() >= -1.0 and resized.max() <= 1.0
        torch.testing.assert_close(resized, prepared[:, :, :1, :1].expand_as(resized), atol=1e-6, rtol=0)
    noisy = prepare_images(torch.from_numpy(random_pixels((3, 1, 28, 28))), 20)
    assert noisy.min() >= -1.0 and noisy.max() <= 1.0
    with pytest.raises(ValueError, match="resolution"):
        prepare_images(images, 0)


def test_downsizing_is_antialiased():
    # Halving with the antialiased bilinear (triangle) filter weights source columns 2i-1..2i+2
    # by 1/8, 3/8, 3/8, 1/8 (away from the borders, where the weights are cut and renormalised).
    # A bright column 5 on black gives 3/8 in output column 2 and 1/8 in column 3, i.e.
    # -1 + 2 * 3/8 = -0.25 and -1 + 2/8 = -0.75 in the model range. Plain bilinear sampling
    # would give 0.0 and -1.0.
    images = torch.zeros(1, 1, 12, 12, dtype=torch.uint8)
    images[..., 5] = 255
    resized = prepare_images(images, 6)
    expected = torch.tensor([-1.0, -1.0, -0.25, -0.75, -1.0, -1.0]).expand(1, 1, 6, 6)
    torch.testing.assert_close(resized, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# The ADM centre crop
# ------------------------------------------------------------------------------------------------


def test_adm_crop_keeps_the_middle_of_a_wide_image():
    red, green, blue = (200, 30, 30), (30, 200, 30), (30, 30, 200)
    pixels = np.empty((400, 600, 3), dtype=np.uint8)  # H x W: thirds of 200 columns
    pixels[:, :200], pixels[:, 200:400], pixels[:, 400:] = red, green, blue
    cropped = np.asarray(center_crop_adm(Image.fromarray(pixels), 64))
    # 600x400 -> box 300x200 -> box 150x100 (100 < 128 stops) -> bicubic 96x64 -> columns 16..79.
    # The thirds sit at columns [0, 32), [32, 64), [64, 96) of the 96-wide image, so the crop
    # shows red on [0, 16), green on [16, 48) and blue on [48, 64); bicubic blurs the edges.
    assert cropped.shape == (64, 64, 3)
    assert (cropped == cropped[:1]).all()  # every row is the same
    row = cropped[0]
    assert (row[:14] == red).all() and (row[18:46] == green).all() and (row[50:] == blue).all()
    assert (row[32] == green).all()
    # The edges fall exactly between columns 15|16 and 47|48: bicubic is symmetric about them.
    assert int(row[15, 1]) + int(row[16, 1]) == 30 + 200
    assert int(row[47, 1]) + int(row[48, 1]) == 30 + 200


def test_adm_crop_upsamples_a_tiny_image():
    constant = np.full((30, 40, 3), (12, 34, 56), dtype=np.uint8)
    cropped = np.asarray(center_crop_adm(Image.fromarray(constant), 64))
    assert cropped.shape == (64, 64, 3) and (cropped == (12, 34, 56)).all()

    pixels = random_pixels((30, 40, 3), seed=6)
    # No halving; bicubic to (round(40 * 64 / 30), 64) = (85, 64); columns (85 - 64) // 2 = 10 on.
    expected = Image.fromarray(pixels).resize((85, 64), resample=Image.BICUBIC).crop((10, 0, 74, 64))
    assert np.array_equal(np.asarray(center_crop_adm(Image.fromarray(pixels), 64)), np.asarray(expected))


@pytest.mark.parametrize(
    "width, height, resolution, halvings, resized, corner",
    [
        # 700x530 -> 350x265 -> 175x132 -> 87x66 (66 < 128) -> (round(87 * 64 / 66), 64) = (84, 64)
        (700, 530, 64, [(350, 265), (175, 132), (87, 66)], (84, 64), (10, 0)),
        # 301x650 -> 150x325 -> 75x162 -> 37x81 (37 < 64) -> (32, round(81 * 32 / 37)) = (32, 70)
        (301, 650, 32, [(150, 325), (75, 162), (37, 81)], (32, 70), (0, 19)),
    ],
)
def test_adm_crop_matches_the_steps_done_by_hand(width, height, resolution, halvings, resized, corner):
    original = Image.fromarray(random_pixels((height, width, 3), seed=width))
    image = original
    for size in halvings:
        image = image.resize(size, resample=Image.BOX)
    image = image.resize(resized, resample=Image.BICUBIC)
    left, top = corner
    expected = image.crop((left, top, left + resolution, top + resolution))
    assert np.array_equal(np.asarray(center_crop_adm(original, resolution)), np.asarray(expected))


def test_adm_crop_converts_to_rgb_first():
    grey = Image.fromarray(random_pixels((50, 70), seed=7), mode="L")
    cropped = np.asarray(center_crop_adm(grey, 16))
    expected = np.asarray(center_crop_adm(grey.convert("RGB"), 16))
    assert cropped.shape == (16, 16, 3) and np.array_equal(cropped, expected)
    assert np.array_equal(cropped[..., 0], cropped[..., 2])


# ------------------------------------------------------------------------------------------------
# ImageFolder trees
# ------------------------------------------------------------------------------------------------


def save_image(path, pixels, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels).convert(mode)
    image.save(path)


def make_tree(root):
    """Three classes whose names sort differently from their creation order."""
    save_image(root / "zebra" / "b.png", random_pixels((20, 24, 3), seed=1))
    save_image(root / "zebra" / "a.JPEG", random_pixels((24, 20, 3), seed=2))
    save_image(root / "apple" / "one.jpg", random_pixels((18, 18, 3), seed=3))
    save_image(root / "apple" / "nested" / "two.bmp", random_pixels((30, 18, 3), seed=4))
    save_image(root / "Mango" / "x.webp", random_pixels((16, 40, 3), seed=5))
    (root / "apple" / "notes.txt").write_text("not an image")
    save_image(root / "apple" / ".hidden.png", random_pixels((8, 8, 3), seed=6))
    return root


def test_image_folder_classes_sorted_by_name(tmp_path):
    dataset = ImageFolderDataset(make_tree(tmp_path / "tree"), resolution=16)
    assert dataset.class_names == ["Mango", "apple", "zebra"] and dataset.num_classes == 3
    names = [(os.path.relpath(path, tmp_path / "tree"), label) for path, label in dataset.samples]
    assert names == [
        (os.path.join("Mango", "x.webp"), 0),
        (os.path.join("apple", "one.jpg"), 1),
        (os.path.join("apple", "nested", "two.bmp"), 1),
        (os.path.join("zebra", "a.JPEG"), 2),
        (os.path.join("zebra", "b.png"), 2),
    ]
    assert dataset.skipped == []
    image, label = dataset[4]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 2
    with Image.open(dataset.samples[4][0]) as original:
        expected = np.array(center_crop_adm(original, 16))
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert len(pickle.loads(pickle.dumps(dataset))) == 5  # DataLoader workers receive a pickled copy


def test_load_image_folder(tmp_path):
    images, labels, class_names = load_image_folder(make_tree(tmp_path / "tree"), resolution=12)
    assert images.shape == (5, 3, 12, 12) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 1, 2, 2]
    assert class_names == ["Mango", "apple", "zebra"]
    images, labels, _ = load_image_folder(tmp_path / "tree", resolution=12, max_images=2)
    assert images.shape == (2, 3, 12, 12) and labels.tolist() == [0, 1]


def test_grey_rgba_and_palette_images_come_back_rgb(tmp_path):
    root = tmp_path / "tree"
    save_image(root / "a" / "grey.png", np.full((20, 20), 77, dtype=np.uint8))
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent: the colour is kept, the alpha dropped
    save_image(root / "a" / "rgba.png", rgba)
    indexed = Image.new("P", (20, 20), color=3)
    indexed.putpalette([0, 0, 0] * 3 + [200, 100, 50])  # entry 3 is the only colour used
    indexed.save(root / "a" / "palette.png")
    images, _, _ = load_image_folder(root, resolution=8)
    assert images.shape == (3, 3, 8, 8)
    grey, palette, transparent = images  # sorted file names: grey, palette, rgba
    assert (grey == 77).all()
    for image, colour in ((palette, [200, 100, 50]), (transparent, [10, 20, 30])):
        assert (image == torch.tensor(colour, dtype=torch.uint8)[:, None, None]).all()


def test_corrupt_file_raises_by_default_and_is_skipped_on_request(tmp_path):
    root = make_tree(tmp_path / "tree")
    corrupt = root / "apple" / "broken.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(ValueError) as error:
        ImageFolderDataset(root, resolution=16)
    assert str(corrupt) in str(error.value) and "skip_corrupt" in str(error.value)

    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        dataset = ImageFolderDataset(root, resolution=16, skip_corrupt=True)
    assert dataset.skipped == [str(corrupt)]
    assert len(dataset) == 5 and str(corrupt) not in [path for path, _ in dataset.samples]


def test_truncated_file_fails_in_getitem_with_its_name(tmp_path):
    root = tmp_path / "tree"
    buffer = io.BytesIO()
    Image.fromarray(random_pixels((64, 64, 3), seed=8)).save(buffer, format="JPEG")
    truncated = root / "only" / "cut.jpg"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # headers intact, data cut
    dataset = ImageFolderDataset(root, resolution=16)  # verify() reads headers only
    with pytest.raises(ValueError, match="cut.jpg"):
        dataset[0]


def test_layout_errors_explain_the_expected_tree(tmp_path):
    layout = "root/<class_name>/<image files>"
    with pytest.raises(ValueError, match="does not exist") as error:
        ImageFolderDataset(tmp_path / "missing")
    assert layout in str(error.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty") as error:
        ImageFolderDataset(tmp_path / "empty")
    assert layout in str(error.value)

    flat = tmp_path / "flat"
    save_image(flat / "cat.png", random_pixels((8, 8, 3)))
    save_image(flat / "dog.png", random_pixels((8, 8, 3)))
    with pytest.raises(ValueError, match="no class sub-folders") as error:
        ImageFolderDataset(flat)
    assert layout in str(error.value) and "cat.png" in str(error.value)

    no_images = tmp_path / "no_images"
    save_image(no_images / "cats" / "cat.png", random_pixels((8, 8, 3)))
    (no_images / "dogs").mkdir()
    (no_images / "dogs" / "readme.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match="1 of 2 class folders") as error:
        ImageFolderDataset(no_images)
    assert layout in str(error.value) and "dogs" in str(error.value)
