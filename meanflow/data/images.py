"""Image data sets for training: MNIST, Fashion-MNIST and CIFAR-10 as arrays, and ImageFolder trees.

Two kinds of image data reach the training loop:

* Small data sets that fit in memory as one uint8 tensor (N, C, H, W): MNIST, Fashion-MNIST and
  CIFAR-10 through :func:`load_array_dataset`, or a small ImageFolder tree through
  :func:`load_image_folder`. :func:`prepare_images` turns them into float32 in [-1, 1].
* Large ImageFolder trees (ImageNet) that are read one file at a time through
  :class:`ImageFolderDataset`; the latent cache iterates over it once and training reads latents.

Images are uint8 (N, C, H, W) until :func:`to_model_range` maps them to the model's range
[-1, 1]; labels are int64 (N,). Pillow and torchvision are optional: they are imported only by
the code paths that need them, with a message saying how to install them when they are missing.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Union, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

ArrayDatasetName = Literal["mnist", "fashion-mnist", "cifar10"]
Split = Literal["train", "test"]

ARRAY_DATASETS: tuple[str, ...] = get_args(ArrayDatasetName)
SPLITS: tuple[str, ...] = get_args(Split)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_DOWNLOAD_ROOT = os.path.join("~", ".cache", "meanflow")
DEFAULT_IMAGE_FOLDER_RESOLUTION = 256

PathLike = Union[str, os.PathLike]

# name -> (torchvision.datasets class, the folder that class writes under its root).
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
}
# The IDX files of MNIST and Fashion-MNIST (the same names for both), possibly gzipped.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_LOCAL_DATA_HINT = (
    "or set data.path to a local .npz (keys x_train, y_train, x_test, y_test with uint8 images "
    "(N, H, W) or (N, H, W, C)) or to a folder in the torchvision layout"
)
_IMAGE_FOLDER_LAYOUT = (
    "an ImageFolder tree root/<class_name>/<image files> (the ImageNet layout, e.g. "
    "train/n01440764/n01440764_10026.JPEG): one sub-folder per class, class ids 0..K-1 in sorted "
    f"folder-name order, image extensions {' '.join(IMAGE_EXTENSIONS)} (any case)"
)
# Converting images in chunks bounds the float32 working memory of resizing a large array.
_RESIZE_CHUNK = 2048


# ------------------------------------------------------------------------------------------------
# Small array data sets: MNIST, Fashion-MNIST, CIFAR-10
# ------------------------------------------------------------------------------------------------


def load_array_dataset(
    name: ArrayDatasetName,
    path: Optional[PathLike] = None,
    split: Split = "train",
    download_root: Optional[PathLike] = None,
    max_images: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Load MNIST, Fashion-MNIST or CIFAR-10 as uint8 images and int64 labels.

    With ``path`` the data is read from disk and its format is detected:

    * an ``.npz`` with ``x_<split>`` (uint8 (N, H, W) or (N, H, W, C)) and ``y_<split>`` (N,);
    * an ``.npz`` of encoded image files (the offline CIFAR-10 copy): ``<split>_jpeg`` (the files
      concatenated, uint8), ``<split>_offsets`` ((N + 1,), image i is bytes
      ``offsets[i]:offsets[i + 1]``) and ``y_<split>``; decoded with Pillow;
    * a folder in the layout torchvision downloads into: ``MNIST/raw/`` or ``FashionMNIST/raw/``
      with the IDX files (``.gz`` or not), or ``cifar-10-batches-py/`` with the python batches. The
      folder may be the download root, the data set folder or the ``raw`` folder itself.

    With an ``.npz`` the ``name`` only labels messages: the file defines the images. Without
    ``path`` the data set is downloaded by torchvision into ``download_root``.

    Args:
        name: "mnist", "fashion-mnist" or "cifar10".
        path: a local ``.npz`` file or folder (``data.path`` in the configuration), or None.
        split: "train" or "test".
        download_root: where torchvision keeps downloads; default ``~/.cache/meanflow``.
        max_images: keep only the first this many images (decoding stops there too), or None.

    Returns:
        images: (N, C, H, W) uint8; C is 1 for MNIST-like data, 3 for CIFAR-10.
        labels: (N,) int64.

    Raises:
        ValueError: an invalid argument, or a file or folder of an unrecognised format (the
            message lists what was found and what was expected).
        FileNotFoundError: ``path`` does not exist.
        ImportError: torchvision (downloads) or Pillow (encoded images) is not installed.
        RuntimeError: the torchvision download failed (for example offline).
    """
    if name not in ARRAY_DATASETS:
        raise ValueError(f"unknown array data set {name!r}; valid names are {list(ARRAY_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if max_images is not None:
        _check_positive_int("max_images", max_images)
    if path is not None:
        images, labels, source = _load_local(name, Path(path).expanduser(), split, max_images)
    else:
        images, labels, source = _load_with_torchvision(name, split, download_root, max_images)
    return _to_tensors(images, labels, source)


def to_model_range(images: Tensor) -> Tensor:
    """Map uint8 pixels to the model's range: ``x / 127.5 - 1``, so 0 -> -1 and 255 -> 1 exactly.

    Computed as ``(2x - 255) / 255``: the numerator is an exact integer in float32, so the one
    division rounds once and every level is the correctly rounded value of ``x / 127.5 - 1``,
    with ``to_model_range(255 - x) == -to_model_range(x)`` exactly.

    Args:
        images: (N, C, H, W) (or any shape) uint8.

    Returns:
        The same shape, float32 in [-1, 1].
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"to_model_range expects uint8 pixels, got {images.dtype}")
    return images.to(torch.float32).mul_(2.0).sub_(255.0).div_(255.0)


def prepare_images(images: Tensor, resolution: Optional[int] = None) -> Tensor:
    """uint8 images -> float32 model inputs in [-1, 1], optionally resized to R x R.

    Resizing is bilinear (``align_corners=False``), with antialiasing when an axis shrinks so
    that downsampling averages rather than aliases. Bilinear and antialiased weights are
    non-negative and sum to 1, so the values stay in [-1, 1] (a final clamp absorbs rounding)
    and a constant image stays constant up to float32 rounding (about 1e-7).
    A non-square input is stretched to R x R (crop it first to keep its aspect ratio).

    Args:
        images: (N, C, H, W) uint8.
        resolution: R, or None to keep (H, W).

    Returns:
        (N, C, R, R) float32 in [-1, 1] ((N, C, H, W) when ``resolution`` is None).
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"prepare_images expects uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if resolution is not None:
        _check_positive_int("resolution", resolution)
    if resolution is None or tuple(images.shape[-2:]) == (resolution, resolution):
        return to_model_range(images).contiguous()
    height, width = images.shape[-2:]
    antialias = resolution < height or resolution < width
    out = torch.empty(images.shape[0], images.shape[1], resolution, resolution, dtype=torch.float32)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = to_model_range(images[start:start + _RESIZE_CHUNK])  # (b, C, H, W)
        out[start:start + _RESIZE_CHUNK] = F.interpolate(
            chunk, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=antialias
        )  # (b, C, R, R)
    return out.clamp_(-1.0, 1.0)


def _load_local(name: str, path: Path, split: str, max_images: Optional[int]) -> tuple[np.ndarray, np.ndarray, str]:
    if path.is_dir():
        return _load_torchvision_folder(name, path, split, max_images)
    if not path.exists():
        raise FileNotFoundError(f"data.path {str(path)!r} does not exist (expected an .npz file or a folder)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} is not an .npz archive ({error}); data.path must be an .npz with x_{split}/y_{split}, "
            f"an .npz of encoded images ({split}_jpeg, {split}_offsets, y_{split}), or a folder in the "
            "torchvision layout"
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive with keys x_{split} and y_{split}")
    with archive:
        keys = set(archive.files)
        if {f"x_{split}", f"y_{split}"} <= keys:
            images = archive[f"x_{split}"][:max_images]
            labels = archive[f"y_{split}"][:max_images]
        elif {f"{split}_jpeg", f"{split}_offsets", f"y_{split}"} <= keys:
            labels = archive[f"y_{split}"][:max_images]
            images = _decode_concatenated(
                archive[f"{split}_jpeg"], archive[f"{split}_offsets"], len(labels), f"{path} ({split}_jpeg)"
            )
        else:
            raise ValueError(
                f"{path} has keys {sorted(keys)}, which match no known layout for split {split!r}; expected "
                f"x_{split} (uint8 images (N, H, W) or (N, H, W, C)) and y_{split} (int labels (N,)), or "
                f"the encoded-image layout {split}_jpeg (concatenated image files, uint8), "
                f"{split}_offsets ((N + 1,) byte offsets) and y_{split}"
            )
    return images, labels, str(path)


def _decode_concatenated(buffer: np.ndarray, offsets: np.ndarray, count: int, source: str) -> np.ndarray:
    """Decode images ``buffer[offsets[i]:offsets[i + 1]]`` for i < count into (count, H, W, 3) uint8."""
    Image = _import_pil(f"decoding the encoded images of {source}")
    offsets = np.asarray(offsets, dtype=np.int64)
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError(f"{source}: expected a 1-D uint8 byte buffer, got {buffer.dtype} {buffer.shape}")
    if offsets.ndim != 1 or len(offsets) < count + 1:
        raise ValueError(f"{source}: {len(offsets)} offsets cannot delimit {count} images (need {count + 1})")
    bounds = offsets[: count + 1]
    if count == 0 or np.any(np.diff(bounds) <= 0) or bounds[0] < 0 or bounds[-1] > len(buffer):
        raise ValueError(f"{source}: the offsets must increase strictly and stay inside the {len(buffer)}-byte buffer")
    decoded: Optional[np.ndarray] = None
    for index in range(count):
        encoded = buffer[bounds[index]:bounds[index + 1]].tobytes()
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
        except Exception as error:  # any decoder failure is a bad file, whatever Pillow raises
            raise ValueError(f"{source}: image {index} cannot be decoded ({error})") from error
        if decoded is None:
            decoded = np.empty((count, *pixels.shape), dtype=np.uint8)
        elif pixels.shape != decoded.shape[1:]:
            raise ValueError(f"{source}: image {index} is {pixels.shape}, image 0 is {decoded.shape[1:]}")
        decoded[index] = pixels
    return decoded


def _load_torchvision_folder(
    name: str, folder: Path, split: str, max_images: Optional[int]
) -> tuple[np.ndarray, np.ndarray, str]:
    """Read the files torchvision downloads (IDX files or CIFAR-10 python batches) from ``folder``."""
    data_folder = _TORCHVISION[name][1]
    if name == "cifar10":
        candidates = [folder, folder / data_folder]
        expected = _CIFAR_BATCHES[split]
        for candidate in candidates:
            if all((candidate / batch).is_file() for batch in expected):
                images, labels = _read_cifar_batches([candidate / batch for batch in expected])
                return images[:max_images], labels[:max_images], str(candidate)
        wanted = f"{data_folder}/{{{', '.join(expected)}}}"
    else:
        candidates = [folder, folder / "raw", folder / data_folder, folder / data_folder / "raw"]
        expected = _IDX_FILES[split]
        for candidate in candidates:
            files = [_find_maybe_gzipped(candidate / stem) for stem in expected]
            if all(file is not None for file in files):
                images, labels = _read_idx(files[0]), _read_idx(files[1])
                return images[:max_images], labels[:max_images], str(candidate)
        wanted = f"{data_folder}/raw/{{{', '.join(expected)}}} (optionally .gz)"
    found = sorted(entry.name for entry in folder.iterdir())
    raise ValueError(
        f"{folder} is not a {name} folder in the torchvision layout: expected {wanted} under it (or the "
        f"files directly inside it); found {found[:20]}{' ...' if len(found) > 20 else ''}"
    )


def _find_maybe_gzipped(stem: Path) -> Optional[Path]:
    for candidate in (stem, stem.with_name(stem.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format): big-endian header, then the raw array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    # Header: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: the header promises shape {shape} but {data.size} values follow")
    return data.reshape(shape)


class _CifarBatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 python batches (dicts of lists, bytes and numpy arrays) and nothing else.

    A pickle can name any Python callable; the batches only need numpy's array reconstruction, so
    every other global is refused and a tampered file cannot run code.
    """

    _reconstruct = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, whatever its module is called
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 writes bytes from Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR-10 batch holds only arrays and lists")


def _read_cifar_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches -> (N, 32, 32, 3) uint8 images, (N,) labels."""
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as handle:
            try:
                batch = _CifarBatchUnpickler(handle, encoding="bytes").load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
                raise ValueError(f"{path} is not a CIFAR-10 python batch: {error}") from error
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{path} is not a CIFAR-10 python batch (expected a dict with b'data' and b'labels')")
        # Each row is one image stored channel-major: 1024 red, 1024 green, then 1024 blue values.
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (n, 32, 32, 3)
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _load_with_torchvision(
    name: str, split: str, download_root: Optional[PathLike], max_images: Optional[int]
) -> tuple[np.ndarray, np.ndarray, str]:
    root = os.path.expanduser(os.fspath(download_root) if download_root is not None else DEFAULT_DOWNLOAD_ROOT)
    try:
        import torchvision.datasets as torchvision_datasets
    except ImportError as error:
        raise ImportError(
            f"loading {name!r} without data.path downloads it with torchvision, which is not installed; "
            "install it with `pip install torchvision` (the build matching your torch, see "
            f"https://pytorch.org/get-started/locally/), {_LOCAL_DATA_HINT}"
        ) from error
    dataset_class = getattr(torchvision_datasets, _TORCHVISION[name][0])
    try:
        dataset = dataset_class(root=root, train=split == "train", download=True)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"could not download {name!r} into {root} ({error}); when offline, {_LOCAL_DATA_HINT}"
        ) from error
    images = np.asarray(dataset.data)[:max_images]  # MNIST: (N, 28, 28); CIFAR-10: (N, 32, 32, 3)
    labels = np.asarray(dataset.targets, dtype=np.int64)[:max_images]
    return images, labels, f"torchvision {_TORCHVISION[name][0]} in {root}"


def _to_tensors(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[Tensor, Tensor]:
    """Validate and convert (N, H, W) / (N, H, W, C) uint8 images and (N,) labels to torch."""
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 pixels 0..255, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]  # (N, 1, H, W)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # (N, C, H, W)
    else:
        raise ValueError(
            f"{source}: images must be (N, H, W) or channels-last (N, H, W, C) with C = 1 or 3, got shape "
            f"{images.shape}; transpose channels-first arrays before saving"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}"
        )
    if len(labels) == 0:
        raise ValueError(f"{source}: the data set is empty")
    if labels.min() < 0:
        raise ValueError(f"{source}: labels must be class ids >= 0, found {labels.min()}")
    # np.require copies read-only or strided arrays so that torch owns writable, contiguous memory.
    image_tensor = torch.from_numpy(np.require(images, dtype=np.uint8, requirements=["C", "W"]))
    label_tensor = torch.from_numpy(np.require(labels, dtype=np.int64, requirements=["C", "W"]))
    return image_tensor, label_tensor


# ------------------------------------------------------------------------------------------------
# ImageFolder trees (ImageNet)
# ------------------------------------------------------------------------------------------------


def center_crop_adm(image: "PILImage.Image", resolution: int) -> "PILImage.Image":
    """The ADM centre crop: the preprocessing behind the ImageNet FID reference statistics.

    The image is first converted to RGB (grey is replicated, alpha is dropped, palettes are
    expanded). Then, while the short side is at least ``2 * R``, both sides are halved (floor)
    with a BOX filter; the image is resized with BICUBIC so that each side becomes
    ``round(side * R / short_side)`` (Python's ``round``, as in the reference); and the central
    R x R square is cut, its top-left corner at ``((W - R) // 2, (H - R) // 2)``. Repeated box
    halving followed by one bicubic step avoids the aliasing of a single large bicubic reduction.

    Args:
        image: a Pillow image of any size and mode.
        resolution: R.

    Returns:
        An R x R RGB Pillow image.
    """
    Image = _import_pil("the ADM centre crop")
    _check_positive_int("resolution", resolution)
    resampling = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 moved the filter constants
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=resampling.BICUBIC)
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(image: "PILImage.Image") -> Tensor:
    """An RGB Pillow image (W x H) -> a (3, H, W) uint8 tensor."""
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, H, W)


