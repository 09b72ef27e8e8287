"""Samples the user holds: a tensor, a numpy array, a torch ``Dataset``, or an ``.npz`` file.

They train through the same loop, checkpoints and exact resume as the built-in data sets:

- ``data.name = "memory"``: samples passed in Python, ``meanflow.train.train(config, folder,
  data=x, labels=y)``;
- ``data.name = "npz"``: an ``.npz`` file at ``data.path`` holding ``x`` (N, ...) and optionally
  ``labels`` (N,), for the command line.

Samples are (N, *sample_shape) with any sample shape the model takes: (N, D) points for the MLP,
(N, C, H, W) images or latents for the DiT and U-Net. Everything is validated once, up front
(floating point, finite, integer labels of the right length, enough samples for a batch), with
a message that says what to change. The samples are held as one float32 CPU tensor; a
``Dataset`` is read once, item by item, when training starts.

A source over such data records a fingerprint (SHA-256 of the samples and labels) in its
position, so resuming a run with other data is refused instead of silently mixing the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..encoders import Encoder, PixelEncoder, PointEncoder
from ..errors import PickledDataError, advises_unpickling, pickled_data_message
from ..fingerprints import state_fingerprint
from ..validation import PathLike
from . import DataInfo
from .sources import TensorBatches


@dataclass(frozen=True)
class InMemoryData:
    """Validated samples: ``x`` (N, *sample_shape) float32 on the CPU, ``labels`` (N,) int64 or None."""

    x: Tensor
    labels: Optional[Tensor] = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def fingerprint(self) -> str:
        """SHA-256 over the shape, dtypes and bytes of the samples and labels."""
        tensors = {"x": self.x} if self.labels is None else {"x": self.x, "labels": self.labels}
        return state_fingerprint(tensors, prefix=repr(tuple(self.x.shape)).encode())


def as_in_memory_data(data: Any, labels: Any = None) -> InMemoryData:
    """Validate and convert what the user passes as ``data=`` (and ``labels=``).

    Args:
        data: a torch Tensor or numpy array (N, *sample_shape) of floating-point samples, or a
            map-style torch ``Dataset`` whose items are ``x`` or ``(x, label)``.
        labels: (N,) integer class labels for a tensor or array (a Dataset's items carry theirs).

    Raises:
        TypeError: ``data`` is none of the accepted kinds.
        ValueError: the samples or labels are not valid (the message names the problem).
    """
    if isinstance(data, (Tensor, np.ndarray)):
        x = _samples_tensor(data, "data")
        return InMemoryData(x, None if labels is None else _labels_tensor(labels, len(x), "labels"))
    if isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError("data= must be a map-style Dataset (with __len__ and __getitem__), not an IterableDataset")
    if isinstance(data, torch.utils.data.Dataset):
        if labels is not None:
            raise ValueError("labels= goes with a tensor or array; a Dataset's items carry their own labels "
                             "as (x, label)")
        return _from_dataset(data)
    raise TypeError(f"data= must be a torch Tensor, a numpy array or a torch Dataset of samples; got "
                    f"{type(data).__name__}")


def _samples_tensor(data: Any, what: str) -> Tensor:
    """(N, ...) floating-point, finite samples -> a float32 CPU tensor (no copy when already one)."""
    if isinstance(data, np.ndarray):
        if not np.issubdtype(data.dtype, np.floating):
            raise ValueError(_not_float_message(what, data.dtype))
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not data.is_floating_point():
        raise ValueError(_not_float_message(what, data.dtype))
    if data.dim() < 2:
        raise ValueError(f"{what} must be (N, *sample_shape) with at least one dimension per sample, got shape "
                         f"{tuple(data.shape)}; reshape scalars to (N, 1)")
    if len(data) == 0:
        raise ValueError(f"{what} holds no samples (shape {tuple(data.shape)})")
    x = data.detach().to(device="cpu", dtype=torch.float32).contiguous()
    finite = torch.isfinite(x).flatten(1).all(dim=1)  # (N,)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise ValueError(f"{what} holds non-finite values (NaN or inf) in {len(bad)} of {len(x)} samples, the first "
                         f"at index {int(bad[0])}; remove or repair them before training")
    return x


def _not_float_message(what: str, dtype: Any) -> str:
    return (f"{what} must hold floating-point samples, got {dtype}; convert them, e.g. uint8 images with "
            "x.float() / 127.5 - 1 to the range [-1, 1] the image models expect")


def _labels_tensor(labels: Any, count: int, what: str) -> Tensor:
    """(N,) integer labels >= 0 -> an int64 CPU tensor."""
    array = labels.detach().cpu() if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if array.dtype == torch.bool or array.is_floating_point() or array.is_complex():
        raise ValueError(f"{what} must be integer class ids 0..C-1, got {array.dtype}")
    if array.shape != (count,):
        raise ValueError(f"{what} must have shape ({count},), one per sample, got {tuple(array.shape)}")
    array = array.to(torch.int64).contiguous()
    if bool((array < 0).any()):
        raise ValueError(f"{what} must be class ids >= 0, found {int(array.min())}")
    return array


def _from_dataset(dataset: torch.utils.data.Dataset) -> InMemoryData:
    """Read every item (``x`` or ``(x, label)``) of a map-style Dataset into one tensor."""
    try:
        count = len(dataset)
    except TypeError:
        raise TypeError("data= Dataset must have a length (__len__)") from None
    if count == 0:
        raise ValueError("data= Dataset is empty")
    first_x, first_label = _split_item(dataset[0], 0)
    shape = tuple(_samples_tensor(_as_tensor(first_x)[None], "the Dataset's item 0").shape[1:])
    x = torch.empty((count, *shape), dtype=torch.float32)
    labels = None if first_label is None else torch.empty(count, dtype=torch.int64)
    for index in range(count):
        item_x, item_label = (first_x, first_label) if index == 0 else _split_item(dataset[index], index)
        sample = _as_tensor(item_x)
        if tuple(sample.shape) != shape:
            raise ValueError(f"the Dataset's item {index} has shape {tuple(sample.shape)}, item 0 has {shape}: "
                             "every sample must have the same shape")
        if not sample.is_floating_point():
            raise ValueError(_not_float_message(f"the Dataset's item {index}", sample.dtype))
        x[index] = sample
        if (item_label is None) != (labels is None):
            raise ValueError(f"the Dataset's item {index} {'lacks' if item_label is None else 'has'} a label "
                             "unlike item 0: every item must be x, or every item (x, label)")
        if labels is not None:
            labels[index] = _labels_tensor(_as_tensor(item_label).reshape(-1), 1, f"the label of item {index}")[0]
    return InMemoryData(_samples_tensor(x, "the Dataset's samples"), labels)


def _split_item(item: Any, index: int) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ValueError(f"the Dataset's item {index} is a sequence of {len(item)} values; items must be x "
                             "or (x, label)")
        return item[0], item[1]
    return item, None


def _as_tensor(value: Any) -> Tensor:
    return value.detach().cpu() if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))


def load_npz_data(path: PathLike, resolution: Optional[int] = None, class_conditional: bool = True) -> InMemoryData:
    """The samples of an ``.npz`` (``data.name = "npz"``): ``x`` (N, ...) float samples as the
    model takes them, or uint8 images (N, C, H, W) mapped to [-1, 1]; ``labels`` (N,) integers.

    Read with ``allow_pickle=False``: an archive holding Python objects is refused, never run.
    ``resolution`` resizes uint8 images (not float samples); ``class_conditional`` False
    ignores the labels.
    """
    from .transforms import prepare_images

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.path {str(path)!r} is not a file (data.name='npz' reads an .npz archive)")
    x, labels = _read_npz(path)
    if x.dtype == np.uint8:
        x = prepare_images(_channels_first(torch.from_numpy(x), path), resolution)
    elif resolution is not None:
        raise ValueError(f"data.resolution={resolution} resizes uint8 images; {path} holds {x.dtype} samples, "
                         "which are used as they are: set data.resolution=null")
    if class_conditional and labels is None:
        raise ValueError(f"{path} has no 'labels' array; set data.class_conditional=false to train "
                         "unconditionally, or add labels (N,) to the file")
    try:
        return as_in_memory_data(x, labels if class_conditional else None)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _read_npz(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:  # numpy's message for a non-numpy file advises unpickling it: not relayed
        reason = "no numpy arrays; pickled data is never loaded" if "pickle" in str(error) else error
        raise ValueError(f"{path} is not an .npz archive ({reason})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array; data.name='npz' needs an .npz archive with arrays x "
                         "(N, ...) and optionally labels (N,) (numpy.savez)")
    with archive:
        if "x" not in archive.files:
            raise ValueError(f"{path} has no array 'x' (it has {sorted(archive.files)}); data.name='npz' expects x "
                             "(N, ...) float samples or uint8 images (N, C, H, W), and optionally labels (N,)")
        try:
            x = archive["x"]
            labels = archive["labels"] if "labels" in archive.files else None
        except ValueError as error:  # object arrays need pickle, which is refused; numpy's advice is not relayed
            if advises_unpickling(error):
                raise PickledDataError(pickled_data_message(path, "an array")) from None
            raise ValueError(f"{path}: {error}; store numeric arrays only") from None
    return x, labels


def _channels_first(images: Tensor, path: Path) -> Tensor:
    """uint8 (N, C, H, W) with C in {1, 3}, or a clear error (channels-last arrays are common)."""
    if images.dim() == 4 and images.shape[1] in (1, 3):
        return images
    hint = " (it looks channels-last: save x.transpose(0, 3, 1, 2))" if images.dim() == 4 and \
        images.shape[-1] in (1, 3) else ""
    raise ValueError(f"{path}: uint8 images must be (N, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}"
                     f"{hint}")


class MemoryBatches(TensorBatches):
    """:class:`TensorBatches` over :class:`InMemoryData` whose position records the data's
    fingerprint, so that a run resumes only on the data it was trained on."""

    def __init__(self, data: InMemoryData, batch_size: int, seed: int = 0, horizontal_flip: bool = False,
                 rank: int = 0, world_size: int = 1):
        super().__init__(data.x, data.labels, batch_size, seed, horizontal_flip, rank, world_size)
        self.fingerprint = data.fingerprint()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stored = state.get("fingerprint")
        if stored != self.fingerprint:
            raise ValueError(f"this run was trained on other data (fingerprint {str(stored)[:12]}..., the data given "
                             f"now is {self.fingerprint[:12]}...); pass the same data to resume it, or train into a "
                             "new folder")
        super().load_state_dict(state)


def memory_source(data: InMemoryData, config, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                  num_classes: Optional[int] = None) -> tuple[MemoryBatches, DataInfo]:
    """The batch source and data description of validated samples.

    ``config`` is the run's DataConfig (for ``horizontal_flip``). ``num_classes``, when known
    (the model's), bounds the labels: a small data set need not show every class. Otherwise
    the classes are ``0..max(labels)``.
    """
    labels = data.labels
    if labels is not None and num_classes is not None and int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for model.options.num_classes={num_classes}; found "
                         f"{int(labels.max())} (in {int((labels >= num_classes).sum())} of {len(labels)} samples)")
    if labels is not None and num_classes is None:
        num_classes = int(labels.max()) + 1
    source = MemoryBatches(data, batch_size, seed, config.horizontal_flip, rank, world_size)
    info = DataInfo(num_classes if labels is not None else None, _encoder(data.sample_shape))
    return source, info


def _encoder(shape: tuple[int, ...]) -> Encoder:
    """(C, H, W) samples are treated as pixels in [-1, 1]; anything else as points."""
    return PixelEncoder(shape) if len(shape) == 3 else PointEncoder(shape)


def source_from_config(config, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                       num_classes: Optional[int] = None) -> tuple[MemoryBatches, DataInfo]:
    """:func:`meanflow.data.build_source` for ``data.name`` 'npz' (the file at ``data.path``) and
    'memory' (which has nothing to read: its data are passed to ``train``). ``num_classes`` (the
    model's) bounds the file's labels, checked before training."""
    if config.name == "memory":
        raise ValueError("data.name='memory' means samples passed in Python: meanflow.train.train(config, folder, "
                         "data=x, labels=y). To train from the command line, save them with numpy.savez(FILE, x=x, "
                         "labels=y) and set data.name=npz data.path=FILE")
    if not config.path:
        raise ValueError("data.name='npz' needs data.path: an .npz with x (N, ...) samples and optionally labels (N,)")
    data = load_npz_data(config.path, config.resolution, config.class_conditional)
    try:
        return memory_source(data, config, batch_size, seed, rank, world_size, num_classes=num_classes)
    except ValueError as error:
        raise ValueError(f"{config.path}: {error}") from None


__all__ = ["InMemoryData", "MemoryBatches", "as_in_memory_data", "load_npz_data", "memory_source",
           "source_from_config"]
