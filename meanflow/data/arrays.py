"""Small image data sets held in memory as arrays: MNIST, Fashion-MNIST and CIFAR-10.

:func:`load_array_dataset` reads them from a local ``.npz`` (plain arrays, or encoded image
files), from a folder in the layout torchvision downloads into (IDX files, CIFAR-10 python
batches), or downloads them with torchvision. They come back as uint8 images (N, C, H, W) and
int64 labels (N,); :func:`meanflow.data.transforms.prepare_images` turns them into model inputs.

torchvision (downloads) and Pillow (encoded images) are optional and imported only by the code
paths that need them. The CIFAR-10 python batches are pickles; they are read by an unpickler
that refuses every global but numpy's array reconstruction, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Literal, Optional, get_args

import numpy as np
import torch
from torch import Tensor

from ..errors import DataUnavailableError, PickledDataError, advises_unpickling, pickled_data_message
from ..validation import PathLike, check_integer
from .common import import_pil

ArrayDatasetName = Literal["mnist", "fashion-mnist", "cifar10"]
Split = Literal["train", "test"]

ARRAY_DATASETS: tuple[str, ...] = get_args(ArrayDatasetName)
SPLITS: tuple[str, ...] = get_args(Split)
DEFAULT_DOWNLOAD_ROOT = os.path.join("~", ".cache", "meanflow")

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
    "or give a local copy with --set data.path=PATH (Python: path=PATH): an .npz (keys x_train, y_train, "
    "x_test, y_test with uint8 images (N, H, W) or (N, H, W, C)) or a folder in the torchvision layout"
)


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
        DataUnavailableError (a RuntimeError): the torchvision download failed (for example offline).
        PickledDataError (a ValueError): an array of the ``.npz`` holds Python objects.
    """
    if name not in ARRAY_DATASETS:
        raise ValueError(f"unknown array data set {name!r}; valid names are {list(ARRAY_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if max_images is not None:
        check_integer("max_images", max_images)
    if path is not None:
        images, labels, source = _load_local(name, Path(path).expanduser(), split, max_images)
    else:
        images, labels, source = _load_with_torchvision(name, split, download_root, max_images)
    return _to_tensors(images, labels, source)


def _load_local(name: str, path: Path, split: str, max_images: Optional[int]) -> tuple[np.ndarray, np.ndarray, str]:
    if path.is_dir():
        return _load_torchvision_folder(name, path, split, max_images)
    if not path.exists():
        raise FileNotFoundError(f"data.path {str(path)!r} does not exist (expected an .npz file or a folder)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:  # numpy's message for a non-numpy file advises unpickling it: not relayed
        reason = "no numpy arrays; pickled data is never loaded" if "pickle" in str(error) else error
        raise ValueError(
            f"{path} is not an .npz archive ({reason}); data.path must be an .npz with x_{split}/y_{split}, "
            f"an .npz of encoded images ({split}_jpeg, {split}_offsets, y_{split}), or a folder in the "
            "torchvision layout"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive with keys x_{split} and y_{split}")
    with archive:
        keys = set(archive.files)
        if {f"x_{split}", f"y_{split}"} <= keys:
            images = _numeric_array(archive, f"x_{split}", path)[:max_images]
            labels = _numeric_array(archive, f"y_{split}", path)[:max_images]
        elif {f"{split}_jpeg", f"{split}_offsets", f"y_{split}"} <= keys:
            labels = _numeric_array(archive, f"y_{split}", path)[:max_images]
            images = _decode_concatenated(
                _numeric_array(archive, f"{split}_jpeg", path), _numeric_array(archive, f"{split}_offsets", path),
                len(labels), f"{path} ({split}_jpeg)"
            )
        else:
            raise ValueError(
                f"{path} has keys {sorted(keys)}, which match no known layout for split {split!r}; expected "
                f"x_{split} (uint8 images (N, H, W) or (N, H, W, C)) and y_{split} (int labels (N,)), or "
                f"the encoded-image layout {split}_jpeg (concatenated image files, uint8), "
                f"{split}_offsets ((N + 1,) byte offsets) and y_{split}"
            )
    return images, labels, str(path)


def _numeric_array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """``archive[key]``; an object array (which would need unpickling) is refused, without numpy's advice."""
    try:
        return archive[key]
    except ValueError as error:
        if advises_unpickling(error):
            raise PickledDataError(pickled_data_message(path, f"array {key!r}")) from None
        raise ValueError(f"{path}: array {key!r} cannot be read ({error})") from None


def _decode_concatenated(buffer: np.ndarray, offsets: np.ndarray, count: int, source: str) -> np.ndarray:
    """Decode images ``buffer[offsets[i]:offsets[i + 1]]`` for i < count into (count, H, W, 3) uint8."""
    Image = import_pil(f"decoding the encoded images of {source}")
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
        if name == "cifar10":
            # torchvision's CIFAR10 unpickles its batches with plain pickle.load: use it to download
            # only, and read the batches with the restricted unpickler above.
            from torchvision.datasets.utils import download_and_extract_archive

            if not (Path(root) / _TORCHVISION[name][1]).is_dir():
                download_and_extract_archive(dataset_class.url, root, filename=dataset_class.filename,
                                             md5=dataset_class.tgz_md5)
            return _load_torchvision_folder(name, Path(root), split, max_images)
        dataset = dataset_class(root=root, train=split == "train", download=True)
    except (OSError, RuntimeError) as error:
        raise DataUnavailableError(
            f"could not download {name!r} into {root} ({error}); when offline, {_LOCAL_DATA_HINT}"
        ) from error
    images = np.asarray(dataset.data)[:max_images]  # MNIST: (N, 28, 28) from its IDX files, no pickle
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


__all__ = ["ARRAY_DATASETS", "DEFAULT_DOWNLOAD_ROOT", "SPLITS", "ArrayDatasetName", "Split", "load_array_dataset"]