class ImageFolderDataset(Dataset):
    """An ImageFolder tree (``root/<class_name>/<image files>``, the ImageNet layout) as a Dataset.

    Class ids are 0..K-1 in sorted folder-name order (for ImageNet, the standard synset order).
    Files are found recursively inside each class folder, in sorted order, by extension
    (.jpg .jpeg .png .bmp .webp, any case); names starting with "." are ignored. Each item is
    the :func:`center_crop_adm` of the image. Flips and other augmentation are left to the
    training source.

    Construction opens every listed file with Pillow's cheap ``verify()`` (it reads headers and,
    for PNG, checksums, without decoding pixels). An unreadable file raises a ValueError naming
    it, or with ``skip_corrupt=True`` is left out, recorded in ``skipped`` and reported with a
    warning. A file that passes the check but fails to decode (a truncated JPEG) raises a
    ValueError naming it in ``__getitem__``.

    Args:
        root: the tree's root folder.
        resolution: R, the side of the returned square images.
        skip_corrupt: skip unreadable files instead of raising.
        max_images: keep only the first this many readable files in (class, path) order (only
            those are checked), or None for all.

    Attributes:
        class_names: the K class folder names; ``class_names[label]`` names a label.
        samples: (path, label) of every usable image.
        skipped: paths of the files left out as unreadable.

    Item:
        ``(image, label)``: image (3, R, R) uint8, label an int in 0..K-1.
    """

    def __init__(
        self,
        root: PathLike,
        resolution: int = DEFAULT_IMAGE_FOLDER_RESOLUTION,
        skip_corrupt: bool = False,
        max_images: Optional[int] = None,
    ):
        Image = _import_pil("reading an image folder")
        _check_positive_int("resolution", resolution)
        if max_images is not None:
            _check_positive_int("max_images", max_images)
        self.root = Path(root).expanduser()
        self.resolution = resolution
        self.class_names = _find_class_folders(self.root)
        files_per_class = [_list_image_files(self.root / name) for name in self.class_names]
        empty = [name for name, files in zip(self.class_names, files_per_class) if not files]
        if empty:
            raise ValueError(
                f"{len(empty)} of {len(self.class_names)} class folders under {self.root} contain no image "
                f"files: {_preview(empty)}; expected {_IMAGE_FOLDER_LAYOUT}. Add images to them or remove them"
            )
        self.samples: list[tuple[str, int]] = []
        self.skipped: list[str] = []
        for label, files in enumerate(files_per_class):
            for file in files:
                if max_images is not None and len(self.samples) >= max_images:
                    break
                problem = _verify_image(Image, file)
                if problem is None:
                    self.samples.append((str(file), label))
                elif skip_corrupt:
                    self.skipped.append(str(file))
                else:
                    raise ValueError(
                        f"cannot read image file {file}: {problem}; pass skip_corrupt=True to skip unreadable files"
                    )
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image files under {self.root}: {_preview(self.skipped)}",
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(f"no readable image under {self.root}: all {len(self.skipped)} image files are unreadable")

    @property
    def num_classes(self) -> int:
        """K, the number of class folders."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The ``index``-th image as (3, R, R) uint8 after the ADM centre crop, and its label."""
        Image = _import_pil("reading an image folder")  # not kept on self: modules do not pickle
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                cropped = center_crop_adm(image, self.resolution)
        except Exception as error:  # any decoder failure is a bad file, whatever Pillow raises
            raise ValueError(f"cannot decode image file {path}: {error}") from error
        return pil_to_tensor(cropped), label


def load_image_folder(
    root: PathLike,
    resolution: int = DEFAULT_IMAGE_FOLDER_RESOLUTION,
    skip_corrupt: bool = False,
    max_images: Optional[int] = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Read a small ImageFolder tree into memory (see :class:`ImageFolderDataset`).

    Memory is N * 3 * R * R bytes; large trees belong in the latent cache instead.

    Args:
        root: the tree's root folder, ``root/<class_name>/<image files>``.
        resolution: R, the side after the ADM centre crop.
        skip_corrupt: skip unreadable files (with a warning) instead of raising.
        max_images: keep only the first this many images in (class, path) order, or None.

    Returns:
        images: (N, 3, R, R) uint8.
        labels: (N,) int64 class ids.
        class_names: the K class folder names in id order.
    """
    dataset = ImageFolderDataset(root, resolution, skip_corrupt=skip_corrupt, max_images=max_images)
    images = torch.empty(len(dataset), 3, resolution, resolution, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.int64)
    for index in range(len(dataset)):
        images[index], labels[index] = dataset[index]
    return images, labels, list(dataset.class_names)


def _find_class_folders(root: Path) -> list[str]:
    if not root.exists():
        raise ValueError(f"image folder {root} does not exist; expected {_IMAGE_FOLDER_LAYOUT}")
    if not root.is_dir():
        raise ValueError(f"image folder {root} is a file, not a folder; expected {_IMAGE_FOLDER_LAYOUT}")
    entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    folders = [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
    if folders:
        return folders
    files = [entry.name for entry in entries if not entry.name.startswith(".")]
    if files:
        raise ValueError(
            f"image folder {root} has no class sub-folders, only {len(files)} files directly inside it "
            f"({_preview(files)}); expected {_IMAGE_FOLDER_LAYOUT}. For unlabelled images, move them into "
            f"a single sub-folder such as {root / 'images'}"
        )
    raise ValueError(f"image folder {root} is empty; expected {_IMAGE_FOLDER_LAYOUT}")


def _list_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), in sorted order, hidden names excluded."""
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(directory) / name)
    return found


def _verify_image(Image, path: Path) -> Optional[str]:
    """None when Pillow can identify and verify ``path``, otherwise what went wrong."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # any failure here means the file cannot be used
        return f"{type(error).__name__}: {error}"
    return None


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def _import_pil(purpose: str):
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs Pillow; install it with `pip install pillow` or `pip install meanflow[all]`"
        ) from error
    return Image


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _preview(names: list, limit: int = 5) -> str:
    shown = ", ".join(str(name) for name in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


__all__ = [
    "ARRAY_DATASETS",
    "DEFAULT_DOWNLOAD_ROOT",
    "DEFAULT_IMAGE_FOLDER_RESOLUTION",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ArrayDatasetName",
    "ImageFolderDataset",
    "Split",
    "center_crop_adm",
    "load_array_dataset",
    "load_image_folder",
    "pil_to_tensor",
    "prepare_images",
    "to_model_range",
]
